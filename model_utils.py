"""Tokenizer and model: loading (full / LoRA / QLoRA), LoRA targets, memory limits, and the final save and merge."""

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate.utils import convert_file_size_to_int
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
)
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config
from transformers.utils import is_flash_attn_2_available

logger = logging.getLogger(__name__)

AUTO_TARGET_MODULES = "auto"
DEFAULT_PAD_TOKEN = "<pad>"
MEMORY_LIMIT_ENV = "TORCH_PER_PROCESS_MEMORY_LIMIT"
ADAPTER_SUBDIR = "adapter"


@dataclass
class ModelArguments:
    model_id: str = field(metadata={"help": "Hugging Face Hub id or local directory of the causal LM to fine-tune."})
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run Python code shipped with the model repo. Off by default: enable only for repos you trust."
        },
    )
    use_flash_attention: bool = field(
        default=False,
        metadata={"help": "Use flash_attention_2 when the flash-attn package and a GPU are available; otherwise SDPA."},
    )
    max_memory_per_device: str | None = field(
        default=None,
        metadata={
            "help": "Memory one process may use on its device, e.g. 70GiB or 20000 (MiB): the budget the memory "
            "estimate is checked against before loading (on CPU too), and the per-GPU cap when one process spreads "
            "a model over several GPUs."
        },
    )


@dataclass
class LoraArguments:
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter on a frozen base model."})
    use_qlora: bool = field(
        default=False, metadata={"help": "Train a LoRA adapter on a base quantized with bitsandbytes (QLoRA)."}
    )
    qlora_bit_length: Literal[4, 8] = field(
        default=4, metadata={"help": "QLoRA quantization: 4 (NF4 with double quantization) or 8 (LLM.int8)."}
    )
    lora_target_modules: str = field(
        default=AUTO_TARGET_MODULES,
        metadata={
            "help": "'auto' targets every linear layer except the output head (GPT-2 Conv1D included); or a JSON "
            'list of module names, e.g. \'["q_proj", "v_proj"]\'.'
        },
    )
    lora_r: int = field(default=32, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_bias: Literal["none", "all", "lora_only"] = field(
        default="none", metadata={"help": "Which biases to train along with the adapter."}
    )
    merge_adapters: bool = field(
        default=True,
        metadata={
            "help": "Merge the trained adapter into a freshly loaded 16/32-bit base and save the full model in "
            "--output_dir (the adapter goes to --output_dir/adapter). false saves only the adapter in --output_dir."
        },
    )

    @property
    def use_peft(self) -> bool:
        return self.use_lora or self.use_qlora


class ModelLoadError(Exception):
    """The model or tokenizer cannot be loaded; the message says which flag to fix."""


def hub_kwargs(model_args: ModelArguments) -> dict:
    return {"trust_remote_code": model_args.trust_remote_code}


def load_model_config(model_args: ModelArguments) -> PretrainedConfig:
    """Loading the config first turns a wrong --model_id into one clear message."""
    path = Path(model_args.model_id).expanduser()
    looks_like_path = path.is_absolute() or model_args.model_id.startswith((".", "~")) or len(path.parts) > 2
    if looks_like_path and not path.is_dir():
        raise ModelLoadError(f"--model_id {model_args.model_id}: no such model directory.")
    try:
        return AutoConfig.from_pretrained(model_args.model_id, **hub_kwargs(model_args))
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"--model_id {model_args.model_id!r} could not be loaded: {str(error).splitlines()[0]}\n"
            "Pass a local model directory or a Hub id that exists (and is downloadable from this machine); "
            "models with custom code also need --trust_remote_code true."
        ) from error


def load_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_id, **hub_kwargs(model_args))
    if tokenizer.eos_token is None:
        raise ModelLoadError(
            f"the tokenizer of {model_args.model_id!r} has no EOS token; the model could not learn to stop."
        )
    if tokenizer.pad_token is None:
        # A dedicated pad token keeps EOS trainable: padding with EOS would mask the real EOS labels.
        tokenizer.add_special_tokens({"pad_token": DEFAULT_PAD_TOKEN})
        logger.info("The tokenizer has no pad token; added %s.", DEFAULT_PAD_TOKEN)
    # Right padding keeps the default position ids of every sample starting at 0.
    tokenizer.padding_side = "right"
    return tokenizer


