"""End to end through `accelerate launch train.py` on tiny local models: full fine-tune, LoRA, QLoRA, bad input."""

import json
import random

import pytest
from conftest import (
    FAST,
    SAMPLE_CHAT,
    assert_merged_is_base_plus_adapter,
    logged_losses,
    run_train,
    train_ok,
    write_jsonl,
)
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoint_utils import OUTPUT_DIR_MARKER

pytestmark = pytest.mark.e2e
# Enough steps that the loss falls well below where it started.
TRAINED = [*FAST, "--max_steps", "40", "--per_device_train_batch_size", "8", "--max_num_samples", "320",
           "--logging_steps", "5"]  # fmt: skip


def assert_loss_falls(output_dir, factor: float):
    losses = logged_losses(output_dir)
    assert len(losses) >= 4, losses
    assert losses[-1] < factor * losses[0], losses


def generate(model_dir, user: str = "What is 12 + 7?") -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert len(new_tokens) > 0
    return tokenizer.decode(new_tokens)


def test_full_finetune(tiny_llama, tmp_path):
    out = tmp_path / "full"
    train_ok("--model_id", str(tiny_llama), "--train_data", SAMPLE_CHAT, "--output_dir", str(out),
             "--learning_rate", "0.003", *TRAINED)  # fmt: skip
    assert_loss_falls(out, 0.6)
    generate(out)
    saved_args = json.loads((out / "run_args.json").read_text())
    assert saved_args["learning_rate"] == 0.003 and saved_args["model_id"] == str(tiny_llama)
    assert (out / OUTPUT_DIR_MARKER).exists()
    assert list(out.glob("*.safetensors"))
    assert json.loads((out / "config.json").read_text())["use_cache"] is True


def test_lora_merged_model_matches_base_plus_adapter(tiny_llama, tmp_path):
    out = tmp_path / "lora"
    train_ok("--model_id", str(tiny_llama), "--train_data", SAMPLE_CHAT, "--output_dir", str(out),
             "--use_lora", "true", "--learning_rate", "0.005", *TRAINED)  # fmt: skip
    assert_loss_falls(out, 0.7)
    assert_merged_is_base_plus_adapter(out, tiny_llama, trained_at_least=1e-2)
    generate(out)


def test_qlora_4bit(tiny_llama, tmp_path):
    out = tmp_path / "qlora"
    train_ok("--model_id", str(tiny_llama), "--train_data", SAMPLE_CHAT, "--output_dir", str(out),
             "--use_qlora", "true", "--qlora_bit_length", "4", "--learning_rate", "0.005", *TRAINED)  # fmt: skip
    assert_loss_falls(out, 0.7)
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert {name.rsplit(".", 1)[-1] for name in adapter_config["target_modules"]} >= {"q_proj", "down_proj"}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # merged into an unquantized base
    generate(out)


def reverse_word_chats(count: int) -> list[dict]:
    """A different chat task than the sample data: spell a word backwards."""
    rng = random.Random(7)
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "forest", "silver"]
    chats = []
    for _ in range(count):
        word = rng.choice(words)
        chats.append({"messages": [
            {"role": "system", "content": "Reverse the word."},
            {"role": "user", "content": word},
            {"role": "assistant", "content": word[::-1]},
        ]})  # fmt: skip
    return chats


def test_qlora_on_another_architecture_and_dataset(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "reverse.jsonl", reverse_word_chats(320))
    out = tmp_path / "gpt2-qlora"
    train_ok("--model_id", str(tiny_gpt2), "--train_data", str(data), "--output_dir", str(out),
             "--use_qlora", "true", "--learning_rate", "0.005", *TRAINED)  # fmt: skip
    assert_loss_falls(out, 0.7)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "gpt2"
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    generate(out, "apple")


def test_merge_adapters_false_keeps_only_the_adapter(tiny_llama, tmp_path):
    out = tmp_path / "adapter-only"
    train_ok("--model_id", str(tiny_llama), "--train_data", SAMPLE_CHAT, "--output_dir", str(out),
             "--use_lora", "true", "--merge_adapters", "false", *TRAINED, "--max_steps", "5")  # fmt: skip
    assert (out / "adapter_config.json").exists()
    assert not (out / "config.json").exists()
    assert (out / "trainer_state.json").exists()


def test_bad_data_stops_cleanly_before_the_output_dir(tiny_llama, tmp_path):
    """One data error through the entry point: every DataError takes this path, and test_data.py /
    test_data_sources.py check each message (invalid JSON, no records, a wrong field type, a missing file)."""
    data = write_jsonl(tmp_path / "train.jsonl", ['{"prompt": "a", "completion": "b"}', "not json"])
    out = tmp_path / "out"
    result = run_train("--model_id", str(tiny_llama), "--train_data", str(data), "--output_dir", str(out))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "train.jsonl:2: invalid JSON" in output
    assert "Traceback" not in output
    assert not out.exists()


def test_several_processes_without_a_gpu_need_use_cpu(tiny_llama, tmp_path):
    """Without --use_cpu, two CPU processes would each train an unsynchronised copy of the model."""
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    out = tmp_path / "out"
    args = ["--model_id", str(tiny_llama), "--train_data", str(data), "--output_dir", str(out), "--use_ddp", "true"]
    result = run_train(*args, num_processes=2)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "2 processes were launched" in output and "--use_cpu true" in output
    assert not out.exists()


def test_prepare_data_only_writes_prepared_data_and_preview_then_reuses_the_cache(tiny_llama, tmp_path):
    out = tmp_path / "out"
    args = ["--model_id", str(tiny_llama), "--train_data", SAMPLE_CHAT, "--output_dir", str(out),
            "--max_num_samples", "60", "--eval_size", "10", "--max_length", "128",
            "--prepare_data_only", "true"]  # fmt: skip
    result = train_ok(*args)
    assert "no model was loaded" in result.stdout + result.stderr
    train, evaluation = (load_from_disk(str(out / "prepared" / split)) for split in ("train", "eval"))
    assert (len(train), len(evaluation)) == (50, 10)
    assert {"input_ids", "labels"} <= set(train.column_names)
    preview = (out / "prepared" / "preview.txt").read_text()
    assert preview.count("=====") == 10 and "[[" in preview and "<|im_end|>]]" in preview
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    second = train_ok(*args)
    assert "Using the prepared data cached" in second.stdout + second.stderr
