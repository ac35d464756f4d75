"""Tokenizer and model: loading (full / LoRA / DoRA / IA3, optionally on a quantized base, placed as the engine in
launch_env.py says, with the attention attention.py chose), adapter targets, the final save and merge, and
generation from a saved model."""

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import httpx2
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import get_session
from peft import IA3Config, LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
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
from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config
from transformers.pytorch_utils import Conv1D
from transformers.utils import CONFIG_NAME

from attention import loaded_attention
from data_utils import IGNORE_INDEX
from launch_env import (
    compute_dtype,
    engine_places_weights,
    parse_memory_size,
    qlora_weight_dtype,
    quant_storage_dtype,
    uses_cuda,
    weights_dtype,
)
from options import AUTO_TARGET_MODULES, LoraArguments, ModelArguments
from output_layout import ADAPTER_SUBDIR, SAMPLES_FILE

logger = logging.getLogger(__name__)

DEFAULT_PAD_TOKEN = "<pad>"
HUB_PROBE_TIMEOUT_S = 5


class ModelLoadError(Exception):
    """The model or tokenizer cannot be loaded; the message says which flag to fix."""


def hub_kwargs(model_args: ModelArguments) -> dict:
    return {"trust_remote_code": model_args.trust_remote_code}


def looks_like_local_path(model_id: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else, or a first part that is a local directory, is a path."""
    path = Path(model_id).expanduser()
    explicit = path.is_absolute() or model_id.startswith((".", "~")) or model_id.endswith(("/", "\\"))
    return explicit or len(path.parts) > 2 or (len(path.parts) == 2 and path.parent.is_dir())


def check_hub_reachable(model_id: str) -> None:
    """One quick request before the first download of an uncached model: huggingface_hub would retry a refused or
    timed-out connection for about 25 s before saying the same."""
    if hub_constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(model_id, CONFIG_NAME), str):
        return
    try:
        get_session().head(hub_constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except httpx2.TransportError as error:
        raise ModelLoadError(
            f"--model_id {model_id}: cannot reach the Hugging Face Hub at {hub_constants.ENDPOINT} ({error}). "
            "Check the network or proxy (HTTPS_PROXY, HF_ENDPOINT), set HF_HUB_OFFLINE=1 to use models already "
            "in the cache, or pass a local model directory."
        ) from error


def load_model_config(model_args: ModelArguments) -> PretrainedConfig:
    """Loading the config first turns a wrong --model_id into one clear message."""
    if not Path(model_args.model_id).expanduser().is_dir():
        if looks_like_local_path(model_args.model_id):
            raise ModelLoadError(f"--model_id {model_args.model_id}: no such directory.")
        check_hub_reachable(model_args.model_id)
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
    if model_args.special_tokens:
        add_special_tokens(tokenizer, model_args.special_tokens)
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


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, value: str) -> None:
    try:
        tokens = json.loads(value)
    except json.JSONDecodeError:
        tokens = None
    if not isinstance(tokens, dict) or not all(isinstance(v, str) for v in tokens.values()):
        raise ModelLoadError(f'--special_tokens must be a JSON object like {{"pad_token": "<pad>"}}, got {value!r}.')
    try:
        added = tokenizer.add_special_tokens(tokens)
    except (ValueError, TypeError) as error:
        raise ModelLoadError(f"--special_tokens {value}: {error}") from error
    if tokenizer.pad_token is not None and tokenizer.pad_token == tokenizer.eos_token:
        logger.warning("--special_tokens: the pad token is the EOS token; only the loss mask keeps EOS trained.")
    logger.info("Special tokens set: %s (%d new).", ", ".join(tokens), added)


def model_max_positions(config: PretrainedConfig) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


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
        bnb_4bit_quant_storage=quant_storage_dtype(training_args, lora_args),
    )


def device_map(training_args: TrainingArguments) -> dict | str | None:
    """One process on several GPUs spreads the layers over them ('auto'), so bigger models fit; under DDP each
    process keeps a whole copy on its own GPU. On CPU the Trainer places the model, under ZeRO-3 / FSDP the engine."""
    if not uses_cuda(training_args) or engine_places_weights(training_args):
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
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_id,
        dtype=weights_dtype(training_args, lora_args),
        quantization_config=quantization_config(lora_args, training_args),
        attn_implementation=loaded_attention(attn_implementation),
        device_map=device_map(training_args),
        max_memory=max_memory(model_args, training_args),
        **hub_kwargs(model_args),
    )
    resize_embeddings_for_tokenizer(model, tokenizer)
    if lora_args.use_qlora:
        keep_cpu_inference_packing_off(model)
        prepare_quantized_model(model, training_args)
    if lora_args.use_peft:
        model = get_peft_model(model, peft_config(lora_args, model))
        logger.info("%s targets: %s", model.peft_config["default"].peft_type.value, ", ".join(lora_target_names(model)))
        model.print_trainable_parameters()
    return model


def keep_cpu_inference_packing_off(model: PreTrainedModel) -> None:
    """bitsandbytes 0.50 repacks a 4-bit weight for a bf16 CPU inference kernel on the first eval-mode forward (on
    CPUs with AVX512-BF16) and never undoes it when training resumes; from then on no gradient flows through the
    layer (`gemv_4bit` has no autograd kernel). Training and evaluation both keep the trainable dequantize + matmul
    path instead. See README "Known issues"."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def is_quantized(param: torch.Tensor) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params")


