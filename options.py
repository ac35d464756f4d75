"""The options of train.py: every option dataclass with its defaults and help, the checks that need only option
values, and the parser that layers train.args, a config file and the command line.

Precedence, lowest first: the dataclass defaults, train.args beside this file (only values that differ from
upstream TrainingArguments), a config file (ours, Axolotl's or a RunPod-style job; config_files.py translates it into
our options), then the command line. `python train.py --help` shows the effective defaults.
"""

import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Literal

import quiet  # first: bitsandbytes warns while transformers imports it

# isort: split
import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

import attention
from config_files import (
    ConfigFileError,
    Translation,
    command_line_tokens,
    flag_values,
    last_value,
    load_config_file,
    raise_parse_error,
    report_untranslated,
    split_config_file,
)
from data_formats import RECORD_FORMATS
from data_mixing import MIXING_STRATEGIES, NO_EVAL_DATA, DataSource, parse_sources
from data_sources import DataError
from launch_env import launched_processes
from quick_help import CACHE_ROOT, is_plain_help_request, store_help

TRAIN_ARGS_FILE = Path(__file__).with_name("train.args")
AUTO_TARGET_MODULES = "auto"  # --lora_target_modules: every linear layer but the output head
HELP_USAGE = "train.py [CONFIG.yaml | --config FILE] --model_id MODEL --train_data DATA [--option value ...]"
HELP_DESCRIPTION = """Fine-tune a Hugging Face causal LM on JSONL data: full fine-tune, LoRA or QLoRA.

A config file (YAML or JSON, first or after --config) holds our options, Axolotl's, or a RunPod-style job body; see
the README, "Config files". Values come from, lowest first: the defaults shown below, which include %s
(one `--flag value` per line), then the config file, then the command line."""


class ArgumentError(Exception):
    """Incompatible or unsupported options; the message lists every problem found."""


