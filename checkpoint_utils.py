"""Output directory safety and checkpoint resolution."""

import logging
import shutil
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)

# Written into every output dir this script creates; --cleanup_output_dir_on_start deletes only such dirs.
OUTPUT_DIR_MARKER = ".finetune_output_dir"


class OutputDirError(Exception):
    """The output directory cannot be used as asked; the message says why and what to do."""


def resolve_resume_checkpoint(value: str | None, output_dir: str) -> str | None:
    """--resume_from_checkpoint: 'true' (newest checkpoint in --output_dir, if any), 'false'/unset, or a path."""
    if value is None or value.lower() in ("false", ""):
        return None
    if value.lower() == "true":
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None:
            logger.info("--resume_from_checkpoint true: no checkpoint in %s, starting fresh.", output_dir)
        else:
            logger.info("Resuming from %s.", last)
        return last
    if not Path(value).is_dir():
        raise OutputDirError(f"--resume_from_checkpoint {value}: no such checkpoint directory.")
    return value


def refusal_to_delete(path: Path) -> str | None:
    """Why --cleanup_output_dir_on_start must not delete `path`, or None when it is safe."""
    resolved = path.resolve()
    protected = {Path("/"), Path.home().resolve(), Path(__file__).resolve().parent}
    if resolved in protected:
        return f"{path} is the filesystem root, the home directory or the repository"
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        return f"{path} is the current directory or one of its parents"
    if resolved.is_dir() and any(resolved.iterdir()) and not (resolved / OUTPUT_DIR_MARKER).exists():
        return f"{path} is not empty and was not created by this script (no {OUTPUT_DIR_MARKER} marker)"
    return None


def cleanup_output_dir(output_dir: str) -> None:
    path = Path(output_dir)
    if not path.exists():
        return
    reason = refusal_to_delete(path)
    if reason:
        raise OutputDirError(f"--cleanup_output_dir_on_start refused: {reason}. Nothing was deleted.")
    logger.warning("--cleanup_output_dir_on_start: deleting %s.", path)
    shutil.rmtree(path)


def mark_output_dir(output_dir: str) -> None:
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / OUTPUT_DIR_MARKER).touch()
