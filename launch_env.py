"""The launch environment, read in one place: which engine accelerate will run (one process, DDP, DeepSpeed ZeRO-n
with offload, FSDP with its sharding and offload), how many processes, whether the engine places the weights, the
dtype policy that follows from it, and the memory one process may use on its device. Every other module asks here.

DeepSpeed is read through the config objects transformers and accelerate build from --deepspeed (or from
`accelerate launch --use_deepspeed` alone); FSDP through the plugin arguments transformers builds from --fsdp, else
through the FSDP_* variables `accelerate launch` exports, parsed with accelerate's own helpers."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate.utils import convert_file_size_to_int, get_int_from_env, parse_flag_from_env
from accelerate.utils.constants import FSDP_SHARDING_STRATEGY

if TYPE_CHECKING:
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers import TrainingArguments

logger = logging.getLogger(__name__)

MIB = 2**20
GIB = 2**30
MEMORY_LIMIT_ENV = "TORCH_PER_PROCESS_MEMORY_LIMIT"
USE_FSDP_ENV = "ACCELERATE_USE_FSDP"
USE_CPU_ENV = "ACCELERATE_USE_CPU"
# accelerate's Accelerator and AcceleratorState turn FSDP on for this exact value only (accelerator.py, state.py:
# `os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"`), while transformers' is_fsdp_enabled and
# accelerate's parse_flag_from_env accept any truth value. `accelerate launch` writes "true".
ACCELERATE_FSDP_VALUE = "true"
OFFLOAD_DEVICES = ("cpu", "nvme")  # DeepSpeed's offload targets (accelerate's HfDeepSpeedConfig.set_stage_and_offload)


# Engine


@dataclass(frozen=True)
class Engine:
    """How the training state is spread over the devices."""

    kind: str  # "single", "ddp", "deepspeed" or "fsdp"
    world_size: int = 1
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    fsdp_sharding: str = ""  # one of accelerate's FSDP_SHARDING_STRATEGY names (FULL_SHARD, SHARD_GRAD_OP, ...)

    def describe(self) -> str:
        if self.kind == "deepspeed":
            offload = [name for name, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params))
                       if on]  # fmt: skip
            suffix = f", offload {' + '.join(offload)} to CPU" if offload else ""
            return f"DeepSpeed ZeRO-{self.zero_stage}{suffix}, {self.world_size} processes"
        if self.kind == "fsdp":
            suffix = ", params offloaded to CPU" if self.offload_params else ""
            return f"FSDP {self.fsdp_sharding}{suffix}, {self.world_size} processes"
        if self.kind == "ddp":
            return f"DDP, {self.world_size} processes"
        return "one process"

    @property
    def shards_optimizer(self) -> bool:
        return (self.kind == "deepspeed" and self.zero_stage >= 1) or self.shards_gradients

    @property
    def shards_gradients(self) -> bool:
        return (self.kind == "deepspeed" and self.zero_stage >= 2) or (
            self.kind == "fsdp" and self.fsdp_sharding != "NO_SHARD"
        )

    @property
    def shards_params(self) -> bool:
        return (self.kind == "deepspeed" and self.zero_stage == 3) or (
            self.kind == "fsdp" and self.fsdp_sharding in ("FULL_SHARD", "HYBRID_SHARD")
        )

    @property
    def places_weights(self) -> bool:
        """ZeRO-3 or FSDP (any strategy) wraps, flattens and places the weights itself, not from_pretrained."""
        return self.kind == "fsdp" or (self.kind == "deepspeed" and self.zero_stage == 3)


def env_flag(name: str, default: bool = False) -> bool:
    """A boolean environment variable as accelerate reads it (1/true/yes/on, 0/false/no/off, any case)."""
    try:
        return parse_flag_from_env(name, default)
    except ValueError:
        raise ValueError(
            f"{name}={os.environ[name]!r} is not a truth value: accelerate reads true/false (also 1/0, yes/no, on/off)."
        ) from None


def fsdp_enabled(training_args: TrainingArguments) -> bool:
    """FSDP comes from an accelerate config file (`accelerate launch --config_file ...`, which exports
    ACCELERATE_USE_FSDP) or from --fsdp."""
    return bool(training_args.fsdp) or env_flag(USE_FSDP_ENV)


def deepspeed_config(training_args: TrainingArguments) -> HfDeepSpeedConfig | None:
    """The DeepSpeed config the Trainer hands to accelerate: transformers' HfTrainerDeepSpeedConfig from --deepspeed
    ("auto" values filled), or the one accelerate's DeepSpeedPlugin builds from `accelerate launch --use_deepspeed`
    alone. Not transformers' is_deepspeed_zero3_enabled(): that reads a process-global which without_zero3_init
    clears while the memory estimate builds its meta-device model."""
    plugin = training_args.deepspeed_plugin
    return plugin.hf_ds_config if plugin is not None else None


def zero_stage(training_args: TrainingArguments) -> int:
    config = deepspeed_config(training_args)
    return int(config.get_value("zero_optimization.stage", 0)) if config else 0


def fsdp_sharding(name: str) -> str:
    """An FSDP1 sharding strategy by name or by accelerate's number (1 = FULL_SHARD ... 5 = HYBRID_SHARD_ZERO2)."""
    if name.isdigit() and 1 <= int(name) <= len(FSDP_SHARDING_STRATEGY):
        return FSDP_SHARDING_STRATEGY[int(name) - 1]
    if name.upper() in FSDP_SHARDING_STRATEGY:
        return name.upper()
    raise ValueError(f"FSDP_SHARDING_STRATEGY={name!r}: expected one of {', '.join(FSDP_SHARDING_STRATEGY)} or 1-5.")


