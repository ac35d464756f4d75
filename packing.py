"""Sample packing: several samples share one row of at most --max_length tokens, and the collators that batch the
rows.

Rows: first-fit decreasing into rows of at most --max_length tokens, deterministic (exact resume), every sample
exactly once per epoch. Each sample's position_ids restart at 0 and its first label is masked.

The collators: PackedCollator pads packed rows and keeps them apart (eager); FlattenedCollator flattens a batch into
one row and computes the sample boundaries the other backends read. How each attention backend keeps the samples of
a row from attending to each other, and which collator it gets: attention.py.
"""

import logging
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset

logger = logging.getLogger(__name__)

# The label the loss ignores (PyTorch cross-entropy's default ignore_index).
IGNORE_INDEX = -100


def first_fit_decreasing(lengths: list[int], max_length: int) -> list[list[int]]:
    """Sample indices grouped into rows of at most max_length tokens: longest sample first (ties by index), each into
    the first row with room. Deterministic, so the same data always gives the same rows (exact resume needs that).

    The first row with room is found in a max-tree over the rows' free space: O(n log n) instead of O(n * rows).
    """
    if any(length > max_length for length in lengths):
        raise ValueError(f"a sample is longer than max_length {max_length}; apply the length policy first")
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = np.full(2 * size, max_length, dtype=np.int64)  # leaves: free tokens of row i; inner nodes: max of children
    rows: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        node = 1
        while node < size:  # descend to the leftmost row with room
            node = 2 * node if free[2 * node] >= lengths[index] else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(index)
        free[node] -= lengths[index]
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def split_rows_to_multiple(rows: list[list[int]], multiple: int) -> list[list[int]]:
    """Split rows until their number is a multiple of `multiple` (processes x per-device batch size).

    accelerate gives every process the same number of full batches by repeating rows from the start of the epoch:
    repeated rows would train their samples twice. Splitting a row instead (the last sample of the row holding the
    most samples moves to a row of its own) keeps every sample exactly once per epoch. Deterministic.
    """
    rows = [list(row) for row in rows]
    while len(rows) % multiple:
        fullest = max(range(len(rows)), key=lambda i: (len(rows[i]), -i))
        if len(rows[fullest]) < 2:
            break  # fewer samples than processes x batch size: nothing left to split
        rows.append([rows[fullest].pop()])
    return rows


def packing_efficiency(real_tokens: int, computed_tokens: int) -> float:
    """Packing efficiency: real tokens / tokens the model computes for them (padding included).

    What is computed depends on the layout (see computed_tokens): a flattened batch computes its real tokens only,
    rows kept apart (eager) are padded, at most to max_length each.
    """
    return real_tokens / computed_tokens if computed_tokens else 0.0


def computed_tokens(row_lengths: list[int], max_length: int, flattened: bool) -> list[int]:
    """Tokens the model computes for each row: its own length in a flattened batch (plus the batch's rounding to
    --pad_to_multiple_of, under 8 tokens per batch by default, left out here), max_length for rows kept apart (an
    upper bound: a batch pads its rows to its longest row)."""
    return list(row_lengths) if flattened else [max_length] * len(row_lengths)


def rows_efficiency(packed: Dataset) -> float:
    """packing_efficiency of a packed dataset."""
    return packing_efficiency(
        int(column_values(packed, "length").sum()), int(column_values(packed, "computed_tokens").sum())
    )


def is_packed(dataset: Dataset | None) -> bool:
    return dataset is not None and "num_samples" in dataset.column_names


def pack_rows(batch: dict, indices: list[list[int]]) -> dict:
    """Concatenate the samples of each row: the first label of each sample masked, position_ids restarting at 0."""
    output = {"input_ids": [], "labels": [], "position_ids": [], "length": [], "num_trained": [], "num_samples": []}
    for row in indices:
        input_ids, labels, position_ids = [], [], []
        for index in row:
            input_ids.extend(batch["input_ids"][index])
            # The model shifts labels: the label at a sample's first position would be predicted from the previous
            # sample's last token. Alone, that label is never used (nothing precedes it), so masking it changes nothing.
            labels.extend([IGNORE_INDEX, *batch["labels"][index][1:]])
            position_ids.extend(range(len(batch["input_ids"][index])))
        output["input_ids"].append(input_ids)
        output["labels"].append(labels)
        output["position_ids"].append(position_ids)
        output["length"].append(len(input_ids))
        output["num_trained"].append(sum(label != IGNORE_INDEX for label in labels))
        output["num_samples"].append(len(row))
    return output


