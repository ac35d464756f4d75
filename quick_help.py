"""`python train.py --help` without the heavy imports: the help text is kept on disk.

Building the parser imports transformers' TrainingArguments, and with it torch, peft and bitsandbytes (transformers'
trainer_utils imports peft at module level): 6-15 s on a 2-core machine. The text options.build_parser() prints is
stored under a key of everything it is made from (this repository's modules, train.args, the installed libraries,
the Python version, the terminal width, HF_HOME), so a cached text is never stale: the first --help after any of
them changes builds and stores it, every later one reads it. A key is one file name; nothing is ever overwritten.
"""

import hashlib
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from huggingface_hub.constants import HF_HOME

PROJECT_DIR = Path(__file__).resolve().parent
HELP_REQUESTS = (["--help"], ["-h"])
# The distributions whose code makes the option list, its defaults or its help strings.
LIBRARIES = ("transformers", "peft", "accelerate", "torch", "datasets", "huggingface_hub", "bitsandbytes", "deepspeed")
CACHE_ROOT = Path(HF_HOME) / "llm-finetune"  # this tool's caches: prepared data (options.py), help text
HELP_DIR = CACHE_ROOT / "help"
KEPT_TEXTS = 16


def is_plain_help_request(argv: list[str]) -> bool:
    """Only a bare --help is cached: with a config file or other flags the parser itself answers."""
    return argv in HELP_REQUESTS


def help_key() -> str:
    digest = hashlib.sha256()
    for path in sorted(PROJECT_DIR.glob("*.py")) + [PROJECT_DIR / "train.args"]:
        digest.update(path.name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    for name in LIBRARIES:
        digest.update(f"{name}={installed_version(name)}\0".encode())
    # argparse wraps the text to the terminal's width.
    digest.update(f"{sys.version}\0{shutil.get_terminal_size().columns}\0{HF_HOME}".encode())
    return digest.hexdigest()[:24]


def installed_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def cached_help_path() -> Path:
    return HELP_DIR / f"{help_key()}.txt"


def print_cached_help_and_exit(argv: list[str]) -> None:
    """Print the stored help text and exit 0 when argv is a bare --help and the text is stored; else return."""
    if not is_plain_help_request(argv):
        return
    try:
        text = cached_help_path().read_text()
    except OSError:  # not built yet for this key (or an unreadable cache): the parser answers
        return
    sys.stdout.write(text)
    sys.exit(0)


def store_help(text: str) -> None:
    """Keep the parser's text for the next --help, and only the newest KEPT_TEXTS texts (each edit of the code makes a
    new key). A cache that cannot be written only costs speed."""
    path = cached_help_path()
    handle = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
            handle.write(text)
        os.replace(handle.name, path)  # atomic: processes launched together never read half a file
        others = sorted((p for p in path.parent.glob("*.txt") if p != path), key=os.path.getmtime, reverse=True)
        for old in others[KEPT_TEXTS - 1 :]:
            old.unlink(missing_ok=True)
    except OSError:
        if handle is not None:
            Path(handle.name).unlink(missing_ok=True)