def fsdp_version_from_env() -> int:
    value = os.environ.get("FSDP_VERSION", "1")
    if value not in ("1", "2"):
        raise ValueError(f"FSDP_VERSION={value!r}: expected 1 or 2 (fsdp_version in the accelerate config file).")
    return int(value)


def fsdp_engine(training_args: TrainingArguments, world_size: int) -> Engine:
    """FSDP as accelerate's FullyShardedDataParallelPlugin sets it up (its __post_init__): the plugin arguments
    transformers derives from --fsdp / --fsdp_config come first, the FSDP_* variables fill what they leave unset.
    The plugin itself is not built here: with sync_module_states or cpu_ram_efficient_loading on (our
    accelerate_configs set both) it asks the accelerator for its current device, which fails on CPU and initialises
    CUDA on GPU 0 in every process, and it writes FSDP_CPU_RAM_EFFICIENT_LOADING into the environment."""
    plugin_args = training_args.fsdp_plugin_args or {}
    version = plugin_args.get("fsdp_version") or fsdp_version_from_env()
    if version == 2:
        reshard = plugin_args.get("reshard_after_forward")
        if reshard is None:
            reshard = env_flag("FSDP_RESHARD_AFTER_FORWARD", default=True)
        sharding = "FULL_SHARD" if reshard else "SHARD_GRAD_OP"  # parameters kept gathered from forward to backward
    else:
        # FSDP1 prefers sharding_strategy, which the plugin always reads from the environment, over the
        # reshard_after_forward transformers passes (accelerator.py `sharding_strategy or reshard_after_forward`).
        sharding = fsdp_sharding(os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD"))
    offload = plugin_args.get("cpu_offload")
    if offload is None:
        offload = env_flag("FSDP_OFFLOAD_PARAMS")
    return Engine("fsdp", world_size, fsdp_sharding=sharding, offload_params=offload)


def detect_engine(training_args: TrainingArguments) -> Engine:
    """The engine this run trains with. Raises ValueError on an environment value accelerate would reject."""
    world_size = training_args.world_size
    config = deepspeed_config(training_args)
    if config is not None:
        return Engine(
            "deepspeed",
            world_size,
            zero_stage=zero_stage(training_args),
            offload_optimizer=config.get_value("zero_optimization.offload_optimizer.device") in OFFLOAD_DEVICES,
            offload_params=config.get_value("zero_optimization.offload_param.device") in OFFLOAD_DEVICES,
        )
    if fsdp_enabled(training_args):
        return fsdp_engine(training_args, world_size)
    return Engine("ddp" if world_size > 1 else "single", world_size)


def engine_places_weights(training_args: TrainingArguments) -> bool:
    """DeepSpeed ZeRO-3 or FSDP: the engine places (and partitions) the weights, not from_pretrained."""
    return detect_engine(training_args).places_weights


def uses_cuda(training_args: TrainingArguments) -> bool:
    """This process trains on a CUDA GPU (not with --use_cpu or `accelerate launch --cpu`): transformers' answer."""
    return training_args.device.type == "cuda"


def launched_processes() -> int:
    """How many processes the launcher started (torchrun / accelerate launch export WORLD_SIZE)."""
    return get_int_from_env(["WORLD_SIZE"], 1)


def launch_env_problems(training_args: TrainingArguments) -> list[str]:
    """Environment values accelerate would reject, misread, or read differently from transformers."""
    problems = []
    for read in (detect_engine, gpu_memory_limit):
        try:
            read(training_args)
        except ValueError as error:
            problems.append(str(error))
    value = os.environ.get(USE_FSDP_ENV, "")
    if not problems and not training_args.fsdp and env_flag(USE_FSDP_ENV) and value.lower() != ACCELERATE_FSDP_VALUE:
        problems.append(
            f"{USE_FSDP_ENV}={value}: accelerate turns FSDP on only for the value 'true' (transformers reads any "
            "truth value), so the model would be loaded for FSDP and then trained without it. Set "
            f"{USE_FSDP_ENV}=true, or launch with `accelerate launch --config_file "
            "accelerate_configs/fsdp_full_shard.yaml`."
        )
    return problems


# Dtype policy


def compute_dtype(training_args: TrainingArguments) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def weights_dtype(training_args: TrainingArguments, lora_args) -> torch.dtype:
    """Frozen bases load in the compute dtype; a fully trained model keeps fp32 weights under fp16 mixed precision
    because the fp16 grad scaler cannot unscale fp16 gradients."""
    if training_args.fp16 and not lora_args.use_peft:
        return torch.float32
    return compute_dtype(training_args)


def quant_storage_dtype(training_args: TrainingArguments, lora_args) -> torch.dtype | None:
    """ZeRO-3 and FSDP shard tensors of one dtype: the packed 4-bit weights are stored in the weights' dtype
    (https://huggingface.co/docs/peft/accelerate/fsdp#use-peft-qlora-and-fsdp-for-finetuning-large-models); elsewhere
    bitsandbytes' default (uint8)."""
    return weights_dtype(training_args, lora_args) if engine_places_weights(training_args) else None


def is_norm(module: torch.nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def qlora_weight_dtype(module: torch.nn.Module, training_args: TrainingArguments) -> torch.dtype:
    """The QLoRA dtype policy: the dtype a frozen, unquantized weight of `module` is kept in (the adapters PEFT adds
    are fp32; the quantized linears compute in the compute dtype).

    Norms stay in fp32 for stability, except under ZeRO-3 / FSDP, which flatten each layer's weights into one tensor
    of a single dtype (the 4-bit weights are stored in the compute dtype there). Everything else - embeddings, output
    head, MoE routers and the fused experts bitsandbytes cannot quantize - is kept in the compute dtype: in fp32 the
    residual stream would run in fp32 (TRL's peft_module_casting_to_bf16 does the same)."""
    if is_norm(module) and not engine_places_weights(training_args):
        return torch.float32
    return compute_dtype(training_args)


# Memory limit


def parse_memory_limit(value: str) -> float:
    """A fraction of the device (0 < x <= 1) or a number of MiB (> 1)."""
    try:
        limit = float(value)
    except ValueError:
        limit = 0.0
    if limit <= 0:
        raise ValueError(f"{MEMORY_LIMIT_ENV}={value!r}: expected a fraction in (0, 1] or a number of MiB.")
    return limit


def parse_memory_size(value: str) -> int:
    """Bytes from '70GiB', '20000MB', ... or a plain number of MiB."""
    try:
        return int(float(value) * MIB)
    except ValueError:
        pass
    try:
        return convert_file_size_to_int(value)
    except ValueError as error:
        raise ValueError(f"--max_memory_per_device {value!r}: expected e.g. 70GiB, 20000MB or a number of MiB.") from (
            error
        )


@dataclass(frozen=True)
class GpuMemory:
    device: int
    total: int  # bytes of the GPU
    limit: float  # bytes this process may use: the GPU, or TORCH_PER_PROCESS_MEMORY_LIMIT of it
    source: str


def gpu_memory_limit(training_args: TrainingArguments) -> GpuMemory | None:
    """This process's GPU and TORCH_PER_PROCESS_MEMORY_LIMIT applied to it (None on CPU, where the variable is
    ignored, but still checked). The one reader of the variable: the memory estimate and apply_memory_limit ask here."""
    value = os.environ.get(MEMORY_LIMIT_ENV)
    limit = parse_memory_limit(value) if value else None
    if not uses_cuda(training_args):
        return None
    device = training_args.local_process_index
    total = torch.cuda.get_device_properties(device).total_memory
    source = f"GPU {device} ({torch.cuda.get_device_name(device)})"
    if limit is None:
        return GpuMemory(device, total, total, source)
    if limit > 1 and limit * MIB > total:
        raise ValueError(f"{MEMORY_LIMIT_ENV}={value} MiB is more than the {total / MIB:.0f} MiB of GPU {device}.")
    limit_bytes = limit * total if limit <= 1 else limit * MIB
    return GpuMemory(device, total, limit_bytes, f"{source}, {MEMORY_LIMIT_ENV}={value}")


def memory_limit(model_args, training_args: TrainingArguments) -> tuple[float | None, str]:
    """The memory one process may use on its device (the smaller of its GPU's limit and --max_memory_per_device),
    and where that limit comes from."""
    limits = []
    if model_args.max_memory_per_device:
        limits.append((parse_memory_size(model_args.max_memory_per_device), "--max_memory_per_device"))
    if gpu := gpu_memory_limit(training_args):
        limits.append((gpu.limit, gpu.source))
    if not limits:
        return None, "no limit on CPU unless --max_memory_per_device is set"
    return min(limits)


def apply_memory_limit(training_args: TrainingArguments) -> None:
    """Honour TORCH_PER_PROCESS_MEMORY_LIMIT on this process's GPU."""
    value = os.environ.get(MEMORY_LIMIT_ENV)
    if not value:
        return
    gpu = gpu_memory_limit(training_args)
    if gpu is None:
        logger.info("%s=%s is ignored: no GPU.", MEMORY_LIMIT_ENV, value)
        return
    fraction = gpu.limit / gpu.total
    torch.cuda.set_per_process_memory_fraction(fraction, gpu.device)
    logger.info("GPU %d memory limited to %.0f%% (%.0f MiB).", gpu.device, fraction * 100, gpu.limit / MIB)
