"""Config files for train.py: `train.py config.yaml [--flags]`, `train.py --config job.json [--flags]`.

A config file is read into a mapping and translated, mapping to mapping, into our options' values; options.py hands
them to the parser as defaults, so train.args supplies the defaults, the file overrides them and flags on the command
line override the file, and HfArgumentParser types every value as if it had been typed.

Three kinds of file are understood:
  our own options     {"model_id": ..., "train_data": ..., "use_qlora": true, ...}  (YAML or JSON)
  Axolotl's options   base_model, datasets, adapter, micro_batch_size, ... (recognised by its own key names and
                      translated; see AXOLOTL_TRANSLATIONS)
  a RunPod-style job  {"input": {"user_id", "model_id", "run_id", "credentials": {"hf_token", "wandb_api_key"},
                      "args": {...}}}: `args` is read as above; credentials go to the environment of the run only.

Data keys that cannot be honoured (a `datasets` / `test_datasets` key or value, a named chat template,
`pretraining_dataset`) always stop the run, naming the key, the entry and the reason: ignoring them would train on
other data than the file describes. Other keys with no equivalent are listed in one warning (an error with --strict
true). Keys set to null or an empty string set nothing; unknown keys set to false or an empty value (a feature
turned off) are ignored. The TrueFoundry launcher's Axolotl-style flags (--base_model, --train_data_uri, ...) are
translated on the command line too.
"""

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_formats import FORMATS, axolotl_formats
from data_mixing import NO_EVAL_DATA, source_entries

logger = logging.getLogger(__name__)

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# RunPod job credentials and the environment variables the libraries read them from.
CONFIG_FLAG = "--config"
CREDENTIAL_ENVIRONMENT = {"hf_token": "HF_TOKEN", "wandb_api_key": "WANDB_API_KEY"}
WANDB_ENVIRONMENT = {"wandb_project": "WANDB_PROJECT", "wandb_entity": "WANDB_ENTITY", "wandb_name": "WANDB_NAME"}
JOB_METADATA_KEYS = ("user_id", "model_id", "run_id")
CHAT_TEMPLATE_TYPE = "chat_template"
# Keys that decide what the model trains on: one that cannot be honoured always stops the run (with or without
# --strict), since ignoring it would train on other data than the file describes. `datasets` and `test_datasets`
# entries are checked key by key in translate_data.
DATA_KEYS = ("chat_template", "chat_template_jinja", "chat_template_kwargs", "pretraining_dataset")
SOURCE_FLAGS = ("train_data", "eval_data")
# Axolotl chat_template values that keep the tokenizer's own template (ours falls back to a ChatML-style default).
TOKENIZER_TEMPLATES = ("tokenizer_default", "tokenizer_default_fallback_chatml")
# The TrueFoundry launcher's Axolotl-style command-line flags (translated like the keys of an Axolotl file).
LAUNCHER_FLAGS = frozenset(
    ("base_model", "train_data_uri", "val_data_uri", "val_set_size", "micro_batch_size", "num_epochs", "adapter",
     "lora_target_linear", "train_on_inputs", "flash_attention")
)  # fmt: skip
TRUE_STRINGS = ("true", "yes", "y", "1", "t")
FALSE_STRINGS = ("false", "no", "n", "0", "f", "none", "")


class ConfigFileError(Exception):
    """An unreadable config file, or a value that cannot be translated; the message says which key and why."""


class Untranslatable(Exception):
    """A key (or value) with no equivalent in this script; the message says why."""


@dataclass
class Translation:
    values: dict[str, Any] = field(default_factory=dict)  # option name -> value, as the parser's defaults
    environment: dict[str, str] = field(default_factory=dict)  # set for the run once the options parse
    untranslated: list[str] = field(default_factory=list)  # "key: why" for every key with no equivalent
    refused: list[str] = field(default_factory=list)  # "key: why" for data keys that cannot be honoured: always stop


def is_unset(value: Any) -> bool:
    return value is None or value is False or value in ("", [], {})


def as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_STRINGS:
        return True
    if text in FALSE_STRINGS:
        return False
    raise ConfigFileError(f"{key}: expected true or false, got {value!r}.")


