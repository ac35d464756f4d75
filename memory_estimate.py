"""The peak memory per device of one training step (weights, gradients, optimizer states, activations), estimated
from the model config on the meta device before any weight is loaded, printed, and checked against the limit."""

import json
import logging
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.error import NoMatchingPeftModuleError
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, TrainingArguments

from launch_env import (
    GIB,
    MIB,
    Engine,
    compute_dtype,
    detect_engine,
    memory_limit,
    qlora_weight_dtype,
    uses_cuda,
    weights_dtype,
)
from model_utils import (
    ModelLoadError,
    is_fused_experts,
    lora_dropout,
    peft_config,
    quantizable_linears,
    without_zero3_init,
)
from options import LoraArguments, ModelArguments

logger = logging.getLogger(__name__)

# What the CUDA context, cuBLAS workspaces and allocator fragmentation take beyond the tensors (not measured by
# torch.cuda.max_memory_allocated).
CUDA_RUNTIME_OVERHEAD = 1 * GIB
# NF4 with double quantization: 4 bits per weight, plus an 8-bit absmax per 64 weights and an fp32 scale per 256
# absmax values.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES_PER_WEIGHT = 1 + 4 / 4096


class MemoryLimitError(ModelLoadError):
    """The estimated peak memory per device exceeds the limit; the message says what to change."""


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts and layer sizes of a model, read from its config without allocating weights."""

    total: int  # every parameter, tied ones once
    linear: int  # weights of the linear layers bitsandbytes quantizes (all but the output head)
    adapter: int  # parameters PEFT trains: the adapters and the --lora_modules_to_save copies (0 without PEFT)
    module_copies: int  # parameters of the --lora_modules_to_save copies (held beside the frozen originals)
    lora_inputs_per_layer: int  # input features summed over the LoRA-adapted linears of one decoder layer
    largest_layer: int  # parameters of the largest decoder layer (what ZeRO-3 / FSDP gather at once)
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    experts: int = 0  # parameters of fused MoE experts (3-D tensors bitsandbytes does not quantize)
    qlora_unquantized_bytes: float = 0  # under QLoRA, bytes of every weight left unquantized (qlora_weight_dtype)
    adapter_dropout: float = 0.0  # the LoRA dropout training applies (0 when fused experts are adapted)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    layers = [module for module in model.modules() if type(module).__name__ in set(model._no_split_modules or [])]
    if layers:
        return layers
    return max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=[])


def model_shape(
    config: PretrainedConfig, model_args: ModelArguments, lora_args: LoraArguments, training_args: TrainingArguments
) -> ModelShape:
    with without_zero3_init(training_args), init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        total = sum(p.numel() for p in model.parameters())
        linear = sum(module.weight.numel() for _, module in quantizable_linears(model))
        layers = decoder_layers(model)
        largest_layer = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
        experts = sum(p.numel() for p in model.parameters() if is_fused_experts(p))
        unquantized = qlora_unquantized_bytes(model, training_args)
        dropout = lora_dropout(lora_args, model)
        if lora_args.use_peft:
            adapter, module_copies, lora_inputs = adapter_shape(model, lora_args, layers[0] if layers else None)
        else:
            adapter = module_copies = lora_inputs = 0
    text_config = config.get_text_config()
    hidden = text_config.hidden_size
    return ModelShape(
        total=total,
        linear=linear,
        adapter=adapter,
        module_copies=module_copies,
        lora_inputs_per_layer=lora_inputs,
        largest_layer=largest_layer,
        num_layers=len(layers) or text_config.num_hidden_layers,
        hidden_size=hidden,
        intermediate_size=getattr(text_config, "intermediate_size", None) or 4 * hidden,
        vocab_size=text_config.vocab_size,
        experts=experts,
        qlora_unquantized_bytes=unquantized,
        adapter_dropout=dropout,
    )


def qlora_unquantized_bytes(model: PreTrainedModel, training_args: TrainingArguments) -> float:
    """Bytes of the weights bitsandbytes leaves unquantized (all but the quantizable linears' weights), each in the
    dtype the QLoRA dtype policy keeps it in."""
    quantized = {id(module.weight) for _, module in quantizable_linears(model)}
    seen, size = set(), 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) not in quantized | seen:
                seen.add(id(param))
                size += param.numel() * qlora_weight_dtype(module, training_args).itemsize
    return size


def adapter_shape(
    model: PreTrainedModel, lora_args: LoraArguments, first_layer: torch.nn.Module | None
) -> tuple[int, int, int]:
    """(trainable parameters, --lora_modules_to_save copies, LoRA input features of one decoder layer), counted by
    applying the run's PEFT config (LoRA, DoRA or IA3) to the meta-device model: exactly what training will get."""
    try:
        adapted = get_peft_model(model, peft_config(lora_args, model))
    except NoMatchingPeftModuleError:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in quantizable_linears(model)})
        raise ModelLoadError(
            f"--lora_target_modules {lora_args.lora_target_modules}: no such module in this "
            f"{model.config.model_type} model. Its linear layers are {json.dumps(names)}; pass some of them as a "
            "JSON list, or 'auto' for all of them."
        ) from None
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    copies = sum(
        p.numel()
        for module in adapted.modules()
        if isinstance(module, ModulesToSaveWrapper)
        for p in module.modules_to_save.parameters()
    )
    lora_inputs = sum(
        module.in_features for module in (first_layer.modules() if first_layer else []) if isinstance(module, LoraLayer)
    )
    return trainable, copies, lora_inputs