@dataclass
class ModelArguments:
    model_id: str = field(metadata={"help": "Hugging Face Hub id or local directory of the causal LM to fine-tune."})
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run Python code shipped with the model repo. Off by default: enable only for repos you trust."
        },
    )
    attn_implementation: Literal[attention.CHOICES] = field(
        default=attention.AUTO, metadata={"help": attention.OPTION_HELP}
    )
    use_flash_attention: bool = field(
        default=False,
        metadata={
            "help": "Old switch for --attn_implementation flash_attention_2; where flash-attn or a GPU is missing, "
            "'auto' is used instead (with a warning)."
        },
    )
    special_tokens: str | None = field(
        default=None,
        metadata={
            "help": 'Special tokens to set on the tokenizer, as a JSON object, e.g. \'{"pad_token": "<|pad|>"}\'. '
            "New tokens grow the embeddings (train them with --lora_modules_to_save under LoRA)."
        },
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
    use_lora: bool = field(
        default=False, metadata={"help": "Train an adapter (--peft_method, LoRA by default) on a frozen base model."}
    )
    use_qlora: bool = field(
        default=False, metadata={"help": "Train an adapter on a base quantized with bitsandbytes (QLoRA)."}
    )
    peft_method: Literal["lora", "ia3"] = field(
        default="lora",
        metadata={
            "help": "Adapter type with --use_lora / --use_qlora: 'lora', or 'ia3' (learned scaling vectors; with "
            "--lora_target_modules auto it adapts PEFT's default IA3 layers for the architecture)."
        },
    )
    use_dora: bool = field(
        default=False,
        metadata={"help": "DoRA: LoRA with a learned magnitude per output (slower steps, often better at low rank)."},
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
    lora_modules_to_save: str | None = field(
        default=None,
        metadata={
            "help": "JSON list of modules trained in full and saved with the adapter, e.g. "
            '\'["embed_tokens", "lm_head"]\' when new tokens were added.'
        },
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


@dataclass
class DataArguments:
    train_data: str = field(
        metadata={
            "help": "Training data: a .jsonl/.jsonl.gz/.json/.parquet file or a directory of them, an http(s):// or "
            "s3://, gs://, ... URL, a Hugging Face dataset id or save_to_disk directory (append :split to pick a "
            "split), or a TrueFoundry artifact version FQN. Several sources: repeat the flag, separate them with "
            "commas, or give a JSON list; a JSON object gives one source options (format, fields, roles, split, "
            'records, weight, ...), e.g. \'[{"path": "chat.jsonl", "weight": 3}, "alpaca.jsonl"]\'. See the README.'
        }
    )
    eval_data: str = field(
        default=NO_EVAL_DATA,
        metadata={
            "help": "Evaluation data in the same form as --train_data (several sources are concatenated). 'NA' splits "
            "--eval_size off the train data."
        },
    )
    eval_size: float = field(
        default=0.1,
        metadata={
            "help": "Used when --eval_data is NA: a fraction (< 1) or a number of records (>= 1) split off the "
            "training data, shuffled with --data_seed. 0 disables evaluation."
        },
    )
    data_format: Literal[RECORD_FORMATS] = field(
        default="auto",
        metadata={
            "help": "Record shape. 'auto' detects it per record from its keys; any other value is enforced. A source's "
            "own 'format' option wins."
        },
    )
    data_mixing: Literal[MIXING_STRATEGIES] = field(
        default="concat",
        metadata={
            "help": "How several training sources make one dataset: 'concat' uses every record of each once; "
            "'weighted' draws --data_mix_size records, each source's share in proportion to its 'weight' "
            "(under-sampling without replacement, over-sampling by repeating), deterministic from --data_seed."
        },
    )
    data_mix_size: int = field(
        default=0,
        metadata={"help": "Training records of a --data_mixing weighted mixture. 0: as many as the sources hold."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "Jinja chat template (the template itself or a file holding it) that replaces the tokenizer's. "
            "A tokenizer without one gets a ChatML-style default whose turns end with EOS."
        },
    )
    chat_template_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "Extra variables for every chat template render, as a JSON object, e.g. "
            "'{\"enable_thinking\": false}' for Qwen3 without thinking. A data source's own chat_template_kwargs "
            "win over these."
        },
    )
    default_system_message: str | None = field(
        default=None,
        metadata={"help": "System message put first in every chat (alpaca, sharegpt included) that has none."},
    )
    skip_invalid_samples: bool = field(
        default=False,
        metadata={"help": "Drop invalid records (and report how many) instead of stopping with a report."},
    )
    dedup: bool = field(default=False, metadata={"help": "Drop exact duplicate records (the count is reported)."})
    max_num_samples: int = field(
        default=0, metadata={"help": "Use only the first N training records (before the eval split). 0 uses all."}
    )
    train_on_prompt: bool = field(
        default=False,
        metadata={"help": "Train on every non-pad token. By default only completions / assistant turns carry loss."},
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Maximum tokens per sample. Default: the model's limit (tokenizer, then model config)."},
    )
    long_sequence_strategy: Literal["error", "truncate", "drop"] = field(
        default="error",
        metadata={
            "help": "What to do with samples longer than --max_length: 'error' stops with a report, 'truncate' cuts "
            "them (labels stay aligned), 'drop' leaves them out and reports how many."
        },
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={
            "help": "Pad every batch to --max_length (static shapes). By default batches pad to their longest sample."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=8, metadata={"help": "Round padded batch lengths up to a multiple of this (8 suits GPU tensor cores)."}
    )
    sample_packing: bool = field(
        default=False,
        metadata={
            "help": "Pack several samples into each row of at most --max_length tokens (first-fit decreasing), each "
            "sample attending only to itself. Fewer padding tokens: faster training on data with short samples. "
            "Steps per epoch count packed rows, so fewer steps cover the data; adjust --max_steps/--save_steps."
        },
    )
    eval_sample_packing: bool = field(
        default=True,
        metadata={
            "help": "With --sample_packing true, pack the evaluation data too (faster evaluation, same loss per "
            "token). Set false to evaluate one sample per row."
        },
    )
    prepare_data_only: bool = field(
        default=False,
        metadata={
            "help": "Load, validate and tokenize the data, write <output_dir>/prepared/{train,eval,preview.txt}, "
            "then exit without loading the model."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "Processes that tokenize. Default: every CPU core for large datasets, 1 for small ones."},
    )
    data_cache_dir: str = field(
        default=str(CACHE_ROOT / "prepared"),
        metadata={
            "help": "Where tokenized datasets are cached, keyed by data content, tokenizer, template and data "
            "options; a rerun with the same inputs reuses them. 'none' disables the cache."
        },
    )

    def __post_init__(self):
        train = self.sources("train")  # a malformed source stops here, before anything is loaded
        if self.eval_data != NO_EVAL_DATA and any(source.weight != 1 for source in self.sources("eval")):
            raise DataError("--eval_data: evaluation sources are concatenated; 'weight' applies to --train_data.")
        if self.data_mixing == "concat" and any(source.weight != 1 for source in train):
            raise DataError("--train_data: a source has a 'weight', which only --data_mixing weighted uses.")
        if self.data_mix_size and self.data_mixing != "weighted":
            raise DataError("--data_mix_size sets the size of a --data_mixing weighted mixture; set both or neither.")
        if self.data_mix_size < 0:
            raise DataError("--data_mix_size must be >= 0.")

    def sources(self, split: Literal["train", "eval"]) -> list[DataSource]:
        """The sources of --train_data or --eval_data with their options."""
        return parse_sources(self.train_data if split == "train" else self.eval_data, f"--{split}_data")


@dataclass
class TrackingArguments:
    mlfoundry_enable_reporting: bool = field(
        default=False, metadata={"help": "Log params, metrics and the model to a TrueFoundry ML repo."}
    )
    mlfoundry_ml_repo: str | None = field(default=None, metadata={"help": "TrueFoundry ML repo to log the run to."})
    mlfoundry_run_name: str | None = field(
        default=None, metadata={"help": "Run name in the ML repo. Default: TFY_INTERNAL_JOB_RUN_NAME or a timestamp."}
    )
    mlfoundry_checkpoint_artifact_name: str | None = field(
        default=None,
        metadata={"help": "Artifact that checkpoints are uploaded to. Default: derived from the run name."},
    )
    mlfoundry_log_checkpoints: bool = field(
        default=True, metadata={"help": "Upload every saved checkpoint to the ML repo (with reporting enabled)."}
    )
    mlflow_experiment_name: str | None = field(
        default=None,
        metadata={"help": "MLflow experiment (--report_to mlflow). Default: MLFLOW_EXPERIMENT_NAME or llm-finetune."},
    )
    mlflow_run_name: str | None = field(
        default=None,
        metadata={
            "help": "MLflow run name. Default: TFY_INTERNAL_JOB_RUN_NAME or a timestamp. Keep it the same on every "
            "attempt of a job so that --resume_from_checkpoint true can continue from the run's uploaded checkpoint."
        },
    )
    tracker_upload_timeout: float = field(
        default=600,
        metadata={
            "help": "Seconds to wait, all together, for the uploads still pending once the final model is saved "
            "(metrics, checkpoints, the model version); after that the run ends (exit code 0) with a warning "
            "listing what the tracker did not get. Raise it to upload large models over slow links."
        },
    )
    mlflow_log_checkpoints: bool = field(
        default=False,
        metadata={"help": "Upload every saved checkpoint to the MLflow run (with --report_to mlflow)."},
    )


@dataclass
class FinetuneTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments plus the TrueFoundry launcher's options, with defaults for fine-tuning."""

    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={
            "help": "Integrations to report to, space- or comma-separated (tensorboard mlflow, or tensorboard,mlflow); "
            "'none' for none. TensorBoard by default."
        },
    )
    # Typed str (upstream's `str | bool` parses as bool only), so 'non_padding' can be passed and be the default.
    include_num_input_tokens_seen: str = field(
        default="non_padding",
        metadata={
            "help": "Count input tokens: 'non_padding' (default: the logged train_tokens_per_second counts real "
            "tokens), 'all' or 'no'."
        },
    )
    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "Batch samples of similar length together: less padding without --sample_packing (same as "
            "--train_sampling_strategy group_by_length)."
        },
    )
    dataloader_pin_memory: bool | None = field(
        default=None,
        metadata={"help": "Pin data-loader memory for faster copies to the GPU; by default on when there is one."},
    )
    evaluation_strategy: str | None = field(
        default=None, metadata={"help": "Old name of --eval_strategy (transformers < 5), accepted as an alias."}
    )
    cleanup_output_dir_on_start: bool = field(
        default=False,
        metadata={"help": "Delete --output_dir before training; only a directory this script created is ever deleted."},
    )
    use_ddp: bool = field(
        default=False,
        metadata={
            "help": "Set when launching several processes (accelerate launch --multi_gpu): one model copy per GPU."
        },
    )
    early_stopping_patience: int = field(
        default=0, metadata={"help": "Stop after this many evaluations without eval-loss improvement. 0 disables it."}
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "Smallest eval-loss improvement that resets the early-stopping patience."}
    )
    keep_checkpoints: bool = field(
        default=False,
        metadata={
            "help": "Keep the intermediate checkpoints after a successful run (by default only the model stays)."
        },
    )
    loss_watchdog_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Stop when the logged training loss stays above this for --loss_watchdog_patience logging steps. "
            "A NaN/inf loss always stops training."
        },
    )
    loss_watchdog_patience: int = field(
        default=3, metadata={"help": "Consecutive logging steps above --loss_watchdog_threshold that stop training."}
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "Replace NaN/inf step losses by the running mean in the logs. Off by default so the loss "
            "watchdog sees a diverging run."
        },
    )

    strict: bool = field(
        default=False,
        metadata={"help": "Stop, instead of warning, when a config file has keys with no equivalent here."},
    )
    sample_generations: int = field(
        default=0,
        metadata={
            "help": "After training, answer this many evaluation prompts (training ones without eval data) and write "
            "prompt, reference and answer to --output_dir/samples.jsonl. 0 disables it."
        },
    )
    sample_max_new_tokens: int = field(
        default=64, metadata={"help": "Most tokens generated per answer of --sample_generations (greedy)."}
    )
    eval_accuracy: bool = field(
        default=False,
        metadata={
            "help": "After training, answer the evaluation prompts (greedy, --per_device_eval_batch_size at a time) "
            "and log eval_accuracy: the share of answers equal to the trained answer, special tokens removed; "
            "every answer goes to --output_dir/eval_answers.jsonl. For tasks with one right answer; needs "
            "evaluation data."
        },
    )
    eval_accuracy_during_training: bool = field(
        default=False, metadata={"help": "Also log eval_accuracy at each evaluation (--eval_strategy), with eval_loss."}
    )
    eval_accuracy_samples: int = field(
        default=0, metadata={"help": "Most evaluation prompts answered for eval_accuracy (0: all of them)."}
    )
    eval_accuracy_max_new_tokens: int = field(
        default=64, metadata={"help": "Most tokens generated per answer for eval_accuracy; longer answers fail."}
    )

    def __post_init__(self):
        self.report_to = split_list_option(self.report_to)
        if problem := precision_problem(self):  # TrainingArguments would raise it with a traceback
            raise ArgumentError(problem)
        if self.deepspeed and isinstance(self.deepspeed, str) and not self.deepspeed.lstrip().startswith("{"):
            if not os.path.isfile(self.deepspeed):  # checked before TrainingArguments reads it
                raise ArgumentError(f"--deepspeed {self.deepspeed}: no such file; see deepspeed_configs/.")
        self.include_num_input_tokens_seen = {"true": "all", "false": "no"}.get(
            self.include_num_input_tokens_seen.lower(), self.include_num_input_tokens_seen
        )
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.use_ddp and self.ddp_find_unused_parameters is None:
            # Every parameter that trains gets a gradient each step; skipping the search saves a graph traversal.
            self.ddp_find_unused_parameters = False
        if self.early_stopping_patience and self.metric_for_best_model is None:
            self.metric_for_best_model = "eval_loss"
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = torch.accelerator.is_available()
        if self.disable_tqdm is None and not quiet.output_is_terminal():
            self.disable_tqdm = True  # the Trainer then prints each log line instead of redrawing a bar
        super().__post_init__()


