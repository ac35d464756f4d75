"""Every launcher in scripts/ passes only flags that train.py accepts (a dry parse of its real command line)."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

import train

LAUNCHERS = ["single_gpu_qlora.sh", "single_gpu_full.sh", "multi_gpu_ddp.sh", "cpu.sh"]


def launcher_train_args(script: str, tmp_path) -> list[str]:
    """Run the launcher with `accelerate` replaced by a shell function that records its arguments."""
    record = tmp_path / "args"
    fake = f'accelerate() {{ printf "%s\\0" "$@" > "{record}"; }}; export -f accelerate; bash "$0"'
    subprocess.run(["bash", "-c", fake, str(REPO / "scripts" / script)], check=True, env=os.environ.copy())
    args = record.read_text().split("\0")[:-1]
    assert args[0] == "launch", args
    return args[args.index("train.py") + 1 :]


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_flags_parse(script, tmp_path, monkeypatch):
    # --use_cpu lets TrainingArguments accept --bf16 on this GPU-less machine; it is not part of the launcher.
    args = [*launcher_train_args(script, tmp_path), "--use_cpu", "true"]
    monkeypatch.setattr(sys, "argv", [str(REPO / "train.py"), *args])
    model_args, data_args, *_ = train.parse_args()
    assert model_args.model_id and data_args.train_data