def token(value: Any) -> str:
    """A YAML/JSON value as a command-line value: booleans as true/false, lists and mappings as JSON."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


Values = dict[str, str]  # what one key translates to: option name -> value as it would be typed on the command line
Translator = Callable[[Any, dict], Values]


def option(name: str) -> Translator:
    return lambda value, config: {name: token(value)}


def bool_option(name: str) -> Translator:
    return lambda value, config: {name: token(as_bool(value, name))}


def nothing(value: Any, config: dict) -> Values:
    return {}


# Axolotl keys -> our flags


def translate_adapter(value: Any, config: dict) -> Values:
    adapter = str(value or "").lower()
    if adapter in ("", "none", "full"):
        return {"use_lora": "false", "use_qlora": "false"}
    if adapter == "qlora" or (adapter == "lora" and (config.get("load_in_4bit") or config.get("load_in_8bit"))):
        bits = "8" if config.get("load_in_8bit") and not config.get("load_in_4bit") else "4"
        return {"use_qlora": "true", "qlora_bit_length": bits}
    if adapter == "lora":
        return {"use_lora": "true"}
    raise Untranslatable(f"adapter {value!r}: only lora and qlora are supported")


def translate_quantization(value: Any, config: dict) -> Values:
    """load_in_4bit / load_in_8bit: read together with `adapter`, which decides LoRA vs QLoRA."""
    if as_bool(value, "load_in_4bit / load_in_8bit") and not config.get("adapter"):
        raise Untranslatable("quantized full fine-tuning is not supported; set adapter: qlora (or lora)")
    return {}


def translate_target_modules(value: Any, config: dict) -> Values:
    if config.get("lora_target_linear"):
        return {}  # lora_target_linear already targets every linear layer
    modules = [value] if isinstance(value, str) else value
    return {"lora_target_modules": json.dumps(list(modules))}


def translate_target_linear(value: Any, config: dict) -> Values:
    return {"lora_target_modules": "auto"} if as_bool(value, "lora_target_linear") else {}


def translate_bf16(value: Any, config: dict) -> Values:
    if str(value).lower() == "auto":
        import torch

        value = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {"bf16": token(as_bool(value, "bf16"))}


def translate_sdp_attention(value: Any, config: dict) -> Values:
    if as_bool(value, "sdp_attention"):
        return {}  # SDPA is what this script uses unless flash attention is asked for
    raise Untranslatable("turning SDPA off (eager attention) is not supported")


def translate_chat_template(value: Any, config: dict) -> Values:
    if value in TOKENIZER_TEMPLATES:
        return {}
    if value == "jinja":
        if not config.get("chat_template_jinja"):
            raise Untranslatable("chat_template: jinja needs chat_template_jinja")
        return {"chat_template": config["chat_template_jinja"]}
    if "{" in str(value) or Path(str(value)).expanduser().is_file():
        return {"chat_template": str(value)}
    raise Untranslatable(
        f"chat_template {value!r}: named templates are not built in; give the template text with "
        "chat_template: jinja and chat_template_jinja, or use the tokenizer's (tokenizer_default)"
    )


def per_epoch_steps(key: str, value: Any, config: dict) -> str:
    """`saves_per_epoch` / `evals_per_epoch` as an HF strategy ('epoch', or 'steps' with a ratio of all steps)."""
    if float(value) == 1:
        return "epoch"
    if config.get("max_steps"):
        raise Untranslatable(f"{key} with max_steps: use {key.split('s_per')[0]}_steps instead")
    if not config.get("num_epochs"):
        raise Untranslatable(f"{key} needs num_epochs in the same file")
    per_run = float(value) * float(config["num_epochs"])
    if per_run <= 1:
        return "epoch"
    return repr(1 / per_run)  # save_steps / eval_steps below 1 are a fraction of the total steps


def translate_saves_per_epoch(value: Any, config: dict) -> Values:
    steps = per_epoch_steps("saves_per_epoch", value, config)
    if steps == "epoch":
        return {"save_strategy": "epoch"}
    return {"save_strategy": "steps", "save_steps": steps}


def has_eval_data(config: dict) -> bool:
    return bool(config.get("test_datasets")) or float(config.get("val_set_size") or 0) > 0


def translate_evals_per_epoch(value: Any, config: dict) -> Values:
    if not has_eval_data(config):
        return {}  # no evaluation data: Axolotl evaluates nothing either (see translate_data)
    steps = per_epoch_steps("evals_per_epoch", value, config)
    if steps == "epoch":
        return {"eval_strategy": "epoch"}
    return {"eval_strategy": "steps", "eval_steps": steps}


def translate_eval_steps(value: Any, config: dict) -> Values:
    return {"eval_strategy": "steps", "eval_steps": token(value)} if has_eval_data(config) else {}


def translate_warmup_ratio(value: Any, config: dict) -> Values:
    if not 0 <= float(value) < 1:
        raise ConfigFileError(f"warmup_ratio must be in [0, 1), got {value!r}.")
    return {"warmup_steps": token(value)}  # transformers 5 reads warmup_steps < 1 as a ratio


def translate_special_tokens(value: Any, config: dict) -> Values:
    if not isinstance(value, dict):
        raise ConfigFileError(f"special_tokens must be a mapping like {{pad_token: '<pad>'}}, got {value!r}.")
    return {"special_tokens": json.dumps(value)}


def translate_wandb_project(value: Any, config: dict) -> Values:
    return {} if "report_to" in config else {"report_to": "wandb"}  # WANDB_PROJECT: see WANDB_ENVIRONMENT


def translate_hub_model_id(value: Any, config: dict) -> Values:
    return {"hub_model_id": str(value), "push_to_hub": "true"}


def translate_auto_resume(value: Any, config: dict) -> Values:
    if config.get("resume_from_checkpoint"):
        return {}  # an explicit checkpoint wins, as in Axolotl
    return {"resume_from_checkpoint": "true"} if as_bool(value, "auto_resume_from_checkpoints") else {}


def translate_model_class(value: Any, config: dict) -> Values:
    """model_type / tokenizer_type: this script always loads the Auto classes, which read the model's config."""
    if str(value).startswith("Auto") or str(value).endswith(("ForCausalLM", "Tokenizer", "TokenizerFast")):
        return {}
    raise Untranslatable(f"{value!r}: only causal LMs loaded with the Auto classes are supported")


