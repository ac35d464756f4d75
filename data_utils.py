"""Training data: read every common record shape from any source, validate each record, tokenize with exact loss
masks, apply the length policy, cache the result, and write a preview of what the model trains on.

Record shapes (detected per record; --data_format forces one):
  prompt_completion  {"prompt": str, "completion": str}
  chat               {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]}
  alpaca             {"instruction": str, "input": str (optional), "output": str}          -> a user/assistant chat
  sharegpt           {"conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...]}  -> a chat
  text               {"text": str}                                  (every token trained)
  tokenized          {"input_ids": [int], "labels": [int] (optional)}  (used as is)

Only completions / assistant turns (each followed by its end-of-turn token) carry labels unless
`--train_on_prompt true`. Every problem is reported as `location: reason` before any model weight is loaded.
"""

import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from datasets import Dataset, load_from_disk
from datasets.fingerprint import Hasher
from huggingface_hub.constants import HF_HOME
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

import chat_masks
from chat_masks import ChatMaskError, chat_text_and_spans, masked_samples
from data_sources import DataError, InvalidRecord, fingerprint_source, iter_source_records
from packing import IGNORE_INDEX, FlattenedCollator, PackedCollator, pack_dataset
from redaction import mask_secrets

logger = logging.getLogger(__name__)

NO_EVAL_DATA = "NA"
CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
MAX_REPORTED_PROBLEMS = 20
# Used when the tokenizer has no chat template: ChatML-style turns written as plain text, each closed by the
# tokenizer's EOS, so no token is added to the vocabulary and the end of every turn is a trainable special token.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PREVIEW_SAMPLES = 5
TRAINED_SPAN = ("[[", "]]")  # how preview.txt marks the tokens that carry loss


@dataclass
class DataArguments:
    train_data: str = field(
        metadata={
            "help": "Training data: a .jsonl/.jsonl.gz/.json/.parquet file or a directory of them, an http(s):// or "
            "s3://, gs://, ... URL, a Hugging Face dataset id or save_to_disk directory (append :split to pick a "
            "split), or a TrueFoundry artifact version FQN."
        }
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
    data_format: Literal["auto", "prompt_completion", "chat", "alpaca", "sharegpt", "text", "tokenized"] = field(
        default="auto",
        metadata={"help": "Record shape. 'auto' detects it per record from its keys; any other value is enforced."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "Jinja chat template (the template itself or a file holding it) that replaces the tokenizer's. "
            "A tokenizer without one gets a ChatML-style default whose turns end with EOS."
        },
    )
    chat_template_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "Extra variables for every chat template render, as a JSON object, e.g. "
            "'{\"enable_thinking\": false}' for Qwen3 without thinking. A data source's own chat_template_kwargs "
            "win over these."
        },
    )
    default_system_message: str | None = field(
        default=None,
        metadata={"help": "System message put first in every chat (alpaca, sharegpt included) that has none."},
    )
    skip_invalid_samples: bool = field(
        default=False,
        metadata={"help": "Drop invalid records (and report how many) instead of stopping with a report."},
    )
    dedup: bool = field(default=False, metadata={"help": "Drop exact duplicate records (the count is reported)."})
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
    sample_packing: bool = field(
        default=False,
        metadata={
            "help": "Pack several samples into each row of at most --max_length tokens (first-fit decreasing), each "
            "sample attending only to itself. Fewer padding tokens: faster training on data with short samples. "
            "Steps per epoch count packed rows, so fewer steps cover the data; adjust --max_steps/--save_steps."
        },
    )
    eval_sample_packing: bool = field(
        default=True,
        metadata={
            "help": "With --sample_packing true, pack the evaluation data too (faster evaluation, same loss per "
            "token). Set false to evaluate one sample per row."
        },
    )
    prepare_data_only: bool = field(
        default=False,
        metadata={
            "help": "Load, validate and tokenize the data, write <output_dir>/prepared/{train,eval,preview.txt}, "
            "then exit without loading the model."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "Processes that tokenize. Default: every CPU core for large datasets, 1 for small ones."},
    )
    data_cache_dir: str = field(
        default=os.path.join(HF_HOME, "llm-finetune", "prepared"),
        metadata={
            "help": "Where tokenized datasets are cached, keyed by data content, tokenizer, template and data "
            "options; a rerun with the same inputs reuses them. 'none' disables the cache."
        },
    )


