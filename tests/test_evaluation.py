"""--eval_accuracy: prompts and references exactly as trained, batched answers equal to one-at-a-time answers."""

import json

import pytest
import torch
from conftest import REPO
from datasets import Dataset
from transformers import TrainingArguments

from data_utils import build_collator, prepare_datasets, read_records, training_columns
from evaluation import AnswerAccuracyTrainer, answer_accuracy, is_exact_match, prompts_and_references
from model_utils import generate_text, load_for_generation
from options import DataArguments

EVAL_DATA = REPO / "sample_data" / "chat_eval.jsonl"


def prepared(tokenizer, limit: int) -> Dataset:
    args = DataArguments(train_data=str(EVAL_DATA), eval_size=0)
    raw = Dataset.from_list(read_records(str(EVAL_DATA), "--data", args, limit))
    return prepare_datasets(args, tokenizer, raw, None, 128)[0]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama):
    return load_for_generation(str(tiny_llama), None, torch.float32, None, trust_remote_code=False)


def test_prompts_and_references_are_the_rendered_question_and_the_assistant_answer(model_and_tokenizer):
    """Reference: the chat template's own render of the conversation without its last turn, and the JSONL answer."""
    _, tokenizer = model_and_tokenizer
    records = [json.loads(line) for line in EVAL_DATA.read_text().splitlines()[:8]]
    pairs = prompts_and_references(prepared(tokenizer, 8), 0)
    assert len(pairs) == 8
    for (prompt, reference), record in zip(pairs, records, strict=True):
        question = tokenizer.apply_chat_template(record["messages"][:-1], add_generation_prompt=True, tokenize=False)
        assert tokenizer.decode(prompt) == question
        assert tokenizer.decode(reference, skip_special_tokens=True) == record["messages"][-1]["content"]


def test_batched_answers_equal_one_at_a_time_answers(model_and_tokenizer):
    """Prompts of different lengths are left-padded into batches of 5; each answer must be the greedy answer to
    that prompt alone (model_utils.generate_text, no padding)."""
    model, tokenizer = model_and_tokenizer
    dataset = prepared(tokenizer, 12)
    accuracy, results = answer_accuracy(model, tokenizer, dataset, max_new_tokens=12, batch_size=5)
    pairs = prompts_and_references(dataset, 0)
    assert len({len(prompt) for prompt, _ in pairs}) > 1  # padding really happens
    for (prompt, _), result in zip(pairs, results, strict=True):
        assert result["answer"] == generate_text(model, tokenizer, prompt, max_new_tokens=12, do_sample=False)
    assert accuracy == sum(result["exact_match"] for result in results) / 12


def test_exact_match_ignores_only_surrounding_whitespace():
    assert is_exact_match(" 47 km = 47000 m\n", "47 km = 47000 m")
    assert not is_exact_match("47 km = 47000 m.", "47 km = 47000 m")
    assert not is_exact_match("47 km = 4700 m", "47 km = 47000 m")


def test_each_evaluation_logs_eval_accuracy_beside_eval_loss(model_and_tokenizer, tmp_path):
    """--eval_accuracy_during_training: Trainer.evaluate() logs one entry holding both, the accuracy equal to
    answer_accuracy on the same prompts."""
    model, tokenizer = model_and_tokenizer
    dataset = prepared(tokenizer, 6)
    options = {"limit": 0, "max_new_tokens": 8, "batch_size": 4}
    trainer = AnswerAccuracyTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), report_to="none", per_device_eval_batch_size=4),
        eval_dataset=training_columns(dataset),
        processing_class=tokenizer,
        data_collator=build_collator(DataArguments(train_data="unused"), tokenizer, 128),
        accuracy_dataset=dataset,
        accuracy_options=options,
    )
    metrics = trainer.evaluate()
    expected, _ = answer_accuracy(model, tokenizer, dataset, **options)
    assert metrics["eval_accuracy"] == expected and "eval_loss" in metrics
    assert {"eval_loss", "eval_accuracy"} <= set(trainer.state.log_history[-1])