def translate_sequence_len(value: Any, config: dict) -> Values:
    # Axolotl leaves longer samples out unless excess_length_strategy says otherwise; this script would stop.
    strategy = config.get("excess_length_strategy") or "drop"
    return {"max_length": token(value), "long_sequence_strategy": str(strategy)}


def translate_excess_length(value: Any, config: dict) -> Values:
    return {} if config.get("sequence_len") else {"long_sequence_strategy": str(value)}


def translate_data_path(name: str) -> Translator:
    def translate(value: Any, config: dict) -> Values:
        text = str(value).strip()
        return {name: NO_EVAL_DATA if text.lower() in ("", "none", "null", "na") else text}

    return translate


def translate_val_set_size(value: Any, config: dict) -> Values:
    return {"eval_size": token(value)}


# Axolotl `datasets` / `test_datasets` entries -> our sources (data_mixing.SOURCE_OPTIONS). A key that cannot be
# honoured stops the run: leaving it out would silently train on other data than the file describes.


def translate_data(config: dict, translation: Translation) -> None:
    """datasets / test_datasets / val_set_size: the data and the evaluation split, with Axolotl's defaults (no
    evaluation unless val_set_size > 0 or test_datasets is given)."""
    translated = {}
    for key, flag in (("datasets", "train_data"), ("test_datasets", "eval_data")):
        if is_unset(config.get(key)):
            continue
        entries = config[key] if isinstance(config[key], list) else [config[key]]
        translated[flag] = []
        for index, entry in enumerate(entries):
            try:
                translated[flag].append(with_template_kwargs(axolotl_source(entry, config), config))
            except Untranslatable as reason:
                translation.refused.append(f"{key}[{index}] ({entry_path(entry)}): {reason}")
    translation.values.update(sources_values(translated))
    if not config.get("test_datasets"):
        translation.values["eval_size"] = token(config.get("val_set_size") or 0)
    if not has_eval_data(config):
        translation.values["eval_strategy"] = "no"


