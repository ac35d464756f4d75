"""Every launcher in scripts/ passes only flags that exist: train.py's through its own parser (a dry parse of the real
command line), and `accelerate launch`'s through accelerate's parser."""

import os
import subprocess
import sys

import pytest
from accelerate.commands.launch import launch_command_parser
from conftest import REPO

import options

SINGLE_PROCESS = ["single_gpu_qlora.sh", "single_gpu_full.sh", "cpu.sh"]
SEVERAL_PROCESSES = ["multi_gpu_ddp.sh", "deepspeed_zero2_qlora.sh", "deepspeed_zero3_full.sh",
                     "deepspeed_zero3_offload.sh", "fsdp.sh", "multi_node.sh"]  # fmt: skip
# What a scheduler sets on each machine of a multi-node job.
MACHINE_ENV = {"MACHINE_RANK": "1", "MAIN_PROCESS_IP": "10.0.0.1"}


def launcher_command(script: str, tmp_path) -> list[str]:
    """Run the launcher with `accelerate` and `python` replaced by stubs that record their arguments."""
    record, bin_dir = tmp_path / "args", tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("accelerate", "python"):
        stub = bin_dir / command
        stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" {command} "$@" > "{record}"\n')
        stub.chmod(0o755)
    env = {**os.environ, **MACHINE_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", str(REPO / "scripts" / script)], check=True, env=env)
    return record.read_text().split("\0")[:-1]


def test_every_launcher_is_tested():
    scripts = {path.name for path in (REPO / "scripts").glob("*.sh")}
    assert scripts - {"quickstart.sh", "setup_venv.sh", "test.sh"} == {*SINGLE_PROCESS, *SEVERAL_PROCESSES}


@pytest.mark.parametrize("script", SINGLE_PROCESS + SEVERAL_PROCESSES)
def test_launcher_flags_parse(script, tmp_path, monkeypatch):
    command = launcher_command(script, tmp_path)
    if script in SINGLE_PROCESS:
        # One process runs train.py directly: `accelerate launch` forwards SIGTERM only with several processes.
        assert command[:2] == ["python", "train.py"], command
    else:
        assert command[:2] == ["accelerate", "launch"], command
        launch_args = launch_command_parser().parse_args(command[2:])
        assert launch_args.training_script == "train.py" and launch_args.num_processes > 1
        if launch_args.config_file:
            assert (REPO / launch_args.config_file).is_file()
    # --use_cpu lets TrainingArguments accept --bf16 on this GPU-less machine; it is not part of the launcher.
    args = [*command[command.index("train.py") + 1 :], "--use_cpu", "true"]
    monkeypatch.chdir(REPO)  # the launchers pass paths relative to the repository (deepspeed_configs/...)
    monkeypatch.setattr(sys, "argv", [str(REPO / "train.py"), *args])
    model_args, data_args, *_, training_args = options.parse_args()
    assert model_args.model_id and data_args.train_data
    if "deepspeed" in script:
        assert training_args.deepspeed and training_args.hf_deepspeed_config.is_zero3() == ("zero3" in script)
