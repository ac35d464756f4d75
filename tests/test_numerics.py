"""Gradients in every training mode against an independent reference: the same model holding the dequantized weights
in fp32, with the same adapter weights, trained without activation checkpointing and without an evaluation pass."""

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16
from conftest import FAST, SAMPLE_CHAT, SAMPLE_CHAT_EVAL, logged_losses, train_ok
from peft import get_peft_model, prepare_model_for_kbit_training
from peft.utils.other import fsdp_auto_wrap_policy
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, TrainingArguments, set_seed

from memory_estimate import model_shape
from model_utils import load_model, peft_config, quantization_config
from options import LoraArguments, ModelArguments

# Dropout 0: a dropout mask is drawn from the RNG, which the reference model does not consume in the same order.
ADAPTER = {"lora_r": 4, "lora_dropout": 0.0}
MODES = {
    "full": LoraArguments(),
    "lora": LoraArguments(use_lora=True, **ADAPTER),
    "qlora_4bit": LoraArguments(use_qlora=True, qlora_bit_length=4, **ADAPTER),
    "qlora_8bit": LoraArguments(use_qlora=True, qlora_bit_length=8, **ADAPTER),
    "dora": LoraArguments(use_lora=True, use_dora=True, **ADAPTER),
}
# Both sides run the same fp32 operations on the same weights; only the kernels' summation order may differ
# (bitsandbytes scales the 8-bit rows in another order than the reference, checkpointing recomputes). A sum of
# n ~ 100 fp32 terms is exact to about n * 1.2e-7 of its largest term, so 1e-5 of each gradient's largest entry
# bounds rounding, while the bug it guards against gives a relative difference of about 1.
RELATIVE_TOLERANCE = 1e-5
TEXTS = ["The teacher reads a long letter in the garden.", "A small dog finds the blue door!"]


def tokenized_batch(model_dir) -> dict:
    encoded = AutoTokenizer.from_pretrained(model_dir)(TEXTS, padding=True, return_tensors="pt")
    labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
    return {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask, "labels": labels}


@pytest.fixture(scope="module")
def batch(tiny_llama) -> dict:
    return tokenized_batch(tiny_llama)


def training_args(tmp_path, checkpointing: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", activation_checkpointing=checkpointing
    )


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight a quantized layer computes with in training, in fp32 (bitsandbytes' own formula)."""
    if isinstance(module, bnb.nn.Linear4bit):
        return dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    codes = module.weight.CB if module.weight.CB is not None else module.state.CB
    scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
    return codes.float().mul_(scales.unsqueeze(1).mul(1.0 / 127.0))


def reference_model(model_dir, model: PreTrainedModel, lora_args: LoraArguments) -> PreTrainedModel:
    """An fp32 copy of `model` built independently: plain layers holding the dequantized weights, the same adapter."""
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if not lora_args.use_peft:
        return reference
    layers = dict(reference.named_modules())
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
            layers[name.removesuffix(".base_layer")].weight.data = dequantized_weight(module)
    return get_peft_model(reference, peft_config(lora_args, reference))


def randomize_adapters(*models: PreTrainedModel) -> None:
    """The same random adapter weights in every model. PEFT starts B at zero, which would make A's gradient zero and
    hide any error in the gradient flowing back through the frozen layers."""
    generator = torch.Generator().manual_seed(1)
    state = {name: torch.randn(value.shape, generator=generator) * 0.1
             for name, value in models[0].state_dict().items() if "lora_" in name}  # fmt: skip
    for model in models:
        assert not model.load_state_dict(state, strict=False).unexpected_keys


def gradients(model: PreTrainedModel, batch: dict, args: TrainingArguments, eval_first: bool) -> dict:
    """One training step's gradients, with checkpointing enabled as the Trainer does and an optional eval pass first
    (what --eval_on_start or an evaluation between steps does)."""
    if args.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=args.activation_checkpointing_kwargs)
    if eval_first:
        model.eval()
        with torch.no_grad():
            model(**batch)
    model.train()
    model(**batch).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def relative_differences(model_dir, tmp_path, batch, mode, checkpointing, eval_first) -> dict[str, float]:
    lora_args = MODES[mode]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    set_seed(0)
    model = load_model(ModelArguments(str(model_dir)), lora_args, training_args(tmp_path, checkpointing), tokenizer)
    reference = reference_model(model_dir, model, lora_args)
    if lora_args.use_peft:
        randomize_adapters(model, reference)
    expected = gradients(reference, batch, training_args(tmp_path, False), eval_first=False)
    actual = gradients(model, batch, training_args(tmp_path, checkpointing), eval_first)
    assert actual.keys() == expected.keys() and expected
    return {name: ((actual[name] - expected[name]).abs().max() / expected[name].abs().max()).item()
            for name in expected}  # fmt: skip


