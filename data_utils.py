"""Training data: the pipeline from records to training samples. Read every source, validate and normalize each
record (its shape: data_formats.py), tokenize with exact loss masks (loss_masks.py), apply the length policy, cache
the result, and write a preview of what the model trains on. Every problem is reported as `location: reason` before
any model weight is loaded.
"""

import ast
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset, load_from_disk
from datasets.fingerprint import Hasher
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from data_formats import normalize_record
from data_mixing import (
    DataSource,
    SourceCounts,
    mixture_positions,
    random_subset,
    selected_positions,
    subset_size,
    summary_rows,
    summary_table,
    weighted_quotas,
)
from data_sources import DataError, InvalidRecord, fingerprint_source, iter_source_records
from loss_masks import TokenizedBatch, labelled_batch, parse_template_kwargs
from options import NO_EVAL_DATA, DataArguments
from output_layout import PREPARED_SUBDIR, PREVIEW_FILE
from packing import IGNORE_INDEX, FlattenedCollator, PackedCollator, column_values, pack_dataset

logger = logging.getLogger(__name__)

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

    def extend(self, other: "ProblemReport") -> None:
        self.shown = (self.shown + other.shown)[:MAX_REPORTED_PROBLEMS]
        self.total += other.total

    def text(self) -> str:
        return f"{self.total} invalid record(s) (showing {len(self.shown)}):\n  " + "\n  ".join(self.shown)


def with_system_message(row: dict, system_message: str) -> dict:
    messages = json.loads(row["messages"])
    if messages[0]["role"] == "system":
        return row
    messages.insert(0, {"role": "system", "content": system_message})
    return {**row, "messages": json.dumps(messages, ensure_ascii=False)}


def read_records(
    spec: "str | DataSource", flag: str, args: DataArguments, limit: int = 0, max_chars: int | None = None
) -> list[dict]:
    """Read and validate every record of one source; stop with a report, or drop the invalid ones when asked."""
    source = spec if isinstance(spec, DataSource) else DataSource(path=spec)
    rows, _, report = read_source(source, 0, flag, args, set(), limit, max_chars=max_chars)
    raise_or_log_problems(report, flag, args)
    if not rows:
        raise DataError(f"{flag}: {source.label} holds no valid record.")
    return rows


def read_source(
    source: DataSource,
    source_id: int,
    flag: str,
    args: DataArguments,
    seen: set,
    limit: int = 0,
    seed: int = 0,
    max_chars: int | None = None,
) -> tuple[list[dict], SourceCounts, ProblemReport]:
    """The valid rows of one source, tagged with `source_id` and its chat template kwargs; what happened to the others
    (counts); and the invalid records. `seen` holds the keys of rows already read, for --dedup across sources.
    Records longer than `max_chars` characters meet --long_sequence_strategy here, before they cost any tokenizing."""
    records = list(iter_records(source, flag, limit if can_stop_early(source) else 0, args))
    counts = SourceCounts(label=source.label, read=len(records))
    positions = selected_positions(len(records), source, seed)
    if positions is not None:
        counts.skipped += len(records) - len(positions)
        records = [records[index] for index in positions]
    rows, report, duplicates = [], ProblemReport(), 0
    too_long, dropped = ProblemReport(), 0
    kwargs = json.dumps(source.chat_template_kwargs, sort_keys=True) if source.chat_template_kwargs else None
    for location, row in records:
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
        rows.append({**row, "source": location, "source_id": source_id, "chat_template_kwargs": kwargs})
    counts.invalid, counts.skipped = report.total, counts.skipped + duplicates + dropped
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
    if duplicates:
        logger.warning("%s: %s: dropped %d exact duplicate record(s) (--dedup true).", flag, source.label, duplicates)
    kept = random_subset(len(rows), subset_size(len(rows), source.records), np.random.default_rng([seed, source_id]))
    if len(kept) < len(rows):
        counts.skipped += len(rows) - len(kept)
        rows = [rows[index] for index in kept]
    return rows, counts, report


def can_stop_early(source: DataSource) -> bool:
    """Whether reading may stop after `limit` valid records (slices, shards and subsets need the whole source)."""
    return not (source.shards or source.records or (source.split and "[" in source.split))


