"""Training data: read JSONL, validate every record, tokenize with exact loss masks, split, collate.

Two record shapes are supported:
  {"prompt": str, "completion": str}
  {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}  (rendered with the chat template)

Only completion / assistant tokens (each followed by its end-of-turn token) carry labels unless
`--train_on_prompt true`. Every problem is reported as `file:line: reason` before any model weight is loaded.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
NO_EVAL_DATA = "NA"
CHAT_ROLES = ("system", "user", "assistant")
MAX_REPORTED_PROBLEMS = 20


@dataclass
class DataArguments:
    train_data: str = field(
        metadata={"help": "Training data: a .jsonl file or a directory of *.jsonl files. One JSON record per line."}
    )
    eval_data: str = field(
        default=NO_EVAL_DATA,
        metadata={
            "help": "Evaluation data in the same form as --train_data. 'NA' splits --eval_size off the train data."
        },
    )
    eval_size: float = field(
        default=0.1,
        metadata={
            "help": "Used when --eval_data is NA: a fraction (< 1) or a number of records (>= 1) split off the "
            "training data, shuffled with --data_seed. 0 disables evaluation."
        },
    )
    max_num_samples: int = field(
        default=0, metadata={"help": "Use only the first N training records (before the eval split). 0 uses all."}
    )
    train_on_prompt: bool = field(
        default=False,
        metadata={"help": "Train on every non-pad token. By default only completions / assistant turns carry loss."},
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Maximum tokens per sample. Default: the model's limit (tokenizer, then model config)."},
    )
    long_sequence_strategy: Literal["error", "truncate", "drop"] = field(
        default="error",
        metadata={
            "help": "What to do with samples longer than --max_length: 'error' stops with a report, 'truncate' cuts "
            "them (labels stay aligned), 'drop' leaves them out and reports how many."
        },
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={
            "help": "Pad every batch to --max_length (static shapes). By default batches pad to their longest sample."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=8, metadata={"help": "Round padded batch lengths up to a multiple of this (8 suits GPU tensor cores)."}
    )


class DataError(Exception):
    """A problem in the user's data or data options; the message says where and how to fix it."""


# Reading and validation


def resolve_data_files(path: str, flag: str) -> list[Path]:
    """A .jsonl file, or every *.jsonl file of a directory (sorted, so the order is reproducible)."""
    data_path = Path(path).expanduser()
    if not data_path.exists():
        raise DataError(f"{flag}: {path} does not exist. Pass a .jsonl file or a directory of .jsonl files.")
    if data_path.is_dir():
        files = sorted(data_path.glob("*.jsonl"))
        if not files:
            raise DataError(f"{flag}: directory {path} holds no *.jsonl files.")
        return files
    return [data_path]


