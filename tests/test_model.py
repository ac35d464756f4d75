"""Model building: LoRA target detection, pad token handling, memory limit parsing."""

import pytest
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from launch_env import parse_memory_limit
from model_utils import (
    load_tokenizer,
    lora_target_names,
    parse_target_modules,
    peft_config,
    resize_embeddings_for_tokenizer,
)
from options import LoraArguments, ModelArguments


def auto_targets(model_dir) -> set[str]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return set(lora_target_names(get_peft_model(model, peft_config(LoraArguments(use_lora=True), model))))


def test_auto_targets_every_linear_layer_of_llama_but_the_head(tiny_llama):
    assert auto_targets(tiny_llama) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_auto_targets_gpt2_conv1d_layers_but_not_the_head(tiny_gpt2):
    assert auto_targets(tiny_gpt2) == {"c_attn", "c_proj", "c_fc"}


def test_explicit_target_list_and_bad_value():
    assert parse_target_modules('["q_proj", "v_proj"]') == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="--lora_target_modules"):
        parse_target_modules("q_proj,v_proj")


def test_pad_token_is_added_and_embeddings_grow(tiny_gpt2):
    tokenizer = load_tokenizer(ModelArguments(model_id=str(tiny_gpt2)))
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    before = model.get_input_embeddings().num_embeddings
    resize_embeddings_for_tokenizer(model, tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == before + 1


@pytest.mark.parametrize(("value", "limit"), [("0.5", 0.5), ("1", 1.0), ("20000", 20000.0)])
def test_memory_limit_is_a_fraction_or_mib(value, limit):
    assert parse_memory_limit(value) == limit


@pytest.mark.parametrize("value", ["0", "-1", "half"])
def test_bad_memory_limit_is_refused(value):
    with pytest.raises(ValueError, match="TORCH_PER_PROCESS_MEMORY_LIMIT"):
        parse_memory_limit(value)


def test_the_main_process_merges_without_any_collective_call(tiny_llama, tmp_path, monkeypatch):
    """write_final_model runs on the main process alone after the others finished: a barrier in it would wait for
    ranks that are gone (or, before, kept them waiting up to the 30-minute timeout during a long merge)."""
    import accelerate
    import torch
    from peft import LoraConfig
    from transformers import TrainingArguments

    from model_utils import ADAPTER_SUBDIR, write_final_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(target_modules=["q_proj"]))
    torch.nn.init.normal_(model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    model.save_pretrained(tmp_path / ADAPTER_SUBDIR)

    def collective(*args, **kwargs):
        raise AssertionError("a collective call while the main process merges")

    for target in (torch.distributed, accelerate.PartialState, accelerate.Accelerator):
        name = "barrier" if target is torch.distributed else "wait_for_everyone"
        monkeypatch.setattr(target, name, collective)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    tokenizer = load_tokenizer(ModelArguments(model_id=str(tiny_llama)))
    write_final_model(ModelArguments(model_id=str(tiny_llama)), LoraArguments(use_lora=True), tokenizer, args)
    ids = torch.tensor([[1, 5, 17, 42]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model.eval()(ids).logits, atol=1e-4, rtol=1e-4)
