"""Tools around a run (scripts/generate.py, scripts/merge_adapter.py) and the adapter variants (DoRA, IA3)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_train, write_jsonl
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_utils import read_records
from model_utils import load_tokenizer, peft_option_problems
from options import DataArguments, LoraArguments, ModelArguments

SAMPLE_CHAT = str(REPO / "sample_data" / "chat.jsonl")
FAST = [
    "--train_data", SAMPLE_CHAT, "--max_steps", "12", "--per_device_train_batch_size", "8", "--max_num_samples",
    "200", "--max_length", "128", "--logging_steps", "4", "--save_strategy", "no", "--eval_strategy", "no",
    "--eval_size", "0", "--report_to", "none", "--warmup_steps", "0", "--learning_rate", "0.005",
]  # fmt: skip
PROMPTS = ["What is 12 + 7?", "Please add 3 and 4."]
TOKENS = 8


def train_ok(tiny_llama, output_dir, *args):
    result = run_train("--model_id", str(tiny_llama), "--output_dir", str(output_dir), *FAST, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return output_dir


@pytest.fixture(scope="module")
def lora_run(tiny_llama, tmp_path_factory):
    """A LoRA run: the merged model in the directory, the adapter in adapter/."""
    return train_ok(tiny_llama, tmp_path_factory.mktemp("runs") / "lora", "--use_lora", "true")


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


def test_generate_answers_prompts_from_stdin(lora_run):
    merged = generate_from_stdin(lora_run)
    assert [answer["prompt"] for answer in merged] == PROMPTS
    assert [answer["answer"] for answer in merged] == [reference_answer(lora_run, prompt) for prompt in PROMPTS]
    assert any(answer["answer"] for answer in merged)
    # The adapter directory loads its base (from adapter_config.json) and answers the same.
    assert generate_from_stdin(lora_run / "adapter") == merged


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


def assert_merged_matches_adapter(output_dir, tiny_llama):
    ids = torch.tensor([[1, 5, 17, 42, 99, 3]])
    merged = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), output_dir / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted.eval()(ids).logits, atol=1e-4, rtol=1e-4)
        with adapted.disable_adapter():
            assert (merged(ids).logits - adapted(ids).logits).abs().max() > 1e-3  # training changed the model


def test_dora_trains_and_merges(tiny_llama, tmp_path):
    out = train_ok(tiny_llama, tmp_path / "dora", "--use_lora", "true", "--use_dora", "true")
    assert PeftConfig.from_pretrained(out / "adapter").use_dora is True
    assert_merged_matches_adapter(out, tiny_llama)


def test_ia3_trains_and_merges(tiny_llama, tmp_path):
    out = train_ok(tiny_llama, tmp_path / "ia3", "--use_lora", "true", "--peft_method", "ia3")
    config = PeftConfig.from_pretrained(out / "adapter")
    assert config.peft_type == "IA3" and set(config.target_modules) == {"k_proj", "v_proj", "down_proj"}
    assert_merged_matches_adapter(out, tiny_llama)


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