def record_problem(record) -> str | None:
    """Why a parsed JSON value is not a usable training record, or None when it is."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        return chat_problem(record["messages"])
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                return f"'{key}' must be a string, got {type(record.get(key)).__name__}"
        if not record["completion"]:
            return "'completion' is empty: there is nothing to train on"
        return None
    return f"unknown record shape with keys {sorted(record)}: expected 'prompt'/'completion' or 'messages'"


def chat_problem(messages) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {'role', 'content'} objects"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{index}] must be an object, got {type(message).__name__}"
        if message.get("role") not in CHAT_ROLES:
            return f"messages[{index}] has role {message.get('role')!r}; expected one of {', '.join(CHAT_ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"messages[{index}].content must be a string, got {type(message.get('content')).__name__}"
    if messages[-1]["role"] != "assistant":
        return "the chat does not end with an assistant turn"
    if not any(message["content"] for message in messages if message["role"] == "assistant"):
        return "no assistant turn has content: there is nothing to train on"
    return None


def normalize_record(record: dict) -> dict:
    """One schema for every shape, so mixed files make one Arrow table."""
    if "messages" in record:
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        return {"prompt": None, "completion": None, "messages": messages}
    return {"prompt": record["prompt"], "completion": record["completion"], "messages": None}


def read_records(path: str, flag: str, limit: int = 0) -> list[dict]:
    """Parse and validate every line; raise one DataError listing the first problems with file:line."""
    records, problems, total_problems = [], [], 0
    for file in resolve_data_files(path, flag):
        file_records = 0
        with open(file, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                file_records += 1
                try:
                    problem = record_problem(record := json.loads(line))
                except json.JSONDecodeError as error:
                    problem = f"invalid JSON ({error.msg} at column {error.colno})"
                if problem:
                    total_problems += 1
                    if len(problems) < MAX_REPORTED_PROBLEMS:
                        problems.append(f"{file}:{line_number}: {problem}")
                    continue
                records.append({**normalize_record(record), "source": f"{file}:{line_number}"})
                if limit and len(records) >= limit:
                    break
        if file_records == 0:
            problems.append(f"{file}: the file holds no records")
            total_problems += 1
        if limit and len(records) >= limit:
            break
    if problems:
        shown = "\n  ".join(problems)
        raise DataError(f"{flag}: {total_problems} invalid record(s) (showing {len(problems)}):\n  {shown}")
    return records


def load_raw_datasets(args: DataArguments, seed: int) -> tuple[Dataset, Dataset | None]:
    """Validated train (and eval) records, before tokenization."""
    train = Dataset.from_list(read_records(args.train_data, "--train_data", args.max_num_samples))
    if args.eval_data != NO_EVAL_DATA:
        return train, Dataset.from_list(read_records(args.eval_data, "--eval_data"))
    if not args.eval_size:
        return train, None
    test_size = args.eval_size if args.eval_size < 1 else int(args.eval_size)
    if len(train) < 2 or (test_size >= 1 and test_size >= len(train)):
        raise DataError(
            f"--eval_size {args.eval_size} leaves no training data from {len(train)} record(s); "
            "lower it, pass --eval_data, or set --eval_size 0."
        )
    split = train.train_test_split(test_size=test_size, seed=seed)
    return split["train"], split["test"]


# Tokenization with loss masks


def chat_segments(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """Split a rendered chat into (text, trained) pieces: each assistant content with its end-of-turn token is trained.

    Assistant turns are located by rendering growing prefixes of the conversation, so any template that renders a
    prefix of a chat as a prefix of the whole (ChatML, Llama-3, Mistral, ...) gets an exact mask.
    """
    segments, rendered = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
        after = render_chat(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not before.startswith(rendered) or not after.startswith(before):
            raise DataError(
                "the chat template does not render a conversation prefix as a prefix of the whole; "
                "loss masks cannot be built exactly. Use a template without history rewriting."
            )
        segments.append((before[len(rendered) :], False))
        segments.extend(assistant_turn_segments(after[len(before) :], message["content"], tokenizer))
        rendered = after
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    if full[len(rendered) :]:
        segments.append((full[len(rendered) :], False))
    return segments


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages:
        # Scaffolding before the first turn (e.g. the BOS token) is what an empty prefix renders to.
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_turn_segments(turn: str, content: str, tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """Train the content and the end-of-turn token that follows it; mask the template's text around them."""
    # Templates either keep the content as is or trim it (Llama-3); train exactly what they render.
    rendered = content if content in turn else content.strip()
    start = turn.find(rendered) if rendered else 0
    if start < 0:
        raise DataError(
            "the chat template rewrites assistant content, so its tokens cannot be located for the loss mask."
        )
    end = start + len(rendered)
    end_of_turn = first_special_token(turn[end:], tokenizer)
    if end_of_turn is None:
        # The template closes the turn with no special token: train the EOS so the model learns to stop.
        return [(turn[:start], False), (turn[start:end] + tokenizer.eos_token, True), (turn[end:], False)]
    trained_end = end + turn[end:].index(end_of_turn) + len(end_of_turn)
    return [(turn[:start], False), (turn[start:trained_end], True), (turn[trained_end:], False)]


def first_special_token(text: str, tokenizer: PreTrainedTokenizerBase) -> str | None:
    found = [(text.find(token), token) for token in tokenizer.all_special_tokens if token and token in text]
    return min(found)[1] if found else None


def prompt_completion_segments(prompt: str, completion: str, tokenizer, bos: str) -> list[tuple[str, bool]]:
    """The prompt (after BOS, when the tokenizer uses one) is masked; the completion and EOS are trained."""
    return [(bos + prompt, False), (completion + tokenizer.eos_token, True)]


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> str:
    """The BOS text when the tokenizer adds BOS to plain text (Llama-style), else ''."""
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return tokenizer.bos_token if adds_bos else ""


def tokenize_segments(
    segments: list[tuple[str, bool]], token_ids: list[list[int]], train_on_prompt: bool
) -> tuple[list[int], list[int]]:
    input_ids, labels = [], []
    for (_, trained), ids in zip(segments, token_ids, strict=True):
        input_ids.extend(ids)
        labels.extend(ids if trained or train_on_prompt else [IGNORE_INDEX] * len(ids))
    return input_ids, labels


def tokenize_batch(batch: dict, tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool) -> dict:
    """Render every record into segments, tokenize all segments of the batch in one call, then reassemble."""
    all_segments, bos = [], bos_prefix(tokenizer)
    for prompt, completion, messages in zip(batch["prompt"], batch["completion"], batch["messages"], strict=True):
        if messages is not None:
            all_segments.append(chat_segments(messages, tokenizer))
        else:
            all_segments.append(prompt_completion_segments(prompt, completion, tokenizer, bos))
    flat_texts = [text for segments in all_segments for text, _ in segments]
    flat_ids = iter(tokenizer(flat_texts, add_special_tokens=False)["input_ids"])
    output = {"input_ids": [], "labels": []}
    for segments in all_segments:
        input_ids, labels = tokenize_segments(segments, [next(flat_ids) for _ in segments], train_on_prompt)
        output["input_ids"].append(input_ids)
        output["labels"].append(labels)
    return output


