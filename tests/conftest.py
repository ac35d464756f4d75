"""Shared fixtures: tiny models built locally once per test session, and a runner for the real entry point."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Training runs cache prepared data under $HF_HOME: keep it out of the user's home, fresh for every session.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="llm-finetune-tests-")
sys.path.insert(0, str(REPO))


def launch_command(num_processes: int = 1) -> list[str]:
    """`accelerate launch` for one process, or DDP over `num_processes` CPU processes (gloo)."""
    processes = (
        ["--multi_gpu", "--num_processes", str(num_processes)] if num_processes > 1 else ["--num_processes", "1"]
    )
    return [sys.executable, "-m", "accelerate.commands.launch", "--quiet", *processes, "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train.py")]  # fmt: skip


def build_tiny_model(output_dir: Path, *flags: str) -> Path:
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), "--output_dir", str(output_dir), *flags],
        check=True,
        capture_output=True,
    )
    return output_dir


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama architecture, ChatML template, with a pad token: the quickstart's model."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """GPT-2 architecture (Conv1D layers), Llama-3 style template, no pad token: the 'other model' case."""
    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-gpt2", "--architecture", "gpt2", "--chat_template", "llama3",
        "--no_pad_token",
    )  # fmt: skip


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def run_train(*args: str, num_processes: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch train.py ARGS` in a subprocess, as a user runs it, with train.args defaults applied."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [*launch_command(num_processes), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


def logged_losses(output_dir: Path, key: str = "loss") -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry[key] for entry in state["log_history"] if key in entry]
