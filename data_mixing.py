"""Several data sources in one run: the per-source options of --train_data / --eval_data, the deterministic mixing
of their records, and the per-source summary.

A value of --train_data / --eval_data is a list of sources, written as
  a JSON list        '[{"path": "chat.jsonl", "weight": 3}, "alpaca.jsonl"]'  (what a config file's list becomes)
  a JSON object      '{"path": "org/data", "split": "test", "records": 500}'  (one source with options)
  plain paths        'chat.jsonl,alpaca.jsonl'  (split on commas, unless the whole value is an existing path)
and the flag may be repeated on the command line (the values are appended). A path or URL holding a comma must be
written as a JSON object. Each source's options are listed in SOURCE_OPTIONS.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets
import numpy as np
from numpy.typing import ArrayLike

from data_formats import RECORD_FORMATS
from data_sources import DataError, split_local_spec
from redaction import mask_secrets

NO_EVAL_DATA = "NA"  # --eval_data value: no evaluation sources
MIXING_STRATEGIES = ("concat", "weighted")
SOURCE_OPTIONS = {
    "path": "where the records are: any --train_data form (file, directory, URL, hub id, artifact FQN)",
    "split": "a split of a hub / saved dataset, with an optional slice: 'test', 'train[:20%]', 'train[100:200]'",
    "name": "the configuration name of a hub dataset (datasets.load_dataset(path, name))",
    "data_files": "files inside `path` (a directory or a hub dataset repo) to read, in order",
    "format": f"record shape of this source: {', '.join(RECORD_FORMATS)} (default: --data_format)",
    "fields": 'record keys renamed to ours, e.g. {"messages": "conversations", "completion": "answer"}',
    "message_fields": 'keys of each chat message renamed to ours, e.g. {"role": "from", "content": "value"}',
    "roles": 'chat roles renamed to ours (system, user, assistant, tool), e.g. {"human": "user"}',
    "chat_template_kwargs": 'extra chat template variables for this source, e.g. {"enable_thinking": false}',
    "records": "a seeded random subset of the valid records: a number (>= 1) or a fraction (< 1)",
    "shards": "split the source into this many contiguous shards and read one (datasets.Dataset.shard)",
    "shard_index": "which shard to read (0-based; default 0)",
    "weight": "mixing weight with --data_mixing weighted (default 1)",
}


@dataclass
class DataSource:
    """One source of --train_data / --eval_data and its options (see SOURCE_OPTIONS)."""

    path: str
    split: str | None = None
    name: str | None = None
    data_files: list[str] = field(default_factory=list)
    format: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    message_fields: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    chat_template_kwargs: dict[str, Any] | None = None
    records: float | None = None
    shards: int | None = None
    shard_index: int = 0
    weight: float = 1.0

    @property
    def label(self) -> str:
        """How logs and summaries name the source (secrets masked)."""
        extras = [f"split {self.split}"] if self.split else []
        extras += [f"name {self.name}"] if self.name else []
        extras += [f"data_files {', '.join(self.data_files)}"] if self.data_files else []
        return mask_secrets(self.path) + (f" ({'; '.join(extras)})" if extras else "")

    def base_split(self) -> str | None:
        """The split name without its slice ('train[:20%]' -> 'train')."""
        return self.split.partition("[")[0] if self.split else None

    def canonical(self) -> dict:
        """Every option, for cache keys."""
        return asdict(self)


def parse_sources(value: str, flag: str) -> list[DataSource]:
    """The sources named by a value of --train_data / --eval_data (see the module docstring)."""
    entries = source_entries(value, flag)
    return [source_from_entry(entry, f"{flag} source {index + 1}") for index, entry in enumerate(entries)]


def source_entries(value: str, flag: str) -> list:
    """The entries of a value before they are checked: paths (strings) and source objects (dicts)."""
    text = value.strip()
    if text.startswith(("[", "{")):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{flag}: {mask_secrets(text)[:200]} starts like JSON but is not valid JSON ({error.msg} at column "
                f"{error.colno}). Write a list of sources or one source object, e.g. "
                '[{"path": "chat.jsonl", "weight": 2}, "other.jsonl"].'
            ) from None
        entries = entries if isinstance(entries, list) else [entries]
    elif split_local_spec(text):
        entries = [text]
    else:
        entries = [piece.strip() for piece in text.split(",") if piece.strip()]
    if not entries:
        raise DataError(f"{flag}: no data source given.")
    return entries


def source_from_entry(entry: Any, where: str) -> DataSource:
    if isinstance(entry, str) and entry.strip():
        return DataSource(path=entry.strip())
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"].strip():
        raise DataError(f"{where}: expected a path or an object with a 'path', got {mask_secrets(repr(entry))[:200]}.")
    unknown = sorted(set(entry) - set(SOURCE_OPTIONS))
    if unknown:
        raise DataError(
            f"{where} ({mask_secrets(entry['path'])}): unknown option(s) {', '.join(unknown)}. Options:\n  "
            + "\n  ".join(f"{key}: {meaning}" for key, meaning in SOURCE_OPTIONS.items())
        )
    options = {key: value for key, value in entry.items() if value is not None}
    if isinstance(options.get("data_files"), str):
        options["data_files"] = [options["data_files"]]
    problem = source_option_problem(options)
    if problem:
        raise DataError(f"{where} ({mask_secrets(entry['path'])}): {problem}")
    return DataSource(**options)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_text_mapping(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def source_option_problem(options: dict) -> str | None:
    """Why the options of one source are invalid, or None."""
    for key in ("split", "name"):
        if key in options and not isinstance(options[key], str):
            return f"{key} must be a string, got {options[key]!r}"
    if options.get("split") and "[" in options["split"]:
        try:
            datasets.ReadInstruction.from_spec(options["split"])
        except (ValueError, AssertionError):
            return f"split {options['split']!r} is not a split with a slice such as 'train[:20%]' or 'train[10:100]'"
    if not all(isinstance(item, str) for item in options.get("data_files", [])):
        return "data_files must be a file name or a list of them"
    if options.get("format", "auto") not in RECORD_FORMATS:
        return f"format {options['format']!r}; expected one of {', '.join(RECORD_FORMATS)}"
    for key in ("fields", "message_fields", "roles"):
        if key in options and not is_text_mapping(options[key]):
            return f'{key} must map names to names, e.g. {{"ours": "theirs"}}, got {options[key]!r}'
    if "chat_template_kwargs" in options and not isinstance(options["chat_template_kwargs"], dict):
        return f"chat_template_kwargs must be an object, got {options['chat_template_kwargs']!r}"
    records = options.get("records")
    if records is not None and not (is_number(records) and records > 0 and (records < 1 or records == int(records))):
        return f"records must be a whole number >= 1 or a fraction between 0 and 1, got {records!r}"
    shards, index = options.get("shards"), options.get("shard_index", 0)
    if shards is not None and not (isinstance(shards, int) and shards >= 1):
        return f"shards must be a whole number >= 1, got {shards!r}"
    if not isinstance(index, int) or index < 0 or index >= (shards or 1):
        return f"shard_index must be in 0..{(shards or 1) - 1}, got {index!r}"
    if "weight" in options and not (is_number(options["weight"]) and options["weight"] > 0):
        return f"weight must be a number > 0, got {options['weight']!r}"
    return None


# Choosing records within a source


def selected_positions(num_read: int, source: DataSource, seed: int) -> np.ndarray | None:
    """Positions (in read order) kept by the split slice, the shard and `records`; None keeps everything.

    The slice and the shard apply to the records as read, as `datasets` applies them to rows, so the same
    records are chosen whether or not some are invalid."""
    positions = np.arange(num_read)
    if source.split and "[" in source.split:
        [instruction] = datasets.ReadInstruction.from_spec(source.split).to_absolute({source.base_split(): num_read})
        positions = positions[instruction.from_ : instruction.to]
    if source.shards:
        positions = positions[contiguous_shard(len(positions), source.shards, source.shard_index)]
    return positions if len(positions) < num_read else None


def contiguous_shard(length: int, num_shards: int, index: int) -> slice:
    """The rows `datasets.Dataset.shard(num_shards, index, contiguous=True)` keeps."""
    size, extra = divmod(length, num_shards)
    start = size * index + min(index, extra)
    return slice(start, start + size + (1 if index < extra else 0))


def subset_size(available: int, records: float | None) -> int:
    if records is None:
        return available
    wanted = int(records) if records >= 1 else max(1, round(records * available))
    return min(available, wanted)


def random_subset(available: int, wanted: int, rng: np.random.Generator) -> np.ndarray:
    """`wanted` distinct positions out of `available`, in their original order."""
    if wanted >= available:
        return np.arange(available)
    return np.sort(rng.choice(available, size=wanted, replace=False))


# Mixing


def weighted_quotas(weights: list[float], target: int) -> list[int]:
    """Records per source for a mixture of `target` records in proportion to `weights` (largest remainder: the
    counts add up to `target` and each is within one record of its exact share)."""
    total = sum(weights)
    shares = [target * weight / total for weight in weights]
    quotas = [math.floor(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (quotas[i] - shares[i], i))
    for index in by_remainder[: target - sum(quotas)]:
        quotas[index] += 1
    return quotas


def mixture_positions(sizes: list[int], quotas: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """For each source, the positions of its records in the mixture: every record `quota // size` times, plus a
    random `quota % size` of them once more (under-sampling when quota < size, over-sampling when larger)."""
    positions = []
    for size, quota in zip(sizes, quotas, strict=True):
        repeats, rest = divmod(quota, size)
        positions.append(np.concatenate([np.tile(np.arange(size), repeats), random_subset(size, rest, rng)]))
    return positions


# The per-source summary


@dataclass
class SourceCounts:
    """What happened to one source's records before tokenization."""

    label: str
    read: int = 0
    invalid: int = 0
    skipped: int = 0  # duplicates (--dedup), and records left out by split slices, shards or `records`

    def as_dict(self) -> dict:
        return asdict(self)


def summary_rows(counts: list[dict], train_ids: ArrayLike, train_trained: ArrayLike, eval_ids: ArrayLike) -> list:
    """One row per source: records read, invalid, skipped, kept for training (after mixing and the length policy),
    held out for evaluation, and trained tokens."""
    kept = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=len(counts))
    tokens = np.bincount(np.asarray(train_ids, dtype=np.int64), weights=train_trained, minlength=len(counts))
    held_out = np.bincount(np.asarray(eval_ids, dtype=np.int64), minlength=len(counts))
    return [
        {**count, "kept": int(kept[index]), "eval": int(held_out[index]), "trained_tokens": int(tokens[index])}
        for index, count in enumerate(counts)
    ]


def summary_table(rows: list[dict], flag: str) -> str:
    kept = "kept for training" if flag == "--train_data" else "kept"
    header = f"{flag} sources: read / invalid / skipped / {kept} / eval / trained tokens"
    lines = [
        f"  [{index}] {row['label']}: {row['read']} / {row['invalid']} / {row['skipped']} / {row['kept']} / "
        f"{row['eval']} / {row['trained_tokens']}"
        for index, row in enumerate(rows)
    ]
    return "\n".join([header, *lines])
