"""Sample packing with isolated attention: several samples share one row of at most --max_length tokens, and no
sample attends to another, on every attention backend.

Rows: first-fit decreasing into rows of at most --max_length tokens, deterministic (exact resume), every sample
exactly once per epoch. Each sample's position_ids restart at 0 and its first label is masked.

How each backend keeps samples apart (model_utils.attention_implementation picks one; `auto` the fastest exact one):
  sdpa, varlen, flash_attention_2  The collator flattens each batch into ONE row and computes the sample boundaries
      once per batch: cu_seq_lens_q/k (int32 starts of every sample, then the end), max_length_q/k (Python ints) and
      sample_lengths (a Python tuple). These flow from the model's forward to the attention function as
      transformers' FlashAttentionKwargs, so no layer reads a boundary back from the device.
      - sdpa runs `packed_sdpa` during training: causal SDPA on each sample (split from sample_lengths), exact on
        any device, and on CPU much faster than SDPA under a block-diagonal mask.
      - varlen runs PyTorch's varlen flash attention (torch.nn.attention.varlen.varlen_attn; CUDA, torch >= 2.10).
      - flash_attention_2 runs flash-attn's varlen kernel through transformers, fed the same boundaries.
      A flattened batch has no padding between rows: the model computes only real tokens (plus the rounding to
      --pad_to_multiple_of), however full the rows are.
  eager  Rows stay separate (the collator pads them to the batch's longest row) and send no attention mask:
      transformers (masking_utils.find_packed_sequence_indices) builds a block-diagonal causal mask from the
      restarting position_ids. That detection needs no KV cache: the Trainer runs the model with use_cache=False.

Why not leave flash attention to transformers: it finds packed sequences only in a batch of one row
(modeling_flash_attention_utils._is_packed_sequence); with several rows per batch each sample would attend to the
samples before it.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.flash_attention import get_target_dtype
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
    return packing_efficiency(sum(packed["length"]), sum(packed["computed_tokens"]))


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


PACKED_SDPA = "packed_sdpa"
VARLEN = "varlen"
# Backends that get one flattened row per batch, with the sample boundaries from the collator.
FLATTENED_BACKENDS = ("sdpa", VARLEN, "flash_attention_2")
# The implementation a model is loaded (and saved, and generates) with; training switches to training_attention().
LOADED_AS = {VARLEN: "sdpa"}

try:  # torch >= 2.10; the kernel runs on CUDA only
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


def varlen_available() -> bool:
    return varlen_attn is not None and torch.cuda.is_available()


def flattens_batches(attn_implementation: str) -> bool:
    return attn_implementation in FLATTENED_BACKENDS


def training_attention(attn_implementation: str, packing: bool) -> str:
    """The attention implementation the model runs while training."""
    if packing and attn_implementation == "sdpa":
        return PACKED_SDPA
    return attn_implementation


def loaded_attention(attn_implementation: str) -> str:
    return LOADED_AS.get(attn_implementation, attn_implementation)


@dataclass
class FlattenedCollator:
    """A batch of packed rows as one row [1, total tokens]: input_ids, labels, position_ids, and the sample boundaries
    computed here, once per batch (see the module docstring): cu_seq_lens_q/k, max_length_q/k, sample_lengths.

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


def sample_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """(start, end) of each run of consecutive positions in each row; None when no row holds more than one run.
    Reads the positions back to the host: only for batches that did not come from FlattenedCollator."""
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


def causal_sdpa(module, query, key, value, **kwargs) -> torch.Tensor:
    """Causal SDPA over one whole sample [1, heads, length, dim] (a sliding window, where the layer has one shorter
    than the sample, as a band mask); returns [1, length, heads, dim]."""
    length = query.shape[2]
    window = kwargs.pop("sliding_window", None) or getattr(module, "sliding_window", None)
    mask = None
    if window and length > window:
        mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril().triu(1 - window)[None, None]
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)[0]


