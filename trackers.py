"""Experiment trackers behind one small interface, and the factory that picks the one the options ask for.

To add a tracker: subclass `Tracker` here (how the options choose it, their checks, how it opens a run, and the
seven calls), add it to TRACKERS, and add its options to TrackingArguments (options.py). The rest of the run
(uploads in the background, retries, resume from the tracker, what is logged and when) lives in tracking.py and
serves every tracker.
"""

import logging
import os
import re
import time
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from output_layout import COMPLETE_MARKER, MLFLOW_ARTIFACTS_SUBDIR, MLFLOW_DB, checkpoint_name, checkpoint_step
from redaction import mask_secrets

logger = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value
DEFAULT_MLFLOW_EXPERIMENT = "llm-finetune"


class TrackingError(Exception):
    """The tracker cannot be used as asked (unreachable at start, package missing); the message says what to do."""


class Tracker(ABC):
    """One run in an experiment tracker. Every call may raise; tracking.py retries and decides what is fatal."""

    name: ClassVar[str]
    choice: ClassVar[str]  # the options that pick it, as a user writes them
    run_label = ""
    log_checkpoints = False  # upload every complete checkpoint

    # Choosing and opening (on the class, before any run exists)

    @staticmethod
    @abstractmethod
    def chosen(tracking_args, training_args) -> bool:
        """Whether the options ask for this tracker."""

    @staticmethod
    def option_problems(tracking_args, training_args) -> list[str]:
        """This tracker's options that cannot work, each with its fix (checked whether it is chosen or not)."""
        return []

    @staticmethod
    def stores_in_output_dir(tracking_args, training_args) -> bool:
        """Whether the store is created inside --output_dir (then only once the data is valid)."""
        return False

    @staticmethod
    @abstractmethod
    def location(tracking_args) -> str:
        """Where it logs to, for an error message (no secrets)."""

    @classmethod
    @abstractmethod
    def open(cls, tracking_args, training_args) -> "Tracker":
        """Connect and create (or, for a restarted job, continue) the run."""

    # The run

    @abstractmethod
    def log_params(self, params: dict[str, str]) -> None: ...

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    @abstractmethod
    def log_checkpoint(self, checkpoint: Path, step: int) -> None:
        """Upload a complete checkpoint directory as a new version of the checkpoint artifact."""

    @abstractmethod
    def download_latest_checkpoint(self, destination: Path) -> Path | None:
        """Download the newest complete checkpoint version under `destination`; return the directory holding its
        files (with the completion marker), or None when the tracker holds none."""

    @abstractmethod
    def log_model(self, model_dir: Path, name: str, metadata: dict, step: int) -> None: ...

    @abstractmethod
    def log_file(self, path: Path) -> None: ...

    @abstractmethod
    def end(self, status: str) -> None:
        """status: 'FINISHED' or 'FAILED'."""