def tokenize_dataset(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, args: DataArguments) -> Dataset:
    if any(messages is not None for messages in dataset["messages"]) and not tokenizer.chat_template:
        raise DataError(
            "the data has chat 'messages' records but the tokenizer has no chat template; "
            "use a model whose tokenizer ships one, or convert the records to prompt/completion."
        )
    try:
        return dataset.map(
            tokenize_batch,
            batched=True,
            fn_kwargs={"tokenizer": tokenizer, "train_on_prompt": args.train_on_prompt},
            remove_columns=["prompt", "completion", "messages"],
            desc="Tokenizing",
        )
    except DataError:
        raise
    except Exception as error:  # a template that fails on a record: name the cause instead of a datasets traceback
        raise DataError(f"tokenizing failed: {error}") from error


# Length policy


def apply_length_policy(dataset: Dataset, args: DataArguments, max_length: int, split: str) -> Dataset:
    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    too_long = np.flatnonzero(lengths > max_length)
    if len(too_long) and args.long_sequence_strategy == "error":
        longest = int(too_long[np.argmax(lengths[too_long])])
        raise DataError(
            f"{len(too_long)} {split} sample(s) are longer than --max_length {max_length} "
            f"(longest: {lengths[longest]} tokens at {dataset[longest]['source']}). Raise --max_length, or pass "
            "--long_sequence_strategy truncate or drop."
        )
    if len(too_long) and args.long_sequence_strategy == "drop":
        logger.warning("Dropping %d %s sample(s) longer than --max_length %d.", len(too_long), split, max_length)
        dataset = dataset.select(np.setdiff1d(np.arange(len(dataset)), too_long))
    elif len(too_long):
        logger.warning("Truncating %d %s sample(s) to --max_length %d.", len(too_long), split, max_length)
        dataset = dataset.map(lambda row: {k: row[k][:max_length] for k in ("input_ids", "labels")})
    return drop_untrained(dataset, split)


def drop_untrained(dataset: Dataset, split: str) -> Dataset:
    """A sample whose labels are all masked (e.g. truncated before the answer) adds no loss, only compute."""
    kept = dataset.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"]))
    if len(kept) < len(dataset):
        logger.warning("Dropping %d %s sample(s) with no trained tokens left.", len(dataset) - len(kept), split)
    if len(kept) == 0:
        raise DataError(f"no {split} sample has a trained token left; check --max_length and the data.")
    return kept


def log_length_summary(dataset: Dataset, split: str) -> None:
    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    trained = sum(sum(label != IGNORE_INDEX for label in labels) for labels in dataset["labels"])
    logger.info(
        "%s: %d samples, tokens p50 %d / p90 %d / max %d, %d of %d tokens trained.",
        split,
        len(lengths),
        np.percentile(lengths, 50),
        np.percentile(lengths, 90),
        lengths.max(),
        trained,
        lengths.sum(),
    )


def resolve_max_length(args: DataArguments, tokenizer: PreTrainedTokenizerBase, model_max_positions: int | None) -> int:
    """--max_length, else the tokenizer's limit, else the model config's."""
    if args.max_length:
        return args.max_length
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    if tokenizer.model_max_length and tokenizer.model_max_length < 1_000_000:
        return tokenizer.model_max_length
    if model_max_positions:
        return model_max_positions
    raise DataError("neither the tokenizer nor the model config gives a maximum length; pass --max_length.")


def prepare_datasets(
    args: DataArguments,
    tokenizer: PreTrainedTokenizerBase,
    raw_train: Dataset,
    raw_eval: Dataset | None,
    max_length: int,
) -> tuple[Dataset, Dataset | None]:
    """Tokenize, apply the length policy and log a token-length summary per split."""
    prepared = []
    for split, raw in (("train", raw_train), ("eval", raw_eval)):
        if raw is None:
            prepared.append(None)
            continue
        dataset = apply_length_policy(tokenize_dataset(raw, tokenizer, args), args, max_length, split)
        log_length_summary(dataset, split)
        prepared.append(
            dataset.remove_columns("source").map(lambda row: {"attention_mask": [1] * len(row["input_ids"])})
        )
    return prepared[0], prepared[1]


def build_collator(args: DataArguments, tokenizer: PreTrainedTokenizerBase, max_length: int) -> DataCollatorForSeq2Seq:
    """Right-pads input_ids/attention_mask with the pad token and labels with IGNORE_INDEX."""
    return DataCollatorForSeq2Seq(
        tokenizer,
        padding="max_length" if args.pad_to_max_length else "longest",
        max_length=max_length,
        pad_to_multiple_of=args.pad_to_multiple_of,
        label_pad_token_id=IGNORE_INDEX,
    )