@pytest.mark.parametrize("eval_first", [False, True], ids=["no_eval", "eval_before_step"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_checkpointing", "checkpointing"])
@pytest.mark.parametrize("mode", MODES)
def test_gradients_equal_the_dequantized_fp32_reference(tiny_llama, tmp_path, batch, mode, checkpointing, eval_first):
    differences = relative_differences(tiny_llama, tmp_path, batch, mode, checkpointing, eval_first)
    worst = max(differences, key=differences.get)
    assert differences[worst] <= RELATIVE_TOLERANCE, f"{worst}: relative difference {differences[worst]:.2e}"


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
def test_negative_control_without_the_fix_an_eval_pass_breaks_qlora_gradients(tiny_llama, tmp_path, batch, monkeypatch):
    """With bitsandbytes' CPU inference repacking left on, the same check fails after an eval pass."""
    monkeypatch.setattr("model_utils.keep_cpu_inference_packing_off", lambda model: None)
    assert max(relative_differences(tiny_llama, tmp_path, batch, "qlora_4bit", False, False).values()) == 0
    assert max(relative_differences(tiny_llama, tmp_path, batch, "qlora_4bit", False, True).values()) > 0.1


# Through train.py

# Dropout 0 here too: every DataLoader iterator draws its seed from the global RNG, so an evaluation shifts the
# dropout masks of the steps after it (different samples of the same training, not different gradients).
RUN = [
    "--train_data", SAMPLE_CHAT, *FAST, "--max_steps", "10", "--per_device_train_batch_size", "4",
    "--max_num_samples", "40", "--learning_rate", "0.005", "--logging_steps", "1", "--merge_adapters", "false",
    "--lora_dropout", "0",
]  # fmt: skip
# Evaluations before the first step and between steps 5 and 6 (RUN, from FAST, evaluates nothing).
EVALUATED = ["--eval_data", SAMPLE_CHAT_EVAL, "--eval_strategy", "steps", "--eval_steps", "5",
             "--eval_on_start", "true"]  # fmt: skip


def write_dequantized_copy(model_dir, output_dir):
    """The model with every quantizable linear replaced by its dequantized NF4 weights, in fp32."""
    args = TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to="none")
    quantized = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization_config(LoraArguments(use_qlora=True), args)
    )
    copy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    layers = dict(copy.named_modules())
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            layers[name].weight.data = dequantized_weight(module)
    copy.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(output_dir)
    return output_dir


def losses_of_run(tmp_path, name: str, *args: str) -> list[float]:
    output_dir = tmp_path / name
    result = train_ok("--output_dir", str(output_dir), *RUN, *args)
    assert "silently incorrect" not in result.stdout + result.stderr
    return logged_losses(output_dir)


@pytest.mark.e2e
def test_qlora_losses_do_not_depend_on_evaluation_and_match_lora_on_the_dequantized_model(tiny_llama, tmp_path):
    model = ["--model_id", str(tiny_llama), "--use_qlora", "true"]
    evaluated = losses_of_run(tmp_path, "evaluated", *model, *EVALUATED)
    plain = losses_of_run(tmp_path, "plain", *model)
    dequantized = write_dequantized_copy(tiny_llama, tmp_path / "dequantized-model")
    lora = losses_of_run(tmp_path, "lora", "--model_id", str(dequantized), "--use_lora", "true")
    assert len(plain) == 10
    torch.testing.assert_close(evaluated, plain, rtol=0, atol=1e-3)
    torch.testing.assert_close(lora, plain, rtol=0, atol=1e-3)


