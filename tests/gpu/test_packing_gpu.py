"""Packed attention on a CUDA GPU: PyTorch's varlen flash attention (and flash-attn's, when installed) give a packed
bf16 batch the logits of its samples run alone, and packing beats padding in real tokens/s. Run with
`pytest tests/gpu -s`; skipped without CUDA."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from test_packing import SAMPLE_LENGTHS, flattened_batch, packed_rows_of, split_row, worst_difference
from transformers import AutoModelForCausalLM, LlamaConfig

from attention import VARLEN, register_packed_attention, varlen_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_model(attn_implementation: str, dtype: torch.dtype):
    """A random Llama with grouped-query attention and a head size flash kernels take (64)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype).cuda().eval()


def alone(model, packed) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            model(input_ids=torch.tensor([sample["input_ids"]], device="cuda"), use_cache=False).logits[0].float()
            for row in packed for sample in split_row(row)
        ]  # fmt: skip


@pytest.mark.parametrize("backend", [VARLEN, "flash_attention_2"])
def test_packed_bf16_logits_equal_the_samples_alone(backend):
    """Against the fp32 model run sample by sample: the packed bf16 batch is as close as the same bf16 model run
    sample by sample with SDPA (bf16 rounding only); a single segment without boundaries is far off (control)."""
    if backend == VARLEN and not varlen_available():
        pytest.skip("torch.nn.attention.varlen needs torch >= 2.10")
    if backend == "flash_attention_2":
        pytest.importorskip("flash_attn")
    register_packed_attention()
    packed = packed_rows_of(SAMPLE_LENGTHS)
    reference = alone(cuda_model("sdpa", torch.float32), packed)
    bf16_alone = worst_difference(torch.cat(alone(cuda_model("sdpa", torch.bfloat16), packed)), reference)
    model = cuda_model("sdpa" if backend == VARLEN else backend, torch.bfloat16)
    model.set_attn_implementation(backend)
    batch = {key: value.cuda() if torch.is_tensor(value) else value for key, value in flattened_batch(packed).items()}
    with torch.no_grad():
        packed_logits = model(**batch, use_cache=False).logits[0].float()
        total = batch["input_ids"].shape[1]
        one_segment = torch.tensor([0, total], dtype=torch.int32, device="cuda")
        leaking = model(**{**batch, "cu_seq_lens_q": one_segment, "cu_seq_lens_k": one_segment, "max_length_q": total,
                           "max_length_k": total}, use_cache=False).logits[0].float()  # fmt: skip
    worst = worst_difference(packed_logits, reference)
    print(f"\n{backend} bf16 packed vs fp32 alone: {worst:.3g} (bf16 SDPA alone: {bf16_alone:.3g}); "
          f"without boundaries: {worst_difference(leaking, reference):.3g}")  # fmt: skip
    assert worst <= 2 * bf16_alone + 1e-3
    assert worst_difference(leaking, reference) > 4 * worst


def test_packed_beats_padded_in_real_tokens_per_second(tmp_path):
    """scripts/benchmark.py on this GPU in bf16: padded vs packed per backend; its JSON lines are printed."""
    command = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--num_samples", "800", "--hidden_size",
               "1024", "--num_layers", "8", "--num_heads", "16", "--batch_size", "16", "--extra_args", "--bf16 true",
               "--work_dir", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print("\n" + result.stdout + result.stderr[-2000:])
    runs = {(r["attn_implementation"], r["sample_packing"]): r for r in map(json.loads, result.stdout.splitlines())}
    best_packed = max(r["real_tokens_per_s"] for (_, packing), r in runs.items() if packing)
    assert best_packed > runs["sdpa", False]["real_tokens_per_s"]