# Record shapes: detection, validation, normalisation

# One Arrow schema for every shape, so mixed files make one table. Chats are kept as JSON text: messages may carry
# tool calls of any structure.
EMPTY_ROW = {"kind": None, "messages": None, "tools": None, "prompt": None, "completion": None, "text": None,
             "input_ids": None, "labels": None}  # fmt: skip


def detect_format(record: dict) -> str | None:
    for key, data_format in (
        ("messages", "chat"),
        ("conversations", "sharegpt"),
        ("instruction", "alpaca"),
        ("prompt", "prompt_completion"),
        ("completion", "prompt_completion"),
        ("input_ids", "tokenized"),
        ("text", "text"),
    ):
        if key in record:
            return data_format
    return None


def string_field_problem(record: dict, key: str, required: bool = True, non_empty: bool = False) -> str | None:
    if key not in record and not required:
        return None
    value = record.get(key)
    if not isinstance(value, str):
        return f"'{key}' must be a string, got {type(value).__name__}"
    if non_empty and not value.strip():
        return f"'{key}' is empty: there is nothing to train on"
    return None


def chat_problem(messages, tools=None) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {'role', 'content'} objects"
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools)):
        return "'tools' must be a list of objects (JSON schemas of the functions)"
    for index, message in enumerate(messages):
        problem = message_problem(message, index)
        if problem:
            return problem
    if messages[-1]["role"] != "assistant":
        return "the chat does not end with an assistant turn"
    if not any(m.get("content") or m.get("tool_calls") for m in messages if m["role"] == "assistant"):
        return "no assistant turn has content: there is nothing to train on"
    return None


def message_problem(message, index: int) -> str | None:
    if not isinstance(message, dict):
        return f"messages[{index}] must be an object, got {type(message).__name__}"
    if message.get("role") not in CHAT_ROLES:
        return f"messages[{index}] has role {message.get('role')!r}; expected one of {', '.join(CHAT_ROLES)}"
    tool_calls = message.get("tool_calls")
    calls_ok = isinstance(tool_calls, list) and all(isinstance(call, dict) for call in tool_calls)
    if tool_calls is not None and (message["role"] != "assistant" or not calls_ok):
        return f"messages[{index}].tool_calls must be a list of objects, on an assistant message"
    # An assistant turn that only calls tools may have `content: null` (the OpenAI shape).
    if not (tool_calls and message.get("content") is None) and not isinstance(message.get("content"), str):
        return f"messages[{index}].content must be a string, got {type(message.get('content')).__name__}"
    if message.get("reasoning_content") is not None and not isinstance(message["reasoning_content"], str):
        return f"messages[{index}].reasoning_content must be a string"
    return None


def sharegpt_messages(conversations) -> list[dict] | str:
    """The conversation as chat messages, or why it cannot be one."""
    if not isinstance(conversations, list) or not conversations:
        return "'conversations' must be a non-empty list of {'from', 'value'} objects"
    messages = []
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            return f"conversations[{index}] must be an object, got {type(turn).__name__}"
        if turn.get("from") not in SHAREGPT_ROLES:
            return f"conversations[{index}] has from {turn.get('from')!r}; expected one of system, human, gpt"
        if not isinstance(turn.get("value"), str):
            return f"conversations[{index}].value must be a string, got {type(turn.get('value')).__name__}"
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def alpaca_messages(record: dict) -> list[dict]:
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def token_list_problem(record: dict, key: str) -> str | None:
    value = record.get(key)
    if not isinstance(value, list) or not value or not all(type(v) is int for v in value):
        return f"'{key}' must be a non-empty list of integers"
    return None


