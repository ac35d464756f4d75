"""Experiment tracking: MLflow and TrueFoundry behind one small interface.

Only the main process talks to the tracker. It logs curated params (secrets masked) once, metrics at every logging
step, each complete checkpoint as a new version of one checkpoint artifact (uploaded in a background thread, retried,
never fatal), the final model as a model version, and the model card. With `--resume_from_checkpoint true` and no
complete local checkpoint, the newest uploaded checkpoint is downloaded into --output_dir and training resumes from it.
"""

import atexit
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback, TrainingArguments
from transformers.integrations import MLflowCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from checkpoint_utils import COMPLETE_MARKER, checkpoint_dirs, is_complete
from data_mixing import NO_EVAL_DATA
from mlfoundry_utils import run_arguments
from model_utils import ADAPTER_SUBDIR
from packing import is_packed, rows_efficiency
from redaction import mask_secrets

logger = logging.getLogger(__name__)

# Staging areas inside --output_dir (names no checkpoint or model file uses).
UPLOAD_STAGING = ".tracker-uploads"
DOWNLOAD_STAGING = ".tracker-download"
# Tries per upload and the pauses between them; after a call has failed every try, later calls get one try each
# until one succeeds, so a tracker that went away costs training no time.
RETRY_DELAYS = (2.0, 8.0)
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value
SOURCE_COUNTS = ("read", "invalid", "skipped", "kept", "eval", "trained_tokens")
DEFAULT_MLFLOW_EXPERIMENT = "llm-finetune"
# TrainingArguments worth seeing next to a run; the script's own options are always logged.
TRAINING_PARAMS = (
    "output_dir", "run_name", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "per_device_eval_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
    "warmup_steps", "weight_decay", "max_grad_norm", "optim", "seed", "data_seed", "bf16", "fp16", "tf32",
    "gradient_checkpointing", "torch_compile", "auto_find_batch_size", "logging_steps", "eval_strategy",
    "eval_steps", "save_strategy", "save_steps", "save_total_limit", "report_to", "resume_from_checkpoint",
    "use_cpu", "neftune_noise_alpha",
)  # fmt: skip
# Files of --output_dir that are not part of the model version.
NOT_MODEL_FILES = re.compile(
    rf"^({PREFIX_CHECKPOINT_DIR}-\d+|runs|prepared|mlflow\.db|mlartifacts|samples\.jsonl|\..*)$"
)


class TrackingError(Exception):
    """The tracker cannot be used as asked (unreachable at start, package missing); the message says what to do."""


# The interface and its two back ends


class Tracker:
    """One run in a tracker. Every method may raise; callers decide whether that is fatal."""

    name = "tracker"
    run_label = ""
    healthy = True  # False once a call failed every try, until one succeeds
    ended = False
    uploads: "UploadWorker"  # every call after the start goes through it, in order

    def log_params(self, params: dict[str, str]) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_checkpoint(self, checkpoint: Path, step: int) -> None:
        """Upload a complete checkpoint directory as a new version of the checkpoint artifact."""
        raise NotImplementedError

    def download_latest_checkpoint(self, destination: Path) -> Path | None:
        """Download the newest complete checkpoint version under `destination`; return the directory holding its
        files (with the completion marker), or None when the tracker holds none."""
        raise NotImplementedError

    def log_model(self, model_dir: Path, name: str, metadata: dict, step: int) -> None:
        raise NotImplementedError

    def log_file(self, path: Path) -> None:
        raise NotImplementedError

    def end(self, status: str) -> None:
        """status: 'FINISHED' or 'FAILED'."""
        raise NotImplementedError