# The QLoRA dtype policy, single device and sharded (FSDP / ZeRO-3)


def fsdp_unit_dtypes(model: PreTrainedModel) -> dict[str, set[torch.dtype]]:
    """The dtypes of the parameters each FSDP unit would flatten together, with the auto-wrap policy the Trainer gives
    FSDP for a PEFT model (transformers update_fsdp_plugin_peft): one unit per decoder layer, one per trainable adapter
    leaf, and the root holding the rest."""
    policy = fsdp_auto_wrap_policy(model)
    units = {name for name, module in model.named_modules() if policy(module=module, recurse=False, nonwrapped_numel=0)}
    dtypes = {}
    for name, param in model.named_parameters():
        unit = max((unit for unit in units if name.startswith(unit + ".")), key=len, default="")
        dtypes.setdefault(unit, set()).add(param.dtype)
    return dtypes


def sharded_bf16_args(tmp_path, monkeypatch) -> TrainingArguments:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp...yaml` sets
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=True)


def test_sharded_qlora_has_one_dtype_per_fsdp_unit(tiny_llama, tmp_path, monkeypatch):
    args = sharded_bf16_args(tmp_path, monkeypatch)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = load_model(ModelArguments(str(tiny_llama)), LoraArguments(use_qlora=True), args, tokenizer)
    dtypes = fsdp_unit_dtypes(model)
    layers = {f"base_model.model.model.layers.{index}" for index in (0, 1)}
    assert {unit for unit in dtypes if "lora_" not in unit} == {"", *layers}
    assert all(len(unit_dtypes) == 1 for unit_dtypes in dtypes.values()), dtypes
    assert dtypes[""] == dtypes["base_model.model.model.layers.0"] == {torch.bfloat16}  # 4-bit storage included
    # Negative control: PEFT's prepare_model_for_kbit_training upcasts the norms beside the bf16-stored 4-bit weights.
    base = AutoModelForCausalLM.from_pretrained(
        tiny_llama, dtype=torch.bfloat16, quantization_config=quantization_config(LoraArguments(use_qlora=True), args)
    )
    upcast = get_peft_model(prepare_model_for_kbit_training(base), peft_config(LoraArguments(use_lora=True), base))
    assert fsdp_unit_dtypes(upcast)["base_model.model.model.layers.0"] == {torch.bfloat16, torch.float32}


def test_single_device_qlora_keeps_norms_and_adapters_in_fp32_and_the_rest_in_bf16(tiny_llama, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = load_model(ModelArguments(str(tiny_llama)), LoraArguments(use_qlora=True), args, tokenizer)
    base = model.base_model.model
    assert {p.dtype for n, p in model.named_parameters() if "norm" in n} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert base.get_input_embeddings().weight.dtype == base.lm_head.weight.dtype == torch.bfloat16
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.uint8  # NF4 in the default storage


@pytest.mark.parametrize("sharded", [False, True], ids=["single_device", "sharded"])
def test_memory_estimate_counts_unquantized_weights_as_loaded(tiny_llama, tmp_path, monkeypatch, sharded):
    args = sharded_bf16_args(tmp_path, monkeypatch) if sharded else TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=True
    )  # fmt: skip
    lora_args = LoraArguments(use_qlora=True)
    model = load_model(ModelArguments(str(tiny_llama)), lora_args, args, AutoTokenizer.from_pretrained(tiny_llama))
    loaded = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                 if "lora_" not in n and p.dtype != torch.uint8 and not n.endswith("base_layer.weight"))  # fmt: skip
    shape = model_shape(model.config, ModelArguments(str(tiny_llama)), lora_args, args)
    assert shape.qlora_unquantized_bytes == loaded
