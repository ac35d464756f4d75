"""The run's tracking, whichever tracker the options chose (trackers.py): what is logged, when, and how a slow or
failing tracker is kept from costing the model.

Only the main process talks to the tracker. It logs curated params (secrets masked) once, metrics at every logging
step, each complete checkpoint as a new version of one checkpoint artifact (uploaded in a background thread, retried,
never fatal), the final model as a model version, and the run's files. With `--resume_from_checkpoint true` and no
complete local checkpoint, the newest uploaded checkpoint is downloaded into --output_dir and training resumes from it.

train.py holds one `Tracking` (start_tracking, after validation) and calls it at each step of the run; without a
tracker, on the other ranks and with --prepare_data_only, every call does nothing.
"""

import atexit
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback, TrainingArguments
from transformers.integrations import MLflowCallback

from checkpoint_utils import checkpoint_dirs, is_complete, lock_output_dir
from output_layout import (
    COMPLETE_MARKER,
    DOWNLOAD_STAGING,
    TRACKED_RUN_FILES,
    UPLOAD_STAGING,
    checkpoint_dir,
    model_entries,
)
from packing import is_packed, rows_efficiency
from redaction import mask_secrets
from reporting import TRAINING_PARAMS, run_arguments
from trackers import MAX_PARAM_LENGTH, Tracker, TrackingError, chosen_tracker, sanitize_name

logger = logging.getLogger(__name__)

# Tries per upload and the pauses between them; after a call has failed every try, later calls get one try each
# until one succeeds, so a tracker that went away costs training no time.
RETRY_DELAYS = (2.0, 8.0)
SOURCE_COUNTS = ("read", "invalid", "skipped", "kept", "eval", "trained_tokens")


def tracked_params(model_args, data_args, lora_args, tracking_args, training_args) -> dict[str, str]:
    """The script's options and the training hyperparameters that matter, secrets masked, as strings."""
    params = run_arguments(model_args, data_args, lora_args, tracking_args)
    training = run_arguments(training_args)
    own = {f.name for f in fields(training_args)} - set(TrainingArguments.__dataclass_fields__)
    params.update({k: training[k] for k in sorted(own.union(TRAINING_PARAMS)) if k in training})
    params["world_size"] = training_args.world_size
    return {k: str(v)[:MAX_PARAM_LENGTH] for k, v in sorted(params.items())}


def data_params(summary: dict[str, list[dict]], splits: dict) -> dict[str, str]:
    """One param per data source, e.g. data_train_source_0: 'chat.jsonl: read 100, invalid 0, skipped 0, kept 90,
    eval 10, trained_tokens 4321' (see data_utils.source_summary), and train_packing_efficiency /
    eval_packing_efficiency (real tokens / tokens computed) of the packed splits."""
    params = {
        f"data_{split}_source_{index}": mask_secrets(
            f"{row['label']}: " + ", ".join(f"{key} {row[key]}" for key in SOURCE_COUNTS)
        )[:MAX_PARAM_LENGTH]
        for split, rows in summary.items()
        for index, row in enumerate(rows)
    }
    params.update({
        f"{name}_packing_efficiency": f"{rows_efficiency(rows):.4f}" for name, rows in splits.items() if is_packed(rows)
    })  # fmt: skip
    return params


def start_tracking(model_args, data_args, lora_args, tracking_args, training_args) -> "Tracking":
    """After validation. A remote tracker is reached now, so an unreachable one stops the run before the data is
    read; a store kept in --output_dir is created once the data is valid (Tracking.log_data)."""
    tracker_class = chosen_tracker(tracking_args, training_args)
    if tracker_class is None or not PartialState().is_main_process or data_args.prepare_data_only:
        return Tracking()
    params = tracked_params(model_args, data_args, lora_args, tracking_args, training_args)
    tracking = Tracking(tracker_class, tracking_args, training_args, params)
    if not tracker_class.stores_in_output_dir(tracking_args, training_args):
        tracking.open()
    return tracking