def iter_records(source: DataSource, flag: str, limit: int, args: DataArguments) -> Iterator[tuple[str, dict | str]]:
    """(location, normalized row or the reason it is invalid) for every record of the source, in order."""
    data_format = source.format or args.data_format
    valid = 0
    for spec in source_specs(source):
        for location, value in iter_source_records(spec, flag, config_name=source.name):
            if isinstance(value, InvalidRecord):
                yield location, value.reason
                continue
            row = normalize_record(mapped_record(value, source), data_format)
            yield location, row
            valid += not isinstance(row, str)
            if limit and valid >= limit:
                return


def source_specs(source: DataSource) -> list[str]:
    """What data_sources reads for a source: its path (with the split), or each of its data_files."""
    split = source.base_split()
    if not source.data_files:
        return [source.path if split in (None, "train") else f"{source.path}:{split}"]
    local = Path(source.path).expanduser()
    specs = []
    for name in source.data_files:
        if local.is_dir():
            specs.append(str(local / name))
        elif Path(name).expanduser().is_file():
            specs.append(name)
        else:  # a file inside a Hugging Face dataset repo
            specs.append(f"hf://datasets/{source.path}/{name}")
    return specs


def mapped_record(record: Any, source: DataSource) -> Any:
    """The record with the source's field, message-field and role names replaced by ours."""
    if not isinstance(record, dict) or not (source.fields or source.message_fields or source.roles):
        return record
    theirs_to_ours = {theirs: ours for ours, theirs in source.fields.items()}
    record = {theirs_to_ours.get(key, key): value for key, value in record.items()}
    messages = record.get("messages")
    if isinstance(messages, list) and (source.message_fields or source.roles):
        record["messages"] = [mapped_message(message, source) for message in messages]
    return record


def mapped_message(message: Any, source: DataSource) -> Any:
    if not isinstance(message, dict):
        return message
    theirs_to_ours = {theirs: ours for ours, theirs in source.message_fields.items()}
    message = {theirs_to_ours.get(key, key): value for key, value in message.items()}
    if source.roles and message.get("role") in source.roles:
        message["role"] = source.roles[message["role"]]
    return message


def raise_or_log_problems(report: ProblemReport, flag: str, args: DataArguments) -> None:
    if report.total and not args.skip_invalid_samples:
        raise DataError(
            f"{flag}: {report.text()}\nFix these records, or pass --skip_invalid_samples true to drop them."
        )
    if report.total:
        logger.warning("%s: dropped %s", flag, report.text())


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


def read_sources(
    sources: list[DataSource], flag: str, args: DataArguments, seed: int, limit: int = 0, max_chars: int | None = None
) -> tuple[list[dict], list[SourceCounts]]:
    """The valid rows of every source in order (at most `limit` in all), and each source's counts."""
    all_rows, all_counts, report, seen = [], [], ProblemReport(), set()
    for source_id, source in enumerate(sources):
        remaining = limit - len(all_rows) if limit else 0
        rows, counts, problems = read_source(source, source_id, flag, args, seen, remaining, seed, max_chars)
        if limit and len(all_rows) + len(rows) > limit:
            counts.skipped += len(all_rows) + len(rows) - limit
            rows = rows[: limit - len(all_rows)]
        all_rows += rows
        all_counts.append(counts)
        report.extend(problems)
        if limit and len(all_rows) >= limit:
            break
    raise_or_log_problems(report, flag, args)
    for source, counts in zip(sources, all_counts, strict=False):
        if counts.read - counts.invalid - counts.skipped <= 0:
            raise DataError(f"{flag}: {source.label} holds no valid record.")
    return all_rows, all_counts