def column_values(dataset: Dataset, name: str) -> np.ndarray:
    """A column as one numpy array through Arrow (indexing a Dataset column builds a Python object per row)."""
    return dataset.with_format("arrow")[name].to_numpy()


def pack_dataset(
    dataset: Dataset, max_length: int, split: str = "train", rows_multiple: int = 1, flattened: bool = False
) -> Dataset:
    """A prepared dataset (input_ids, labels, length) as packed rows: input_ids, labels, position_ids, length,
    num_trained, num_samples, computed_tokens. Every sample lands in exactly one row; none is dropped.
    `rows_multiple`: see split_rows_to_multiple; `flattened`: the collator flattens each batch (computed_tokens)."""
    lengths = column_values(dataset, "length").tolist()
    rows = split_rows_to_multiple(first_fit_decreasing(lengths, max_length), rows_multiple)
    columns = dataset.select_columns(["input_ids", "labels"]).to_dict()
    packed = pack_rows(columns, rows)
    packed["computed_tokens"] = computed_tokens(packed["length"], max_length, flattened)
    packed = Dataset.from_dict(packed)
    logger.info(
        "Packing %s: %d samples into %d rows of at most %d tokens (%s); packing efficiency %.1f%% (real tokens / "
        "tokens computed).",
        split, len(lengths), len(rows), max_length, "flattened per batch" if flattened else "rows kept apart",
        100 * rows_efficiency(packed),
    )  # fmt: skip
    return packed


@dataclass
class PackedCollator:
    """Right-pads packed rows: input_ids with the pad token, labels with IGNORE_INDEX, position_ids with 0, 1, 2, ...
    (the padding is a separate dummy sequence, so real tokens never attend to it). Sends no attention_mask: that is
    what makes transformers build the per-sample causal mask from position_ids.

    Rows without position_ids (an unpacked eval set, --eval_sample_packing false) go to `fallback`, which builds the
    usual attention mask.
    """

    pad_token_id: int
    fallback: object
    pad_to_multiple_of: int | None = None
    pad_to_length: int | None = None  # --pad_to_max_length: every batch padded to max_length

    def __call__(self, features: list[dict]) -> dict:
        if "position_ids" not in features[0]:
            return self.fallback(features)
        length = self.pad_to_length or max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "labels": [], "position_ids": []}
        for feature in features:
            padding = length - len(feature["input_ids"])
            batch["input_ids"].append([*feature["input_ids"], *[self.pad_token_id] * padding])
            batch["labels"].append([*feature["labels"], *[IGNORE_INDEX] * padding])
            batch["position_ids"].append([*feature["position_ids"], *range(padding)])
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


@dataclass
class FlattenedCollator:
    """A batch of packed rows as one row [1, total tokens]: input_ids, labels, position_ids, and the sample boundaries
    computed here, once per batch (see attention.py): cu_seq_lens_q/k, max_length_q/k, sample_lengths.

    Padding (to --pad_to_multiple_of, or to rows x max_length with --pad_to_max_length) is one more sequence at the
    end, with its own positions and ignored labels: no real token attends to it. Rows without position_ids (an
    unpacked eval set) go to `fallback`, which builds the usual attention mask.
    """

    pad_token_id: int
    fallback: object
    pad_to_multiple_of: int | None = None
    row_length: int | None = None  # --pad_to_max_length: pad to rows x max_length (static shapes per batch size)

    def __call__(self, features: list[dict]) -> dict:
        if "position_ids" not in features[0]:
            return self.fallback(features)
        input_ids, labels, positions, sample_lengths = [], [], [], []
        for feature in features:
            starts = [*np.flatnonzero(np.asarray(feature["position_ids"]) == 0).tolist(), len(feature["input_ids"])]
            sample_lengths += [end - start for start, end in zip(starts, starts[1:], strict=False)]
            input_ids += feature["input_ids"]
            labels += feature["labels"]
            positions += feature["position_ids"]
        length = self.row_length * len(features) if self.row_length else len(input_ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        padding = length - len(input_ids)
        if padding:
            sample_lengths.append(padding)
        cu_seq_lens = torch.tensor([0, *np.cumsum(sample_lengths).tolist()], dtype=torch.int32)
        return {
            "input_ids": torch.tensor([input_ids + [self.pad_token_id] * padding]),
            "labels": torch.tensor([labels + [IGNORE_INDEX] * padding]),
            "position_ids": torch.tensor([positions + list(range(padding))]),
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max(sample_lengths),
            "max_length_k": max(sample_lengths),
            "sample_lengths": tuple(sample_lengths),
        }
