"""Fine-tune a Hugging Face causal LM on JSONL data: full fine-tune, LoRA or QLoRA.

Defaults come from train.args beside this file; a config file given first (our options or Axolotl's, YAML or JSON,
or a RunPod-style job body; see config_files.py) overrides them; flags on the command line override both.

CPU smoke test with the embedded tiny model (scripts/quickstart.sh runs this with more options):
    python scripts/make_tiny_model.py --output_dir models/tiny-llama-units --pretrain_steps 600
    accelerate launch --quiet --num_processes 1 train.py --model_id models/tiny-llama-units \
        --train_data sample_data/chat.jsonl --eval_data sample_data/chat_eval.jsonl --eval_accuracy true \
        --output_dir outputs/quickstart --use_qlora true

The same from an Axolotl-style config file (examples/), then chat with the result:
    accelerate launch --quiet --num_processes 1 train.py examples/axolotl_qlora_tiny.yaml
    python scripts/generate.py outputs/axolotl-qlora "Convert 250 kg to g."

One GPU, QLoRA (scripts/single_gpu_qlora.sh):
    accelerate launch --quiet --num_processes 1 train.py --model_id meta-llama/Llama-3.1-8B-Instruct \
        --train_data data/train.jsonl --output_dir outputs/llama-qlora --use_qlora true --bf16 true

Several GPUs on one machine, DDP (scripts/multi_gpu_ddp.sh):
    accelerate launch --multi_gpu --num_processes 8 train.py --use_ddp true --model_id ... --train_data ...

DeepSpeed ZeRO-3 (scripts/deepspeed_zero3_full.sh; configs in deepspeed_configs/) and FSDP (scripts/fsdp.sh):
    accelerate launch --use_deepspeed --num_processes 8 train.py --deepspeed deepspeed_configs/5_ds_z3_config.json ...
    accelerate launch --config_file accelerate_configs/fsdp_full_shard.yaml --num_processes 8 train.py ...
"""

import copy
import functools
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field, fields

import quiet  # first: bitsandbytes warns while the libraries below are imported

# isort: split
import datasets
import torch
import transformers
from accelerate import PartialState
from transformers import EarlyStoppingCallback, HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

from checkpoint_utils import (
    PREEMPTED_EXIT_CODES,
    WATCHDOG_EXIT_CODE,
    CheckpointCompletionCallback,
    DiskFullError,
    LossWatchdogCallback,
    OutputDirError,
    PreemptionCallback,
    cleanup_output_dir,
    ctrl_c_for_main_process_only,
    explain_disk_full,
    lock_output_dir,
    mark_output_dir,
    remove_incomplete_checkpoints,
    remove_intermediate_checkpoints,
    resolve_resume_checkpoint,
)
from config_files import ConfigFileError, config_file_argument, expand_command_line, last_value, raise_parse_error
from data_utils import (
    NO_EVAL_DATA,
    DataArguments,
    DataError,
    apply_chat_template_option,
    build_collator,
    load_prepared_datasets,
    pack_datasets,
    resolve_max_length,
    source_summary,
    training_columns,
    write_prepared_data,
)
from engine_utils import check_memory_fits, engine_problems, init_deepspeed_comm
from evaluation import AnswerAccuracyTrainer, accuracy_options, log_answer_accuracy
from mlfoundry_utils import TrackingArguments, save_run_arguments
from model_utils import (
    LoraArguments,
    ModelArguments,
    ModelLoadError,
    answer_sample_prompts,
    apply_memory_limit,
    attention_implementation,
    attention_problems,
    load_model,
    load_model_config,
    load_tokenizer,
    model_max_positions,
    peft_option_problems,
    save_trained_model,
    write_final_model,
    write_sample_generations,
)
from option_checks import cpu_has_bf16, option_value_problems
from packing import flattens_batches, packed_attention
from redaction import SecretMaskingFilter, mask_secrets, register_secret_options
from tracking import (
    TrackingError,
    attach_tracker,
    log_data_sources,
    log_packing_efficiency,
    report_run,
    restore_checkpoint_from_tracker,
    start_tracker,
    tracker_store_in_output_dir,
    tracking_problems,
)

logger = logging.getLogger(__name__)


class ArgumentError(Exception):
    """Incompatible or unsupported options; the message lists every problem found."""