def normalize_record(record: Any, data_format: str) -> dict | str:
    """The record as a row of the common schema, or the reason it is invalid."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    detected = detect_format(record)
    if detected is None:
        return (
            f"unknown record shape with keys {sorted(record)[:10]}: expected prompt/completion, messages, "
            "instruction/output (alpaca), conversations (sharegpt), text or input_ids"
        )
    if data_format != "auto" and detected != data_format:
        return f"a {detected} record, but --data_format is {data_format}"
    return NORMALIZERS[detected](record)


def normalize_prompt_completion(record: dict) -> dict | str:
    problem = string_field_problem(record, "prompt") or string_field_problem(record, "completion", non_empty=True)
    return problem or {**EMPTY_ROW, "kind": "prompt_completion", "prompt": record["prompt"],
                       "completion": record["completion"]}  # fmt: skip


def normalize_chat(messages: Any, tools: Any = None) -> dict | str:
    problem = chat_problem(messages, tools)
    return problem or {**EMPTY_ROW, "kind": "chat", "messages": json.dumps(messages, ensure_ascii=False),
                       "tools": json.dumps(tools, ensure_ascii=False) if tools else None}  # fmt: skip


def normalize_sharegpt(record: dict) -> dict | str:
    messages = sharegpt_messages(record["conversations"])
    return messages if isinstance(messages, str) else normalize_chat(messages)


def normalize_alpaca(record: dict) -> dict | str:
    problem = (
        string_field_problem(record, "instruction")
        or string_field_problem(record, "input", required=False)
        or string_field_problem(record, "system", required=False)
        or string_field_problem(record, "output", non_empty=True)
    )
    return problem or normalize_chat(alpaca_messages(record))


def normalize_text(record: dict) -> dict | str:
    return string_field_problem(record, "text", non_empty=True) or {**EMPTY_ROW, "kind": "text", "text": record["text"]}


def normalize_tokenized(record: dict) -> dict | str:
    problem = token_list_problem(record, "input_ids")
    if not problem and "labels" in record:
        problem = token_list_problem(record, "labels")
        if not problem and len(record["labels"]) != len(record["input_ids"]):
            problem = f"'labels' has {len(record['labels'])} tokens but 'input_ids' has {len(record['input_ids'])}"
        elif not problem and all(label == IGNORE_INDEX for label in record["labels"]):
            problem = "every label is -100: there is nothing to train on"
    labels = record.get("labels") or list(record.get("input_ids") or [])
    return problem or {**EMPTY_ROW, "kind": "tokenized", "input_ids": record["input_ids"], "labels": labels}


NORMALIZERS = {
    "prompt_completion": normalize_prompt_completion,
    "chat": lambda record: normalize_chat(record["messages"], record.get("tools")),
    "sharegpt": normalize_sharegpt,
    "alpaca": normalize_alpaca,
    "text": normalize_text,
    "tokenized": normalize_tokenized,
}


# Reading


class ProblemReport:
    """Collects invalid records: the first MAX_REPORTED_PROBLEMS as `location: reason`, and the total."""

    def __init__(self):
        self.shown: list[str] = []
        self.total = 0

    def add(self, location: str, reason: str) -> None:
        self.total += 1
        if len(self.shown) < MAX_REPORTED_PROBLEMS:
            self.shown.append(f"{location}: {reason}")

    def text(self) -> str:
        return f"{self.total} invalid record(s) (showing {len(self.shown)}):\n  " + "\n  ".join(self.shown)


def with_system_message(row: dict, system_message: str) -> dict:
    messages = json.loads(row["messages"])
    if messages[0]["role"] == "system":
        return row
    messages.insert(0, {"role": "system", "content": system_message})
    return {**row, "messages": json.dumps(messages, ensure_ascii=False)}


def read_records(spec: str, flag: str, args: DataArguments, limit: int = 0, max_chars: int | None = None) -> list[dict]:
    """Read and validate every record of a source; stop with a report, or drop the invalid ones when asked. Records
    longer than `max_chars` characters meet --long_sequence_strategy here, before they cost any tokenizing."""
    rows, report, seen, duplicates = [], ProblemReport(), set(), 0
    too_long, dropped = ProblemReport(), 0
    for location, value in iter_source_records(spec, flag):
        row = value.reason if isinstance(value, InvalidRecord) else normalize_record(value, args.data_format)
        if isinstance(row, str):
            report.add(location, row)
            continue
        if max_chars and (chars := record_chars(row)) > max_chars:
            if args.long_sequence_strategy == "error":
                too_long.add(location, f"{chars} characters")
                continue
            if args.long_sequence_strategy == "drop":
                dropped += 1
                continue
            # Twice the bound: the tokens of the first max_chars characters (at least max_length of them) stay
            # clear of the cut, where a word split in two would tokenize differently.
            row = truncated_record(row, 2 * max_chars)
        if args.default_system_message and row["kind"] == "chat":
            row = with_system_message(row, args.default_system_message)
        if args.dedup:
            key = hashlib.sha1(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).digest()
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
        rows.append({**row, "source": location})
        if limit and len(rows) >= limit:
            break
    if report.total and not args.skip_invalid_samples:
        raise DataError(
            f"{flag}: {report.text()}\nFix these records, or pass --skip_invalid_samples true to drop them."
        )
    if too_long.total:
        raise DataError(
            f"{flag}: {too_long.total} record(s) hold more than {max_chars} characters of text, more than "
            "--max_length tokens can cover whatever the tokenizer does:\n  "
            + "\n  ".join(too_long.shown)
            + "\nRaise --max_length, or pass --long_sequence_strategy truncate or drop."
        )
    if dropped:
        logger.warning("%s: dropped %d record(s) longer than %d characters (--long_sequence_strategy drop).",
                       flag, dropped, max_chars)  # fmt: skip
    if report.total:
        logger.warning("%s: dropped %s", flag, report.text())
    if duplicates:
        logger.warning("%s: dropped %d exact duplicate record(s) (--dedup true).", flag, duplicates)
    if not rows:
        raise DataError(f"{flag}: {mask_secrets(spec)} holds no valid record.")
    return rows


# Length pre-check: bounds the work per record before tokenizing (a 20 MB line would take minutes and gigabytes)


def max_record_chars(tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
    """Characters of record text that surely make more than max_length tokens: no token covers more characters of
    text than its string in the vocabulary has (byte-level and SentencePiece pieces spell each byte or space with one
    character), so a record with more than max_length x the longest token's characters is longer than max_length."""
    return max_length * max(len(token) for token in tokenizer.get_vocab())


