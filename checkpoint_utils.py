"""Checkpoints that survive preemption: completion markers, resume resolution, SIGTERM handling, output-dir safety,
and the loss watchdog.

A checkpoint counts only once `checkpoint_complete.json` is in it. The Trainer writes `checkpoint-N/` in place, so a
process killed mid-save leaves a directory that looks like a checkpoint; the marker, written after every file of the
checkpoint is fsynced, is what tells the two apart.
"""

import errno
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from accelerate import PartialState
from transformers import TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

from output_layout import COMPLETE_MARKER, OUTPUT_DIR_LOCK, OUTPUT_DIR_MARKER, checkpoint_dir, checkpoint_step

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent
# 128 + signal number, the shell's convention for "terminated by this signal".
PREEMPTED_EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
WATCHDOG_EXIT_CODE = 3


class OutputDirError(Exception):
    """The output directory cannot be used as asked; the message says why and what to do."""


class DiskFullError(Exception):
    """Saving failed because the disk is full; the message says where and which checkpoint is intact."""


# Checkpoint completeness


def checkpoint_dirs(output_dir: str) -> list[Path]:
    """Every checkpoint-N directory, oldest first."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    found = [(step, p) for p in path.iterdir() if p.is_dir() and (step := checkpoint_step(p.name)) is not None]
    return [p for _, p in sorted(found)]


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).is_file()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_checkpoint_complete(checkpoint: Path, global_step: int) -> None:
    """Flush every file of the checkpoint to disk, then atomically add the completion marker."""
    for root, _, files in os.walk(checkpoint):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))
    temporary = checkpoint / f".{COMPLETE_MARKER}.tmp"
    with open(temporary, "w") as handle:
        json.dump({"global_step": global_step}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, checkpoint / COMPLETE_MARKER)
    fsync_path(checkpoint)


def remove_incomplete_checkpoints(output_dir: str) -> None:
    for checkpoint in checkpoint_dirs(output_dir):
        if not is_complete(checkpoint):
            logger.warning(
                "Removing incomplete checkpoint %s (no %s: the save was interrupted).", checkpoint, COMPLETE_MARKER
            )
            shutil.rmtree(checkpoint)


def remove_intermediate_checkpoints(output_dir: str) -> None:
    for checkpoint in checkpoint_dirs(output_dir):
        shutil.rmtree(checkpoint)
    logger.info("Removed the intermediate checkpoints (--keep_checkpoints false).")


def resolve_resume_checkpoint(value: str | None, output_dir: str) -> str | None:
    """--resume_from_checkpoint: 'true' (the newest complete checkpoint, if any), 'false'/unset, or a path."""
    if value is None or value.lower() in ("false", ""):
        return None
    if value.lower() == "true":
        complete = [c for c in checkpoint_dirs(output_dir) if is_complete(c)]
        if not complete:
            logger.info("--resume_from_checkpoint true: no complete checkpoint in %s, starting fresh.", output_dir)
            return None
        logger.info("Resuming from %s.", complete[-1])
        return str(complete[-1])
    problem = resume_path_problem(value)
    if problem:
        raise OutputDirError(problem)
    return value


def resume_path_problem(value: str | None) -> str | None:
    """Why --resume_from_checkpoint PATH cannot be resumed from, or None ('true', 'false' and unset are no paths)."""
    if value is None or value.lower() in ("true", "false", ""):
        return None
    if not Path(value).is_dir():
        return f"--resume_from_checkpoint {value}: no such checkpoint directory."
    if not is_complete(Path(value)):
        return f"--resume_from_checkpoint {value}: the checkpoint is incomplete (no {COMPLETE_MARKER})."
    return None


class CheckpointCompletionCallback(TrainerCallback):
    """Marks each checkpoint complete once every rank has finished writing it, then keeps the newest
    `save_total_limit` (and the best one), so a complete checkpoint exists at every moment."""

    def __init__(self, save_total_limit: int | None):
        self.save_total_limit = save_total_limit

    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()
        if state.is_world_process_zero:
            checkpoint = checkpoint_dir(args.output_dir, state.global_step)
            mark_checkpoint_complete(checkpoint, state.global_step)
            rotate_checkpoints(args.output_dir, self.save_total_limit, state.best_model_checkpoint)


# Preemption


@contextmanager
def ctrl_c_for_main_process_only():
    """Ctrl-C reaches every process of the terminal's process group. Within this block, forked worker processes
    (tokenizing with --preprocessing_num_workers) ignore it and only this process raises KeyboardInterrupt; its pool
    then terminates the workers, so one line is reported instead of a traceback per worker. The interrupt wins over
    the errors it causes on its way out (datasets' pool raises a TimeoutError while cleaning up)."""
    main_pid, interrupted = os.getpid(), False

    def interrupt_main_only(signum, frame):
        nonlocal interrupted
        if os.getpid() == main_pid:
            interrupted = True
            # The pool's generator, closed while the interrupt unwinds, raises again in its clean-up; Python would
            # print that as "Exception ignored ... Traceback". The process is on its way out: stay quiet.
            sys.unraisablehook = lambda unraisable: None
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt_main_only)
    try:
        yield
    except BaseException:
        if interrupted:
            # Workers started just before the interrupt may not belong to a pool that terminates them yet: stop
            # them here, or they would outlive this process (and keep its output pipe open).
            for child in psutil.Process().children(recursive=True):
                child.terminate()
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