class MLflowTracker(Tracker):
    name = "MLflow"
    choice = "--report_to mlflow"

    @staticmethod
    def chosen(tracking_args, training_args):
        return "mlflow" in (training_args.report_to or [])

    @staticmethod
    def option_problems(tracking_args, training_args):
        problems = []
        if tracking_args.mlflow_log_checkpoints and not MLflowTracker.chosen(tracking_args, training_args):
            problems.append("--mlflow_log_checkpoints true needs --report_to mlflow (add mlflow to the list).")
        local_store = MLflowTracker.stores_in_output_dir(tracking_args, training_args)
        if local_store and training_args.cleanup_output_dir_on_start:
            problems.append(
                "--cleanup_output_dir_on_start true would delete the local MLflow store in --output_dir while the run "
                "logs to it: set MLFLOW_TRACKING_URI (a server, or sqlite:////elsewhere/mlflow.db) or drop the flag."
            )
        return problems

    @staticmethod
    def stores_in_output_dir(tracking_args, training_args):
        """Without MLFLOW_TRACKING_URI the store (mlflow.db, mlartifacts/) is kept in --output_dir."""
        return MLflowTracker.chosen(tracking_args, training_args) and not os.environ.get("MLFLOW_TRACKING_URI")

    @staticmethod
    def location(tracking_args):
        return f"MLflow at {mask_secrets(os.environ.get('MLFLOW_TRACKING_URI', 'a local store under --output_dir'))}"

    @classmethod
    def open(cls, tracking_args, training_args):
        output_dir = Path(training_args.output_dir).resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{output_dir / MLFLOW_DB}"
        local = None if os.environ.get("MLFLOW_TRACKING_URI") else output_dir / MLFLOW_ARTIFACTS_SUBDIR
        if local:
            output_dir.mkdir(parents=True, exist_ok=True)
        experiment = tracking_args.mlflow_experiment_name or os.environ.get(
            "MLFLOW_EXPERIMENT_NAME", DEFAULT_MLFLOW_EXPERIMENT
        )
        resume = (training_args.resume_from_checkpoint or "").lower() == "true"
        run_name = default_run_name(tracking_args.mlflow_run_name)
        return cls(uri, experiment, run_name, resume, local, tracking_args.mlflow_log_checkpoints)

    def __init__(
        self, uri: str, experiment_name: str, run_name: str, resume: bool, local_artifacts: Path | None,
        log_checkpoints: bool = False,
    ):  # fmt: skip
        self.log_checkpoints = log_checkpoints
        # The script retries uploads itself; MLflow's own default (7 retries, ~4 minutes per call) would stall the
        # upload thread when the server is gone. A value the user set wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self._param = Param
        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            location = local_artifacts.resolve().as_uri() if local_artifacts else None
            experiment_id = self.client.create_experiment(experiment_name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        self.experiment_id = experiment_id
        previous = self._latest_run(run_name) if resume else None
        if previous is not None:
            self.run_id = previous.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            logger.info("MLflow: continuing run %s (%s).", run_name, self.run_id)
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.run_label = f"run {run_name} ({self.run_id}) in experiment {experiment_name}"

    def _latest_run(self, run_name: str):
        quoted = run_name.replace("'", "\\'")
        runs = self.client.search_runs(
            [self.experiment_id], f"attributes.run_name = '{quoted}'", order_by=["attributes.start_time DESC"],
            max_results=1,
        )  # fmt: skip
        return runs[0] if runs else None

    def log_params(self, params):
        existing = self.client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            logger.warning("MLflow keeps a run's first params; these changed and are not updated: %s", changed)
        new = [self._param(k, v) for k, v in params.items() if k not in existing]
        for start in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=new[start : start + 100])

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_checkpoint(self, checkpoint, step):
        # The marker goes last: a version whose upload broke off has none and is never resumed from.
        target = f"checkpoints/{checkpoint_name(step)}"
        files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
        for path in [*files, checkpoint / COMPLETE_MARKER]:
            parent = path.parent.relative_to(checkpoint).as_posix()
            self.client.log_artifact(self.run_id, str(path), target if parent == "." else f"{target}/{parent}")

    def download_latest_checkpoint(self, destination):
        found = [
            (step, info.path)
            for info in self.client.list_artifacts(self.run_id, "checkpoints")
            if info.is_dir and (step := checkpoint_step(Path(info.path).name)) is not None
        ]
        for _, path in sorted(found, reverse=True):
            names = {Path(f.path).name for f in self.client.list_artifacts(self.run_id, path)}
            if COMPLETE_MARKER not in names:
                logger.warning("MLflow: %s has no %s (upload broke off); trying an older one.", path, COMPLETE_MARKER)
                continue
            return Path(self.client.download_artifacts(self.run_id, path, str(destination)))
        return None

    def log_model(self, model_dir, name, metadata, step):
        from mlflow.entities import LoggedModelStatus
        from mlflow.exceptions import MlflowException

        tags = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in metadata.items()}
        model = self.client.create_logged_model(
            experiment_id=self.experiment_id, name=name, source_run_id=self.run_id, tags=tags,
            model_type="transformers",
        )  # fmt: skip
        self.client.log_model_artifacts(model.model_id, str(model_dir))
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name)
        version = self.client.create_model_version(
            name, source=model.artifact_location, run_id=self.run_id, tags=tags, model_id=model.model_id,
            description=f"Fine-tuned from {metadata.get('base_model')} ({metadata.get('method')}).",
        )  # fmt: skip
        logger.info("MLflow: model %s version %s logged.", name, version.version)

    def log_file(self, path):
        self.client.log_artifact(self.run_id, str(path))

    def end(self, status):
        self.client.set_terminated(self.run_id, status=status)