def record_chars(row: dict) -> int:
    """Characters of the record's text (template text only adds to it); tokenized records are measured later."""
    if row["kind"] == "chat":
        return sum(len(m.get("content") or "") for m in json.loads(row["messages"]))
    return sum(len(row[key] or "") for key in ("prompt", "completion", "text"))


def truncated_record(row: dict, max_chars: int) -> dict:
    """The record's first max_chars characters of text, in order (later chat turns dropped)."""
    if row["kind"] == "chat":
        messages, budget = [], max_chars
        for message in json.loads(row["messages"]):
            if budget <= 0:
                break
            content = message.get("content") or ""
            messages.append({**message, "content": content[:budget]} if content else message)
            budget -= len(content)
        return {**row, "messages": json.dumps(messages, ensure_ascii=False)}
    cut, budget = {}, max_chars
    for key in ("prompt", "completion", "text"):
        if row[key] is not None:
            cut[key] = row[key][: max(budget, 0)]
            budget -= len(row[key])
    return {**row, **cut}


def load_raw_datasets(args: DataArguments, seed: int, max_chars: int | None = None) -> tuple[Dataset, Dataset | None]:
    """Validated train (and eval) records, before tokenization."""
    train = Dataset.from_list(read_records(args.train_data, "--train_data", args, args.max_num_samples, max_chars))
    if args.eval_data != NO_EVAL_DATA:
        return train, Dataset.from_list(read_records(args.eval_data, "--eval_data", args, max_chars=max_chars))
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


def apply_chat_template_option(tokenizer: PreTrainedTokenizerBase, args: DataArguments) -> None:
    """--chat_template (the template itself, or a file holding it) replaces the tokenizer's."""
    if args.chat_template:
        path = Path(args.chat_template).expanduser()
        template = path.read_text() if "{" not in args.chat_template and path.is_file() else args.chat_template
        if "{" not in template:
            raise DataError(f"--chat_template {args.chat_template!r} is neither a Jinja template nor a file.")
        tokenizer.chat_template = template


