"""Fine-tune a Hugging Face causal LM on JSONL data: full fine-tune, LoRA or QLoRA.

Options (options.py): defaults from train.args beside this file; a config file (first, or --config FILE: our options
or Axolotl's, YAML or JSON, or a RunPod-style job body; see config_files.py) overrides them; flags on the command
line override both. `python train.py --help` lists every option with the value a run uses.

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

import sys

import quick_help

if __name__ == "__main__":
    quick_help.print_cached_help_and_exit(sys.argv[1:])  # before the imports below, which take seconds

# isort: split
import copy
import logging
import os
import signal
from dataclasses import fields

import quiet  # first: bitsandbytes warns while the libraries below are imported

# isort: split
import datasets
import transformers
from accelerate import PartialState
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

from attention import AttentionError, attention_implementation, attention_problems, flattens_batches, packed_attention
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
from config_files import ConfigFileError
from data_utils import (
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
from engine_utils import engine_problems, init_deepspeed_comm
from evaluation import AnswerAccuracyTrainer, accuracy_options, log_answer_accuracy
from launch_env import apply_memory_limit
from memory_estimate import check_memory_fits
from model_utils import (
    ModelLoadError,
    answer_sample_prompts,
    load_model,
    load_model_config,
    load_tokenizer,
    model_max_positions,
    peft_option_problems,
    save_trained_model,
    write_final_model,
    write_sample_generations,
)
from option_checks import path_problems
from options import NO_EVAL_DATA, ArgumentError, FinetuneTrainingArguments, has_eval_data, option_problems, parse_args
from redaction import SecretMaskingFilter, mask_secrets, register_secret_options
from reporting import write_run_report
from trackers import TrackingError, tracking_problems
from tracking import Tracking, start_tracking

logger = logging.getLogger(__name__)

# Errors the user fixes by changing the command or its inputs: one error line saying what and how, exit 2.
REFUSALS = (ArgumentError, AttentionError, ConfigFileError, DataError, ModelLoadError, OutputDirError, TrackingError)


class TrainingStopped(Exception):
    """Training ended early (preemption or the loss watchdog); carries the process exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


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


def find_argument_problems(model_args, data_args, lora_args, tracking_args, training_args) -> list[str]:
    problems = option_problems(data_args, lora_args, training_args)
    problems += path_problems(model_args, training_args)
    problems += tracking_problems(tracking_args, training_args)
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


def prepare_output_dir(training_args: FinetuneTrainingArguments, tracking: Tracking | None = None) -> str | None:
    """Lock, clean and mark the output dir on the main process (fetching the tracker's newest checkpoint when
    resuming with none here); return the checkpoint to resume from, if any."""
    state = PartialState()
    claim_output_dir(training_args, create=True)
    if state.is_main_process:
        if training_args.cleanup_output_dir_on_start:
            cleanup_output_dir(training_args.output_dir)
        mark_output_dir(training_args.output_dir)
        remove_incomplete_checkpoints(training_args.output_dir)
        if tracking is not None:
            tracking.restore_checkpoint()
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
    # A remote tracker is reached now (an unreachable one stops the run early); a store in --output_dir is created
    # once the data is valid (tracking.log_data).
    tracking = start_tracking(model_args, data_args, lora_args, tracking_args, training_args)

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
    if data_args.prepare_data_only:
        save_prepared_data(training_args, tokenizer, train_dataset, eval_dataset)
        return
    train_rows, eval_rows = pack_datasets(
        data_args, train_dataset, eval_dataset, max_length, rows_per_optimizer_step(training_args),
        flattens_batches(attention),
    )  # fmt: skip
    tracking.log_data(source_summary(train_dataset, eval_dataset), train=train_rows, eval=eval_rows)

    # Build the model
    check_memory_fits(model_config, model_args, lora_args, training_args, max_length)
    resume_checkpoint = prepare_output_dir(training_args, tracking)
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
    tracking.attach(trainer)
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
        if samples is not None:
            write_sample_generations(samples, training_args)
        if not training_args.keep_checkpoints:
            remove_intermediate_checkpoints(output_dir)
        argument_groups = (model_args, data_args, lora_args, tracking_args, training_args)
        summary = write_run_report(trainer, argument_groups, train_dataset, eval_dataset)
        tracking.finish(summary, trainer.state.global_step)
    logger.info("Fine-tuned model saved in %s.", output_dir)


if __name__ == "__main__":
    try:
        main()
    except REFUSALS as error:
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
