"""The layout of --output_dir: every file and directory a run writes there, and which of them make up the model.

The model (what `from_pretrained(output_dir)` loads, and the model version a tracker logs) is every top-level entry
that is not one of the run's records named below: the weights, config and tokenizer files that `save_pretrained`
writes (their names depend on the model's classes), the Trainer's training_args.bin and trainer_state.json, the model
card, the training curves it shows, run_args.json and the adapter/ a merged model was made from.

Every other module takes these names from here. tests/test_output_layout.py and the end-to-end runs check that a
run leaves no entry this module does not know (`unknown_entries`): a new file is classified here before it can ship
inside the model version. Standard library only, so scripts can import it cheaply.
"""

import re
from pathlib import Path

# Written by this script; part of the model.
MODEL_CARD = "README.md"  # also inside ADAPTER_SUBDIR, replacing PEFT's empty template
TRAINING_CURVES = "training_curves.png"  # shown by the model card
RUN_ARGS_FILE = "run_args.json"  # every option of the run, secrets masked
ADAPTER_SUBDIR = "adapter"  # the trained adapter, when it was merged into the model beside it

# The run's records: never part of the model.
CHECKPOINT_PREFIX = "checkpoint"  # checkpoint-N/, the Trainer's name (transformers' PREFIX_CHECKPOINT_DIR)
COMPLETE_MARKER = "checkpoint_complete.json"  # inside checkpoint-N/, written once every file of it is on disk
TENSORBOARD_SUBDIR = "runs"  # the Trainer's TensorBoard logs (--report_to tensorboard)
SAMPLES_FILE = "samples.jsonl"  # --sample_generations
ANSWERS_FILE = "eval_answers.jsonl"  # --eval_accuracy
PREPARED_SUBDIR = "prepared"  # --prepare_data_only: the prepared data (train/, eval/) ...
PREVIEW_FILE = "preview.txt"  # ... and, inside it, a preview of the loss mask
MLFLOW_DB = "mlflow.db"  # the local MLflow store (--report_to mlflow without MLFLOW_TRACKING_URI) ...
MLFLOW_ARTIFACTS_SUBDIR = "mlartifacts"  # ... and its artifacts
# Written into every output dir this script creates; --cleanup_output_dir_on_start deletes only such dirs.
OUTPUT_DIR_MARKER = ".finetune_output_dir"
# Held (flock) by the run using the output dir; the kernel releases it when the process dies, however it dies.
OUTPUT_DIR_LOCK = ".finetune.lock"
UPLOAD_STAGING = ".tracker-uploads"  # hard links of what is being uploaded to the tracker
DOWNLOAD_STAGING = ".tracker-download"  # a checkpoint being downloaded from the tracker

CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
RUN_RECORDS = (
    TENSORBOARD_SUBDIR, SAMPLES_FILE, ANSWERS_FILE, PREPARED_SUBDIR, MLFLOW_DB, MLFLOW_ARTIFACTS_SUBDIR,
    OUTPUT_DIR_MARKER, OUTPUT_DIR_LOCK, UPLOAD_STAGING, DOWNLOAD_STAGING,
)  # fmt: skip
OWN_MODEL_FILES = (MODEL_CARD, TRAINING_CURVES, RUN_ARGS_FILE, ADAPTER_SUBDIR)
# Run records a tracker gets as files of the run (the model card and curves also travel inside the model version).
TRACKED_RUN_FILES = (MODEL_CARD, TRAINING_CURVES, SAMPLES_FILE, ANSWERS_FILE)
# What the libraries write with a model: transformers' save_pretrained (configs: model, generation, tokenizer,
# processor...; weights, sharded weights and their index; the tokenizer and its vocabulary files; chat templates; remote
# code), the Trainer's save_model / save_state, PEFT's adapter files.
LIBRARY_MODEL_FILES = re.compile(
    r"^((\w+_)?config|tokenizer|special_tokens_map|added_tokens)\.json$"
    r"|^(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$"
    r"|^(chat_template\.(jinja|json)|additional_chat_templates|training_args\.bin|trainer_state\.json)$"
    r"|^(vocab\.\w+|merges\.txt|[\w.-]+\.(model|tiktoken)|\w+\.py)$"
)


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}-{step}"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / checkpoint_name(step)


def checkpoint_step(name: str) -> int | None:
    """N of a checkpoint-N name, or None for any other name."""
    match = CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


def is_run_record(name: str) -> bool:
    """Whether a top-level entry of --output_dir is the run's own record (hidden files included), not the model."""
    return name in RUN_RECORDS or checkpoint_step(name) is not None or name.startswith(".")


def is_model_entry(name: str) -> bool:
    """Whether a top-level entry of --output_dir belongs to the model: everything but the run's records, so a file a
    model's classes add to save_pretrained (a tokenizer vocabulary, remote code) is never left out of the model."""
    return not is_run_record(name)


def model_entries(output_dir: str | Path) -> list[Path]:
    return sorted(entry for entry in Path(output_dir).iterdir() if is_model_entry(entry.name))


def unknown_entries(output_dir: str | Path) -> list[str]:
    """Top-level entries that neither this module nor the libraries' model files account for."""
    known = (*RUN_RECORDS, *OWN_MODEL_FILES)
    return sorted(
        entry.name for entry in Path(output_dir).iterdir()
        if entry.name not in known and checkpoint_step(entry.name) is None and not LIBRARY_MODEL_FILES.match(entry.name)
    )  # fmt: skip
