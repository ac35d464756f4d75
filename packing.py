"""Sample packing with isolated attention: several samples share one row of at most --max_length tokens, and no
sample attends to another.

How the isolation works (transformers masking_utils.find_packed_sequence_indices): with `position_ids` given, no
`attention_mask` and no KV cache, a new sequence starts wherever position_ids do not grow by exactly 1, and the
causal mask is built per sequence. So every sample's position_ids restart at 0, the collator sends no attention
mask, and the padding at the end of a row gets its own positions from 0: a dummy sequence real tokens never see.
The Trainer runs the model with use_cache=False; evaluate or test packed rows with use_cache=False too, or the
detection is silently skipped and samples see each other.

Rows are as long as --max_length at most, never a whole batch flattened into one row.

Speed: given that block-diagonal mask, SDPA computes every row's full max_length x max_length attention (and on CPU
with its slowest kernel). During training the model therefore runs `packed_sdpa` (registered here through
transformers' AttentionInterface): SDPA with is_causal=True on each sample of a row separately, which is the same
computation as the mask describes, at a fraction of the cost. Batches without packed rows, and layers with a
sliding window shorter than a sample, take the ordinary masked SDPA path.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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


def packing_efficiency(lengths: list[int], max_length: int, num_rows: int) -> float:
    """Real tokens / tokens computed when every row is padded to max_length: sum(lengths) / (num_rows * max_length).

    It is the share of the rows' capacity that holds real tokens. Batches padded only to their longest row (the
    default) compute at most that many tokens, so the share of real tokens actually computed is at least this.
    """
    return float(sum(lengths)) / (num_rows * max_length) if num_rows else 0.0


def rows_efficiency(packed: Dataset, max_length: int) -> float:
    """packing_efficiency of a packed dataset (its rows' lengths are the real tokens of each row)."""
    return packing_efficiency(packed["length"], max_length, len(packed))


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


def pack_dataset(dataset: Dataset, max_length: int, split: str = "train", rows_multiple: int = 1) -> Dataset:
    """A prepared dataset (input_ids, labels, length) as packed rows: input_ids, labels, position_ids, length,
    num_trained, num_samples. Every sample lands in exactly one row; none is dropped. `rows_multiple`: see
    split_rows_to_multiple."""
    lengths = list(dataset["length"])
    rows = split_rows_to_multiple(first_fit_decreasing(lengths, max_length), rows_multiple)
    columns = dataset.select_columns(["input_ids", "labels"]).to_dict()
    packed = Dataset.from_dict(pack_rows(columns, rows))
    logger.info(
        "Packing %s: %d samples into %d rows of at most %d tokens; packing efficiency %.1f%% (real tokens / "
        "rows x max_length).",
        split, len(lengths), len(rows), max_length, 100 * packing_efficiency(lengths, max_length, len(rows)),
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


PACKED_SDPA = "packed_sdpa"


def sample_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """(start, end) of each run of consecutive positions in each row; None when no row holds more than one run."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not starts[:, 1:].any():
        return None
    length = position_ids.shape[1]
    spans = []
    for row_starts in starts.cpu().tolist():
        bounds = [i for i, start in enumerate(row_starts) if start] + [length]
        spans.append(list(zip(bounds, bounds[1:], strict=False)))
    return spans


def packed_sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """SDPA per sample of each packed row (causal within the sample); anything else goes to transformers' SDPA.

    The masked path is the reference: same softmax over the same keys, and the logit-equality test checks both.
    """
    position_ids = kwargs.get("position_ids")
    spans = None
    if position_ids is not None and query.shape[2] == key.shape[2] == position_ids.shape[1]:
        spans = sample_spans(position_ids)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if spans is None or (window and any(end - start > window for row in spans for start, end in row)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for row, bounds in enumerate(spans):
        rows.append(
            torch.cat(
                [
                    sdpa_attention_forward(
                        module,
                        query[row : row + 1, :, start:end],
                        key[row : row + 1, :, start:end],
                        value[row : row + 1, :, start:end],
                        None,
                        **kwargs,
                    )[0]
                    for start, end in bounds
                ],
                dim=1,
            )
        )
    return torch.cat(rows, dim=0), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


@contextmanager
def packed_attention(model: PreTrainedModel, enabled: bool) -> Iterator[None]:
    """Run the model with packed_sdpa inside the block when it uses SDPA and packing is on; restore SDPA after, so
    generation and the saved config see the standard implementation."""
    if not enabled or model.config._attn_implementation != "sdpa":
        yield
        return
    model.set_attn_implementation(PACKED_SDPA)
    logger.info("Packed rows run SDPA per sample (%s) during training.", PACKED_SDPA)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")