def model_max_positions(config: PretrainedConfig) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def compute_dtype(training_args: TrainingArguments) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def weights_dtype(training_args: TrainingArguments, lora_args: LoraArguments) -> torch.dtype:
    """Frozen bases load in the compute dtype; a fully trained model keeps fp32 weights under fp16 mixed precision
    because the fp16 grad scaler cannot unscale fp16 gradients."""
    if training_args.fp16 and not lora_args.use_peft:
        return torch.float32
    return compute_dtype(training_args)


def shards_weights(training_args: TrainingArguments) -> bool:
    """DeepSpeed ZeRO-3 or FSDP: the engine places (and partitions) the weights, not from_pretrained."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(training_args.fsdp)
    return fsdp or (bool(training_args.deepspeed) and is_deepspeed_zero3_enabled())


def quantization_config(lora_args: LoraArguments, training_args: TrainingArguments) -> BitsAndBytesConfig | None:
    if not lora_args.use_qlora:
        return None
    if lora_args.qlora_bit_length == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(training_args),
        # ZeRO-3 and FSDP shard tensors of one dtype: the packed 4-bit weights are stored in the weights' dtype
        # (https://huggingface.co/docs/peft/accelerate/fsdp#use-peft-qlora-and-fsdp-for-finetuning-large-models).
        bnb_4bit_quant_storage=weights_dtype(training_args, lora_args) if shards_weights(training_args) else None,
    )


def attention_implementation(model_args: ModelArguments) -> str:
    if model_args.use_flash_attention:
        if is_flash_attn_2_available():
            return "flash_attention_2"
        logger.warning("--use_flash_attention: flash-attn or a GPU is not available; using SDPA attention.")
    return "sdpa"


def device_map(training_args: TrainingArguments) -> dict | str | None:
    """One process on several GPUs spreads the layers over them ('auto'), so bigger models fit; under DDP each
    process keeps a whole copy on its own GPU. On CPU the Trainer places the model, under ZeRO-3 / FSDP the engine."""
    if not torch.cuda.is_available() or shards_weights(training_args):
        return None
    if training_args.world_size == 1 and torch.cuda.device_count() > 1:
        return "auto"
    return {"": training_args.local_process_index}


def max_memory(model_args: ModelArguments, training_args: TrainingArguments) -> dict | None:
    """--max_memory_per_device caps every GPU when one process spreads the model over them."""
    if not model_args.max_memory_per_device or device_map(training_args) != "auto":
        return None
    size = parse_memory_size(model_args.max_memory_per_device)
    return {index: size for index in range(torch.cuda.device_count())}


def load_model(
    model_args: ModelArguments,
    lora_args: LoraArguments,
    training_args: TrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_id,
        dtype=weights_dtype(training_args, lora_args),
        quantization_config=quantization_config(lora_args, training_args),
        attn_implementation=attention_implementation(model_args),
        device_map=device_map(training_args),
        max_memory=max_memory(model_args, training_args),
        **hub_kwargs(model_args),
    )
    resize_embeddings_for_tokenizer(model, tokenizer)
    if lora_args.use_qlora:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=training_args.activation_checkpointing,
            gradient_checkpointing_kwargs=training_args.activation_checkpointing_kwargs,
        )
    if lora_args.use_peft:
        model = get_peft_model(model, lora_config(lora_args))
        logger.info("LoRA targets: %s", ", ".join(lora_target_names(model)))
        model.print_trainable_parameters()
    return model


def lora_target_names(model: PeftModel) -> list[str]:
    """The distinct layer names that received an adapter (e.g. q_proj, v_proj)."""
    return sorted({name.rsplit(".", 1)[-1] for name in model.peft_config["default"].target_modules})


def resize_embeddings_for_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings when the tokenizer gained tokens (e.g. the pad token); never shrink padded vocabularies."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
        logger.info("Resized the embeddings to %d tokens.", len(tokenizer))


def parse_target_modules(value: str) -> str | list[str]:
    if value == AUTO_TARGET_MODULES:
        # PEFT's shorthand: every nn.Linear / Conv1D except the output head.
        return "all-linear"
    try:
        modules = json.loads(value)
    except json.JSONDecodeError:
        modules = None
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise ValueError(f"--lora_target_modules must be 'auto' or a JSON list of module names, got {value!r}.")
    return modules


def lora_config(lora_args: LoraArguments) -> LoraConfig:
    return LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        bias=lora_args.lora_bias,
        target_modules=parse_target_modules(lora_args.lora_target_modules),
        task_type="CAUSAL_LM",
    )


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
        return int(float(value) * 2**20)
    except ValueError:
        pass
    try:
        return convert_file_size_to_int(value)
    except ValueError as error:
        raise ValueError(f"--max_memory_per_device {value!r}: expected e.g. 70GiB, 20000MB or a number of MiB.") from (
            error
        )


def apply_memory_limit(training_args: TrainingArguments) -> None:
    """Honour TORCH_PER_PROCESS_MEMORY_LIMIT on this process's GPU."""
    value = os.environ.get(MEMORY_LIMIT_ENV)
    if not value:
        return
    limit = parse_memory_limit(value)
    if not torch.cuda.is_available():
        logger.info("%s=%s is ignored: no GPU.", MEMORY_LIMIT_ENV, value)
        return
    device = training_args.local_process_index
    total_mib = torch.cuda.get_device_properties(device).total_memory / 2**20
    fraction = limit if limit <= 1 else limit / total_mib
    if fraction > 1:
        raise ValueError(f"{MEMORY_LIMIT_ENV}={value} MiB is more than the {total_mib:.0f} MiB of GPU {device}.")
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    logger.info("GPU %d memory limited to %.0f%% (%.0f MiB).", device, fraction * 100, fraction * total_mib)