# Tokenization with loss masks: each sample is one text and its trained character spans, tokenized once (the masking
# rule and the chat-template handling live in chat_masks.py).


def parse_template_kwargs(value: str | None, where: str) -> dict:
    """--chat_template_kwargs, or a row's chat_template_kwargs column: a JSON object (or nothing)."""
    if not value:
        return {}
    try:
        kwargs = json.loads(value)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: chat_template_kwargs is not valid JSON ({error}): {value!r}") from None
    if not isinstance(kwargs, dict):
        raise DataError(f"{where}: chat_template_kwargs must be a JSON object, e.g. '{{\"enable_thinking\": false}}'")
    return kwargs


def record_text_and_spans(row: dict, tokenizer: PreTrainedTokenizerBase, bos: str, template_kwargs: dict):
    """The text the model sees for a record, and the character spans of it that carry loss."""
    if row["kind"] == "chat":
        # A row's own kwargs (set per data source) win over --chat_template_kwargs.
        kwargs = {**template_kwargs, **parse_template_kwargs(row.get("chat_template_kwargs"), row["source"])}
        tools = json.loads(row["tools"]) if row.get("tools") else None
        return chat_text_and_spans(tokenizer, json.loads(row["messages"]), tools, kwargs)
    if row["kind"] == "text":
        text = bos + row["text"] + tokenizer.eos_token
        return text, [(0, len(text))]
    # The prompt (after BOS, when the tokenizer uses one) is context; the completion and EOS are trained.
    prompt = bos + row["prompt"]
    text = prompt + row["completion"] + tokenizer.eos_token
    return text, [(len(prompt), len(text))]


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> str:
    """The BOS text when the tokenizer adds BOS to plain text (Llama-style), else ''."""
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return tokenizer.bos_token if adds_bos else ""


def token_ids_problem(input_ids: list[int], vocab_size: int) -> str | None:
    if min(input_ids) < 0 or max(input_ids) >= vocab_size:
        return (
            f"'input_ids' holds token ids outside the tokenizer's vocabulary (0..{vocab_size - 1}); "
            "was it tokenized with another tokenizer?"
        )
    return None