def load_raw_datasets(
    args: DataArguments, seed: int, max_chars: int | None = None
) -> tuple[Dataset, Dataset | None, dict]:
    """Validated train (and eval) records before tokenization, mixed as --data_mixing says, and each source's counts
    ({"train": [...], "eval": [...]})."""
    train_sources = args.sources("train")
    rows, train_counts = read_sources(train_sources, "--train_data", args, seed, args.max_num_samples, max_chars)
    counts = {"train": [c.as_dict() for c in train_counts], "eval": []}
    train, evaluation = Dataset.from_list(rows), None
    if args.eval_data != NO_EVAL_DATA:
        eval_rows, eval_counts = read_sources(args.sources("eval"), "--eval_data", args, seed, max_chars=max_chars)
        evaluation, counts["eval"] = Dataset.from_list(eval_rows), [c.as_dict() for c in eval_counts]
    elif args.eval_size:
        train, evaluation = split_off_eval(train, args, seed)
    return mix_train(train, train_sources, args, seed), evaluation, counts


def split_off_eval(train: Dataset, args: DataArguments, seed: int) -> tuple[Dataset, Dataset]:
    """--eval_size records held out of the training data, before mixing, so no repeat of a held-out record trains."""
    test_size = args.eval_size if args.eval_size < 1 else int(args.eval_size)
    if len(train) < 2 or (test_size >= 1 and test_size >= len(train)):
        raise DataError(
            f"--eval_size {args.eval_size} leaves no training data from {len(train)} record(s); "
            "lower it, pass --eval_data, or set --eval_size 0."
        )
    split = train.train_test_split(test_size=test_size, seed=seed)
    return split["train"], split["test"]


def mix_train(train: Dataset, sources: list[DataSource], args: DataArguments, seed: int) -> Dataset:
    """--data_mixing weighted: each source's share of --data_mix_size records follows its weight, records drawn
    without replacement up to the source's size and repeated beyond it, the mixture shuffled; concat keeps all."""
    if args.data_mixing == "concat":
        return train
    source_ids = column_values(train, "source_id")
    members = [np.flatnonzero(source_ids == index) for index in range(len(sources))]
    target = args.data_mix_size or len(train)
    quotas = weighted_quotas([source.weight for source in sources], target)
    rng = np.random.default_rng(seed)
    for source, rows, quota in zip(sources, members, quotas, strict=True):
        if quota and not len(rows):
            raise DataError(
                f"--data_mixing weighted: {source.label} has no training record left after --eval_size; lower "
                "--eval_size or give the evaluation data with --eval_data."
            )
    positions = mixture_positions([len(rows) for rows in members], quotas, rng)
    chosen = [rows[picked] for rows, picked in zip(members, positions, strict=True)]
    for source, rows, quota in zip(sources, members, quotas, strict=True):
        if quota > len(rows):
            logger.info("--data_mixing weighted: %s repeated %.2fx (%d of %d records).", source.label,
                        quota / len(rows), quota, len(rows))  # fmt: skip
    return train.select(rng.permutation(np.concatenate(chosen)))


def apply_chat_template_option(tokenizer: PreTrainedTokenizerBase, args: DataArguments) -> None:
    """--chat_template (the template itself, or a file holding it) replaces the tokenizer's."""
    if args.chat_template:
        path = Path(args.chat_template).expanduser()
        template = path.read_text() if "{" not in args.chat_template and path.is_file() else args.chat_template
        if "{" not in template:
            raise DataError(f"--chat_template {args.chat_template!r} is neither a Jinja template nor a file.")
        tokenizer.chat_template = template


# Tokenization with loss masks (the rules live in loss_masks.py, the chat-template handling in chat_masks.py)


