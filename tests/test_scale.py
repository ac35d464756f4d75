"""Several processes on CPU (gloo) through the real entry point: DDP, DeepSpeed ZeRO-2 / ZeRO-3 and two "machines"
log the loss of one process on the same global batch; only the main process writes the model."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    FAST,
    REPO,
    RUN_ENV,
    SAMPLE_CHAT,
    assert_ok,
    free_port,
    launch_command,
    logged_losses,
    run_command,
    train_ok,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.e2e
# Full fine-tune in fp32 without dropout: every engine computes the same update, so the losses must agree.
SIX_STEPS = [
    "--train_data", SAMPLE_CHAT, *FAST, "--max_steps", "6", "--max_num_samples", "48", "--logging_steps", "1",
    "--learning_rate", "0.003",
]  # fmt: skip
TWO_PROCESSES = ["--use_cpu", "true", "--per_device_train_batch_size", "2"]


def deepspeed_launch_command() -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--use_deepspeed",
            "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            str(REPO / "train.py")]  # fmt: skip


def run(command: list[str], *args: str) -> subprocess.CompletedProcess:
    return assert_ok(run_command(command, *args))


@pytest.fixture(scope="module")
def single_process_losses(tiny_llama, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("single")
    train_ok("--model_id", str(tiny_llama), "--output_dir", str(out), *SIX_STEPS, "--per_device_train_batch_size", "4")
    return logged_losses(out)


def assert_same_losses(losses: list[float], expected: list[float]) -> None:
    assert len(losses) == len(expected) >= 6, (losses, expected)
    torch.testing.assert_close(losses, expected, rtol=2e-3, atol=0)
    assert losses[-1] < 0.8 * losses[0]  # it trained


def test_ddp_logs_the_single_process_loss_of_the_same_global_batch(tiny_llama, tmp_path, single_process_losses):
    out = tmp_path / "ddp"
    run(launch_command(num_processes=2), "--model_id", str(tiny_llama), "--output_dir", str(out), *SIX_STEPS,
        *TWO_PROCESSES, "--use_ddp", "true")  # fmt: skip
    assert_same_losses(logged_losses(out), single_process_losses)
    assert list(out.glob("*.safetensors")) and (out / "run_args.json").exists()


def test_deepspeed_zero2_full_finetune_matches_one_process(tiny_llama, tmp_path, single_process_losses):
    out = tmp_path / "zero2"
    result = run(deepspeed_launch_command(), "--model_id", str(tiny_llama), "--output_dir", str(out), *SIX_STEPS,
                 *TWO_PROCESSES, "--deepspeed", str(REPO / "deepspeed_configs" / "3_ds_z2_config.json"))  # fmt: skip
    assert "Estimated peak memory per device (DeepSpeed ZeRO-2, 2 processes; full fine-tune" in result.stdout
    assert_same_losses(logged_losses(out), single_process_losses)
    AutoModelForCausalLM.from_pretrained(out)


def test_deepspeed_zero3_qlora_saves_a_trained_adapter_and_a_merged_model(tiny_llama, tmp_path):
    """ZeRO-3 partitions the 4-bit weights (stored as fp32 through bnb_4bit_quant_storage); the saved adapter must
    hold the trained values, not the empty partitions of rank 0."""
    out = tmp_path / "zero3-qlora"
    result = run(deepspeed_launch_command(), "--model_id", str(tiny_llama), "--output_dir", str(out), *SIX_STEPS,
                 *TWO_PROCESSES, "--use_qlora", "true", "--learning_rate", "0.005", "--sample_generations", "2",
                 "--deepspeed", str(REPO / "deepspeed_configs" / "5_ds_z3_config.json"))  # fmt: skip
    assert "DeepSpeed ZeRO-3, 2 processes; QLoRA" in result.stdout
    losses = logged_losses(out)
    assert losses[-1] < 0.8 * losses[0], losses
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and all(tensor.numel() > 0 and tensor.abs().max() > 0 for tensor in lora_b)  # B starts at zero
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(merged.config, "quantization_config", None) is None
    # Generating from partitioned weights needs every rank in each forward pass, not the main process alone.
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(sample["prompt"] and sample["reference"] for sample in samples)


def test_two_machines_train_as_one_run(tiny_llama, tmp_path, single_process_losses):
    """Two `accelerate launch --num_machines 2` on 127.0.0.1, one process each: machine 0 hosts the rendezvous."""
    out, port = tmp_path / "two-machines", free_port()
    env = {**os.environ, **RUN_ENV}

    def machine_command(rank: int) -> list[str]:
        launch = ["--quiet", "--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                  "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no",
                  "--dynamo_backend", "no"]  # fmt: skip
        train = ["--model_id", str(tiny_llama), "--output_dir", str(out), *SIX_STEPS, *TWO_PROCESSES,
                 "--use_ddp", "true"]  # fmt: skip
        return [sys.executable, "-m", "accelerate.commands.launch", *launch, str(REPO / "train.py"), *train]

    machines = [
        subprocess.Popen(
            machine_command(rank), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
        )
        for rank in (0, 1)
    ]
    outputs = [machine.communicate(timeout=600)[0] for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert_same_losses(logged_losses(out), single_process_losses)
    # Each machine's first process prepared (or loaded) the data for its machine; only machine 0 wrote the model.
    assert all("train: 48 samples" in output for output in outputs)
    assert "Fine-tuned model saved" in outputs[0]
