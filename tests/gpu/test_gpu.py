"""GPU checks on a Llama with Llama-3.2-1B's shape (random weights, built locally): bf16 QLoRA, LoRA and full
fine-tune, SDPA / flash attention, DeepSpeed ZeRO-2 / ZeRO-3 on one GPU. Each prints tokens/s, MFU and the measured
peak memory against the script's estimate. Run with `pytest tests/gpu -s`; skipped without CUDA."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, build_tiny_model, logged_losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Llama-3.2-1B (config.json on the Hub): 1.24B parameters.
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 4096,
            "tie_word_embeddings": True}  # fmt: skip
BATCH, LENGTH, STEPS = 4, 1024, 20
# Dense bf16 peak FLOP/s by GPU name (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
CUDA_CONTEXT_GIB = 1.0  # added by the estimate on GPU; not counted by max_memory_allocated


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = build_tiny_model(tmp_path_factory.mktemp("models") / "llama-1b-shape")
    config = LlamaConfig(**LLAMA_1B, bos_token_id=0, eos_token_id=1, pad_token_id=3)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for path in directory.glob("model*.safetensors"):
        path.unlink()
    model.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    return directory


def launch(engine: str) -> list[str]:
    if engine == "deepspeed":
        return ["--use_deepspeed", "--num_processes", "1"]
    return ["--num_processes", "1"]


def train_and_measure(model_dir, tmp_path, engine: str, *args: str) -> dict:
    out, peak_file = tmp_path / "out", tmp_path / "peak.json"
    env = {**os.environ, "PEAK_MEMORY_FILE": str(peak_file), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", *launch(engine), "--num_machines", "1",
               "--mixed_precision", "bf16", "--dynamo_backend", "no", str(REPO / "tests" / "gpu" / "measure_train.py"),
               "--model_id", str(model_dir), "--train_data", str(REPO / "sample_data" / "chat.jsonl"),
               "--output_dir", str(out), "--bf16", "true", "--max_steps", str(STEPS),
               "--per_device_train_batch_size", str(BATCH), "--max_length", str(LENGTH), "--pad_to_max_length", "true",
               "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no", "--eval_size", "0",
               "--report_to", "none", "--warmup_steps", "0", "--merge_adapters", "false", *args]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    losses = logged_losses(out)
    assert losses[-1] < losses[0], losses
    estimate = float(re.search(r"^\s+total\s+([\d.]+) GiB", result.stdout, re.MULTILINE).group(1))
    state = json.loads((out / "trainer_state.json").read_text())
    runtime = next(entry["train_runtime"] for entry in reversed(state["log_history"]) if "train_runtime" in entry)
    peak = json.loads(peak_file.read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"estimate_gib": estimate, "peak_gib": peak["max_memory_allocated"] / 2**30, "device": peak["device"],
            "tokens_per_second": STEPS * BATCH * LENGTH / runtime}  # fmt: skip


def report(name: str, figures: dict, flops_per_token: float) -> None:
    peak_flops = next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in figures["device"]), None)
    mfu = f"{figures['tokens_per_second'] * flops_per_token / peak_flops:.1%}" if peak_flops else "n/a"
    ratio = figures["peak_gib"] / (figures["estimate_gib"] - CUDA_CONTEXT_GIB)
    print(f"\n{name} on {figures['device']}: {figures['tokens_per_second']:,.0f} tokens/s (padded, {BATCH} x {LENGTH}),"
          f" MFU {mfu}, peak {figures['peak_gib']:.2f} GiB vs estimate {figures['estimate_gib'] - CUDA_CONTEXT_GIB:.2f}"
          f" GiB (+{CUDA_CONTEXT_GIB} GiB context): measured/estimate {ratio:.2f}")  # fmt: skip
    # The estimate decides whether a run may start: it must not be far below what the run takes.
    assert 0.4 < ratio < 1.3, ratio


PARAMETERS = 1.24e9
SETUPS = {
    "qlora-sdpa": ("single", ["--use_qlora", "true", "--gradient_checkpointing", "true"], 4 * PARAMETERS),
    "lora-sdpa": ("single", ["--use_lora", "true"], 4 * PARAMETERS),
    "lora-flash": ("single", ["--use_lora", "true", "--use_flash_attention", "true"], 4 * PARAMETERS),
    "full-sdpa": ("single", ["--gradient_checkpointing", "true"], 6 * PARAMETERS),
    "full-zero2": ("deepspeed", ["--deepspeed", str(REPO / "deepspeed_configs" / "3_ds_z2_config.json")],
                   6 * PARAMETERS),
    "full-zero3": ("deepspeed", ["--deepspeed", str(REPO / "deepspeed_configs" / "5_ds_z3_config.json")],
                   6 * PARAMETERS),
    "qlora-zero3": ("deepspeed", ["--use_qlora", "true", "--deepspeed",
                                  str(REPO / "deepspeed_configs" / "5_ds_z3_config.json")], 4 * PARAMETERS),
}  # fmt: skip


@pytest.mark.parametrize("setup", list(SETUPS))
def test_gpu_setup(setup, llama_1b, tmp_path):
    """MFU counts 6 FLOPs per parameter and token for a full fine-tune and 4 for (Q)LoRA (no weight gradients of the
    frozen base), without the recomputation of gradient checkpointing."""
    engine, args, flops_per_token = SETUPS[setup]
    if setup == "lora-flash":
        pytest.importorskip("flash_attn")
    report(setup, train_and_measure(llama_1b, tmp_path, engine, *args), flops_per_token)