def prepare_quantized_model(model: PreTrainedModel, training_args: TrainingArguments) -> None:
    """Freeze the quantized base and cast its unquantized weights as `qlora_weight_dtype` says. Replaces PEFT's
    prepare_model_for_kbit_training, which upcasts every unquantized weight to fp32: FSDP cannot flatten that beside
    the 4-bit weights, and fp32 embeddings double the activation memory. The Trainer enables checkpointing."""
    for module in model.modules():
        dtype = qlora_weight_dtype(module, training_args)
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)
            if param.is_floating_point() and not is_quantized(param):
                param.data = param.data.to(dtype)
    # Reentrant checkpointing only back-propagates into a layer whose input requires grad.
    model.enable_input_require_grads()


def quantizable_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The linear layers bitsandbytes quantizes and LoRA can adapt: every nn.Linear / Conv1D but the output head."""
    head = model.get_output_embeddings()
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear | Conv1D) and module is not head]  # fmt: skip


def is_fused_experts(param: torch.Tensor) -> bool:
    """transformers 5 stacks a MoE layer's experts into 3-D parameters (Mixtral, Qwen3-MoE, ...); bitsandbytes
    quantizes only linear layers, so these stay unquantized."""
    return param.ndim == 3


def fused_expert_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the fused expert parameters, e.g. gate_up_proj, down_proj."""
    return sorted({name.rsplit(".", 1)[-1] for name, param in model.named_parameters() if is_fused_experts(param)})


def lora_dropout(lora_args: LoraArguments, model: torch.nn.Module) -> float:
    """PEFT adapts fused expert parameters through lora.ParamWrapper, which has no dropout: with experts targeted the
    adapter trains without dropout (check_memory_fits says so before loading)."""
    experts_targeted = lora_args.lora_target_modules == AUTO_TARGET_MODULES and fused_expert_parameters(model)
    return 0.0 if experts_targeted else lora_args.lora_dropout


def lora_target_names(model: PeftModel) -> list[str]:
    """The distinct layer and parameter names that received an adapter (e.g. q_proj, v_proj, gate_up_proj)."""
    config = model.peft_config["default"]
    targets = [*config.target_modules, *(getattr(config, "target_parameters", None) or [])]
    return sorted({name.rsplit(".", 1)[-1] for name in targets})


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


def parse_modules_to_save(value: str | None) -> list[str] | None:
    if not value:
        return None
    try:
        modules = json.loads(value)
    except json.JSONDecodeError:
        modules = None
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ValueError(f"--lora_modules_to_save must be a JSON list of module names, got {value!r}.")
    return modules or None


