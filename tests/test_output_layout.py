"""output_layout.py: which entries of --output_dir are the model, which are the run's records, and that nothing a run
or the libraries write is unknown to it. The end-to-end check on a real run is in test_quickstart.py
(test_the_files_say_what_happened) and test_tracking.py, beside the runs they reuse."""

from pathlib import Path

import peft.utils.constants as peft_names
import pytest
import transformers.tokenization_utils_base as tokenizer_names
import transformers.utils as transformers_names
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.integration_utils import default_logdir
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import output_layout
from output_layout import checkpoint_step, is_model_entry, model_entries, unknown_entries
from tracking import stage_model_files

# What a LoRA run with merged adapters, --sample_generations, --eval_accuracy, --keep_checkpoints, TensorBoard and a
# local MLflow store leaves in --output_dir (a merged model of a Llama-style tokenizer), written out by hand.
MODEL = [
    "README.md", "training_curves.png", "run_args.json", "adapter", "config.json", "generation_config.json",
    "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "training_args.bin",
    "trainer_state.json",
]  # fmt: skip
RUN_RECORDS = [
    "checkpoint-3", "checkpoint-6", "runs", "samples.jsonl", "eval_answers.jsonl", "mlflow.db", "mlartifacts",
    "prepared", ".finetune_output_dir", ".finetune.lock", ".tracker-uploads", ".tracker-download",
]  # fmt: skip


def make_listing(directory: Path, names: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name in ("adapter", "runs", "mlartifacts", "prepared", ".tracker-uploads") or name.startswith("checkpoint"):
            (directory / name).mkdir()
            (directory / name / "file.bin").write_bytes(b"x")
        else:
            (directory / name).write_text(name)
    return directory


def test_the_model_is_everything_but_the_run_records():
    assert [name for name in MODEL + RUN_RECORDS if is_model_entry(name)] == MODEL
    # Files a model's classes add to save_pretrained ship with it, known to this module or not.
    for name in ("model-00001-of-00004.safetensors", "model.safetensors.index.json", "tokenizer.model", "vocab.json",
                 "merges.txt", "qwen.tiktoken", "modeling_custom.py", "preprocessor_config.json"):  # fmt: skip
        assert is_model_entry(name), name
    for name in ("checkpoint-12", ".DS_Store", ".checkpoint_complete.json.tmp"):
        assert not is_model_entry(name), name
    assert checkpoint_step("checkpoint-12") == 12
    assert checkpoint_step("checkpoint-final") is None and checkpoint_step("checkpoint-12.bak") is None


def test_a_file_this_module_does_not_know_is_reported(tmp_path):
    directory = make_listing(tmp_path / "out", MODEL + RUN_RECORDS)
    assert unknown_entries(directory) == []
    # Negative control: what a new writer would leave, and what the libraries do not write.
    for name in ("new_report.json", "checkpoint-final", ".scratch", "notes.txt"):
        (directory / name).write_text("x")
    assert unknown_entries(directory) == [".scratch", "checkpoint-final", "new_report.json", "notes.txt"]


def test_only_the_model_is_staged_for_the_model_version(tmp_path):
    directory = make_listing(tmp_path / "out", MODEL + RUN_RECORDS)
    staged = stage_model_files(directory)
    assert sorted(p.name for p in staged.iterdir()) == sorted(MODEL)
    assert (staged / "adapter" / "file.bin").read_bytes() == b"x"
    assert [p.name for p in model_entries(directory)] == sorted(MODEL)


def test_names_shared_with_the_libraries_match_theirs():
    assert output_layout.CHECKPOINT_PREFIX == PREFIX_CHECKPOINT_DIR
    assert Path(default_logdir()).parts[0] == output_layout.TENSORBOARD_SUBDIR
    library_files = [
        TRAINER_STATE_NAME, TRAINING_ARGS_NAME, transformers_names.CONFIG_NAME,
        transformers_names.GENERATION_CONFIG_NAME, transformers_names.SAFE_WEIGHTS_NAME,
        transformers_names.SAFE_WEIGHTS_INDEX_NAME, transformers_names.WEIGHTS_NAME,
        transformers_names.WEIGHTS_INDEX_NAME, transformers_names.PROCESSOR_NAME,
        transformers_names.IMAGE_PROCESSOR_NAME, tokenizer_names.TOKENIZER_CONFIG_FILE,
        tokenizer_names.SPECIAL_TOKENS_MAP_FILE, tokenizer_names.ADDED_TOKENS_FILE, tokenizer_names.FULL_TOKENIZER_FILE,
        tokenizer_names.CHAT_TEMPLATE_FILE, tokenizer_names.CHAT_TEMPLATE_DIR, peft_names.CONFIG_NAME,
        peft_names.SAFETENSORS_WEIGHTS_NAME, peft_names.WEIGHTS_NAME,
    ]  # fmt: skip
    for name in library_files:
        assert output_layout.LIBRARY_MODEL_FILES.match(name) and is_model_entry(name), name


@pytest.mark.parametrize("with_adapter", [False, True])
def test_what_save_pretrained_writes_is_known(tiny_llama, tmp_path, with_adapter):
    """A real save of the tiny model (and of a LoRA adapter on it) with its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    if with_adapter:
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(tmp_path)
    assert unknown_entries(tmp_path) == []
    assert all(is_model_entry(path.name) for path in tmp_path.iterdir())