class TrueFoundryTracker(Tracker):
    """Through the `truefoundry` package's `truefoundry.ml` client (imported only when reporting is enabled)."""

    name = "TrueFoundry"
    choice = "--mlfoundry_enable_reporting true"

    @staticmethod
    def chosen(tracking_args, training_args):
        return tracking_args.mlfoundry_enable_reporting

    @staticmethod
    def option_problems(tracking_args, training_args):
        if tracking_args.mlfoundry_enable_reporting and not tracking_args.mlfoundry_ml_repo:
            return ["--mlfoundry_enable_reporting true needs --mlfoundry_ml_repo <the ML repo to log to>."]
        return []

    @staticmethod
    def location(tracking_args):
        host = os.environ.get("TFY_HOST", "unset")
        return f"TrueFoundry (TFY_HOST={host}, ML repo {tracking_args.mlfoundry_ml_repo})"

    @classmethod
    def open(cls, tracking_args, training_args):
        run_name = sanitize_name(default_run_name(tracking_args.mlfoundry_run_name))
        artifact = tracking_args.mlfoundry_checkpoint_artifact_name or f"ckpt-{run_name}"
        return cls(tracking_args.mlfoundry_ml_repo, run_name, artifact, tracking_args.mlfoundry_log_checkpoints)

    def __init__(self, ml_repo: str, run_name: str, artifact_name: str, log_checkpoints: bool = True):
        self.log_checkpoints = log_checkpoints
        try:
            from truefoundry import ml
        except ImportError:
            raise TrackingError(
                "--mlfoundry_enable_reporting true needs the TrueFoundry client: pip install truefoundry (TrueFoundry "
                "job images include it), then log in (tfy login, or TFY_HOST and TFY_API_KEY)."
            ) from None
        self.ml = ml
        self.ml_repo, self.artifact_name = ml_repo, artifact_name
        self.client = ml.get_client()
        try:
            # A job run restarted on a new machine has the same name: continue its run (names are unique per repo).
            self.run = self.client.get_run_by_name(ml_repo=ml_repo, run_name=run_name)
            logger.info("TrueFoundry: continuing run %s.", run_name)
        except ml.MlFoundryException:
            self.run = self.client.create_run(ml_repo=ml_repo, run_name=run_name)
        self.run_label = f"run {self.run.run_name} in ML repo {ml_repo}"

    def log_params(self, params):
        existing = self.run.get_params()
        new = {k: v for k, v in params.items() if k not in existing}
        if new:
            self.run.log_params(new, flatten_params=False)

    def log_metrics(self, metrics, step):
        self.run.log_metrics(metrics, step=step)

    def log_checkpoint(self, checkpoint, step):
        self.run.log_artifact(
            name=self.artifact_name, artifact_paths=[(str(checkpoint),)], step=step,
            description=f"Checkpoint at step {step} of {self.run_label}", metadata={"global_step": step},
        )  # fmt: skip

    def download_latest_checkpoint(self, destination):
        try:
            versions = self.client.list_artifact_versions(ml_repo=self.ml_repo, name=self.artifact_name)
        except self.ml.MlFoundryException:  # the artifact does not exist yet
            return None
        for version in versions:
            files = Path(version.download(path=str(destination / str(version.version)), overwrite=True))
            if (files / COMPLETE_MARKER).is_file():
                return files
            logger.warning("TrueFoundry: %s has no %s; trying an older version.", version.fqn, COMPLETE_MARKER)
        return None

    def log_model(self, model_dir, name, metadata, step):
        version = self.run.log_model(
            name=name, model_file_or_folder=str(model_dir), framework="transformers", metadata=metadata, step=step,
            description=f"Fine-tuned from {metadata.get('base_model')} ({metadata.get('method')}).",
        )  # fmt: skip
        logger.info("TrueFoundry: model version %s logged.", version.fqn)

    def log_file(self, path):
        self.run.log_artifact(name=sanitize_name(f"{self.run.run_name}-{path.stem}"), artifact_paths=[(str(path),)])

    def end(self, status):
        from truefoundry.ml.enums import RunStatus

        self.run.end(status=RunStatus(status))


# The trackers the options can choose; one at a time.
TRACKERS: tuple[type[Tracker], ...] = (MLflowTracker, TrueFoundryTracker)


def chosen_tracker(tracking_args, training_args) -> type[Tracker] | None:
    """The tracker the options ask for (tracking_problems has refused more than one), or None."""
    return next((tracker for tracker in TRACKERS if tracker.chosen(tracking_args, training_args)), None)


def tracking_problems(tracking_args, training_args) -> list[str]:
    problems = []
    if tracking_args.tracker_upload_timeout < 0:
        problems.append(f"--tracker_upload_timeout {tracking_args.tracker_upload_timeout:g} must be >= 0 (seconds).")
    for tracker in TRACKERS:
        problems += tracker.option_problems(tracking_args, training_args)
    chosen = [tracker for tracker in TRACKERS if tracker.chosen(tracking_args, training_args)]
    if len(chosen) > 1:
        problems.append(
            f"{' and '.join(tracker.choice for tracker in chosen)}: pick one tracker (TrueFoundry ML repos are the "
            "TrueFoundry choice, MLflow the one for everything else)."
        )
    return problems


def sanitize_name(value: str) -> str:
    """TrueFoundry names allow letters, digits and hyphens."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", value).strip("-") or "run"


def default_run_name(given: str | None) -> str:
    """A restarted TrueFoundry job keeps TFY_INTERNAL_JOB_RUN_NAME, so its attempts share one run."""
    if given:
        return given
    job_run = os.environ.get("TFY_INTERNAL_JOB_RUN_NAME")
    return sanitize_name(job_run) if job_run else datetime.now(UTC).strftime("finetune-%Y-%m-%d-%H-%M-%S")