class Tracking:
    """The main process's link to its tracker, from the start of the run to its end. Without one, does nothing."""

    def __init__(self, tracker_class: type[Tracker] | None = None, tracking_args=None, training_args=None, params=None):
        self.tracker_class, self.params = tracker_class, params
        self.tracking_args, self.training_args = tracking_args, training_args
        self.tracker: Tracker | None = None
        self.uploads: UploadWorker | None = None  # every call after the start goes through it, in order
        self.ended = False

    def open(self) -> None:
        """Open the run and log the options; TrackingError when the tracker cannot be used."""
        try:
            tracker = self.tracker_class.open(self.tracking_args, self.training_args)
            tracker.log_params(self.params)
        except TrackingError:
            raise
        except Exception as error:  # the clients raise many types (HTTP, SQL, auth): all mean "cannot track"
            raise TrackingError(
                f"cannot reach the experiment tracker, {self.tracker_class.location(self.tracking_args)}: "
                f"{mask_secrets(str(error))}. Check the address and credentials (MLFLOW_TRACKING_URI; for TrueFoundry "
                "tfy login or TFY_HOST and TFY_API_KEY), or train without it (--report_to tensorboard, "
                "--mlfoundry_enable_reporting false)."
            ) from None
        logger.info("Tracking to %s: %s.", tracker.name, tracker.run_label)
        self.tracker = tracker
        self.uploads = UploadWorker(tracker.name, self.tracking_args.tracker_upload_timeout)
        # A run that stops early (preemption, watchdog, crash) is marked failed; a finished run has ended already.
        atexit.register(self.end, "FAILED")

    def log_data(self, summary: dict[str, list[dict]], **splits) -> None:
        """Once the data is valid: open a store kept in --output_dir (the dir locked first), then log the data sources
        and the packing efficiency of the packed splits (train=rows, eval=rows)."""
        if self.tracker_class is None:
            return
        if self.tracker is None:
            lock_output_dir(self.training_args.output_dir, create=True)
            self.open()
        params = data_params(summary, splits)
        if params:
            self.uploads.call("logging the data sources", lambda: self.tracker.log_params(params), retry=False)

    def restore_checkpoint(self) -> None:
        """With --resume_from_checkpoint true and no complete local checkpoint, download the newest uploaded one into
        --output_dir as checkpoint-N (marker included), where the normal resume finds it."""
        if self.tracker is None or (self.training_args.resume_from_checkpoint or "").lower() != "true":
            return
        output_dir = Path(self.training_args.output_dir)
        if any(is_complete(c) for c in checkpoint_dirs(output_dir)):
            return
        tracker, staging = self.tracker, output_dir / DOWNLOAD_STAGING
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            files = tracker.download_latest_checkpoint(staging)
            if files is None:
                logger.info("%s holds no checkpoint of %s to resume from.", tracker.name, tracker.run_label)
                return
            step = int(json.loads((files / COMPLETE_MARKER).read_text())["global_step"])
            checkpoint = checkpoint_dir(output_dir, step)
            os.replace(files, checkpoint)
            logger.info("Downloaded %s from %s (%s) to resume from.", checkpoint.name, tracker.name, tracker.run_label)
        except Exception as error:
            raise TrackingError(
                f"could not download the newest checkpoint from {tracker.name} ({tracker.run_label}): "
                f"{mask_secrets(str(error))}. Rerun to try again, or pass --resume_from_checkpoint false to start "
                "fresh."
            ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def attach(self, trainer) -> None:
        """Replace transformers' MLflowCallback (it would log everything a second time) by the tracking callback,
        added last so that it runs after the checkpoint is marked complete."""
        trainer.remove_callback(MLflowCallback)
        if self.tracker is not None:
            trainer.add_callback(TrackingCallback(self.tracker, self.uploads))

    def finish(self, summary: dict, step: int) -> None:
        """Main process, after the model and its card are written: the model version and the run's files, then the
        run's end, queued behind the pending uploads, all of them within --tracker_upload_timeout."""
        if self.tracker is None:
            return
        tracker, output_dir = self.tracker, Path(self.training_args.output_dir)
        staged = stage_model_files(output_dir)
        metadata = {
            "base_model": summary["base_model"], "method": summary["method"], "merged": summary["merged"],
            "train_samples": summary["data"]["train"]["samples"], "eval_samples": summary["data"]["eval"]["samples"],
            "train_data": summary["data"]["train_data"], "pipeline_tag": "text-generation",
            **{f"final_{k}": v for k, v in summary["final_metrics"].items()},
        }  # fmt: skip
        name = sanitize_name(f"finetuned-{Path(summary['base_model']).name}")
        self.uploads.submit("logging the model", lambda: tracker.log_model(staged, name, metadata, step), retry=True)
        for path in [output_dir / name for name in TRACKED_RUN_FILES if (output_dir / name).is_file()]:
            self.uploads.submit(f"uploading {path.name}", lambda path=path: tracker.log_file(path), retry=True)
        try:
            self.end("FINISHED")
        finally:
            shutil.rmtree(output_dir / UPLOAD_STAGING, ignore_errors=True)

    def end(self, status: str) -> None:
        """Queue the run's end behind the pending uploads, then wait for all of them within one deadline; a tracker
        that does not answer in time is left behind with a warning naming what it did not get."""
        if self.tracker is None or self.ended:
            return
        self.ended = True
        self.uploads.submit(f"marking the run {status}", lambda: self.tracker.end(status), retry=False)
        not_done = self.uploads.wait()
        if not_done:
            logger.warning(
                "%s did not answer within --tracker_upload_timeout %.0f s; not done: %s.",
                self.tracker.name, self.uploads.timeout, "; ".join(not_done),
            )  # fmt: skip


def stage_model_files(output_dir: Path) -> Path:
    """Hard-link the model's files (output_layout.model_entries) into a directory to upload."""
    staged = output_dir / UPLOAD_STAGING / "model"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    for entry in model_entries(output_dir):
        if entry.is_dir():
            shutil.copytree(entry, staged / entry.name, copy_function=link_or_copy)
        else:
            link_or_copy(str(entry), str(staged / entry.name))
    return staged


def link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


# Calls in the background


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

    def __init__(self, name: str, timeout: float):
        self.name, self.timeout = name, timeout
        self.healthy = True  # False once a call failed every try, until one succeeds
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
                self.call(upload.description, upload.call, upload.retry)
            finally:
                if upload.cleanup:
                    upload.cleanup()
                upload.done.set()

    def call(self, description: str, call: Callable[[], None], retry: bool) -> bool:
        """Call now, retrying after RETRY_DELAYS when `retry` and the tracker is healthy; log a warning and return
        False when every try failed."""
        delays = RETRY_DELAYS if retry and self.healthy else ()
        for attempt in range(len(delays) + 1):
            try:
                call()
                self.healthy = True
                return True
            except Exception as error:  # any failure of the tracker is reported, training goes on
                message = mask_secrets(str(error)).splitlines()[0] if str(error) else type(error).__name__
                if attempt == len(delays):
                    self.healthy = False
                    logger.warning("%s: %s failed (%s); training goes on without it.", self.name, description, message)
                    return False
                logger.info("%s: %s failed (%s); retrying in %.0f s.", self.name, description, message, delays[attempt])
                time.sleep(delays[attempt])
        return False

    def wait(self) -> list[str]:
        """Wait for every pending call, all of them within the timeout; return those still not done."""
        pending = [u for u in self.pending if not u.done.is_set()]
        if pending:
            logger.info(
                "Waiting up to %.0f s (--tracker_upload_timeout) for %d pending %s call(s).",
                self.timeout, len(pending), self.name,
            )  # fmt: skip
        deadline = time.monotonic() + self.timeout
        for upload in pending:
            upload.done.wait(max(0.0, deadline - time.monotonic()))
        return [u.description for u in pending if not u.done.is_set()]


# During training


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
    CheckpointCompletionCallback). Pending calls are waited for in Tracking.finish, once the final model is saved."""

    def __init__(self, tracker: Tracker, worker: UploadWorker):
        self.tracker, self.worker = tracker, worker
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
        if not self.tracker.log_checkpoints:
            return
        checkpoint = checkpoint_dir(args.output_dir, state.global_step)
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
