"""The launch environment is read in one place (launch_env.py): the same environment and config give the same answer
to every module that asks, and that answer is the one accelerate, transformers and DeepSpeed reach themselves."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin
from conftest import REPO
from torch.distributed.fsdp import CPUOffloadPolicy
from transformers import LlamaConfig, TrainingArguments
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.utils import strtobool

import launch_env
import model_utils
from engine_utils import engine_problems
from launch_env import (
    GIB,
    MIB,
    apply_memory_limit,
    detect_engine,
    engine_places_weights,
    memory_limit,
    qlora_weight_dtype,
)
from memory_estimate import MemoryLimitError, check_memory_fits, model_shape
from model_utils import quantization_config
from options import LoraArguments, ModelArguments

DEEPSPEED_CONFIGS = sorted((REPO / "deepspeed_configs").glob("*.json"))
TINY = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)  # fmt: skip
QLORA = LoraArguments(use_qlora=True)
QLORA_8BIT = LoraArguments(use_qlora=True, qlora_bit_length=8)
NORM = LlamaRMSNorm(8)
LAUNCH_VARIABLES = (
    "ACCELERATE_USE_FSDP", "ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED", "FSDP_VERSION", "FSDP_SHARDING_STRATEGY",
    "FSDP_RESHARD_AFTER_FORWARD", "FSDP_OFFLOAD_PARAMS", "FSDP_SYNC_MODULE_STATES", "FSDP_CPU_RAM_EFFICIENT_LOADING",
    "TORCH_PER_PROCESS_MEMORY_LIMIT",
)  # fmt: skip


@pytest.fixture(autouse=True)
def clean_launch_environment(monkeypatch):
    """None of these set; each restored afterwards, also when a library sets it during the test (accelerate's FSDP
    plugin writes FSDP_CPU_RAM_EFFICIENT_LOADING)."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def training_args(tmp_path, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=True, **kwargs)


def sharding_answers(args: TrainingArguments) -> dict[str, bool]:
    """Whether each module that asks treats the run as one where the engine shards the weights."""
    return {
        "engine (memory estimate)": detect_engine(args).places_weights,
        "memory estimate description": check_memory_fits(
            TINY, ModelArguments("tiny"), QLORA, args, 64
        ).description.startswith(("FSDP", "DeepSpeed ZeRO-3")),
        "4-bit storage dtype (loading)": quantization_config(QLORA, args).bnb_4bit_quant_storage != torch.uint8,
        "norm dtype (QLoRA policy)": qlora_weight_dtype(NORM, args) != torch.float32,
        "8-bit QLoRA refused": any("--qlora_bit_length 8" in p for p in engine_problems(QLORA_8BIT, args)),
    }


@pytest.mark.parametrize("value", ["true", "True", "1", "yes", "false", "0", None])
def test_every_module_reads_accelerate_use_fsdp_as_transformers_does(tmp_path, monkeypatch, value):
    if value is not None:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", value)
    expected = value is not None and strtobool(value) == 1  # transformers' is_fsdp_enabled reading
    answers = sharding_answers(training_args(tmp_path))
    assert answers == dict.fromkeys(answers, expected)
    assert (detect_engine(training_args(tmp_path)).kind == "fsdp") == expected


def test_the_consistency_check_catches_the_old_two_readers(tmp_path, monkeypatch):
    """Negative control: loading read ACCELERATE_USE_FSDP as 'true' only, the estimate as 1/true/yes."""

    def old_model_utils_reading(training_args):
        import os

        return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(training_args.fsdp)

    monkeypatch.setattr(launch_env, "engine_places_weights", old_model_utils_reading)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "1")
    answers = sharding_answers(training_args(tmp_path))
    assert answers["engine (memory estimate)"] and not answers["4-bit storage dtype (loading)"]