def optimizer_state_bytes(optim: str, param_bytes: int) -> float:
    """Optimizer state per trainable parameter (torch keeps Adam's moments in the parameter's dtype)."""
    optim = optim.lower()
    if "8bit" in optim:
        return 2
    if "adafactor" in optim:
        return 0.1 * param_bytes  # factored second moment: rows + columns, not rows x columns
    if optim.startswith("sgd"):
        return 0
    if "lion" in optim:
        return param_bytes
    return 2 * param_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, float]  # bytes per device, by what holds them
    description: str

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def table(self) -> str:
        lines = [f"  {name:<34}{format_size(size):>12}" for name, size in self.parts.items()]
        lines.append(f"  {'total':<34}{format_size(self.total):>12}")
        return "\n".join(lines)


def format_size(size: float) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / MIB:.1f} MiB"


def estimate_memory(
    shape: ModelShape,
    engine: Engine,
    lora_args: LoraArguments,
    training_args: TrainingArguments,
    max_length: int,
    on_gpu: bool,
) -> MemoryEstimate:
    """Peak memory per device of one training step: weights, gradients, optimizer states, activations."""
    compute_bytes = compute_dtype(training_args).itemsize
    weight_bytes = weights_dtype(training_args, lora_args).itemsize
    if lora_args.use_qlora:
        per_weight = NF4_BYTES_PER_WEIGHT if lora_args.qlora_bit_length == 4 else INT8_BYTES_PER_WEIGHT
        weights = shape.linear * per_weight + shape.qlora_unquantized_bytes
    else:
        weights = shape.total * weight_bytes
    weights += shape.module_copies * (4 if lora_args.use_qlora else weight_bytes)
    trainable = shape.adapter if lora_args.use_peft else shape.total
    trainable_bytes = 4 if lora_args.use_peft else weight_bytes  # PEFT keeps adapters in fp32
    gradients = trainable * trainable_bytes
    optim = getattr(training_args.optim, "value", training_args.optim)
    optimizer = trainable * optimizer_state_bytes(optim, trainable_bytes)
    if engine.kind == "deepspeed" and (training_args.bf16 or training_args.fp16):
        optimizer += trainable * 4  # DeepSpeed keeps an fp32 master copy of the trained weights
    parts = {}
    n = engine.world_size
    if lora_args.use_qlora and engine.kind == "deepspeed" and engine.zero_stage == 3:
        # transformers does not use zero.Init for a quantized model: every process loads it whole, then DeepSpeed
        # partitions it.
        parts["weights (loaded whole, then partitioned)"] = weights
    else:
        experts = " (MoE experts unquantized)" if lora_args.use_qlora and shape.experts else ""
        parts["weights" + experts + (" (sharded)" if engine.shards_params else "")] = (
            0 if engine.offload_params else weights / n if engine.shards_params else weights
        )
    if engine.shards_params:
        parts["gathered layers (2 at a time)"] = 2 * shape.largest_layer * compute_bytes
    parts["gradients" + (" (sharded)" if engine.shards_gradients else "")] = (
        gradients / n if engine.shards_gradients else gradients
    )
    parts["optimizer states" + (" (sharded)" if engine.shards_optimizer else "")] = (
        0 if engine.offload_optimizer else optimizer / n if engine.shards_optimizer else optimizer
    )
    tokens = training_args.per_device_train_batch_size * max_length
    h, i = shape.hidden_size, shape.intermediate_size
    # Saved for backward per token in one decoder layer: norm inputs and outputs, q/k/v, attention output, the
    # MLP's gate, up, activation and product (flash / memory-efficient attention keeps no score matrix).
    layer_elements = 10 * h + 4 * i
    if lora_args.use_peft and shape.adapter_dropout > 0:
        layer_elements += shape.lora_inputs_per_layer  # each adapter keeps its dropped-out input
    if training_args.gradient_checkpointing:
        # Only each layer's input is kept; one layer's activations exist again while it is recomputed.
        activations = tokens * compute_bytes * (shape.num_layers * h + layer_elements)
        parts["activations (checkpointed)"] = activations
    else:
        parts["activations"] = tokens * compute_bytes * shape.num_layers * layer_elements
    # Logits in the compute dtype, their fp32 copy and log-softmax for the loss, and the gradient of one of them.
    parts["logits and loss"] = tokens * shape.vocab_size * (compute_bytes + 12)
    if on_gpu:
        parts["CUDA context and workspace"] = CUDA_RUNTIME_OVERHEAD
    method = "QLoRA" if lora_args.use_qlora else "LoRA" if lora_args.use_lora else "full fine-tune"
    checkpointing = ", gradient checkpointing" if training_args.gradient_checkpointing else ""
    dtype = str(compute_dtype(training_args)).removeprefix("torch.")
    description = (
        f"{engine.describe()}; {method}, {dtype}, {optim}{checkpointing}; "
        f"{training_args.per_device_train_batch_size} x {max_length} tokens per device"
    )
    return MemoryEstimate(parts, description)