def tokenize_batch(
    batch: dict, tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool, template_kwargs: dict
) -> dict:
    """Render every record, tokenize the whole batch in one call, and label the trained spans. A record that cannot
    be rendered or masked gets a `problem` (reported, or dropped with --skip_invalid_samples) and no tokens."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    bos = bos_prefix(tokenizer)
    samples, problems = [], []
    for row in rows:
        sample, problem = ("", []), None
        if row["kind"] == "tokenized":
            problem = token_ids_problem(row["input_ids"], len(tokenizer))
        else:
            try:
                sample = record_text_and_spans(row, tokenizer, bos, template_kwargs)
            except ChatMaskError as error:
                problem = str(error)
        samples.append(sample)
        problems.append(problem)
    encoded = iter(masked_samples(tokenizer, samples, train_on_prompt))
    output = {"input_ids": [], "labels": [], "source": [row["source"] for row in rows], "problem": problems}
    for row, problem in zip(rows, problems, strict=True):
        input_ids, labels = next(encoded)
        if row["kind"] == "tokenized":
            input_ids, labels = row["input_ids"], row["labels"]
        if problem:
            input_ids, labels = [], []
        output["input_ids"].append(input_ids)
        output["labels"].append(labels)
    return {**output, **length_columns(output["labels"])}


def length_columns(labels: list[list[int]]) -> dict:
    """Per-sample token and trained-token counts, so length checks and summaries never load the token lists."""
    return {
        "length": [len(row) for row in labels],
        "num_trained": [len(row) - row.count(IGNORE_INDEX) for row in labels],
    }


def tokenize_dataset(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, args: DataArguments, split: str) -> Dataset:
    if "chat" in dataset.unique("kind") and not tokenizer.chat_template:
        logger.info("The tokenizer has no chat template; chats use the ChatML-style default (turns end with EOS).")
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    template_kwargs = parse_template_kwargs(args.chat_template_kwargs, "--chat_template_kwargs")
    try:
        tokenized = dataset.map(
            tokenize_batch,
            batched=True,
            num_proc=tokenizing_processes(args, len(dataset)),
            fn_kwargs={"tokenizer": tokenizer, "train_on_prompt": args.train_on_prompt,
                       "template_kwargs": template_kwargs},  # fmt: skip
            remove_columns=dataset.column_names,
            desc="Tokenizing",
        )
    except (DataError, ChatMaskError) as error:
        raise DataError(f"{split} data: {error}") from error
    return without_unmaskable(tokenized, args, split)


def without_unmaskable(dataset: Dataset, args: DataArguments, split: str) -> Dataset:
    """Records the template cannot render or mask: reported like every invalid record, or dropped when asked."""
    flagged = [index for index, problem in enumerate(dataset["problem"]) if problem]
    dataset = dataset.remove_columns("problem") if not flagged else dataset
    if not flagged:
        return dataset
    report = ProblemReport()
    for row in dataset.select(flagged):
        report.add(row["source"], row["problem"])
    if not args.skip_invalid_samples:
        raise DataError(
            f"{split} data: {report.text()}\nFix these records (or --chat_template / --chat_template_kwargs), or "
            "pass --skip_invalid_samples true to drop them."
        )
    logger.warning("%s data: dropped %s", split, report.text())
    kept = np.setdiff1d(np.arange(len(dataset)), flagged)
    if not len(kept):
        raise DataError(f"{split} data: no record can be rendered by the chat template.")
    return dataset.select(kept).remove_columns("problem")


def tokenizing_processes(args: DataArguments, num_records: int) -> int | None:
    """Worker processes cost about a second to start: worth it from a few thousand records."""
    if args.preprocessing_num_workers is not None:
        return args.preprocessing_num_workers if args.preprocessing_num_workers > 1 else None
    workers = min(os.cpu_count() or 1, num_records // 5000)
    return workers if workers > 1 else None


# Length policy


def apply_length_policy(dataset: Dataset, args: DataArguments, max_length: int, split: str) -> Dataset:
    lengths = np.array(dataset["length"])
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
        dataset = dataset.map(truncate_batch, batched=True, fn_kwargs={"max_length": max_length}, desc="Truncating")
    return drop_untrained(dataset, split)


def truncate_batch(batch: dict, max_length: int) -> dict:
    if max(batch["length"]) <= max_length:
        return batch
    input_ids = [ids[:max_length] for ids in batch["input_ids"]]
    labels = [row[:max_length] for row in batch["labels"]]
    return {**batch, "input_ids": input_ids, "labels": labels, **length_columns(labels)}


def drop_untrained(dataset: Dataset, split: str) -> Dataset:
    """A sample whose labels are all masked (e.g. truncated before the answer) adds no loss, only compute."""
    trained = np.array(dataset["num_trained"]) > 0
    kept = dataset.select(np.flatnonzero(trained)) if not trained.all() else dataset
    if len(kept) < len(dataset):
        logger.warning("Dropping %d %s sample(s) with no trained tokens left.", len(dataset) - len(kept), split)
    if len(kept) == 0:
        raise DataError(f"no {split} sample has a trained token left; check --max_length and the data.")
    return kept


def log_length_summary(dataset: Dataset, split: str) -> None:
    lengths, trained = np.array(dataset["length"]), int(np.sum(dataset["num_trained"]))
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    logger.info(
        "%s: %d samples, tokens p50 %d / p90 %d / p99 %d / max %d, %d of %d tokens trained (%.1f%%).",
        split, len(lengths), p50, p90, p99, lengths.max(), trained, lengths.sum(), 100 * trained / lengths.sum(),
    )  # fmt: skip


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
    """Tokenize and apply the length policy; columns input_ids, labels, source, length and num_trained."""
    prepared = []
    for split, raw in (("train", raw_train), ("eval", raw_eval)):
        if raw is None:
            prepared.append(None)
            continue
        prepared.append(apply_length_policy(tokenize_dataset(raw, tokenizer, args, split), args, max_length, split))
    return prepared[0], prepared[1]


# Cache of prepared datasets

CACHE_KEY_OPTIONS = ("train_data", "eval_data", "eval_size", "data_format", "default_system_message",
                     "chat_template_kwargs", "skip_invalid_samples", "dedup", "max_num_samples", "train_on_prompt",
                     "long_sequence_strategy")  # fmt: skip


def prepared_cache_key(args: DataArguments, tokenizer: PreTrainedTokenizerBase, max_length: int, seed: int) -> str:
    """Changes with the data content, the tokenizer and its template, the data options and this module's code."""
    sources = [fingerprint_source(args.train_data)]
    if args.eval_data != NO_EVAL_DATA:
        sources.append(fingerprint_source(args.eval_data))
    options = {key: value for key, value in asdict(args).items() if key in CACHE_KEY_OPTIONS}
    code = inspect.getsource(sys.modules[__name__]) + inspect.getsource(chat_masks)
    parts = [sources, options, max_length, seed, Hasher.hash(tokenizer), tokenizer.chat_template, code]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def load_prepared_datasets(
    args: DataArguments, tokenizer: PreTrainedTokenizerBase, max_length: int, seed: int
) -> tuple[Dataset, Dataset | None]:
    """Read, validate and tokenize the data, or reuse the result of an identical earlier run; log length summaries."""
    cache = None if args.data_cache_dir.lower() == "none" else Path(args.data_cache_dir)
    if cache is not None:
        cache = cache / prepared_cache_key(args, tokenizer, max_length, seed)
    if cache is not None and (cache / "train").is_dir():
        logger.info("Using the prepared data cached in %s.", cache)
        train = load_from_disk(str(cache / "train"))
        evaluation = load_from_disk(str(cache / "eval")) if (cache / "eval").is_dir() else None
        if "chat_template" in train.info.description:
            tokenizer.chat_template = json.loads(train.info.description)["chat_template"]
    else:
        raw_train, raw_eval = load_raw_datasets(args, seed, max_record_chars(tokenizer, max_length))
        train, evaluation = prepare_datasets(args, tokenizer, raw_train, raw_eval, max_length)
        if cache is not None:
            save_to_cache(cache, tokenizer, train, evaluation)
    for split, dataset in (("train", train), ("eval", evaluation)):
        if dataset is not None:
            log_length_summary(dataset, split)
    return train, evaluation