class PreemptionCallback(TrainerCallback):
    """On SIGTERM or SIGINT: finish the current optimizer step, save a complete checkpoint, stop training.

    The handler only records the signal, so a second signal during the save cannot interrupt it.
    """

    def __init__(self):
        self.received: signal.Signals | None = None
        self.checkpoint: Path | None = None
        self._previous_handlers = {}

    def on_train_begin(self, args, state, control, **kwargs):
        for signum in PREEMPTED_EXIT_CODES:
            self._previous_handlers[signum] = signal.signal(signum, self._record_signal)

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)

    def _record_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is None:
            logger.warning("Received %s: saving a checkpoint after the current step.", name)
            self.received = signal.Signals(signum)
        else:
            logger.warning("Received %s again: ignored, the checkpoint is being saved.", name)

    def _any_rank_received(self, args) -> bool:
        """Every rank must stop at the same step, or the collective save would hang."""
        if args.world_size == 1:
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received(args):
            if self.received is None:
                self.received = signal.SIGTERM
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        self.checkpoint = checkpoint_dir(args.output_dir, state.global_step)

    @property
    def exit_code(self) -> int:
        return PREEMPTED_EXIT_CODES[self.received]


# Loss watchdog


class LossWatchdogCallback(TrainerCallback):
    """Stops training on a NaN/inf loss, or a loss above a threshold for `patience` consecutive logging steps.

    The bad step is not saved, so the newest checkpoint is the last good one.
    """

    def __init__(self, threshold: float | None, patience: int):
        self.threshold, self.patience = threshold, patience
        self.strikes = 0
        self.reason: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        if not math.isfinite(loss):
            self.reason = f"the training loss is {loss} at step {state.global_step}"
        elif self.threshold is not None and loss > self.threshold:
            self.strikes += 1
            if self.strikes >= self.patience:
                self.reason = (
                    f"the training loss stayed above --loss_watchdog_threshold {self.threshold} for {self.strikes} "
                    f"logging steps (last: {loss:.4f} at step {state.global_step})"
                )
        else:
            self.strikes = 0
        if self.reason:
            control.should_save = False
            control.should_training_stop = True


# Output directory safety


def refusal_to_delete(path: Path) -> str | None:
    """Why --cleanup_output_dir_on_start must not delete `path`, or None when it is safe."""
    resolved = path.resolve()
    if resolved == Path("/"):
        return f"{path} is the filesystem root"
    if resolved == Path.home().resolve():
        return f"{path} is the home directory"
    if resolved == REPO_ROOT or resolved in REPO_ROOT.parents:
        return f"{path} is the repository root or one of its parents"
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        return f"{path} is the current directory or one of its parents"
    entries = [e for e in resolved.iterdir() if e.name != OUTPUT_DIR_LOCK] if resolved.is_dir() else []
    if entries and not (resolved / OUTPUT_DIR_MARKER).exists():
        return f"{path} is not empty and was not created by this script (no {OUTPUT_DIR_MARKER} marker)"
    if resolved.exists() and not resolved.is_dir():
        return f"{path} is a file, not an output directory"
    return None


def cleanup_output_dir(output_dir: str) -> None:
    path = Path(output_dir)
    if not path.exists():
        return
    reason = refusal_to_delete(path)
    if reason:
        raise OutputDirError(f"--cleanup_output_dir_on_start refused: {reason}. Nothing was deleted.")
    logger.warning("--cleanup_output_dir_on_start: deleting %s.", path)
    for entry in path.iterdir():
        if entry.name == OUTPUT_DIR_LOCK:  # this run holds it: deleting it would let another run in
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    if not any(path.iterdir()):
        path.rmdir()


def mark_output_dir(output_dir: str) -> None:
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / OUTPUT_DIR_MARKER).touch()


# One run per output directory

_held_locks: dict[Path, int] = {}  # output dir -> open file descriptor holding its lock, for the process's life


def lock_output_dir(output_dir: str, create: bool) -> None:
    """Take the output dir's lock for the rest of this process, or raise OutputDirError naming the run holding it.

    With create=False a directory that does not exist yet is left alone (nothing may be created before the data is
    valid); the lock is then taken when the directory is created. Taking a lock already held here does nothing.
    """
    path = Path(output_dir).resolve()
    if path in _held_locks or (not create and not path.is_dir()):
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / OUTPUT_DIR_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise OutputDirError(
            f"--output_dir {output_dir} is in use by another run ({holder}). Wait for it to finish, stop it, or "
            "pass another --output_dir."
        ) from None
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode())
    _held_locks[path] = fd


# A full disk while saving


def is_disk_full(error: BaseException, directory: Path) -> bool:
    """torch.save reports a full disk as 'iostream error' (no errno) and safetensors as text with the OS's message,
    so look for ENOSPC in the exception chain, the OS's text for it, or a disk with no space left."""
    seen = error
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    return shutil.disk_usage(existing).free < 1 << 20


@contextmanager
def explain_disk_full(output_dir: str):
    """Turn a save that failed on a full disk into one message: where, and what is still intact."""
    try:
        yield
    except Exception as error:
        path = Path(output_dir).absolute()
        if not is_disk_full(error, path):
            raise
        complete = [c for c in checkpoint_dirs(output_dir) if is_complete(c)]
        intact = (
            f"The last complete checkpoint, {complete[-1]}, is intact: free space, then rerun with "
            "--resume_from_checkpoint true to continue from it."
            if complete
            else "No complete checkpoint was saved before it: free space and rerun."
        )
        failure = type(error).__name__
        raise DiskFullError(f"the disk holding {path} is full: saving failed ({failure}). {intact}") from None
