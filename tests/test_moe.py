"""Mixture-of-experts models (transformers 5 fused experts): adapter targets, and LoRA / QLoRA end to end with the
default options, the merged model checked against base + adapter."""

import pytest
import torch
from conftest import FAST, SAMPLE_CHAT, assert_merged_is_base_plus_adapter, run_train
from peft import get_peft_model
from test_numerics import RELATIVE_TOLERANCE, relative_differences, tokenized_batch
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, Qwen3MoeConfig

from model_utils import lora_target_names, peft_config
from options import LoraArguments


def moe_config(architecture: str, tokenizer) -> MixtralConfig | Qwen3MoeConfig:
    shared = {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": False, "initializer_range": 0.1,
        "max_position_embeddings": 1024, "num_experts_per_tok": 2,
    }  # fmt: skip
    if architecture == "mixtral":
        return MixtralConfig(intermediate_size=128, num_local_experts=4, **shared)
    return Qwen3MoeConfig(moe_intermediate_size=64, intermediate_size=128, num_experts=4, head_dim=16, **shared)


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def tiny_moe(request, tiny_llama, tmp_path_factory):
    """A tiny random MoE model of the architecture with the tiny Llama's tokenizer and chat template."""
    output_dir = tmp_path_factory.mktemp("models") / request.param
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(moe_config(request.param, tokenizer)).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def test_auto_targets_attention_and_every_expert_but_not_the_router(tiny_moe):
    model = AutoModelForCausalLM.from_pretrained(tiny_moe)
    adapted = get_peft_model(model, peft_config(LoraArguments(use_lora=True), model))
    assert lora_target_names(adapted) == ["down_proj", "gate_up_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    trained = [name for name, param in adapted.named_parameters() if param.requires_grad]
    assert any(".experts." in name for name in trained)
    assert not any(".gate." in name or "router" in name for name in trained), trained
    assert adapted.peft_config["default"].lora_dropout == 0  # lora.ParamWrapper supports no dropout


@pytest.mark.parametrize("mode", ["lora", "qlora_4bit"])
def test_moe_gradients_after_an_eval_pass_equal_the_dequantized_fp32_reference(tiny_moe, tmp_path, mode):
    """The matrix of test_numerics.py on a MoE model: expert adapters (lora.ParamWrapper) and 4-bit attention."""
    differences = relative_differences(tiny_moe, tmp_path, tokenized_batch(tiny_moe), mode, False, True)
    assert any(".experts." in name for name in differences)
    worst = max(differences, key=differences.get)
    assert differences[worst] <= RELATIVE_TOLERANCE, f"{worst}: relative difference {differences[worst]:.2e}"


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["--use_lora", "--use_qlora"])
def test_moe_trains_with_default_options_and_the_merged_model_loads(tiny_moe, tmp_path, method):
    out = tmp_path / "out"
    result = run_train("--model_id", str(tiny_moe), "--train_data", SAMPLE_CHAT, "--output_dir", str(out), method,
                       "true", *FAST, "--max_steps", "2", "--max_num_samples", "16")  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "Traceback" not in output
    assert "--lora_dropout 0.05 is not applied" in output
    assert ("fused expert weights" in output) == (method == "--use_qlora")
    assert_merged_is_base_plus_adapter(out, tiny_moe)