def tokenize_batch(
    batch: dict, tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool, template_kwargs: dict
) -> pa.Table:
    """Label every record of the batch (one tokenizer call); a record that cannot be rendered or masked gets a
    `problem` (reported, or dropped with --skip_invalid_samples) and no tokens."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    tokenized, problems = labelled_batch(rows, tokenizer, train_on_prompt, template_kwargs)
    return token_table(tokenized, rows, problems)


def token_table(tokenized: TokenizedBatch, rows: list[dict], problems: list[str | None]) -> pa.Table:
    """The map output as Arrow columns built from the flat arrays (no per-token Python lists)."""
    ends = np.cumsum(tokenized.lengths)
    offsets = pa.array(np.concatenate([[0], ends]), type=pa.int32())
    trained_through = np.concatenate([[0], np.cumsum(tokenized.labels != IGNORE_INDEX)])
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(tokenized.input_ids, type=pa.int64())),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(tokenized.labels, type=pa.int64())),
        "source": pa.array([row["source"] for row in rows], type=pa.string()),
        "source_id": pa.array([row.get("source_id", 0) for row in rows], type=pa.int64()),
        "problem": pa.array(problems, type=pa.string()),
        "length": pa.array(tokenized.lengths, type=pa.int64()),
        "num_trained": pa.array(trained_through[ends] - trained_through[ends - tokenized.lengths], type=pa.int64()),
    })  # fmt: skip


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
    processes = tokenizing_processes(args, len(dataset))
    # Says what runs when the progress bar is off (output to a file).
    logger.info("Tokenizing %d %s record(s) in %d process(es).", len(dataset), split, processes or 1)
    try:
        tokenized = dataset.map(
            tokenize_batch,
            batched=True,
            num_proc=processes,
            fn_kwargs={
                "tokenizer": tokenizer,
                "train_on_prompt": args.train_on_prompt,
                "template_kwargs": template_kwargs,
            },  # fmt: skip
            remove_columns=dataset.column_names,
            desc="Tokenizing",
        )
    except DataError as error:
        raise DataError(f"{split} data: {error}") from error
    return without_unmaskable(tokenized, args, split)


def without_unmaskable(dataset: Dataset, args: DataArguments, split: str) -> Dataset:
    """Records the template cannot render or mask: reported like every invalid record, or dropped when asked."""
    flagged = [index for index, problem in enumerate(column_values(dataset, "problem")) if problem]
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
    lengths = column_values(dataset, "length")
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
    trained = column_values(dataset, "num_trained") > 0
    kept = dataset.select(np.flatnonzero(trained)) if not trained.all() else dataset
    if len(kept) < len(dataset):
        logger.warning("Dropping %d %s sample(s) with no trained tokens left.", len(dataset) - len(kept), split)
    if len(kept) == 0:
        raise DataError(f"no {split} sample has a trained token left; check --max_length and the data.")
    return kept


def log_length_summary(dataset: Dataset, split: str) -> None:
    lengths, trained = column_values(dataset, "length"), int(np.sum(column_values(dataset, "num_trained")))
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
    """Tokenize and apply the length policy; columns input_ids, labels, source, source_id, length and num_trained."""
    prepared = []
    for split, raw in (("train", raw_train), ("eval", raw_eval)):
        if raw is None:
            prepared.append(None)
            continue
        tokenized = tokenize_dataset(raw, tokenizer, args, split)
        prepared.append(apply_length_policy(tokenized, args, max_length, split))
    return prepared[0], prepared[1]


def describe_prepared(train: Dataset, tokenizer: PreTrainedTokenizerBase, counts: dict) -> None:
    """What a cached copy must bring back: the chat template (the default may have been set while tokenizing) and
    each source's counts."""
    train.info.description = json.dumps({"chat_template": tokenizer.chat_template, "source_counts": counts})


def source_summary(train: Dataset, evaluation: Dataset | None) -> dict[str, list[dict]]:
    """Per source of --train_data (and of --eval_data): records read, invalid, skipped, kept, held out for
    evaluation, and trained tokens."""
    counts = json.loads(train.info.description or "{}").get("source_counts")
    if not counts:
        return {}
    eval_ids = column_values(evaluation, "source_id") if evaluation is not None else []
    held_out = [] if counts["eval"] else eval_ids  # --eval_size: evaluation records come from the train sources
    train_ids, train_trained = column_values(train, "source_id"), column_values(train, "num_trained")
    summary = {"train": summary_rows(counts["train"], train_ids, train_trained, held_out)}
    if counts["eval"]:
        summary["eval"] = summary_rows(counts["eval"], eval_ids, column_values(evaluation, "num_trained"), [])
    return summary


def log_source_summary(summary: dict[str, list[dict]]) -> None:
    for split, rows in summary.items():
        logger.info("%s", summary_table(rows, f"--{split}_data"))


# Cache of prepared datasets

CACHE_KEY_OPTIONS = ("train_data", "eval_data", "eval_size", "data_format", "default_system_message",
                     "chat_template_kwargs", "skip_invalid_samples", "dedup", "max_num_samples", "train_on_prompt",
                     "long_sequence_strategy", "data_mixing", "data_mix_size")  # fmt: skip