def test_fsdp_values_accelerate_would_not_honour_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "1")
    problems = engine_problems(LoraArguments(), training_args(tmp_path))
    assert "ACCELERATE_USE_FSDP=1: accelerate turns FSDP on only for the value 'true'" in problems[0]
    for value in ("true", "True"):  # `accelerate launch` writes "true"; accelerate compares in lower case
        monkeypatch.setenv("ACCELERATE_USE_FSDP", value)
        assert not any("ACCELERATE_USE_FSDP" in p for p in engine_problems(LoraArguments(), training_args(tmp_path)))
    for name, value, message in (
        ("FSDP_SHARDING_STRATEGY", "ZERO_SHARD", "expected one of FULL_SHARD"),
        ("FSDP_VERSION", "3", "expected 1 or 2"),
        ("FSDP_RESHARD_AFTER_FORWARD", "sometimes", "is not a truth value"),
    ):
        monkeypatch.setenv("FSDP_VERSION", "2" if name == "FSDP_RESHARD_AFTER_FORWARD" else "1")
        monkeypatch.setenv(name, value)
        problems = engine_problems(LoraArguments(), training_args(tmp_path))
        assert f"{name}={value!r}: {message}" in problems[0] or f"{name}={value!r} {message}" in problems[0]
        monkeypatch.delenv(name)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "maybe")
    problems = engine_problems(LoraArguments(), training_args(tmp_path))
    assert len(problems) == 1 and "ACCELERATE_USE_FSDP='maybe' is not a truth value" in problems[0], problems


def plugin_engine(plugin: FullyShardedDataParallelPlugin) -> tuple[str, bool]:
    """(sharding, params offloaded) as accelerate's own FSDP plugin resolved them."""
    if plugin.fsdp_version == 2:
        sharding = "FULL_SHARD" if plugin.reshard_after_forward else "SHARD_GRAD_OP"
        return sharding, isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    return plugin.sharding_strategy.name.lstrip("_"), plugin.cpu_offload.offload_params