def save_to_cache(cache: Path, tokenizer: PreTrainedTokenizerBase, train: Dataset, evaluation: Dataset | None) -> None:
    """Written beside the final place, then renamed: a concurrent or killed run never sees half a cache entry."""
    temporary = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    # The default chat template may have been set while tokenizing; a cache hit must restore it.
    train.info.description = json.dumps({"chat_template": tokenizer.chat_template})
    save_prepared(temporary, train, evaluation)
    try:
        os.replace(temporary, cache)
    except OSError:  # another process stored the same entry first
        shutil.rmtree(temporary, ignore_errors=True)
    logger.info("Cached the prepared data in %s.", cache)


def save_prepared(directory: Path, train: Dataset, evaluation: Dataset | None) -> None:
    train.save_to_disk(str(directory / "train"))
    if evaluation is not None:
        evaluation.save_to_disk(str(directory / "eval"))


# --prepare_data_only: the prepared data and a preview a person can check


def marked_text(tokenizer: PreTrainedTokenizerBase, input_ids: list[int], labels: list[int]) -> str:
    """The sample as text, with every run of trained tokens wrapped in TRAINED_SPAN. Each run is the text its tokens
    add to the decoded sample, so a leading space (which SentencePiece decoders drop at the start of a decode) shows."""
    pieces, start, decoded = [], 0, ""
    trained = [label != IGNORE_INDEX for label in labels]
    for index in range(1, len(input_ids) + 1):
        if index == len(input_ids) or trained[index] != trained[start]:
            upto = tokenizer.decode(input_ids[:index])
            text = upto[len(decoded) :] if upto.startswith(decoded) else tokenizer.decode(input_ids[start:index])
            pieces.append(f"{TRAINED_SPAN[0]}{text}{TRAINED_SPAN[1]}" if trained[start] else text)
            start, decoded = index, upto
    return "".join(pieces)