def sources_values(translated: dict[str, list[dict]]) -> Values:
    """--train_data / --eval_data values, and one --data_format when every source has the same record shape; a
    plain path for a lone source without options."""
    formats = {source.get("format", "auto") for sources in translated.values() for source in sources}
    values = {}
    for name, sources in translated.items():
        if len(formats) == 1:
            sources = [{k: v for k, v in source.items() if k != "format"} for source in sources]
        path = sources[0]["path"] if len(sources) == 1 and set(sources[0]) == {"path"} else None
        if path and "," not in path and not path.startswith(("[", "{")):  # read back as one plain path
            values[name] = path
        else:
            values[name] = json.dumps(sources, separators=(",", ":"))
    return values | ({"data_format": formats.pop()} if len(formats) == 1 else {})


def with_template_kwargs(source: dict, config: dict) -> dict:
    """The top-level chat_template_kwargs go to every source, as Axolotl applies them to every chat."""
    if isinstance(config.get("chat_template_kwargs"), dict) and config["chat_template_kwargs"]:
        return {**source, "chat_template_kwargs": dict(config["chat_template_kwargs"])}
    return source


def entry_path(entry: Any) -> str:
    return str(entry.get("path")) if isinstance(entry, dict) else repr(entry)


# What each key of an entry means here; keys not listed cannot be honoured.
AXOLOTL_DATASET_KEYS = ("path", "type", "ds_type", "data_files", "split", "name", "shards", "shards_idx",
                        "field_messages", "message_property_mappings", "message_field_role", "message_field_content",
                        "roles", "roles_to_train", "train_on_eos", "chat_template", "field")  # fmt: skip
READABLE_DS_TYPES = ("json", "jsonl", "parquet")
# Axolotl's chat_template role names when `roles` is not given (prompt_strategies/chat_template.py).
AXOLOTL_DEFAULT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                         "system": "system", "tool": "tool"}  # fmt: skip


def axolotl_source(entry: Any, config: dict) -> dict:
    """One entry of `datasets` / `test_datasets` as one of our sources; Untranslatable names every key that cannot
    be honoured and why."""
    if isinstance(entry, str):
        return {"path": entry}
    if not isinstance(entry, dict) or not entry.get("path"):
        raise Untranslatable(f"each entry needs a path, got {entry!r}")
    entry = {key: value for key, value in entry.items() if value is not None}
    problems = [f"{key}: no equivalent here" for key in sorted(set(entry) - set(AXOLOTL_DATASET_KEYS))]
    source = {"path": str(entry["path"])}
    for translate in (translate_location, translate_type, translate_chat_fields, translate_trained_roles):
        try:
            source.update(translate(entry, config))
        except Untranslatable as reason:
            problems.append(str(reason))
    if problems:
        raise Untranslatable("; ".join(problems))
    return source


def translate_location(entry: dict, config: dict) -> dict:
    source, split = {}, str(entry.get("split") or "train")
    if str(entry.get("ds_type") or "json").lower() not in READABLE_DS_TYPES:
        raise Untranslatable(f"ds_type {entry['ds_type']!r}: only JSON / JSON Lines and Parquet files are read")
    if entry.get("data_files"):
        if split != "train":
            raise Untranslatable(f"split {split!r} with data_files: data_files are read as the train split")
        files = entry["data_files"]
        source["data_files"] = [files] if isinstance(files, str) else [str(file) for file in files]
    if split != "train":
        source["split"] = split
    if entry.get("name"):
        source["name"] = str(entry["name"])
    if entry.get("shards"):
        source.update(shards=int(entry["shards"]), shard_index=int(entry.get("shards_idx") or 0))
    elif entry.get("shards_idx"):
        raise Untranslatable("shards_idx without shards")
    return source