def peft_option_problems(lora_args: LoraArguments) -> list[str]:
    if not lora_args.use_peft:
        if lora_args.use_dora or lora_args.peft_method != "lora":
            return ["--use_dora / --peft_method choose an adapter: add --use_lora true or --use_qlora true."]
        return []
    problems = []
    for parse, value in ((parse_target_modules, lora_args.lora_target_modules),
                         (parse_modules_to_save, lora_args.lora_modules_to_save)):  # fmt: skip
        try:
            parse(value)
        except ValueError as error:
            problems.append(str(error))
    if lora_args.use_dora and lora_args.peft_method != "lora":
        problems.append(
            f"--use_dora true is a LoRA variant; it does not apply to --peft_method {lora_args.peft_method}."
        )
    return problems


def peft_config(lora_args: LoraArguments, model: torch.nn.Module) -> PeftConfig:
    """The adapter for `model`. On a MoE model, --lora_target_modules auto adapts the attention's linear layers and
    every expert (the fused expert parameters, one LoRA per expert), not the router, whose small weights decide the
    routing: the usual choice for MoE fine-tuning (Unsloth, Axolotl)."""
    model_type = model.config.model_type
    targets = parse_target_modules(lora_args.lora_target_modules)
    modules_to_save = parse_modules_to_save(lora_args.lora_modules_to_save)
    if lora_args.peft_method == "ia3":
        if targets == "all-linear":
            # PEFT's IA3 defaults for the architecture (keys, values and the MLP's down projection for Llama)
            return IA3Config(modules_to_save=modules_to_save, task_type="CAUSAL_LM")
        feedforward = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, [])
        return IA3Config(
            target_modules=targets,
            feedforward_modules=[name for name in targets if name in feedforward],
            modules_to_save=modules_to_save,
            task_type="CAUSAL_LM",
        )
    experts = fused_expert_parameters(model) if targets == "all-linear" else []
    if experts:
        # Explicit names: PEFT's "all-linear" on a transformers-5 MoE also adapts the router (a v4 compatibility rule).
        targets = sorted({name.rsplit(".", 1)[-1] for name, _ in quantizable_linears(model)})
    return LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_dropout(lora_args, model),
        bias=lora_args.lora_bias,
        target_modules=targets,
        target_parameters=experts or None,
        use_dora=lora_args.use_dora,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )


def load_adapter_model(
    model_args: ModelArguments,
    adapter_dir: str,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
    device_map: str | dict | None = None,
) -> PeftModel:
    """The adapter on a freshly loaded unquantized base (model_args.model_id), embeddings grown to the tokenizer."""
    base = AutoModelForCausalLM.from_pretrained(
        model_args.model_id, dtype=dtype, device_map=device_map, **hub_kwargs(model_args)
    )
    resize_embeddings_for_tokenizer(base, tokenizer)
    return PeftModel.from_pretrained(base, adapter_dir)


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
    model_args: ModelArguments,
    adapter_dir: str,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
    device_map: str | dict | None = None,
) -> PreTrainedModel:
    """Apply the adapter to a freshly loaded unquantized base (on CPU unless device_map says otherwise) and merge it.

    Merging into a 4-bit base would re-quantize the merged weights; a 16/32-bit base keeps them exact.
    """
    merged = load_adapter_model(model_args, adapter_dir, tokenizer, dtype, device_map).merge_and_unload()
    merged.config.use_cache = True
    return merged


def adapter_base_model(directory: str | Path) -> str | None:
    """The base model an adapter directory was trained on, or None when the directory holds no adapter."""
    if not (Path(directory) / "adapter_config.json").is_file():
        return None
    return PeftConfig.from_pretrained(str(directory)).base_model_name_or_path


def load_for_generation(
    model_dir: str, base_model: str | None, dtype: torch.dtype, device_map: str | dict | None, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A saved model (merged, or an adapter with its base) and its tokenizer, ready to generate."""
    hub = {"trust_remote_code": trust_remote_code}
    adapter_base = adapter_base_model(model_dir)
    has_tokenizer = (Path(model_dir) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(model_dir if has_tokenizer else base_model or adapter_base, **hub)
    if adapter_base is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map, **hub)
    else:
        base_args = ModelArguments(model_id=base_model or adapter_base, trust_remote_code=trust_remote_code)
        model = load_adapter_model(base_args, model_dir, tokenizer, dtype, device_map)
    model.config.use_cache = True
    return model.eval(), tokenizer


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """The conversation rendered with the chat template and the assistant's generation prompt, as token ids."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def generate_text(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, input_ids: list[int], **generation
) -> str:
    """The model's continuation of `input_ids` as text (greedy unless `do_sample=True` is passed)."""
    ids = torch.tensor([input_ids], device=model.device)
    with torch.no_grad():
        output = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.pad_token_id, **generation
        )
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