class MLflowTracker(Tracker):
    name = "MLflow"

    def __init__(self, uri: str, experiment_name: str, run_name: str, resume: bool, local_artifacts: Path | None):
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
        target = f"checkpoints/{PREFIX_CHECKPOINT_DIR}-{step}"
        files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
        for path in [*files, checkpoint / COMPLETE_MARKER]:
            parent = path.parent.relative_to(checkpoint).as_posix()
            self.client.log_artifact(self.run_id, str(path), target if parent == "." else f"{target}/{parent}")

    def download_latest_checkpoint(self, destination):
        found = [
            (int(match.group(1)), info.path)
            for info in self.client.list_artifacts(self.run_id, "checkpoints")
            if info.is_dir and (match := re.search(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)$", info.path))
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

    def __init__(self, ml_repo: str, run_name: str, artifact_name: str):
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


# Starting a run


def sanitize_name(value: str) -> str:
    """TrueFoundry names allow letters, digits and hyphens."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", value).strip("-") or "run"


def default_run_name(given: str | None) -> str:
    """A restarted TrueFoundry job keeps TFY_INTERNAL_JOB_RUN_NAME, so its attempts share one run."""
    if given:
        return given
    job_run = os.environ.get("TFY_INTERNAL_JOB_RUN_NAME")
    return sanitize_name(job_run) if job_run else datetime.now(UTC).strftime("finetune-%Y-%m-%d-%H-%M-%S")


def uses_mlflow(training_args) -> bool:
    return "mlflow" in (training_args.report_to or [])


def tracker_store_in_output_dir(tracking_args, training_args) -> bool:
    """MLflow without MLFLOW_TRACKING_URI keeps its store (mlflow.db, mlartifacts/) in --output_dir."""
    return (
        uses_mlflow(training_args)
        and not tracking_args.mlfoundry_enable_reporting
        and not os.environ.get("MLFLOW_TRACKING_URI")
    )


def tracking_problems(tracking_args, training_args) -> list[str]:
    problems = []
    if tracking_args.tracker_upload_timeout < 0:
        problems.append(f"--tracker_upload_timeout {tracking_args.tracker_upload_timeout:g} must be >= 0 (seconds).")
    if tracking_args.mlfoundry_enable_reporting and not tracking_args.mlfoundry_ml_repo:
        problems.append("--mlfoundry_enable_reporting true needs --mlfoundry_ml_repo <the ML repo to log to>.")
    if tracking_args.mlfoundry_enable_reporting and uses_mlflow(training_args):
        problems.append(
            "--mlfoundry_enable_reporting true and --report_to mlflow: pick one tracker (TrueFoundry ML repos are "
            "the TrueFoundry choice, MLflow the one for everything else)."
        )
    if tracking_args.mlflow_log_checkpoints and not uses_mlflow(training_args):
        problems.append("--mlflow_log_checkpoints true needs --report_to mlflow (add mlflow to the list).")
    if (
        uses_mlflow(training_args)
        and training_args.cleanup_output_dir_on_start
        and not os.environ.get("MLFLOW_TRACKING_URI")
    ):
        problems.append(
            "--cleanup_output_dir_on_start true would delete the local MLflow store in --output_dir while the run "
            "logs to it: set MLFLOW_TRACKING_URI (a server, or sqlite:////elsewhere/mlflow.db) or drop the flag."
        )
    return problems


def tracked_params(model_args, data_args, lora_args, tracking_args, training_args) -> dict[str, str]:
    """The script's options and the training hyperparameters that matter, secrets masked, as strings."""
    params = run_arguments(model_args, data_args, lora_args, tracking_args)
    training = run_arguments(training_args)
    own = {f.name for f in fields(training_args)} - set(TrainingArguments.__dataclass_fields__)
    params.update({k: training[k] for k in sorted(own.union(TRAINING_PARAMS)) if k in training})
    params["world_size"] = training_args.world_size
    return {k: str(v)[:MAX_PARAM_LENGTH] for k, v in sorted(params.items())}


def create_tracker(tracking_args, training_args) -> Tracker | None:
    resume = (training_args.resume_from_checkpoint or "").lower() == "true"
    if tracking_args.mlfoundry_enable_reporting:
        run_name = sanitize_name(default_run_name(tracking_args.mlfoundry_run_name))
        artifact = tracking_args.mlfoundry_checkpoint_artifact_name or f"ckpt-{run_name}"
        return TrueFoundryTracker(tracking_args.mlfoundry_ml_repo, run_name, artifact)
    if uses_mlflow(training_args):
        output_dir = Path(training_args.output_dir).resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{output_dir / 'mlflow.db'}"
        local = None if os.environ.get("MLFLOW_TRACKING_URI") else output_dir / "mlartifacts"
        if local:
            output_dir.mkdir(parents=True, exist_ok=True)
        experiment = tracking_args.mlflow_experiment_name or os.environ.get(
            "MLFLOW_EXPERIMENT_NAME", DEFAULT_MLFLOW_EXPERIMENT
        )
        return MLflowTracker(uri, experiment, default_run_name(tracking_args.mlflow_run_name), resume, local)
    return None


def tracker_location(tracking_args) -> str:
    if tracking_args.mlfoundry_enable_reporting:
        host = os.environ.get("TFY_HOST", "unset")
        return f"TrueFoundry (TFY_HOST={host}, ML repo {tracking_args.mlfoundry_ml_repo})"
    return f"MLflow at {mask_secrets(os.environ.get('MLFLOW_TRACKING_URI', 'a local store under --output_dir'))}"


def start_tracker(model_args, data_args, lora_args, tracking_args, training_args) -> Tracker | None:
    """On the main process, open the run and log the params; None elsewhere or when no tracker is asked for.

    A remote tracker is started right after argument validation, so an unreachable one stops the run before
    anything is loaded; a local store (tracker_store_in_output_dir) once the data is valid and the output dir locked.
    """
    if not PartialState().is_main_process or data_args.prepare_data_only:
        return None
    try:
        tracker = create_tracker(tracking_args, training_args)
        if tracker is None:
            return None
        tracker.log_params(tracked_params(model_args, data_args, lora_args, tracking_args, training_args))
    except TrackingError:
        raise
    except Exception as error:  # the clients raise many types (HTTP, SQL, auth): all mean "cannot track"
        raise TrackingError(
            f"cannot reach the experiment tracker, {tracker_location(tracking_args)}: {mask_secrets(str(error))}. "
            "Check the address and credentials (MLFLOW_TRACKING_URI; for TrueFoundry tfy login or TFY_HOST and "
            "TFY_API_KEY), or train without it (--report_to tensorboard, --mlfoundry_enable_reporting false)."
        ) from None
    logger.info("Tracking to %s: %s.", tracker.name, tracker.run_label)
    tracker.uploads = UploadWorker(tracker, tracking_args.tracker_upload_timeout)
    # A run that stops early (preemption, watchdog, crash) is marked failed; a finished run has ended already.
    atexit.register(finish_run, tracker, "FAILED")
    return tracker


def log_packing_efficiency(tracker: Tracker | None, **splits) -> None:
    """Params train_packing_efficiency / eval_packing_efficiency (real tokens / tokens computed) of the packed
    splits."""
    params = {
        f"{name}_packing_efficiency": f"{rows_efficiency(rows):.4f}" for name, rows in splits.items() if is_packed(rows)
    }
    if tracker is not None and params:
        run_with_retries(tracker, "logging the packing efficiency", lambda: tracker.log_params(params), retry=False)


def finish_run(tracker: Tracker, status: str) -> None:
    """Queue the run's end behind the pending uploads, then wait for all of them within one deadline; a tracker
    that does not answer in time is left behind with a warning naming what it did not get."""
    if tracker.ended:
        return
    tracker.ended = True
    tracker.uploads.submit(f"marking the run {status}", lambda: tracker.end(status), retry=False)
    not_done = tracker.uploads.wait()
    if not_done:
        logger.warning(
            "%s did not answer within --tracker_upload_timeout %.0f s; not done: %s.",
            tracker.name, tracker.uploads.timeout, "; ".join(not_done),
        )  # fmt: skip


def log_data_sources(tracker: Tracker | None, summary: dict[str, list[dict]]) -> None:
    """One param per data source, e.g. data_train_source_0: 'chat.jsonl: read 100, invalid 0, skipped 0, kept 90,
    eval 10, trained_tokens 4321' (see data_utils.source_summary)."""
    params = {
        f"data_{split}_source_{index}": mask_secrets(
            f"{row['label']}: " + ", ".join(f"{key} {row[key]}" for key in SOURCE_COUNTS)
        )[:MAX_PARAM_LENGTH]
        for split, rows in summary.items()
        for index, row in enumerate(rows)
    }
    if tracker is not None and params:
        run_with_retries(tracker, "logging the data sources", lambda: tracker.log_params(params), retry=False)


# Resume from the tracker


def restore_checkpoint_from_tracker(tracker: Tracker | None, training_args) -> None:
    """Main process: with --resume_from_checkpoint true and no complete local checkpoint, download the newest
    uploaded one into --output_dir as checkpoint-N (marker included), where the normal resume finds it."""
    output_dir = Path(training_args.output_dir)
    if tracker is None or (training_args.resume_from_checkpoint or "").lower() != "true":
        return
    if any(is_complete(c) for c in checkpoint_dirs(output_dir)):
        return
    staging = output_dir / DOWNLOAD_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        files = tracker.download_latest_checkpoint(staging)
        if files is None:
            logger.info("%s holds no checkpoint of %s to resume from.", tracker.name, tracker.run_label)
            return
        step = int(json.loads((files / COMPLETE_MARKER).read_text())["global_step"])
        checkpoint = output_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        os.replace(files, checkpoint)
        logger.info("Downloaded %s from %s (%s) to resume from.", checkpoint.name, tracker.name, tracker.run_label)
    except Exception as error:
        raise TrackingError(
            f"could not download the newest checkpoint from {tracker.name} ({tracker.run_label}): "
            f"{mask_secrets(str(error))}. Rerun to try again, or pass --resume_from_checkpoint false to start fresh."
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# Logging during training


@dataclass
class Upload:
    description: str
    call: Callable[[], None]
    retry: bool
    cleanup: Callable[[], None] | None
    done: threading.Event


class UploadWorker:
    """Runs tracker calls in order on one background thread; failures are retried, then logged, never raised.

    The thread is a daemon: a tracker that hangs (a frozen server answers nothing until its timeout) cannot keep the
    process from exiting once wait() has given up on it.
    """

    def __init__(self, tracker: Tracker, timeout: float):
        self.tracker, self.timeout = tracker, timeout
        self.queue: queue.Queue[Upload] = queue.Queue()
        self.pending: list[Upload] = []
        self.thread: threading.Thread | None = None

    def submit(self, description: str, call: Callable[[], None], retry: bool, cleanup: Callable | None = None):
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="tracker", daemon=True)
            self.thread.start()
        upload = Upload(description, call, retry, cleanup, threading.Event())
        self.pending = [u for u in self.pending if not u.done.is_set()] + [upload]
        self.queue.put(upload)

    def _work(self):
        while True:
            upload = self.queue.get()
            try:
                run_with_retries(self.tracker, upload.description, upload.call, upload.retry)
            finally:
                if upload.cleanup:
                    upload.cleanup()
                upload.done.set()

    def wait(self) -> list[str]:
        """Wait for every pending call, all of them within the timeout; return those still not done."""
        pending = [u for u in self.pending if not u.done.is_set()]
        if pending:
            logger.info(
                "Waiting up to %.0f s (--tracker_upload_timeout) for %d pending %s call(s).",
                self.timeout, len(pending), self.tracker.name,
            )  # fmt: skip
        deadline = time.monotonic() + self.timeout
        for upload in pending:
            upload.done.wait(max(0.0, deadline - time.monotonic()))
        return [u.description for u in pending if not u.done.is_set()]


def run_with_retries(tracker: Tracker, description: str, call: Callable[[], None], retry: bool) -> bool:
    """Call, retrying after RETRY_DELAYS when `retry` and the tracker is healthy; log a warning and return False
    when every try failed."""
    delays = RETRY_DELAYS if retry and tracker.healthy else ()
    for attempt in range(len(delays) + 1):
        try:
            call()
            tracker.healthy = True
            return True
        except Exception as error:  # any failure of the tracker is reported, training goes on
            message = mask_secrets(str(error)).splitlines()[0] if str(error) else type(error).__name__
            if attempt == len(delays):
                tracker.healthy = False
                logger.warning("%s: %s failed (%s); training goes on without it.", tracker.name, description, message)
                return False
            logger.info("%s: %s failed (%s); retrying in %.0f s.", tracker.name, description, message, delays[attempt])
            time.sleep(delays[attempt])
    return False


def gpu_memory_metrics(world_size: int) -> dict[str, float]:
    """Allocated / reserved / peak GiB per device this process uses (every visible one for a single process)."""
    if not torch.cuda.is_available():
        return {}
    devices = range(torch.cuda.device_count()) if world_size == 1 else [torch.cuda.current_device()]
    gib = 1024**3
    metrics = {}
    for device in devices:
        metrics[f"gpu{device}_memory_allocated_gib"] = torch.cuda.memory_allocated(device) / gib
        metrics[f"gpu{device}_memory_reserved_gib"] = torch.cuda.memory_reserved(device) / gib
        metrics[f"gpu{device}_memory_peak_gib"] = torch.cuda.max_memory_allocated(device) / gib
    return metrics


class TrackingCallback(TrainerCallback):
    """Metrics at every log, and checkpoint uploads after each checkpoint is marked complete (so it must run after
    CheckpointCompletionCallback). Pending calls are waited for in report_run, once the final model is saved."""

    def __init__(self, tracker: Tracker, log_checkpoints: bool):
        self.tracker, self.log_checkpoints = tracker, log_checkpoints
        self.worker = tracker.uploads
        self.last = None  # (time, input tokens seen, global step) at the previous training log

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = (time.perf_counter(), state.num_input_tokens_seen, state.global_step)
        # Hard links left by a killed attempt would keep deleted checkpoints' disk space.
        shutil.rmtree(Path(args.output_dir) / UPLOAD_STAGING, ignore_errors=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {
            k: float(v) for k, v in (logs or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
        }  # fmt: skip
        if "loss" in metrics and self.last is not None:
            metrics.update(self._throughput(args, state))
        metrics.update(gpu_memory_metrics(args.world_size))
        if metrics:
            step = state.global_step  # read now: the upload thread runs later, when the state has moved on
            self.worker.submit(
                f"logging metrics at step {step}",
                lambda: self.tracker.log_metrics(metrics, step),
                retry=False,
            )

    def _throughput(self, args, state) -> dict[str, float]:
        """Real (non-padding) tokens/s and samples/s since the previous training log."""
        now, tokens, step = time.perf_counter(), state.num_input_tokens_seen, state.global_step
        (then, tokens_then, step_then), self.last = self.last, (now, tokens, step)
        seconds = now - then
        if seconds <= 0:
            return {}
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        rates = {"samples_per_second": (step - step_then) * batch / seconds}
        if args.include_num_input_tokens_seen != "no":
            rates["tokens_per_second"] = (tokens - tokens_then) / seconds
        return rates

    def on_save(self, args, state, control, **kwargs):
        if not self.log_checkpoints:
            return
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not is_complete(checkpoint):
            logger.warning("%s is not marked complete; it is not uploaded.", checkpoint)
            return
        # Hard links keep the files while the upload runs, even if checkpoint rotation deletes the directory.
        staged = Path(args.output_dir) / UPLOAD_STAGING / checkpoint.name
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(checkpoint, staged, copy_function=link_or_copy)
        step = state.global_step
        self.worker.submit(
            f"uploading {checkpoint.name}",
            lambda: self.tracker.log_checkpoint(staged, step),
            retry=True,
            cleanup=lambda: shutil.rmtree(staged, ignore_errors=True),
        )


def link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def attach_tracker(trainer, tracker: Tracker | None, tracking_args) -> None:
    """Replace transformers' MLflowCallback (it would log everything a second time) by the tracking callback, added
    last so that it runs after the checkpoint is marked complete."""
    trainer.remove_callback(MLflowCallback)
    if tracker is not None:
        log_checkpoints = (
            tracking_args.mlfoundry_log_checkpoints
            if isinstance(tracker, TrueFoundryTracker)
            else tracking_args.mlflow_log_checkpoints
        )
        trainer.add_callback(TrackingCallback(tracker, log_checkpoints))


# After training: model card, training curves, model version


def method_name(lora_args) -> str:
    if lora_args.use_qlora:
        return f"QLoRA ({lora_args.qlora_bit_length}-bit, r={lora_args.lora_r}, alpha={lora_args.lora_alpha})"
    if lora_args.use_lora:
        return f"LoRA (r={lora_args.lora_r}, alpha={lora_args.lora_alpha})"
    return "full fine-tune"


def final_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last value of each headline metric in the Trainer's log history."""
    wanted = (
        "loss",
        "eval_loss",
        "eval_accuracy",
        "train_loss",
        "train_runtime",
        "train_tokens_per_second",
        "epoch",
        "step",
    )
    found = {}
    for entry in log_history:
        found.update({k: entry[k] for k in wanted if k in entry})
    return found


def run_summary(argument_groups, log_history, train_dataset, eval_dataset) -> dict:
    model_args, data_args, lora_args, training_args = argument_groups

    def data_summary(dataset):
        if dataset is None:
            return {"samples": 0, "trained_tokens": 0}
        trained = sum(dataset["num_trained"]) if "num_trained" in dataset.column_names else None
        return {"samples": len(dataset), "trained_tokens": trained}

    training = run_arguments(training_args)  # secrets masked
    skipped = ("output_dir", "report_to", "resume_from_checkpoint", "run_name")
    eval_data = data_args.eval_data
    if eval_data == NO_EVAL_DATA:
        eval_data = f"--eval_size {data_args.eval_size:g} of the train data"
    return {
        "base_model": mask_secrets(model_args.model_id),
        "method": method_name(lora_args),
        "merged": lora_args.use_peft and lora_args.merge_adapters,
        "data": {
            "train_data": mask_secrets(data_args.train_data),
            "eval_data": mask_secrets(eval_data),
            "train": data_summary(train_dataset),
            "eval": data_summary(eval_dataset),
        },
        "hyperparameters": {
            k: training[k] for k in TRAINING_PARAMS if k not in skipped and training.get(k) is not None
        },
        "final_metrics": final_metrics(log_history),
    }


def write_model_card(output_dir: Path, summary: dict, curves: str = "training_curves.png") -> Path:
    data, metrics = summary["data"], summary["final_metrics"]
    lines = [
        "---",
        f"base_model: {summary['base_model']}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [llm-finetune]",
        "---",
        "",
        f"# Fine-tuned {Path(summary['base_model']).name}",
        "",
        f"- **Base model:** `{summary['base_model']}`",
        f"- **Method:** {summary['method']}" + (", adapter merged into the base" if summary["merged"] else ""),
        f"- **Training data:** `{data['train_data']}`: {data['train']['samples']} samples, "
        f"{data['train']['trained_tokens']} trained tokens",
        f"- **Evaluation data:** `{data['eval_data']}`: {data['eval']['samples']} samples",
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()),
        "",
        "## Hyperparameters",
        "",
        "| option | value |",
        "|---|---|",
        *(f"| {k} | `{v}` |" for k, v in summary["hyperparameters"].items()),
        "",
        f"![training curves]({curves})",
        "",
    ]
    path = output_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


def write_training_curves(output_dir: Path, log_history: list[dict]) -> Path:
    """Train/eval loss, learning rate and tokens/s against step, from the Trainer's log history."""
    from matplotlib.figure import Figure  # no pyplot: no GUI back end, safe without a display

    def series(key):
        points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        return [p[0] for p in points], [p[1] for p in points]

    figure = Figure(figsize=(12, 3.6), layout="constrained")
    loss, rate, speed = figure.subplots(1, 3)
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        steps, values = series(key)
        if steps:
            loss.plot(steps, values, marker="o" if len(steps) < 30 else None, label=label)
    loss.set(title="loss", xlabel="step")
    loss.legend()
    rate.plot(*series("learning_rate"))
    rate.set(title="learning rate", xlabel="step")
    speed.plot(*series("train_tokens_per_second"))
    speed.set(title="real tokens/s (running mean)", xlabel="step")
    path = output_dir / "training_curves.png"
    figure.savefig(path, dpi=100)
    return path


def stage_model_files(output_dir: Path) -> Path:
    """Hard-link the model's files (not checkpoints, logs or tracker stores) into a directory to upload."""
    staged = output_dir / UPLOAD_STAGING / "model"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    for entry in output_dir.iterdir():
        if NOT_MODEL_FILES.match(entry.name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, staged / entry.name, copy_function=link_or_copy)
        else:
            link_or_copy(str(entry), str(staged / entry.name))
    return staged


def report_run(tracker, trainer, argument_groups, train_dataset, eval_dataset) -> None:
    """Main process, after the model is saved: model card and curves, then the model version, files and run end,
    queued behind the pending uploads, all of them within --tracker_upload_timeout."""
    output_dir = Path(trainer.args.output_dir)
    log_history = trainer.state.log_history
    summary = run_summary(argument_groups, log_history, train_dataset, eval_dataset)
    files = [write_model_card(output_dir, summary), write_training_curves(output_dir, log_history)]
    if (output_dir / ADAPTER_SUBDIR).is_dir():  # replaces PEFT's empty template beside the adapter
        write_model_card(output_dir / ADAPTER_SUBDIR, summary, curves="../training_curves.png")
    logger.info("Model card and training curves written to %s.", output_dir)
    if tracker is None:
        return
    if (output_dir / "samples.jsonl").is_file():
        files.append(output_dir / "samples.jsonl")
    staged = stage_model_files(output_dir)
    metadata = {
        "base_model": summary["base_model"], "method": summary["method"], "merged": summary["merged"],
        "train_samples": summary["data"]["train"]["samples"], "eval_samples": summary["data"]["eval"]["samples"],
        "train_data": summary["data"]["train_data"], "pipeline_tag": "text-generation",
        **{f"final_{k}": v for k, v in summary["final_metrics"].items()},
    }  # fmt: skip
    name = sanitize_name(f"finetuned-{Path(summary['base_model']).name}")
    step = trainer.state.global_step
    tracker.uploads.submit("logging the model", lambda: tracker.log_model(staged, name, metadata, step), retry=True)
    for path in files:
        tracker.uploads.submit(f"uploading {path.name}", lambda path=path: tracker.log_file(path), retry=True)
    try:
        finish_run(tracker, "FINISHED")
    finally:
        shutil.rmtree(output_dir / UPLOAD_STAGING, ignore_errors=True)