PROJECT_DIR = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def token_shaping_modules() -> tuple[str, ...]:
    """This module and every module of the project it imports, directly or not (record formats, loss masks, chat
    masks, reading, mixing, packing, ...): all the code that can change the prepared data. Derived from the import
    statements, so a module added to the pipeline is covered without being listed."""
    found, pending = set(), [__name__]
    while pending:
        name = pending.pop()
        found.add(name)
        for node in ast.walk(ast.parse(module_source(name))):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported = [node.module]
            else:
                continue
            tops = {module.partition(".")[0] for module in imported}
            pending += [top for top in tops - found if (PROJECT_DIR / f"{top}.py").is_file()]
    return tuple(sorted(found))


def module_source(name: str) -> str:
    return (PROJECT_DIR / f"{name}.py").read_text(encoding="utf-8")


def prepared_cache_key(args: DataArguments, tokenizer: PreTrainedTokenizerBase, max_length: int, seed: int) -> str:
    """Changes with the data content, the tokenizer and its template, the data options and the code that shapes the
    prepared data (token_shaping_modules)."""
    splits = ("train", "eval") if args.eval_data != NO_EVAL_DATA else ("train",)
    sources = [
        [source.canonical(), [fingerprint_source(spec, source.name) for spec in source_specs(source)]]
        for split in splits
        for source in args.sources(split)
    ]
    options = {key: value for key, value in asdict(args).items() if key in CACHE_KEY_OPTIONS}
    code = {name: hashlib.sha256(module_source(name).encode()).hexdigest() for name in token_shaping_modules()}
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
        raw_train, raw_eval, counts = load_raw_datasets(args, seed, max_record_chars(tokenizer, max_length))
        train, evaluation = prepare_datasets(args, tokenizer, raw_train, raw_eval, max_length)
        describe_prepared(train, tokenizer, counts)
        if cache is not None:
            save_to_cache(cache, train, evaluation)
    for split, dataset in (("train", train), ("eval", evaluation)):
        if dataset is not None:
            log_length_summary(dataset, split)
    log_source_summary(source_summary(train, evaluation))
    return train, evaluation


def save_to_cache(cache: Path, train: Dataset, evaluation: Dataset | None) -> None:
    """Written beside the final place, then renamed: a concurrent or killed run never sees half a cache entry."""
    temporary = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
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


def preview_indices(dataset: Dataset) -> list[int]:
    """The first samples, then the first sample of every source not among them."""
    indices = list(range(min(PREVIEW_SAMPLES, len(dataset))))
    source_ids = column_values(dataset, "source_id").tolist() if "source_id" in dataset.column_names else []
    shown = {source_ids[index] for index in indices} if source_ids else set()
    for index, source_id in enumerate(source_ids):
        if source_id not in shown:
            indices.append(index)
            shown.add(source_id)
    return indices


def write_preview(path: Path, tokenizer: PreTrainedTokenizerBase, dataset: Dataset) -> None:
    indices = preview_indices(dataset)
    lines = [
        f"The first {min(PREVIEW_SAMPLES, len(dataset))} training samples as the model sees them (then the first "
        f"of every other data source). Tokens that carry loss are between {TRAINED_SPAN[0]} and {TRAINED_SPAN[1]}; "
        "everything else is context only.\n"
    ]
    for row in dataset.select(indices):
        lines.append(f"===== {row['source']} ({len(row['input_ids'])} tokens) =====")
        lines.append(marked_text(tokenizer, row["input_ids"], row["labels"]) + "\n")
    path.write_text("\n".join(lines), encoding="utf-8")


def write_prepared_data(
    output_dir: str, tokenizer: PreTrainedTokenizerBase, train: Dataset, evaluation: Dataset | None
) -> Path:
    directory = Path(output_dir) / PREPARED_SUBDIR
    if directory.exists():
        shutil.rmtree(directory)
    save_prepared(directory, train, evaluation)
    write_preview(directory / PREVIEW_FILE, tokenizer, train)
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
    repeats itself). `flattened`: the collator flattens each batch (attention.flattens_batches)."""
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