def translate_type(entry: dict, config: dict) -> dict:
    """An Axolotl dataset `type` as the source's record shape (data_formats.FORMATS says which type is which)."""
    kind, shapes = entry.get("type"), axolotl_formats()
    if kind is None:
        return {}
    if kind not in shapes:
        types = list(shapes)
        raise Untranslatable(
            f"type {kind!r}: supported types are {', '.join(types[:-1])} and {types[-1]} (without a type, the shape "
            f"of every record is detected: {', '.join(FORMATS)}); convert the records to one of those shapes"
        )
    source, field_key = {"format": shapes[kind].name}, shapes[kind].axolotl_field
    if entry.get("field") and field_key is None:
        with_field = [name for name, shape in shapes.items() if shape.axolotl_field]
        raise Untranslatable(f"field {entry['field']!r} applies to type: {' / '.join(with_field)} only")
    if field_key and entry.get("field", field_key) != field_key:
        source["fields"] = {field_key: str(entry["field"])}
    template = entry.get("chat_template")
    if template is not None and template != config.get("chat_template", TOKENIZER_TEMPLATES[0]):
        if not (template in TOKENIZER_TEMPLATES and config.get("chat_template") in (None, *TOKENIZER_TEMPLATES)):
            raise Untranslatable(
                f"chat_template {template!r}: every source is rendered with the run's one chat template "
                f"({config.get('chat_template', 'tokenizer_default')}); set it at the top level instead"
            )
    return source


def translate_chat_fields(entry: dict, config: dict) -> dict:
    """field_messages, message_property_mappings (or the older message_field_role / _content) and roles."""
    chat_keys = {"field_messages", "message_property_mappings", "message_field_role", "message_field_content", "roles"}
    if entry.get("type") != CHAT_TEMPLATE_TYPE:
        misplaced = sorted(chat_keys & set(entry))
        if misplaced:
            raise Untranslatable(f"{', '.join(misplaced)} apply to type: chat_template only")
        return {}
    source = {}
    if entry.get("field_messages", "messages") != "messages":
        source["fields"] = {"messages": str(entry["field_messages"])}
    mappings = dict(entry.get("message_property_mappings") or {})
    mappings.setdefault("role", entry.get("message_field_role", "role"))
    mappings.setdefault("content", entry.get("message_field_content", "content"))
    if not all(isinstance(value, str) for value in mappings.values()):
        raise Untranslatable(f"message_property_mappings must map names to names, got {mappings!r}")
    if renamed := {ours: theirs for ours, theirs in mappings.items() if ours != theirs}:
        source["message_fields"] = renamed
    roles = AXOLOTL_DEFAULT_ROLES if not entry.get("roles") else axolotl_roles(entry["roles"])
    if renamed_roles := {theirs: ours for theirs, ours in roles.items() if theirs != ours}:
        source["roles"] = renamed_roles
    return source


def axolotl_roles(roles: Any) -> dict[str, str]:
    """Axolotl's `roles` ({ours: [theirs, ...]}) as {theirs: ours}."""
    if not isinstance(roles, dict):
        raise Untranslatable(f"roles must map a role to a list of names, got {roles!r}")
    return {str(theirs): str(ours) for ours, names in roles.items()
            for theirs in ([names] if isinstance(names, str) else names)}  # fmt: skip


def translate_trained_roles(entry: dict, config: dict) -> dict:
    """roles_to_train / train_on_eos: the loss mask here trains each assistant turn and its end-of-turn token, which
    is Axolotl's default (["assistant"], "turn"); other values would train other tokens, so they stop the run."""
    problems = []
    roles = entry.get("roles_to_train", ["assistant"])
    if sorted([roles] if isinstance(roles, str) else roles) != ["assistant"]:
        problems.append(
            f"roles_to_train {roles!r}: only the assistant turns carry loss here (Axolotl's default ['assistant']); "
            "use train_on_inputs: true to train every token"
        )
    if entry.get("train_on_eos", "turn") != "turn":
        problems.append(
            f"train_on_eos {entry['train_on_eos']!r}: the end-of-turn token of every trained turn carries loss here "
            "(Axolotl's default 'turn')"
        )
    if problems:
        raise Untranslatable("; ".join(problems))
    return {}


def translate_chat_template_kwargs(value: Any, config: dict) -> Values:
    """Handled by translate_data: the variables go to every source (a source's own keys win)."""
    if not isinstance(value, dict):
        raise Untranslatable(f"chat_template_kwargs must be a mapping, got {value!r}")
    return {}