def split_list_option(values: str | list[str]) -> list[str]:
    """A list flag as users write it: space- or comma-separated, or the JSON list a config file gives (a plain
    string when the arguments are built in code)."""
    if isinstance(values, str):
        values = [values]
    if len(values) == 1 and values[0].lstrip().startswith("["):
        values = json.loads(values[0])
    return [item.strip() for value in values for item in str(value).split(",") if item.strip()]


def precision_problem(args: TrainingArguments) -> str | None:
    if args.bf16 and args.fp16:
        return "--bf16 true and --fp16 true: pick one precision (bf16 on GPUs that have it, else fp16)."
    if args.bf16 and not args.use_cpu and not is_torch_bf16_gpu_available() and not is_torch_xla_available():
        return "--bf16 true needs a GPU with bfloat16 (Ampere or newer); on a CPU add --use_cpu true, or drop --bf16."
    if args.bf16 and args.use_cpu and not cpu_has_bf16():
        return "--bf16 true: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX); drop --bf16."
    return None


ARGUMENT_GROUPS = (ModelArguments, DataArguments, LoraArguments, TrackingArguments, FinetuneTrainingArguments)


def option_names() -> set[str]:
    return {item.name for group in ARGUMENT_GROUPS for item in fields(group) if item.init}


def read_defaults_file(path: Path = TRAIN_ARGS_FILE) -> dict[str, str]:
    """train.args: `--flag value` pairs, one per line (# starts a comment)."""
    return flag_values(shlex.split(path.read_text(), comments=True)) if path.is_file() else {}