def attention_without_boundaries(module, query, key, value, attention_mask, **kwargs):
    """Batches not flattened by FlattenedCollator: SDPA with the padding mask when there is one; otherwise causal
    SDPA on each sample found from position_ids (read back every layer: exact, but the slow path) or on each row."""
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    position_ids = kwargs.get("position_ids")
    spans = None
    if position_ids is not None and query.shape[2] == position_ids.shape[1]:
        spans = sample_spans(position_ids)
    spans = spans or [[(0, query.shape[2])]] * query.shape[0]
    rows = [
        torch.cat([causal_sdpa(module, *(t[row : row + 1, :, start:end] for t in (query, key, value)), **kwargs)
                   for start, end in bounds], dim=1)
        for row, bounds in enumerate(spans)
    ]  # fmt: skip
    return torch.cat(rows, dim=0), None


def packed_sdpa_attention_forward(module, query, key, value, attention_mask, sample_lengths=None, **kwargs):
    """Causal SDPA on each sample of a flattened batch, split at the collator's sample_lengths (Python ints: no
    device read). Splitting (not slicing) keeps the backward to one concatenation instead of a full-size gradient
    per sample. The same softmax over the same keys as the block-diagonal mask: tests/test_packing.py."""
    if sample_lengths is None or query.shape[0] != 1 or query.shape[2] != sum(sample_lengths):
        return attention_without_boundaries(module, query, key, value, attention_mask, **kwargs)
    parts = (t.split(sample_lengths, dim=2) for t in (query, key, value))
    return torch.cat([causal_sdpa(module, q, k, v, **kwargs) for q, k, v in zip(*parts, strict=True)], dim=1), None


def varlen_attention_forward(
    module, query, key, value, attention_mask, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
    max_length_k=None, dropout=0.0, scaling=None, sliding_window=None, softcap=None, **kwargs,
):  # fmt: skip
    """PyTorch's varlen flash attention over a flattened batch, fed the collator's boundaries; anything else (an
    unpacked, padded eval batch) goes to SDPA. Causal within each sample, like flash_attention_2."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        return attention_without_boundaries(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout or softcap:
        raise ValueError(
            "--attn_implementation varlen: torch's varlen_attn has no attention dropout or logit softcapping, which "
            "this model uses; choose sdpa or flash_attention_2."
        )
    dtype = query.dtype
    target = get_target_dtype(query, module)  # PEFT's fp32 norms can make the query fp32; the kernel needs 16 bits
    q, k, v = (t[0].transpose(0, 1).to(target or t.dtype) for t in (query, key, value))  # [tokens, heads, dim]
    causal = kwargs.get("is_causal")
    causal = module.is_causal if causal is None else causal
    # transformers' sliding_window W lets a token see itself and the W - 1 tokens before it.
    window = (sliding_window - 1 if sliding_window else -1, 0 if causal else -1)
    output = varlen_attn(
        q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scale=scaling, window_size=window,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # fmt: skip
    return output.unsqueeze(0).to(dtype), None


def padding_mask_only(*, attention_mask=None, **kwargs):
    """Mask function of packed_sdpa and varlen: they take the samples' boundaries from the collator, so no mask is
    built for packed batches (transformers would build a block-diagonal one for the whole flattened row); a batch
    with padding gets SDPA's mask."""
    if attention_mask is None:
        return None
    return sdpa_mask(attention_mask=attention_mask, **kwargs)


def register_packed_attention() -> None:
    """Make packed_sdpa and varlen known to transformers (only runs that pack call this)."""
    for name, function in ((PACKED_SDPA, packed_sdpa_attention_forward), (VARLEN, varlen_attention_forward)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, padding_mask_only)


@contextmanager
def packed_attention(model: PreTrainedModel, attn_implementation: str, packing: bool) -> Iterator[None]:
    """Run the model with its training attention inside the block (packed_sdpa for sdpa with packing, varlen);
    restore the implementation it was loaded with after, so generation and the saved model see a standard one."""
    training = training_attention(attn_implementation, packing)
    loaded = model.config._attn_implementation
    if training == loaded:
        yield
        return
    register_packed_attention()
    model.set_attn_implementation(training)
    logger.info("Training runs the %s attention (boundaries of the packed samples from the collator).", training)
    try:
        yield
    finally:
        model.set_attn_implementation(loaded)