class TrainingStopped(Exception):
    """Training ended early (preemption or the loss watchdog); carries the process exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


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


def parse_args() -> tuple:
    """Read train.args beside this script, then a config file, then the command line (the last value of a flag wins).
    Evaluation defaults to off when there is no evaluation data, unless the user asked for it."""
    parser = HfArgumentParser(ARGUMENT_GROUPS)
    arguments = expand_command_line(sys.argv[1:], ARGUMENT_GROUPS)
    config_file = config_file_argument(sys.argv[1:])
    if config_file:  # a problem in the file: one message naming it, not the usage text
        parser.error = functools.partial(raise_parse_error, config_file)
    try:
        groups = parser.parse_args_into_dataclasses(args=arguments, look_for_args_file=True)
        data_args, training_args = groups[1], groups[-1]
        user_asked = any(last_value(arguments, name) is not None for name in ("eval_strategy", "evaluation_strategy"))
        if training_args.eval_strategy != "no" and not has_eval_data(data_args) and not user_asked:
            # train.args evaluates by default; with no evaluation data that default yields, not the user's choice.
            groups = parser.parse_args_into_dataclasses(
                args=[*arguments, "--eval_strategy", "no"], look_for_args_file=True
            )
    except (ValueError, DataError) as error:  # raised by a __post_init__ (ours or transformers'): a message
        if config_file:
            raise ConfigFileError(f"{config_file}: {error}") from None
        if isinstance(error, DataError):
            raise
        raise ArgumentError(f"invalid options: {error}") from None
    return groups


def setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    # transformers and datasets write through handlers of their own.
    for name in ("", "transformers", "datasets"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(SecretMaskingFilter())
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    datasets.utils.logging.set_verbosity(training_args.get_process_log_level())
    quiet.quiet_run(uses_deepspeed=bool(training_args.deepspeed))


def has_eval_data(data_args: DataArguments) -> bool:
    return data_args.eval_data != NO_EVAL_DATA or data_args.eval_size > 0


def find_argument_problems(model_args, data_args, lora_args, tracking_args, training_args) -> list[str]:
    problems = option_value_problems(model_args, data_args, lora_args, training_args)
    problems += tracking_problems(tracking_args, training_args)
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
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size == 1:
        problems.append(
            f"{launched} processes were launched, but without a GPU each would train its own unsynchronised copy "
            "of the model. Add --use_cpu true to train them together on CPU (gloo; DDP or DeepSpeed)."
        )
    problems += attention_problems(model_args, training_args, data_args.sample_packing)
    problems += peft_option_problems(lora_args)
    problems += engine_problems(lora_args, training_args)
    return problems


def validate_args(model_args, data_args, lora_args, tracking_args, training_args) -> None:
    """Check every option combination before anything is loaded, and report all problems at once."""
    problems = find_argument_problems(model_args, data_args, lora_args, tracking_args, training_args)
    if problems:
        raise ArgumentError("invalid options:\n  " + "\n  ".join(problems))
    if not has_eval_data(data_args):
        logger.info("No evaluation data (no --eval_data, --eval_size 0): evaluation is off.")
    if data_args.eval_data == NO_EVAL_DATA and data_args.eval_size > 0 and training_args.eval_strategy == "no":
        logger.warning(
            "--eval_size %s holds records out of training but --eval_strategy is 'no': they are never used. "
            "Set --eval_size 0 to train on them.",
            data_args.eval_size,
        )
    if lora_args.use_lora and lora_args.use_qlora:
        logger.info("--use_lora true and --use_qlora true: training QLoRA (LoRA adapters on the quantized base).")


def claim_output_dir(training_args: TrainingArguments, create: bool) -> None:
    """Only the main process holds the lock: its ranks share one output dir by design."""
    if PartialState().is_main_process:
        lock_output_dir(training_args.output_dir, create)


def prepare_output_dir(training_args: FinetuneTrainingArguments, tracker=None) -> str | None:
    """Lock, clean and mark the output dir on the main process (fetching the tracker's newest checkpoint when
    resuming with none here); return the checkpoint to resume from, if any."""
    state = PartialState()
    claim_output_dir(training_args, create=True)
    if state.is_main_process:
        if training_args.cleanup_output_dir_on_start:
            cleanup_output_dir(training_args.output_dir)
        mark_output_dir(training_args.output_dir)
        remove_incomplete_checkpoints(training_args.output_dir)
        restore_checkpoint_from_tracker(tracker, training_args)
    state.wait_for_everyone()
    return resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)


def save_prepared_data(training_args, tokenizer, train_dataset, eval_dataset) -> None:
    """--prepare_data_only: the main process writes the prepared data and a preview of the loss mask."""
    prepare_output_dir(training_args)
    if PartialState().is_main_process:
        directory = write_prepared_data(training_args.output_dir, tokenizer, train_dataset, eval_dataset)
        logger.info("Prepared data and preview.txt written to %s; no model was loaded.", directory)


def trainer_copy_of_arguments(training_args: FinetuneTrainingArguments) -> FinetuneTrainingArguments:
    """The Trainer pickles its arguments into training_args.bin (output dir, adapter/, every checkpoint), so its copy
    holds no hub token (huggingface_hub reads HF_TOKEN, set here, for --push_to_hub) and masked strings. It gets no
    --save_total_limit either: CheckpointCompletionCallback rotates checkpoints (see build_trainer)."""
    trainer_args = copy.copy(training_args)
    if training_args.hub_token:
        os.environ["HF_TOKEN"] = training_args.hub_token
        trainer_args.hub_token = None
    for option in fields(trainer_args):
        value = getattr(trainer_args, option.name)
        if isinstance(value, str) and option.name not in ("output_dir", "logging_dir"):
            setattr(trainer_args, option.name, mask_secrets(value))
    trainer_args.save_total_limit = None
    return trainer_args


def build_trainer(
    model,
    tokenizer,
    training_args,
    data_args,
    train_rows,
    eval_rows,
    eval_dataset,
    max_length,
    callbacks,
    flattened=False,
) -> Trainer:
    """The Trainer on the (packed) rows; eval_dataset, the unpacked evaluation samples, feeds eval_accuracy."""
    # The Trainer deletes old checkpoints before the callback marks the new one complete; a kill in between could
    # leave none complete. So the Trainer gets no --save_total_limit and the callback rotates after marking.
    callbacks = [CheckpointCompletionCallback(training_args.save_total_limit), *callbacks]
    trainer_args = trainer_copy_of_arguments(training_args)
    if training_args.early_stopping_patience:
        callbacks.append(
            EarlyStoppingCallback(training_args.early_stopping_patience, training_args.early_stopping_threshold)
        )
    return AnswerAccuracyTrainer(
        model=model,
        args=trainer_args,
        train_dataset=training_columns(train_rows),
        eval_dataset=training_columns(eval_rows),
        processing_class=tokenizer,
        data_collator=build_collator(data_args, tokenizer, max_length, flattened),
        callbacks=callbacks,
        accuracy_dataset=eval_dataset if training_args.eval_accuracy_during_training else None,
        accuracy_options=accuracy_options(training_args),
    )


def rows_per_optimizer_step(training_args: TrainingArguments) -> int:
    return training_args.world_size * training_args.train_batch_size * training_args.gradient_accumulation_steps


def raise_if_stopped_early(preemption: PreemptionCallback, watchdog: LossWatchdogCallback) -> None:
    if preemption.received:
        raise TrainingStopped(
            f"Preempted by {preemption.received.name}: the complete checkpoint {preemption.checkpoint} holds the "
            "run. Rerun the same command with --resume_from_checkpoint true to continue.",
            preemption.exit_code,
        )
    if watchdog.reason:
        raise TrainingStopped(
            f"Loss watchdog stopped training: {watchdog.reason}. No model was saved; the newest checkpoint (if any) "
            "is the last good state. Lower --learning_rate or check the data, then resume or restart.",
            WATCHDOG_EXIT_CODE,
        )


def main() -> None:
    model_args, data_args, lora_args, tracking_args, training_args = parse_args()
    register_secret_options(model_args, data_args, lora_args, tracking_args, training_args)
    setup_logging(training_args)
    validate_args(model_args, data_args, lora_args, tracking_args, training_args)
    claim_output_dir(training_args, create=False)  # another run in an existing output dir: refuse now
    # A remote tracker is reached now, so an unreachable one stops the run early; a local store is created in
    # --output_dir, so only once the data is valid.
    local_store = tracker_store_in_output_dir(tracking_args, training_args)
    tracker = None if local_store else start_tracker(model_args, data_args, lora_args, tracking_args, training_args)

    # Read, validate and tokenize the data (or reuse the cached result): before any model weight is loaded.
    model_config = load_model_config(model_args)
    attention = attention_implementation(model_args, training_args, data_args.sample_packing, model_config)
    tokenizer = load_tokenizer(model_args)
    apply_chat_template_option(tokenizer, data_args)
    max_length = resolve_max_length(data_args, tokenizer, model_max_positions(model_config))
    with training_args.main_process_first(desc="preparing data"), ctrl_c_for_main_process_only():
        train_dataset, eval_dataset = load_prepared_datasets(
            data_args, tokenizer, max_length, training_args.data_seed or training_args.seed
        )
    log_data_sources(tracker, source_summary(train_dataset, eval_dataset))
    if data_args.prepare_data_only:
        save_prepared_data(training_args, tokenizer, train_dataset, eval_dataset)
        return
    train_rows, eval_rows = pack_datasets(
        data_args, train_dataset, eval_dataset, max_length, rows_per_optimizer_step(training_args),
        flattens_batches(attention),
    )  # fmt: skip
    if local_store:
        claim_output_dir(training_args, create=True)
        tracker = start_tracker(model_args, data_args, lora_args, tracking_args, training_args)
    log_packing_efficiency(tracker, train=train_rows, eval=eval_rows)

    # Build the model
    check_memory_fits(model_config, model_args, lora_args, training_args, max_length)
    resume_checkpoint = prepare_output_dir(training_args, tracker)
    apply_memory_limit(training_args)
    init_deepspeed_comm(training_args)
    set_seed(training_args.seed)  # the LoRA matrices and any new embedding rows are drawn from it
    model = load_model(model_args, lora_args, training_args, tokenizer, attention)

    # Train
    preemption = PreemptionCallback()
    watchdog = LossWatchdogCallback(training_args.loss_watchdog_threshold, training_args.loss_watchdog_patience)
    trainer = build_trainer(
        model, tokenizer, training_args, data_args, train_rows, eval_rows, eval_dataset, max_length,
        [preemption, watchdog], flattens_batches(attention),
    )  # fmt: skip
    attach_tracker(trainer, tracker, tracking_args)
    with packed_attention(model, attention, data_args.sample_packing), explain_disk_full(training_args.output_dir):
        trainer.train(resume_from_checkpoint=resume_checkpoint)
    raise_if_stopped_early(preemption, watchdog)
    if training_args.eval_accuracy:  # on every rank, like --sample_generations; logged before the state is saved
        log_answer_accuracy(trainer, eval_dataset, accuracy_options(training_args))

    # Save: every rank takes part in the collective save and the generations (ZeRO-3 / FSDP forward passes need all
    # of them); then only the main process merges and writes, while the others finish without waiting for it. All
    # of it before any wait on the tracker: a hung tracker cannot cost the model.
    with explain_disk_full(training_args.output_dir):
        output_dir = save_trained_model(trainer, lora_args)
    samples = None
    if training_args.sample_generations:
        samples = answer_sample_prompts(trainer.model, tokenizer, eval_dataset, train_dataset, training_args)
    if trainer.is_world_process_zero():
        with explain_disk_full(training_args.output_dir):
            write_final_model(model_args, lora_args, tokenizer, training_args)
        save_run_arguments(output_dir, model_args, data_args, lora_args, tracking_args, training_args)
        if samples is not None:
            write_sample_generations(samples, training_args)
        if not training_args.keep_checkpoints:
            remove_intermediate_checkpoints(output_dir)
        report_run(tracker, trainer, (model_args, data_args, lora_args, training_args), train_dataset, eval_dataset)
    logger.info("Fine-tuned model saved in %s.", output_dir)


if __name__ == "__main__":
    try:
        main()
    except (ArgumentError, ConfigFileError, DataError, ModelLoadError, OutputDirError, TrackingError) as error:
        logger.error("%s", error)
        sys.exit(2)
    except DiskFullError as error:
        logger.error("%s", error)
        sys.exit(1)
    except KeyboardInterrupt:  # outside training (during training Ctrl-C saves a checkpoint, then exits 130)
        logger.error(
            "Interrupted (Ctrl-C). Rerun the same command to start again (with --resume_from_checkpoint true, from "
            "the newest complete checkpoint, if any)."
        )
        sys.exit(PREEMPTED_EXIT_CODES[signal.SIGINT])
    except TrainingStopped as stop:
        logger.error("%s", stop)
        sys.exit(stop.exit_code)
