"""The per-device memory estimate, engine detection and engine option checks, on literal configs (no weights)."""

import json

import pytest
import torch
from conftest import REPO, SAMPLE_CHAT, run_train
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

import options
import train
from engine_utils import engine_problems
from launch_env import GIB, Engine, detect_engine, parse_memory_size
from memory_estimate import MemoryLimitError, check_memory_fits, estimate_memory, model_shape
from model_utils import ModelLoadError, peft_config
from options import LoraArguments, ModelArguments

DEEPSPEED_CONFIGS = sorted((REPO / "deepspeed_configs").glob("*.json"))
# Llama-3.1-8B's shape (config.json on the Hub), built on the meta device: no weights are allocated.
LLAMA_8B = LlamaConfig(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=False,
)  # fmt: skip


def training_args(tmp_path, **kwargs) -> options.FinetuneTrainingArguments:
    defaults = {"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True}
    return options.FinetuneTrainingArguments(**{**defaults, **kwargs})


@pytest.mark.parametrize(
    "lora_args",
    [
        LoraArguments(use_lora=True, lora_r=8),
        LoraArguments(use_lora=True, lora_r=8, use_dora=True),
        LoraArguments(use_lora=True, peft_method="ia3"),
        LoraArguments(use_lora=True, lora_r=8, lora_modules_to_save='["embed_tokens", "lm_head"]'),
    ],
    ids=["lora", "dora", "ia3", "modules_to_save"],
)
def test_model_shape_counts_match_the_real_model_and_adapter(tiny_llama, tmp_path, lora_args):
    shape = model_shape(
        AutoModelForCausalLM.from_pretrained(tiny_llama).config, ModelArguments(str(tiny_llama)), lora_args,
        training_args(tmp_path),
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert shape.total == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head)
    assert shape.linear == linear
    assert shape.num_layers == 2 and shape.largest_layer == sum(p.numel() for p in model.model.layers[0].parameters())
    saved = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    assert shape.module_copies == (saved if lora_args.lora_modules_to_save else 0)
    layer_inputs = sum(m.in_features for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    assert shape.lora_inputs_per_layer == (0 if lora_args.peft_method == "ia3" else layer_inputs)
    adapted = get_peft_model(model, peft_config(lora_args, model))
    assert shape.adapter == sum(p.numel() for p in adapted.parameters() if p.requires_grad)


def test_unknown_lora_target_is_refused_before_loading_with_the_real_names(tmp_path):
    lora_args = LoraArguments(use_lora=True, lora_target_modules='["query_key_value"]')
    with pytest.raises(ModelLoadError, match=r'no such module in this llama model.*"down_proj", "gate_proj"'):
        model_shape(LLAMA_8B, ModelArguments("llama"), lora_args, training_args(tmp_path))


@pytest.fixture(scope="module")
def llama_8b_shapes(tmp_path_factory):
    args = training_args(tmp_path_factory.mktemp("out"), bf16=True)  # the dtypes estimate() uses
    return {
        lora: model_shape(LLAMA_8B, ModelArguments("llama"), LoraArguments(use_lora=lora, lora_r=16), args)
        for lora in (False, True)
    }


def test_llama_8b_shape(llama_8b_shapes):
    assert 8.0e9 < llama_8b_shapes[False].total < 8.1e9  # Llama-3.1-8B has 8.03B parameters
    # r=16 on q, k, v, o, gate, up, down of 32 layers: 42M parameters (PEFT reports 41,943,040)
    assert llama_8b_shapes[True].adapter == 41_943_040


def estimate(shape, engine, tmp_path, lora=None, **kwargs):
    kwargs = {"bf16": True, "per_device_train_batch_size": 1, "gradient_checkpointing": True, **kwargs}
    return estimate_memory(shape, engine, lora or LoraArguments(), training_args(tmp_path, **kwargs), 2048, True)


def test_estimates_for_llama_8b_are_in_the_known_range(llama_8b_shapes, tmp_path):
    full = estimate(llama_8b_shapes[False], Engine("single"), tmp_path)
    # bf16 weights + grads + 2 bf16 Adam moments: 8 bytes per parameter, 60 GiB, plus activations
    assert 60 < full.total / GIB < 70
    qlora = estimate(llama_8b_shapes[True], Engine("single"), tmp_path, LoraArguments(use_qlora=True, lora_r=16))
    # QLoRA of an 8B model at 2k tokens is the "fits a 24 GB GPU" case; NF4 weights alone are about 5.5 GiB
    assert 5.5 < qlora.total / GIB < 16
    # NF4 linears (6.98B weights at ~0.52 bytes) plus bf16 embeddings and head (1.05B): about 5.6 GiB
    assert 5.3 < qlora.parts["weights"] / GIB < 5.8


def test_sharding_divides_what_each_stage_partitions(llama_8b_shapes, tmp_path):
    shape = llama_8b_shapes[False]
    single = estimate(shape, Engine("deepspeed", 1, zero_stage=0), tmp_path).parts
    z2 = estimate(shape, Engine("deepspeed", 8, zero_stage=2), tmp_path).parts
    z3 = estimate(shape, Engine("deepspeed", 8, zero_stage=3), tmp_path).parts
    z3_offload = estimate(shape, Engine("deepspeed", 8, 3, offload_optimizer=True, offload_params=True), tmp_path)
    assert z2["weights"] == single["weights"]
    assert z2["gradients (sharded)"] == single["gradients"] / 8
    assert z2["optimizer states (sharded)"] == single["optimizer states"] / 8
    assert z3["weights (sharded)"] == single["weights"] / 8
    assert z3_offload.parts["weights (sharded)"] == z3_offload.parts["optimizer states (sharded)"] == 0
    fsdp = estimate(shape, Engine("fsdp", 8, fsdp_sharding="FULL_SHARD"), tmp_path).parts
    assert fsdp["weights (sharded)"] == z3["weights (sharded)"]
    ddp = estimate(shape, Engine("ddp", 8), tmp_path).parts
    assert ddp["weights"] == single["weights"] and ddp["optimizer states"] < single["optimizer states"]  # no fp32 copy


def test_zero3_qlora_counts_the_whole_model_loaded_on_every_gpu(llama_8b_shapes, tmp_path):
    """transformers loads a quantized model whole on every process under ZeRO-3; DeepSpeed partitions it after."""
    qlora = LoraArguments(use_qlora=True, lora_r=16)
    single = estimate(llama_8b_shapes[True], Engine("single"), tmp_path, qlora).parts["weights"]
    zero3 = estimate(llama_8b_shapes[True], Engine("deepspeed", 8, zero_stage=3), tmp_path, qlora).parts
    assert zero3["weights (loaded whole, then partitioned)"] == single
    assert "gradients (sharded)" in zero3 and "weights (sharded)" not in zero3


def test_checkpointing_and_batch_size_scale_activations(llama_8b_shapes, tmp_path):
    shape, engine = llama_8b_shapes[False], Engine("single")
    plain = estimate(shape, engine, tmp_path, gradient_checkpointing=False).parts["activations"]
    checkpointed = estimate(shape, engine, tmp_path).parts["activations (checkpointed)"]
    assert checkpointed < plain / 5
    one, four = (estimate(shape, engine, tmp_path, per_device_train_batch_size=b).total for b in (1, 4))
    assert four > one
    eight_bit = estimate(shape, engine, tmp_path, optim="adamw_bnb_8bit").parts["optimizer states"]
    assert eight_bit == pytest.approx(estimate(shape, engine, tmp_path).parts["optimizer states"] / 2)


def test_an_estimate_over_the_limit_stops_before_loading(tmp_path):
    args = training_args(tmp_path, bf16=True, per_device_train_batch_size=1)
    model_args = ModelArguments("llama", max_memory_per_device="40GiB")
    with pytest.raises(MemoryLimitError, match=r"exceeds the limit of 40.00 GiB \(--max_memory_per_device\)"):
        check_memory_fits(LLAMA_8B, model_args, LoraArguments(), args, 2048)
    fits = check_memory_fits(LLAMA_8B, model_args, LoraArguments(use_qlora=True), args, 2048)
    assert fits.total < 40 * GIB


@pytest.mark.e2e
def test_memory_limit_stops_the_run_before_the_output_dir(tiny_llama, tmp_path):
    out = tmp_path / "out"
    result = run_train("--model_id", str(tiny_llama), "--train_data", SAMPLE_CHAT,
                       "--output_dir", str(out), "--max_memory_per_device", "1", "--max_length", "128")  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "Estimated peak memory per device (one process; full fine-tune" in output
    assert "exceeds the limit of 1.0 MiB (--max_memory_per_device)" in output and "Traceback" not in output
    assert not out.exists()


@pytest.mark.parametrize(("value", "size"), [("20000", 20000 * 2**20), ("70GiB", 70 * GIB), ("500MB", 500 * 10**6)])
def test_parse_memory_size(value, size):
    assert parse_memory_size(value) == size


def test_parse_memory_size_rejects_garbage():
    with pytest.raises(ValueError, match="--max_memory_per_device 'lots'"):
        parse_memory_size("lots")


@pytest.mark.parametrize("config", DEEPSPEED_CONFIGS, ids=lambda path: path.name)
def test_every_deepspeed_config_is_detected_as_its_name_says(config, tmp_path):
    engine = detect_engine(training_args(tmp_path, deepspeed=str(config)))
    name = config.stem
    assert engine.kind == "deepspeed"
    assert engine.zero_stage == int(name.split("_z")[1][0])
    assert engine.offload_optimizer == ("offload_optimizer" in name)
    assert engine.offload_params == ("offload_param" in name)
    assert "auto" in json.dumps(json.loads(config.read_text())["train_micro_batch_size_per_gpu"])


def test_engine_refusals(tmp_path, monkeypatch):
    zero2, zero3 = (str(REPO / "deepspeed_configs" / name) for name in ("3_ds_z2_config.json", "5_ds_z3_config.json"))
    qlora8 = LoraArguments(use_qlora=True, qlora_bit_length=8)
    assert engine_problems(LoraArguments(), training_args(tmp_path, deepspeed=zero2)) == []
    auto_batch = engine_problems(LoraArguments(), training_args(tmp_path, deepspeed=zero2, auto_find_batch_size=True))
    assert "--auto_find_batch_size is not supported with --deepspeed" in auto_batch[0]
    qlora8_zero3 = engine_problems(qlora8, training_args(tmp_path, deepspeed=zero3))
    assert "--qlora_bit_length 8 cannot be sharded" in qlora8_zero3[0]
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert "drops DeepSpeed silently" in engine_problems(LoraArguments(), training_args(tmp_path, deepspeed=zero2))[0]
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    if not torch.cuda.is_available():
        assert "FSDP needs GPUs" in engine_problems(LoraArguments(), training_args(tmp_path))[0]
    assert detect_engine(training_args(tmp_path)).kind == "fsdp"


def test_auto_find_batch_size_halves_the_batch_on_out_of_memory(tiny_llama, tmp_path):
    """A model that runs out of memory above 2 samples: the Trainer retries with 8, then 4, then trains with 2."""
    from transformers import AutoTokenizer

    from data_utils import load_prepared_datasets
    from options import DataArguments

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    data_args = DataArguments(train_data=SAMPLE_CHAT, max_num_samples=16, eval_size=0,
                              data_cache_dir="none")  # fmt: skip
    train_dataset, _ = load_prepared_datasets(data_args, tokenizer, 128, 42)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    batch_sizes, forward = [], model.forward

    def forward_with_small_memory(input_ids=None, **kwargs):
        batch_sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return forward(input_ids=input_ids, **kwargs)

    model.forward = forward_with_small_memory
    args = training_args(tmp_path, auto_find_batch_size=True, per_device_train_batch_size=8, max_steps=2,
                         save_strategy="no", eval_strategy="no", logging_steps=1)  # fmt: skip
    trainer = train.build_trainer(model, tokenizer, args, data_args, train_dataset, None, None, 128, [])
    trainer.train()
    assert batch_sizes[0] == 8 and 4 in batch_sizes and batch_sizes[-1] == 2
    assert trainer.state.global_step == 2 and trainer._train_batch_size == 2
