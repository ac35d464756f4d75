"""Experiment tracking options, and the run's arguments as they may be shown to a tracker or written to disk."""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from redaction import mask_secrets


@dataclass
class TrackingArguments:
    mlfoundry_enable_reporting: bool = field(
        default=False, metadata={"help": "Log params, metrics and the model to a TrueFoundry ML repo."}
    )
    mlfoundry_ml_repo: str | None = field(default=None, metadata={"help": "TrueFoundry ML repo to log the run to."})
    mlfoundry_run_name: str | None = field(
        default=None, metadata={"help": "Run name in the ML repo. Default: TFY_INTERNAL_JOB_RUN_NAME or a timestamp."}
    )
    mlfoundry_checkpoint_artifact_name: str | None = field(
        default=None,
        metadata={"help": "Artifact that checkpoints are uploaded to. Default: derived from the run name."},
    )
    mlfoundry_log_checkpoints: bool = field(
        default=True, metadata={"help": "Upload every saved checkpoint to the ML repo (with reporting enabled)."}
    )
    mlflow_experiment_name: str | None = field(
        default=None,
        metadata={"help": "MLflow experiment (--report_to mlflow). Default: MLFLOW_EXPERIMENT_NAME or llm-finetune."},
    )
    mlflow_run_name: str | None = field(
        default=None,
        metadata={
            "help": "MLflow run name. Default: TFY_INTERNAL_JOB_RUN_NAME or a timestamp. Keep it the same on every "
            "attempt of a job so that --resume_from_checkpoint true can continue from the run's uploaded checkpoint."
        },
    )
    tracker_upload_timeout: float = field(
        default=600,
        metadata={
            "help": "Seconds to wait, all together, for the uploads still pending once the final model is saved "
            "(metrics, checkpoints, the model version); after that the run ends (exit code 0) with a warning "
            "listing what the tracker did not get. Raise it to upload large models over slow links."
        },
    )
    mlflow_log_checkpoints: bool = field(
        default=False,
        metadata={"help": "Upload every saved checkpoint to the MLflow run (with --report_to mlflow)."},
    )


def run_arguments(*argument_groups) -> dict:
    """Every option of the run, as JSON-ready values with secrets masked."""
    merged = {}
    for group in argument_groups:
        values = group.to_dict() if hasattr(group, "to_dict") else dataclasses.asdict(group)
        merged.update(values)
    return mask_secrets(json.loads(json.dumps(merged, default=str)))


def save_run_arguments(output_dir: str, *argument_groups) -> None:
    path = Path(output_dir) / "run_args.json"
    path.write_text(json.dumps(run_arguments(*argument_groups), indent=2, sort_keys=True) + "\n")