def translate_pretraining_dataset(value: Any, config: dict) -> Values:
    raise Untranslatable(
        "pretraining_dataset: streamed pretraining datasets are not read here; list the text data under datasets "
        "with type: completion (it is read whole, so keep it to what fits on disk)"
    )


AXOLOTL_TRANSLATIONS: dict[str, Translator] = {
    "base_model": option("model_id"),
    "model_type": translate_model_class,
    "tokenizer_type": translate_model_class,
    "adapter": translate_adapter,
    "load_in_4bit": translate_quantization,
    "load_in_8bit": translate_quantization,
    "lora_r": option("lora_r"),
    "lora_alpha": option("lora_alpha"),
    "lora_dropout": option("lora_dropout"),
    "lora_target_modules": translate_target_modules,
    "lora_target_linear": translate_target_linear,
    "lora_modules_to_save": option("lora_modules_to_save"),
    "peft_use_dora": bool_option("use_dora"),
    "sequence_len": translate_sequence_len,
    "excess_length_strategy": translate_excess_length,
    "sample_packing": bool_option("sample_packing"),
    "eval_sample_packing": bool_option("eval_sample_packing"),
    "pad_to_sequence_len": bool_option("pad_to_max_length"),
    "micro_batch_size": option("per_device_train_batch_size"),
    "eval_batch_size": option("per_device_eval_batch_size"),
    "num_epochs": option("num_train_epochs"),
    "optimizer": option("optim"),
    "lr_scheduler": option("lr_scheduler_type"),
    "warmup_ratio": translate_warmup_ratio,
    "bf16": translate_bf16,
    "gradient_checkpointing": bool_option("activation_checkpointing"),
    "flash_attention": bool_option("use_flash_attention"),
    "sdp_attention": translate_sdp_attention,
    "train_on_inputs": bool_option("train_on_prompt"),
    "special_tokens": translate_special_tokens,
    "chat_template": translate_chat_template,
    "chat_template_jinja": nothing,  # read with chat_template: jinja
    "chat_template_kwargs": translate_chat_template_kwargs,
    "pretraining_dataset": translate_pretraining_dataset,
    "dataset_exact_deduplication": bool_option("dedup"),
    "default_system_message": option("default_system_message"),
    "saves_per_epoch": translate_saves_per_epoch,
    "evals_per_epoch": translate_evals_per_epoch,
    "eval_steps": translate_eval_steps,
    "auto_resume_from_checkpoints": translate_auto_resume,
    "dataset_prepared_path": option("data_cache_dir"),
    "hub_model_id": translate_hub_model_id,
    "mlflow_experiment_name": option("mlflow_experiment_name"),
    "wandb_project": translate_wandb_project,
    "wandb_entity": nothing,  # WANDB_ENVIRONMENT
    "wandb_name": nothing,
    "eval_max_new_tokens": option("sample_max_new_tokens"),
    # read by translate_data
    "datasets": nothing,
    "test_datasets": nothing,
    "val_set_size": nothing,
}
# Keys both dialects share with the same meaning pass through by name: learning_rate, gradient_accumulation_steps,
# max_steps, warmup_steps, weight_decay, max_grad_norm, adam_beta1/2, adam_epsilon, fp16, tf32, output_dir,
# save_strategy, save_steps, save_total_limit, early_stopping_patience, loss_watchdog_threshold/patience,
# resume_from_checkpoint, deepspeed, seed, logging_steps, trust_remote_code, group_by_length, ...


def is_axolotl_config(config: dict, known_options: set[str]) -> bool:
    """A file holding any key that only Axolotl uses (base_model, datasets, micro_batch_size, ...)."""
    return any(key in AXOLOTL_TRANSLATIONS and key not in known_options for key in config)


def option_token(key: str, value: Any) -> str:
    if value is False and key.endswith("_strategy"):
        return "no"  # YAML 1.1 reads an unquoted `no` as false
    return token(value)


def translate_key(key: str, value: Any, config: dict, axolotl: bool, known_options: set[str]) -> Values:
    if axolotl and key in AXOLOTL_TRANSLATIONS:
        values = AXOLOTL_TRANSLATIONS[key](value, config)
    elif key in known_options:
        values = {key: option_token(key, value)}
    elif is_unset(value):
        return {}  # a feature this script does not have, turned off
    else:
        raise Untranslatable(f"{key}: no such option")
    missing = [name for name in values if name not in known_options]
    if missing:
        raise Untranslatable(f"{key}: --{missing[0]} is not available in this version")
    return values


