"""Tools around a run (scripts/generate.py, scripts/merge_adapter.py) and the adapter variants (DoRA, IA3)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import (
    FAST,
    REPO,
    SAMPLE_CHAT,
    assert_merged_is_base_plus_adapter,
    train_ok,
    trainer_in_process,
    write_jsonl,
)
from peft import PeftConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_utils import read_records
from model_utils import load_tokenizer, peft_option_problems, save_trained_model, write_final_model
from options import DataArguments, LoraArguments, ModelArguments

PROMPTS = ["What is 12 + 7?", "Please add 3 and 4."]
TOKENS = 8


@pytest.fixture(scope="module")
def lora_run(tiny_llama, tmp_path_factory):
    """A LoRA run: the merged model in the directory, the adapter in adapter/."""
    output_dir = tmp_path_factory.mktemp("runs") / "lora"
    train_ok("--model_id", str(tiny_llama), "--output_dir", str(output_dir), "--train_data", SAMPLE_CHAT, *FAST,
             "--max_steps", "12", "--per_device_train_batch_size", "8", "--max_num_samples", "200",
             "--logging_steps", "4", "--learning_rate", "0.005", "--use_lora", "true")  # fmt: skip
    return output_dir


def run_script(name: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], input=stdin, capture_output=True,
                            text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def reference_answer(model_dir, prompt: str) -> str:
    """Greedy answer computed here with plain transformers calls."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def generate_from_stdin(model_dir) -> list[dict]:
    result = run_script("generate.py", str(model_dir), "--format", "jsonl", "--max_new_tokens", str(TOKENS),
                        stdin="\n".join(PROMPTS) + "\n")  # fmt: skip
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.e2e
def test_generate_answers_prompts_from_stdin(lora_run):
    merged = generate_from_stdin(lora_run)
    assert [answer["prompt"] for answer in merged] == PROMPTS
    assert [answer["answer"] for answer in merged] == [reference_answer(lora_run, prompt) for prompt in PROMPTS]
    assert any(answer["answer"] for answer in merged)
    # The adapter directory loads its base (from adapter_config.json) and answers the same.
    assert generate_from_stdin(lora_run / "adapter") == merged


@pytest.mark.e2e
def test_merge_script_matches_the_training_runs_merge(lora_run, tmp_path):
    out = tmp_path / "merged"
    run_script("merge_adapter.py", str(lora_run / "adapter"), "--output_dir", str(out))
    expected, merged = load_file(lora_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=0, msg=name)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(lora_run).get_vocab()
    refused = subprocess.run([sys.executable, str(REPO / "scripts" / "merge_adapter.py"), str(lora_run / "adapter"),
                              "--output_dir", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert refused.returncode != 0 and "not empty" in refused.stderr


@pytest.mark.parametrize(
    "lora_args",
    [LoraArguments(use_lora=True, use_dora=True), LoraArguments(use_lora=True, peft_method="ia3")],
    ids=["dora", "ia3"],
)
def test_adapter_variants_train_and_merge(tiny_llama, tmp_path, lora_args):
    """train.py's Trainer, save and merge, in this process: the merged model is the base with the trained adapter."""
    trainer = trainer_in_process(tiny_llama, tmp_path, lora_args, max_steps=4)
    trainer.train()
    save_trained_model(trainer, lora_args)
    write_final_model(ModelArguments(str(tiny_llama)), lora_args, trainer.processing_class, trainer.args)
    config = PeftConfig.from_pretrained(tmp_path / "adapter")
    if lora_args.use_dora:
        assert config.peft_type == "LORA" and config.use_dora is True
    else:
        assert config.peft_type == "IA3" and set(config.target_modules) == {"k_proj", "v_proj", "down_proj"}
    assert_merged_is_base_plus_adapter(tmp_path, tiny_llama)


def test_adapter_option_problems():
    assert peft_option_problems(LoraArguments(use_lora=True, use_dora=True)) == []
    assert "LoRA variant" in peft_option_problems(LoraArguments(use_lora=True, use_dora=True, peft_method="ia3"))[0]
    assert "--use_lora true" in peft_option_problems(LoraArguments(peft_method="ia3"))[0]
    assert "--lora_modules_to_save" in peft_option_problems(LoraArguments(use_lora=True, lora_modules_to_save="x"))[0]


def test_special_tokens_option(tiny_gpt2):
    tokenizer = load_tokenizer(ModelArguments(model_id=str(tiny_gpt2), special_tokens='{"pad_token": "<|padding|>"}'))
    assert tokenizer.pad_token == "<|padding|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_default_system_message_fills_chats_without_one(tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}]},
        {"instruction": "add 1 and 2", "output": "3"},
    ])  # fmt: skip
    rows = read_records(str(data), "--train_data", DataArguments(train_data=str(data), default_system_message="Sys."))
    systems = [json.loads(row["messages"])[0] for row in rows]
    assert [message["content"] for message in systems] == ["Sys.", "own", "Sys."]
