"""Answer accuracy (--eval_accuracy): the model's greedy answers to the evaluation prompts, exact match against the
trained answers. Logged as eval_accuracy beside eval_loss, so it reaches the tracker and the model card."""

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

from attention import generation_attention
from model_utils import first_trained_span
from output_layout import ANSWERS_FILE

logger = logging.getLogger(__name__)

ACCURACY_METRIC = "eval_accuracy"


def prompts_and_references(dataset, limit: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) of the first `limit` prepared samples (0: all) that have a prompt: the tokens
    before the first trained span, chat template included, exactly as trained, and that span."""
    pairs = []
    for row in dataset:
        span = first_trained_span(row["labels"])
        if span is not None:
            pairs.append((row["input_ids"][: span[0]], row["input_ids"][span[0] : span[1]]))
        if len(pairs) == limit:
            break
    return pairs


@contextmanager
def generation_mode(model: PreTrainedModel):
    """Eval mode, no gradients and a standard attention (not the packed-row one used in training), restored after."""
    was_training, attention = model.training, model.config._attn_implementation
    generating = generation_attention(attention)
    if generating != attention:
        model.set_attn_implementation(generating)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if generating != attention:
            model.set_attn_implementation(attention)


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS (what training taught to end an answer) and any the generation config names."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({tokenizer.eos_token_id, *(token for token in configured if token is not None)})


def generate_batch(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuations of left-padded prompts; each stops at an end-of-turn token or after max_new_tokens."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(prompt) for prompt in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    output = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=pad_id,
        eos_token_id=stop_token_ids(model, tokenizer),
    )
    return output[:, width:].tolist()


def is_exact_match(answer: str, reference: str) -> bool:
    """The answer equals the reference after stripping surrounding whitespace (special tokens already removed)."""
    return answer.strip() == reference.strip()


def answer_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset,
    limit: int = 0,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> tuple[float, list[dict]]:
    """Share of exact-match answers over the dataset's prompts, and each prompt (special tokens kept: what the
    model saw), reference, answer and verdict."""
    pairs = prompts_and_references(dataset, limit)
    if not pairs:
        raise ValueError("no evaluation sample has a prompt followed by a trained answer")
    results = []
    with generation_mode(model):
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            answers = generate_batch(model, tokenizer, [prompt for prompt, _ in batch], max_new_tokens)
            for (prompt, reference), answer in zip(batch, answers, strict=True):
                reference_text = tokenizer.decode(reference, skip_special_tokens=True)
                answer_text = tokenizer.decode(answer, skip_special_tokens=True)
                results.append({
                    "prompt": tokenizer.decode(prompt),
                    "reference": reference_text,
                    "answer": answer_text,
                    "exact_match": is_exact_match(answer_text, reference_text),
                })  # fmt: skip
    accuracy = sum(result["exact_match"] for result in results) / len(results)
    return accuracy, results


def accuracy_options(training_args) -> dict:
    """answer_accuracy's keyword arguments from the --eval_accuracy_* options."""
    return {
        "limit": training_args.eval_accuracy_samples,
        "max_new_tokens": training_args.eval_accuracy_max_new_tokens,
        "batch_size": training_args.per_device_eval_batch_size,
    }


def log_answer_accuracy(trainer: Trainer, eval_dataset, options: dict) -> float:
    """--eval_accuracy after training: log eval_accuracy like eval_loss (log history, tracker, model card) and write
    every answer to --output_dir/eval_answers.jsonl. Call on every rank; only the main process writes."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    accuracy, results = answer_accuracy(model, trainer.processing_class, eval_dataset, **options)
    trainer.log({ACCURACY_METRIC: accuracy})
    if trainer.is_world_process_zero():
        path = Path(trainer.args.output_dir) / ANSWERS_FILE
        path.write_text("".join(json.dumps(result, ensure_ascii=False) + "\n" for result in results))
        correct = sum(result["exact_match"] for result in results)
        logger.info(
            "Answer accuracy: %.1f%% exact match (%d of %d evaluation prompts); answers in %s.",
            100 * accuracy, correct, len(results), path,
        )  # fmt: skip
    return accuracy


class AnswerAccuracyTrainer(Trainer):
    """A Trainer whose evaluations also report eval_accuracy (--eval_accuracy_during_training), in the same log
    entry as eval_loss. Run on every rank: with ZeRO-3 / FSDP each forward pass gathers weights from all of them."""

    def __init__(self, *args, accuracy_dataset=None, accuracy_options: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.accuracy_dataset, self.accuracy_options = accuracy_dataset, accuracy_options or {}

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):  # fmt: skip
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.accuracy_dataset is not None and metric_key_prefix == "eval":
            model = self.accelerator.unwrap_model(self.model)
            accuracy, _ = answer_accuracy(model, self.processing_class, self.accuracy_dataset, **self.accuracy_options)
            output.metrics[ACCURACY_METRIC] = accuracy
        return output