def first_trained_span(labels: list[int]) -> tuple[int, int] | None:
    """(start, end) of the first run of tokens that carry loss, or None when no token does or nothing precedes it."""
    start = next((index for index, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if not start:  # None, or 0: no prompt to answer
        return None
    end = next((index for index in range(start, len(labels)) if labels[index] == IGNORE_INDEX), len(labels))
    return start, end


def sample_generations(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset, count: int, max_new_tokens: int
) -> list[dict]:
    """Answers to the prompts of the first `count` prepared samples that have one (the tokens before the first
    trained span, i.e. the prompt exactly as trained, chat template included), with the trained answer beside."""
    was_training = model.training
    model.eval()
    samples = []
    for row in dataset:
        span = first_trained_span(row["labels"])
        if span is None:
            continue
        prompt, reference = row["input_ids"][: span[0]], row["input_ids"][span[0] : span[1]]
        samples.append({
            "source": row.get("source"),
            "prompt": tokenizer.decode(prompt),  # special tokens kept: exactly what the model saw
            "reference": tokenizer.decode(reference, skip_special_tokens=True),
            "generation": generate_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, do_sample=False),
        })  # fmt: skip
        if len(samples) == count:
            break
    model.train(was_training)
    return samples


def answer_sample_prompts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eval_dataset, train_dataset, args
) -> list[dict]:
    """--sample_generations: the trained model's answers to evaluation prompts (training prompts without eval data).
    Run it on every rank: with ZeRO-3 / FSDP each forward pass gathers weights from all of them."""
    dataset = eval_dataset
    if dataset is None:
        logger.info("--sample_generations: no evaluation data; answering training prompts instead.")
        dataset = train_dataset
    return sample_generations(model, tokenizer, dataset, args.sample_generations, args.sample_max_new_tokens)


def write_sample_generations(samples: list[dict], args) -> Path:
    path = Path(args.output_dir) / SAMPLES_FILE
    path.write_text("".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples))
    logger.info("Wrote %d sample generation(s) to %s.", len(samples), path)
    return path


def save_trained_model(trainer, lora_args: LoraArguments) -> Path:
    """Every rank: the collective save of what was trained (the adapter goes to --output_dir/adapter when it is merged
    afterwards) and the trainer state. Returns --output_dir."""
    output_dir = Path(trainer.args.output_dir)
    merge = lora_args.use_peft and lora_args.merge_adapters
    # The Trainer turns the KV cache off for training; the saved model should generate with it.
    trainer.accelerator.unwrap_model(trainer.model).config.use_cache = True
    trainer.save_model(str(output_dir / ADAPTER_SUBDIR if merge else output_dir))
    trainer.save_state()
    return output_dir


def write_final_model(
    model_args: ModelArguments,
    lora_args: LoraArguments,
    tokenizer: PreTrainedTokenizerBase,
    training_args: TrainingArguments,
) -> None:
    """Main process only, after save_trained_model: merge the adapter into a fresh 16/32-bit base and write the model a
    user loads with `from_pretrained(output_dir)`, with its tokenizer. Nothing here is collective, so the other ranks
    can finish meanwhile: a long merge (a 70B model on CPU) keeps no rank waiting in a barrier it could time out in."""
    output_dir = Path(training_args.output_dir)
    if lora_args.use_peft and lora_args.merge_adapters:
        with without_zero3_init(training_args):
            merged = merge_adapter(
                model_args, str(output_dir / ADAPTER_SUBDIR), tokenizer, compute_dtype(training_args)
            )
        merged.save_pretrained(output_dir)
        logger.info(
            "Merged the adapter (%s) into a copy of %s; the merged model is in %s.",
            output_dir / ADAPTER_SUBDIR, model_args.model_id, output_dir,
        )  # fmt: skip
    tokenizer.save_pretrained(output_dir)