def build_parser(config_file: Path | None = None) -> HfArgumentParser:
    """The parser with train.args applied as defaults, so --help shows the values a run uses."""
    parser = HfArgumentParser(ARGUMENT_GROUPS, usage=HELP_USAGE, description=HELP_DESCRIPTION % TRAIN_ARGS_FILE)
    set_parser_defaults(parser, read_defaults_file())
    if config_file:  # a problem in the file: one message naming it, not the usage text
        parser.error = partial(raise_parse_error, config_file)
    return parser


def apply_config_file(parser: HfArgumentParser, path: Path) -> Translation:
    """The file's values become the parser's defaults (the command line still overrides them); argparse types a
    string default like a typed value but does not check its choices, so that is done here."""
    translation = load_config_file(path, option_names())
    for action in parser._actions:
        value = translation.values.get(action.dest)
        if action.choices is not None and isinstance(value, str) and not is_choice(action, value):
            choices = ", ".join(str(choice) for choice in action.choices)
            raise ConfigFileError(f"{path}: {action.dest}: {value!r} is not one of {choices}.")
    set_parser_defaults(parser, translation.values)
    return translation


def is_choice(action, value: str) -> bool:
    try:
        return (action.type(value) if action.type else value) in action.choices
    except (TypeError, ValueError):  # e.g. "four" for an int choice
        return False