def announce_moe_limits(shape: ModelShape, lora_args: LoraArguments, training_args: TrainingArguments) -> None:
    """Before loading: what QLoRA and LoRA cannot do for this model's fused MoE experts."""
    if lora_args.use_qlora and shape.experts:
        logger.warning(
            "QLoRA: bitsandbytes quantizes only linear layers; this model's fused expert weights (%.2fM parameters, "
            "%.0f%% of the model) stay unquantized, in %s. The memory estimate below counts them so.",
            shape.experts / 1e6,
            100 * shape.experts / shape.total,
            str(compute_dtype(training_args)).removeprefix("torch."),
        )
    if lora_args.use_peft and lora_args.peft_method == "lora" and shape.adapter_dropout != lora_args.lora_dropout:
        logger.warning(
            "--lora_dropout %s is not applied: the adapters on the fused MoE experts (PEFT lora.ParamWrapper) support "
            "no dropout, so this adapter trains with dropout 0. To keep dropout, target linear layers only, e.g. "
            '--lora_target_modules \'["q_proj", "k_proj", "v_proj", "o_proj"]\'.',
            lora_args.lora_dropout,
        )


def check_memory_fits(
    model_config: PretrainedConfig,
    model_args: ModelArguments,
    lora_args: LoraArguments,
    training_args: TrainingArguments,
    max_length: int,
) -> MemoryEstimate:
    """Log the estimated peak memory per device and stop before loading when it exceeds the limit."""
    shape = model_shape(model_config, model_args, lora_args, training_args)
    announce_moe_limits(shape, lora_args, training_args)
    estimate = estimate_memory(
        shape, detect_engine(training_args), lora_args, training_args, max_length, uses_cuda(training_args)
    )
    limit, source = memory_limit(model_args, training_args)
    limit_text = f"{format_size(limit)} ({source})" if limit else source
    logger.info(
        "Estimated peak memory per device (%s; %s parameters):\n%s\n  limit: %s",
        estimate.description,
        f"{shape.total / 1e9:.2f}B" if shape.total >= 1e8 else f"{shape.total / 1e6:.2f}M",
        estimate.table(),
        limit_text,
    )
    if limit and estimate.total > limit:
        raise MemoryLimitError(
            f"the estimated peak memory per device, {format_size(estimate.total)}, exceeds the limit of "
            f"{limit_text}. Lower --per_device_train_batch_size (raise --gradient_accumulation_steps to keep the "
            "global batch) or --max_length, set --gradient_checkpointing true, use --use_lora / --use_qlora, or "
            "shard with DeepSpeed ZeRO-2/3 (deepspeed_configs/) or FSDP over more GPUs."
        )
    return estimate