def write_preview(path: Path, tokenizer: PreTrainedTokenizerBase, dataset: Dataset) -> None:
    lines = [
        f"The first {min(PREVIEW_SAMPLES, len(dataset))} training samples as the model sees them. Tokens that carry "
        f"loss are between {TRAINED_SPAN[0]} and {TRAINED_SPAN[1]}; everything else is context only.\n"
    ]
    for row in dataset.select(range(min(PREVIEW_SAMPLES, len(dataset)))):
        lines.append(f"===== {row['source']} ({len(row['input_ids'])} tokens) =====")
        lines.append(marked_text(tokenizer, row["input_ids"], row["labels"]) + "\n")
    path.write_text("\n".join(lines), encoding="utf-8")


def write_prepared_data(
    output_dir: str, tokenizer: PreTrainedTokenizerBase, train: Dataset, evaluation: Dataset | None
) -> Path:
    directory = Path(output_dir) / "prepared"
    if directory.exists():
        shutil.rmtree(directory)
    save_prepared(directory, train, evaluation)
    write_preview(directory / "preview.txt", tokenizer, train)
    return directory


def pack_datasets(
    args: DataArguments,
    train: Dataset,
    evaluation: Dataset | None,
    max_length: int,
    train_rows_multiple: int = 1,
    flattened: bool = False,
) -> tuple[Dataset, Dataset | None]:
    """--sample_packing: prepared samples packed into rows of at most max_length tokens (eval too unless
    --eval_sample_packing false). Deterministic, so every rank builds the same rows and a resume sees the same data.
    The number of training rows is a multiple of `train_rows_multiple` (rows per optimizer step over all processes),
    so that no process is topped up with repeated rows and every optimizer step is full (evaluation discards its
    repeats itself). `flattened`: the collator flattens each batch (packing.flattens_batches)."""
    if not args.sample_packing:
        return train, evaluation
    train = pack_dataset(train, max_length, "train", train_rows_multiple, flattened)
    if evaluation is not None and args.eval_sample_packing:
        evaluation = pack_dataset(evaluation, max_length, "eval", flattened=flattened)
    return train, evaluation


def training_columns(dataset: Dataset | None) -> Dataset | None:
    """What the collator takes (it builds the attention mask, or for packed rows passes position_ids); the other
    columns serve reports and the preview."""
    if dataset is None:
        return None
    return dataset.select_columns([c for c in ("input_ids", "labels", "position_ids") if c in dataset.column_names])


def build_collator(
    args: DataArguments, tokenizer: PreTrainedTokenizerBase, max_length: int, flattened: bool = False
) -> DataCollatorForSeq2Seq | PackedCollator | FlattenedCollator:
    """Right-pads input_ids/attention_mask with the pad token and labels with IGNORE_INDEX; with --sample_packing,
    packed rows get position_ids and no attention mask, and with `flattened` each batch becomes one row with its
    samples' boundaries (see packing.py)."""
    padding = DataCollatorForSeq2Seq(
        tokenizer,
        padding="max_length" if args.pad_to_max_length else "longest",
        max_length=max_length,
        pad_to_multiple_of=args.pad_to_multiple_of,
        label_pad_token_id=IGNORE_INDEX,
    )
    if not args.sample_packing:
        return padding
    if flattened:
        return FlattenedCollator(
            pad_token_id=tokenizer.pad_token_id,
            fallback=padding,
            pad_to_multiple_of=args.pad_to_multiple_of,
            row_length=max_length if args.pad_to_max_length else None,
        )
    return PackedCollator(
        pad_token_id=tokenizer.pad_token_id,
        fallback=padding,
        pad_to_multiple_of=args.pad_to_multiple_of,
        pad_to_length=max_length if args.pad_to_max_length else None,
    )
