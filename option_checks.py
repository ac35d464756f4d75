"""Paths named by the options, checked before anything is loaded or created: an output dir that cannot be written,
a model directory with a broken weights file, a checkpoint to resume from that is not there.

Each check returns the problems as messages naming the flag; train.py reports them all at once (exit code 2).
"""

import json
import os
import struct
from pathlib import Path

from checkpoint_utils import resume_path_problem

SAFETENSORS_HEADER_BYTES = 8  # little-endian u64 length of the JSON header that follows


def path_problems(model_args, training_args) -> list[str]:
    problems = output_dir_problems(training_args.output_dir)
    problems += model_file_problems(model_args.model_id)
    if problem := resume_path_problem(training_args.resume_from_checkpoint):
        problems.append(problem + " Pass a complete checkpoint-N directory, or true to resume from --output_dir.")
    return problems


def output_dir_problems(output_dir: str) -> list[str]:
    """A file in the way, or a directory (or its nearest existing parent) this process cannot write to."""
    path = Path(output_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        return [f"--output_dir {output_dir} is a file; pass a directory (it is created if missing)."]
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):  # access() reports a read-only filesystem as well (EROFS)
        return [f"--output_dir {output_dir}: {existing} is not writable (read-only filesystem or no permission)."]
    return []


def model_file_problems(model_id: str) -> list[str]:
    """A local model directory's .safetensors files, checked from their header: a corrupt or truncated file would
    otherwise fail only once the model loads, after the data is prepared."""
    directory = Path(model_id).expanduser()
    if not directory.is_dir():
        return []
    problems = []
    for path in sorted(directory.glob("*.safetensors")):
        if problem := safetensors_problem(path):
            problems.append(f"--model_id {model_id}: {path.name} {problem}. Download or copy the model again.")
    return problems


def safetensors_problem(path: Path) -> str | None:
    """Why the file is not a complete safetensors file, or None. Reads only the header."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(SAFETENSORS_HEADER_BYTES)
        if len(prefix) < SAFETENSORS_HEADER_BYTES:
            return f"is truncated ({size} bytes)"
        (header_length,) = struct.unpack("<Q", prefix)
        if SAFETENSORS_HEADER_BYTES + header_length > size:
            return f"has a corrupt header (it claims {header_length} bytes of header; the file has {size})"
        try:
            header = json.loads(handle.read(header_length))
            end = max((entry["data_offsets"][1] for k, entry in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            return "has a corrupt header (not the JSON tensor index safetensors writes)"
    expected = SAFETENSORS_HEADER_BYTES + header_length + end
    if size < expected:
        return f"is truncated ({size} of {expected} bytes)"
    return None
