"""Every launcher in scripts/ passes only flags that train.py accepts (a dry parse of its real command line)."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

import train

LAUNCHERS = ["single_gpu_qlora.sh", "single_gpu_full.sh", "multi_gpu_ddp.sh", "cpu.sh"]


def launcher_train_args(script: str, tmp_path) -> list[str]:
    """Run the launcher with `accelerate` and `python` replaced by stubs that record their arguments."""
    record, bin_dir = tmp_path / "args", tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("accelerate", "python"):
        stub = bin_dir / command
        stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" {command} "$@" > "{record}"\n')
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", str(REPO / "scripts" / script)], check=True, env=env)
    args = record.read_text().split("\0")[:-1]
    # A single process runs train.py directly: `accelerate launch` forwards SIGTERM only with several processes.
    assert args[:2] == ["python", "train.py"] or args[:3] == ["accelerate", "launch", "--multi_gpu"], args
    return args[args.index("train.py") + 1 :]


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_flags_parse(script, tmp_path, monkeypatch):
    # --use_cpu lets TrainingArguments accept --bf16 on this GPU-less machine; it is not part of the launcher.
    args = [*launcher_train_args(script, tmp_path), "--use_cpu", "true"]
    monkeypatch.setattr(sys, "argv", [str(REPO / "train.py"), *args])
    model_args, data_args, *_ = train.parse_args()
    assert model_args.model_id and data_args.train_data