FSDP_ENVIRONMENTS = [
    {},
    {"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"},
    {"FSDP_SHARDING_STRATEGY": "3", "FSDP_OFFLOAD_PARAMS": "true"},
    {"FSDP_SHARDING_STRATEGY": "hybrid_shard"},
    {"FSDP_SHARDING_STRATEGY": "5"},
    {"FSDP_VERSION": "2"},
    {"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"},
    {"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "True", "FSDP_OFFLOAD_PARAMS": "1"},
]


@pytest.mark.parametrize(
    "environment", FSDP_ENVIRONMENTS, ids=lambda env: ",".join(map(str, env.values())) or "default"
)
def test_fsdp_settings_from_the_environment_match_accelerates_plugin(tmp_path, monkeypatch, environment):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    engine = detect_engine(training_args(tmp_path))
    assert (engine.fsdp_sharding, engine.offload_params) == plugin_engine(FullyShardedDataParallelPlugin())


@pytest.mark.parametrize(
    "fsdp_config",
    [{}, {"reshard_after_forward": False}, {"cpu_offload": True}, {"version": 1, "sync_module_states": False}],
    ids=["default", "fsdp2_no_reshard", "offload", "fsdp1"],
)
def test_fsdp_settings_from_fsdp_flags_match_the_trainers_plugin(tmp_path, monkeypatch, fsdp_config):
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP")  # FSDP1 still takes its strategy from here
    args = training_args(tmp_path, fsdp=True, fsdp_config=fsdp_config)
    engine = detect_engine(args)
    # The Trainer builds its plugin from these arguments (trainer.py create_accelerator_and_postprocess).
    assert (engine.fsdp_sharding, engine.offload_params) == plugin_engine(
        FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    )


@pytest.mark.parametrize("config", DEEPSPEED_CONFIGS, ids=lambda path: path.name)
def test_zero_stage_is_the_config_files_for_every_module(tmp_path, config):
    stage = json.loads(config.read_text())["zero_optimization"]["stage"]
    args = training_args(tmp_path, deepspeed=str(config))
    assert detect_engine(args).zero_stage == stage
    assert args.hf_deepspeed_config.is_zero3() == (stage == 3)  # DeepSpeed's config object agrees
    answers = sharding_answers(args)
    assert answers == dict.fromkeys(answers, stage == 3)


def test_deepspeed_from_accelerate_launch_alone_is_read_from_accelerates_plugin(tmp_path, monkeypatch):
    """`accelerate launch --use_deepspeed --zero_stage 3 --offload_param_device cpu` without --deepspeed."""
    for name, value in (("ACCELERATE_USE_DEEPSPEED", "true"), ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3"),
                        ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu")):  # fmt: skip
        monkeypatch.setenv(name, value)
    engine = detect_engine(training_args(tmp_path))
    assert (engine.kind, engine.zero_stage, engine.offload_params, engine.offload_optimizer) == (
        "deepspeed",
        3,
        True,
        False,
    )


def test_zero3_qlora_estimate_counts_norms_as_zero3_loads_them(tmp_path, monkeypatch):
    """The estimate builds its meta model with transformers' ZeRO-3 switch cleared (without_zero3_init); asking that
    switch made it count fp32 norms under ZeRO-3, where loading keeps them in bf16."""
    hidden, layers, vocab = TINY.hidden_size, TINY.num_hidden_layers, TINY.vocab_size
    norms, embeddings = (2 * layers + 1) * hidden, 2 * vocab * hidden  # untied input and output embeddings
    single = model_shape(TINY, ModelArguments("tiny"), QLORA, training_args(tmp_path))
    assert single.qlora_unquantized_bytes == 4 * norms + 2 * embeddings
    zero3 = training_args(tmp_path, deepspeed=str(REPO / "deepspeed_configs" / "5_ds_z3_config.json"))
    assert model_shape(TINY, ModelArguments("tiny"), QLORA, zero3).qlora_unquantized_bytes == 2 * (norms + embeddings)


@pytest.fixture
def fake_gpu(monkeypatch):
    """An 80 GiB GPU 0 as the memory limit sees it; records what apply_memory_limit sets."""
    applied = []
    monkeypatch.setattr(launch_env, "uses_cuda", lambda training_args: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device: applied.append((f, device)))
    return applied


@pytest.mark.parametrize(("value", "limit"), [("0.5", 40 * GIB), ("1", 80 * GIB), ("20000", 20000 * MIB)])
def test_memory_limit_is_the_same_for_the_estimate_and_the_process(tmp_path, monkeypatch, fake_gpu, value, limit):
    monkeypatch.setenv("TORCH_PER_PROCESS_MEMORY_LIMIT", value)
    args = training_args(tmp_path)
    budget, source = memory_limit(ModelArguments("tiny"), args)
    assert budget == limit and source == f"GPU 0 (Fake GPU), TORCH_PER_PROCESS_MEMORY_LIMIT={value}"
    apply_memory_limit(args)
    assert fake_gpu == [(pytest.approx(limit / (80 * GIB)), 0)]
    assert memory_limit(ModelArguments("tiny", max_memory_per_device="1GiB"), args) == (GIB, "--max_memory_per_device")
    big = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, vocab_size=128256)
    with pytest.raises(MemoryLimitError, match=re.escape(f"TORCH_PER_PROCESS_MEMORY_LIMIT={value})")):
        check_memory_fits(big, ModelArguments("llama"), LoraArguments(), args, 2048)


def test_bad_memory_limits_are_option_problems(tmp_path, monkeypatch, fake_gpu):
    monkeypatch.setenv("TORCH_PER_PROCESS_MEMORY_LIMIT", "100000")
    problems = engine_problems(LoraArguments(), training_args(tmp_path))
    assert problems == ["TORCH_PER_PROCESS_MEMORY_LIMIT=100000 MiB is more than the 81920 MiB of GPU 0."]
    monkeypatch.setattr(launch_env, "uses_cuda", lambda training_args: False)  # checked on CPU too
    monkeypatch.setenv("TORCH_PER_PROCESS_MEMORY_LIMIT", "half")
    assert "TORCH_PER_PROCESS_MEMORY_LIMIT='half'" in engine_problems(LoraArguments(), training_args(tmp_path))[0]
    assert not fake_gpu


def test_only_launch_env_reads_the_launch_environment():
    """Engine variables, the ZeRO stage and the memory limit are read in launch_env.py and nowhere else."""
    reads = re.compile(r"ACCELERATE_USE_|FSDP_[A-Z]|TORCH_PER_PROCESS|WORLD_SIZE|zero_optimization|zero3_enabled")
    sources = [*REPO.glob("*.py"), *(REPO / "scripts").glob("*.py")]
    found = {path.name for path in sources if path.name != "launch_env.py" and reads.search(path.read_text())}
    assert not found
    assert engine_places_weights is launch_env.engine_places_weights and model_utils.uses_cuda is launch_env.uses_cuda