@contextmanager
def without_zero3_init(training_args: TrainingArguments):
    """Under ZeRO-3 transformers partitions every model it builds across all processes (a collective call); a
    model built by one process alone, or an empty one, must skip that."""
    if not training_args.deepspeed:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(training_args.hf_deepspeed_config)


def merge_adapter(
    model_args: ModelArguments, adapter_dir: str, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype
) -> PreTrainedModel:
    """Apply the adapter to a freshly loaded unquantized base on CPU and merge it.

    Merging into a 4-bit base would re-quantize the merged weights; a 16/32-bit base keeps them exact.
    """
    base = AutoModelForCausalLM.from_pretrained(model_args.model_id, dtype=dtype, **hub_kwargs(model_args))
    resize_embeddings_for_tokenizer(base, tokenizer)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def save_final_model(
    trainer,
    model_args: ModelArguments,
    lora_args: LoraArguments,
    tokenizer: PreTrainedTokenizerBase,
) -> Path:
    """Write the model a user loads with `from_pretrained(output_dir)`; returns that directory.

    Every rank calls this (saving can be collective); only the main process merges and writes the rest.
    """
    output_dir = Path(trainer.args.output_dir)
    merge = lora_args.use_peft and lora_args.merge_adapters
    # The Trainer turns the KV cache off for training; the saved model should generate with it.
    trainer.accelerator.unwrap_model(trainer.model).config.use_cache = True
    trainer.save_model(str(output_dir / ADAPTER_SUBDIR if merge else output_dir))
    trainer.save_state()
    if trainer.is_world_process_zero():
        if merge:
            with without_zero3_init(trainer.args):
                merged = merge_adapter(
                    model_args, str(output_dir / ADAPTER_SUBDIR), tokenizer, compute_dtype(trainer.args)
                )
            merged.save_pretrained(output_dir)
            logger.info("Merged the adapter into %s.", model_args.model_id)
        tokenizer.save_pretrained(output_dir)
    trainer.accelerator.wait_for_everyone()
    return output_dir