def set_parser_defaults(parser: HfArgumentParser, values: dict) -> None:
    """Values that the command line may still override; a required option given here is no longer required."""
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values:
            action.required = False


def user_set_evaluation(arguments: list[str], translation: Translation | None) -> bool:
    names = ("eval_strategy", "evaluation_strategy")
    in_file = translation is not None and any(name in translation.values for name in names)
    return in_file or any(last_value(arguments, name) is not None for name in names)


def parse_args(argv: list[str] | None = None) -> tuple:
    """The option groups of this run (see ARGUMENT_GROUPS). Evaluation defaults to off when there is no evaluation
    data, unless the user asked for it. A config file's environment (credentials, W&B names) is set once it parses."""
    config_file, command_line = split_config_file(sys.argv[1:] if argv is None else argv)
    parser = build_parser(config_file)
    if not config_file and is_plain_help_request(command_line):
        store_help(parser.format_help())  # the next --help is answered before the heavy imports (quick_help.py)
    translation = apply_config_file(parser, config_file) if config_file else None
    arguments = command_line_tokens(command_line)
    try:
        groups = parser.parse_args_into_dataclasses(args=arguments, look_for_args_file=False)
        data_args, training_args = groups[1], groups[-1]
        if training_args.eval_strategy != "no" and not has_eval_data(data_args):
            if not user_set_evaluation(arguments, translation):
                # train.args evaluates by default; with no evaluation data that default yields, not the user's choice.
                parser.set_defaults(eval_strategy="no")
                groups = parser.parse_args_into_dataclasses(args=arguments, look_for_args_file=False)
    except (ValueError, DataError) as error:  # raised by a __post_init__ (ours or transformers'): a message
        if config_file:
            raise ConfigFileError(f"{config_file}: {error}") from None
        if isinstance(error, DataError):
            raise
        raise ArgumentError(f"invalid options: {error}") from None
    if translation:
        report_untranslated(config_file, translation, strict=groups[-1].strict)
        os.environ.update(translation.environment)
    return groups