def translate_config(config: dict, known_options: set[str]) -> Translation:
    """A mapping of options (ours or Axolotl's) as our options' values, plus the keys that have no equivalent."""
    translation = Translation()
    axolotl = is_axolotl_config(config, known_options)
    if axolotl:
        translate_data(config, translation)
    for key, value in config.items():
        if value is None or value == "":
            continue  # set to nothing: the default applies
        if axolotl and key in WANDB_ENVIRONMENT:
            translation.environment[WANDB_ENVIRONMENT[key]] = str(value)
        try:
            translation.values.update(translate_key(key, value, config, axolotl, known_options))
        except (Untranslatable, ConfigFileError) as reason:  # a value this script cannot take is listed like a key
            message = str(reason) if isinstance(reason, Untranslatable) else f"{key}: {reason}"
            (translation.refused if key in DATA_KEYS else translation.untranslated).append(message)
    return translation


# Files and the command line


def read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigFileError(f"{path}: no such config file.")
    try:
        text = path.read_text()
        config = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigFileError(f"{path}: cannot be read as {path.suffix[1:].upper()}: {error}") from error
    if not isinstance(config, dict):
        raise ConfigFileError(f"{path}: expected a mapping of option names to values, got {type(config).__name__}.")
    return config


def unpack_job(config: dict, path: Path) -> tuple[dict, dict[str, str]]:
    """A RunPod-style job body: its `args` are the options; its credentials are returned as environment variables."""
    job = config["input"]
    if not isinstance(job, dict) or not isinstance(job.get("args"), dict):
        raise ConfigFileError(f'{path}: a job body needs {{"input": {{"args": {{...options...}}}}}}.')
    unknown = sorted(set(job) - {"args", "credentials", *JOB_METADATA_KEYS})
    if unknown:
        raise ConfigFileError(f"{path}: unknown keys in input: {', '.join(unknown)}.")
    credentials = job.get("credentials") or {}
    environment = {}
    for name, value in credentials.items():
        if name not in CREDENTIAL_ENVIRONMENT:
            raise ConfigFileError(f"{path}: unknown credential {name!r}; expected {', '.join(CREDENTIAL_ENVIRONMENT)}.")
        if value:
            environment[CREDENTIAL_ENVIRONMENT[name]] = str(value)
    args = dict(job["args"])
    if job.get("run_id") and "run_name" not in args:
        args["run_name"] = str(job["run_id"])
    return args, environment


def load_config_file(path: Path, known_options: set[str]) -> Translation:
    """A config file's options as values for the parser, and the environment it sets.

    Raises ConfigFileError for an unreadable file and for data keys that cannot be honoured; the keys with no
    equivalent are left in `untranslated` for the caller (a warning, or an error with --strict true)."""
    config, environment = read_config_file(path), {}
    if set(config) == {"input"}:
        config, environment = unpack_job(config, path)
    translation = translate_config(config, known_options)
    translation.environment.update(environment)
    if translation.refused:
        listing = "\n  ".join(translation.refused)
        raise ConfigFileError(
            f"{path}: {len(translation.refused)} data key(s) cannot be honoured, so nothing was loaded "
            f"(training without them would use other data than the file describes):\n  {listing}"
        )
    return translation


def report_untranslated(path: Path, translation: Translation, strict: bool) -> None:
    if not translation.untranslated:
        return
    listing = "\n  ".join(translation.untranslated)
    if strict:
        raise ConfigFileError(f"{path}: {len(translation.untranslated)} key(s) with no equivalent:\n  {listing}")
    logger.warning(
        "%s: %d key(s) have no equivalent here and are ignored (pass --strict true to stop instead):\n  %s",
        path,
        len(translation.untranslated),
        listing,
    )


def flag_name(item: str) -> str | None:
    return item[2:].partition("=")[0] if item.startswith("--") else None


