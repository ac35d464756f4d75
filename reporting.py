"""What a finished run says about itself, with or without a tracker: its options (run_args.json), the run summary,
the model card (README.md) and the training curves, all in --output_dir (names in output_layout.py).

A tracker gets the same summary (tracking.py); nothing here knows whether one is used.
"""

import dataclasses
import json
import logging
from pathlib import Path

from data_mixing import NO_EVAL_DATA
from output_layout import ADAPTER_SUBDIR, MODEL_CARD, RUN_ARGS_FILE, TRAINING_CURVES
from packing import column_values
from redaction import mask_secrets

logger = logging.getLogger(__name__)

# TrainingArguments worth seeing next to a run (tracker params, the model card's hyperparameters).
TRAINING_PARAMS = (
    "output_dir", "run_name", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "per_device_eval_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
    "warmup_steps", "weight_decay", "max_grad_norm", "optim", "seed", "data_seed", "bf16", "fp16", "tf32",
    "gradient_checkpointing", "torch_compile", "auto_find_batch_size", "logging_steps", "eval_strategy",
    "eval_steps", "save_strategy", "save_steps", "save_total_limit", "report_to", "resume_from_checkpoint",
    "use_cpu", "neftune_noise_alpha",
)  # fmt: skip
FINAL_METRICS = ("loss", "eval_loss", "eval_accuracy", "train_loss", "train_runtime", "train_tokens_per_second",
                 "epoch", "step")  # fmt: skip


def run_arguments(*argument_groups) -> dict:
    """Every option of the run, as JSON-ready values with secrets masked."""
    merged = {}
    for group in argument_groups:
        values = group.to_dict() if hasattr(group, "to_dict") else dataclasses.asdict(group)
        merged.update(values)
    return mask_secrets(json.loads(json.dumps(merged, default=str)))


def method_name(lora_args) -> str:
    if lora_args.use_qlora:
        return f"QLoRA ({lora_args.qlora_bit_length}-bit, r={lora_args.lora_r}, alpha={lora_args.lora_alpha})"
    if lora_args.use_lora:
        return f"LoRA (r={lora_args.lora_r}, alpha={lora_args.lora_alpha})"
    return "full fine-tune"


def final_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last value of each headline metric in the Trainer's log history."""
    found = {}
    for entry in log_history:
        found.update({k: entry[k] for k in FINAL_METRICS if k in entry})
    return found


def run_summary(model_args, data_args, lora_args, training_args, log_history, train_dataset, eval_dataset) -> dict:
    """Base model, method, data, hyperparameters and final metrics, secrets masked: the model card's content and the
    model version's metadata."""

    def data_summary(dataset):
        if dataset is None:
            return {"samples": 0, "trained_tokens": 0}
        trained = int(column_values(dataset, "num_trained").sum()) if "num_trained" in dataset.column_names else None
        return {"samples": len(dataset), "trained_tokens": trained}

    training = run_arguments(training_args)
    skipped = ("output_dir", "report_to", "resume_from_checkpoint", "run_name")
    eval_data = data_args.eval_data
    if eval_data == NO_EVAL_DATA:
        eval_data = f"--eval_size {data_args.eval_size:g} of the train data"
    return {
        "base_model": mask_secrets(model_args.model_id),
        "method": method_name(lora_args),
        "merged": lora_args.use_peft and lora_args.merge_adapters,
        "data": {
            "train_data": mask_secrets(data_args.train_data),
            "eval_data": mask_secrets(eval_data),
            "train": data_summary(train_dataset),
            "eval": data_summary(eval_dataset),
        },
        "hyperparameters": {
            k: training[k] for k in TRAINING_PARAMS if k not in skipped and training.get(k) is not None
        },
        "final_metrics": final_metrics(log_history),
    }


def write_model_card(directory: Path, summary: dict, curves: str = TRAINING_CURVES) -> Path:
    data, metrics = summary["data"], summary["final_metrics"]
    lines = [
        "---",
        f"base_model: {summary['base_model']}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [llm-finetune]",
        "---",
        "",
        f"# Fine-tuned {Path(summary['base_model']).name}",
        "",
        f"- **Base model:** `{summary['base_model']}`",
        f"- **Method:** {summary['method']}" + (", adapter merged into the base" if summary["merged"] else ""),
        f"- **Training data:** `{data['train_data']}`: {data['train']['samples']} samples, "
        f"{data['train']['trained_tokens']} trained tokens",
        f"- **Evaluation data:** `{data['eval_data']}`: {data['eval']['samples']} samples",
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()),
        "",
        "## Hyperparameters",
        "",
        "| option | value |",
        "|---|---|",
        *(f"| {k} | `{v}` |" for k, v in summary["hyperparameters"].items()),
        "",
        f"![training curves]({curves})",
        "",
    ]
    path = directory / MODEL_CARD
    path.write_text("\n".join(lines))
    return path


def write_training_curves(output_dir: Path, log_history: list[dict]) -> Path:
    """Train/eval loss, learning rate and tokens/s against step, from the Trainer's log history."""
    from matplotlib.figure import Figure  # no pyplot: no GUI back end, safe without a display

    def series(key):
        points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        return [p[0] for p in points], [p[1] for p in points]

    figure = Figure(figsize=(12, 3.6), layout="constrained")
    loss, rate, speed = figure.subplots(1, 3)
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        steps, values = series(key)
        if steps:
            loss.plot(steps, values, marker="o" if len(steps) < 30 else None, label=label)
    loss.set(title="loss", xlabel="step")
    loss.legend()
    rate.plot(*series("learning_rate"))
    rate.set(title="learning rate", xlabel="step")
    speed.plot(*series("train_tokens_per_second"))
    speed.set(title="real tokens/s (running mean)", xlabel="step")
    path = output_dir / TRAINING_CURVES
    figure.savefig(path, dpi=100)
    return path


def write_run_report(trainer, argument_groups, train_dataset, eval_dataset) -> dict:
    """Main process, after the model is saved: run_args.json, the model card (beside the adapter too, replacing PEFT's
    empty template) and the training curves. Returns the run summary."""
    model_args, data_args, lora_args, tracking_args, training_args = argument_groups
    output_dir = Path(trainer.args.output_dir)
    options = run_arguments(*argument_groups)
    (output_dir / RUN_ARGS_FILE).write_text(json.dumps(options, indent=2, sort_keys=True) + "\n")
    log_history = trainer.state.log_history
    summary = run_summary(model_args, data_args, lora_args, training_args, log_history, train_dataset, eval_dataset)
    write_model_card(output_dir, summary)
    write_training_curves(output_dir, log_history)
    if (output_dir / ADAPTER_SUBDIR).is_dir():
        write_model_card(output_dir / ADAPTER_SUBDIR, summary, curves=f"../{TRAINING_CURVES}")
    logger.info("Model card and training curves written to %s.", output_dir)
    return summary