def has_eval_data(data_args: DataArguments) -> bool:
    return data_args.eval_data != NO_EVAL_DATA or data_args.eval_size > 0


def option_problems(data_args, lora_args, training_args) -> list[str]:
    """Values out of range and combinations that cannot work, each naming the flag to change."""
    problems = value_problems(data_args, lora_args, training_args)
    if training_args.eval_strategy != "no" and not has_eval_data(data_args):
        problems.append("--eval_strategy needs evaluation data: pass --eval_data or an --eval_size > 0.")
    if (training_args.eval_accuracy or training_args.eval_accuracy_during_training) and not has_eval_data(data_args):
        problems.append("--eval_accuracy needs evaluation data: pass --eval_data or an --eval_size > 0.")
    if training_args.eval_accuracy_during_training and training_args.eval_strategy == "no":
        problems.append("--eval_accuracy_during_training needs evaluation: set --eval_strategy steps or epoch.")
    if training_args.early_stopping_patience and training_args.eval_strategy == "no":
        problems.append("--early_stopping_patience needs evaluation: set --eval_strategy steps or epoch.")
    if training_args.cleanup_output_dir_on_start and (training_args.resume_from_checkpoint or "").lower() == "true":
        problems.append(
            "--cleanup_output_dir_on_start true would delete the checkpoints that --resume_from_checkpoint true "
            "resumes from; set one of them to false."
        )
    if training_args.enable_jit_checkpoint:
        problems.append(
            "--enable_jit_checkpoint: this script handles SIGTERM itself (a complete checkpoint after the current "
            "step, exit code 143); drop the flag."
        )
    launched = launched_processes()
    if launched > 1 and training_args.world_size == 1:
        problems.append(
            f"{launched} processes were launched, but without a GPU each would train its own unsynchronised copy "
            "of the model. Add --use_cpu true to train them together on CPU (gloo; DDP or DeepSpeed)."
        )
    return problems


def value_problems(data_args, lora_args, training_args) -> list[str]:
    problems = []
    if training_args.learning_rate <= 0:
        problems.append(f"--learning_rate {training_args.learning_rate:g} must be a positive number (e.g. 0.0002).")
    if lora_args.use_peft and lora_args.peft_method == "lora" and lora_args.lora_r < 1:
        problems.append(f"--lora_r {lora_args.lora_r}: the LoRA rank must be at least 1 (8 to 64 is usual).")
    if data_args.max_length is not None and data_args.max_length < 1:
        problems.append(
            f"--max_length {data_args.max_length} must be at least 1; leave it out to use the model's limit."
        )
    eval_size = data_args.eval_size
    if eval_size < 0 or (eval_size >= 1 and not float(eval_size).is_integer()):
        problems.append(
            f"--eval_size {eval_size:g}: pass a fraction below 1 (0.1 holds out 10%), a whole number of records, "
            "or 0 for no evaluation split."
        )
    return problems


def cpu_has_bf16() -> bool:
    """x86 CPUs compute bfloat16 natively only with AVX512-BF16 or AMX; without, PyTorch emulates it very slowly."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # ARM CPUs with bf16 (SVE, Apple) have no such probe here; let PyTorch decide
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