def split_flag(tokens: list[str], index: int) -> tuple[str, str | None, int]:
    """(name, value, next index) of the flag at tokens[index], in --name value or --name=value form."""
    name, equals, value = tokens[index][2:].partition("=")
    if equals:
        return name, value, index + 1
    if index + 1 < len(tokens) and not tokens[index + 1].startswith("--"):
        return name, tokens[index + 1], index + 2
    return name, None, index + 1


def translate_launcher_flag(name: str, value: str, names: set[str]) -> list[str]:
    try:
        if name == "train_data_uri":
            values = translate_data_path("train_data")(value, {})
        elif name == "val_data_uri":
            values = translate_data_path("eval_data")(value, {})
        elif name == "val_set_size":
            no_eval_data = float(value) == 0 and not names & {"val_data_uri", "eval_data"}
            values = translate_val_set_size(value, {}) | ({"eval_strategy": "no"} if no_eval_data else {})
        else:
            values = AXOLOTL_TRANSLATIONS[name](value, {})
    except (Untranslatable, ValueError) as error:
        raise ConfigFileError(f"--{name} {value}: {error}") from error
    return [item for name, value in values.items() for item in (f"--{name}", value)]


def translate_launcher_flags(tokens: list[str]) -> list[str]:
    """The TrueFoundry launcher's Axolotl-style flags as this script's flags; every other token is kept."""
    names = {flag_name(item) for item in tokens} - {None}
    translated, index = [], 0
    while index < len(tokens):
        if flag_name(tokens[index]) not in LAUNCHER_FLAGS:
            translated.append(tokens[index])
            index += 1
            continue
        name, value, index = split_flag(tokens, index)
        translated += translate_launcher_flag(name, "true" if value is None else value, names)
    return translated


def flag_values(tokens: list[str]) -> dict[str, str]:
    """The last value of each `--name value` / `--name=value` flag; a flag without a value means true, and tokens
    that are not flags are skipped."""
    values, index = {}, 0
    while index < len(tokens):
        if flag_name(tokens[index]) is None:
            index += 1
            continue
        name, value, index = split_flag(tokens, index)
        values[name] = "true" if value is None else value
    return values


def last_value(tokens: list[str], name: str) -> str | None:
    return flag_values(tokens).get(name)


def command_line_tokens(arguments: list[str]) -> list[str]:
    """The command line with launcher flags translated, and repeated --train_data / --eval_data flags joined into one
    list of sources."""
    return join_repeated_sources(translate_launcher_flags(arguments))


def split_config_file(arguments: list[str]) -> tuple[Path | None, list[str]]:
    """The config file (given first, or as --config FILE) and the rest of the command line."""
    if arguments and not arguments[0].startswith("-") and arguments[0].lower().endswith(CONFIG_SUFFIXES):
        return Path(arguments[0]).expanduser(), arguments[1:]
    for index, item in enumerate(arguments):
        if item == CONFIG_FLAG and index + 1 < len(arguments):
            return Path(arguments[index + 1]).expanduser(), arguments[:index] + arguments[index + 2 :]
        if item.startswith(CONFIG_FLAG + "="):
            return Path(item.partition("=")[2]).expanduser(), arguments[:index] + arguments[index + 1 :]
    return None, arguments


def join_repeated_sources(tokens: list[str]) -> list[str]:
    """`--train_data a --train_data b` as one `--train_data` holding both lists of sources (argparse keeps the last)."""
    for name in SOURCE_FLAGS:
        values, kept, index = [], [], 0
        while index < len(tokens):
            if flag_name(tokens[index]) == name:
                _, value, index = split_flag(tokens, index)
                values.append(value or "")
            else:
                kept.append(tokens[index])
                index += 1
        if len(values) > 1:
            entries = [entry for value in values for entry in source_entries(value, f"--{name}")]
            tokens = [*kept, f"--{name}", json.dumps(entries, separators=(",", ":"))]
    return tokens


def raise_parse_error(path: Path, message: str) -> None:
    """argparse's error for a run from a config file: one line naming the file, instead of the usage text."""
    if "--train_data" in message and "required" in message:
        message = "no training data: add datasets (Axolotl) or train_data (our options), or pass --train_data"
    raise ConfigFileError(
        f"{path}: {message}. Fix the key in the file (or the flag after it); python train.py --help lists the options."
    )
