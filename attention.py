"""Attention backends: one registry entry per --attn_implementation value (what the model is loaded and trained with,
how packed samples are kept apart, what it needs), and everything read from the registry: the option's choices, the
refusals, `auto`, the attention functions of packed training and their registration with transformers (only by runs
that pack).

How each backend keeps packed samples apart (attention_implementation picks one; `auto` the fastest exact one):
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

To add a backend: its Backend entry in BACKENDS (and its attention function here, if it brings one) and its words in
OPTION_HELP; the --attn_implementation choices, the refusals, `auto` and the packed-training switch follow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.integrations.flash_attention import get_target_dtype
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import is_flash_attn_2_available

from launch_env import compute_dtype, uses_cuda

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from options import ModelArguments

try:  # torch >= 2.10; the kernel runs on CUDA only
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

logger = logging.getLogger(__name__)

AUTO = "auto"
SDPA = "sdpa"
PACKED_SDPA = "packed_sdpa"
VARLEN = "varlen"
FLASH_ATTENTION_2 = "flash_attention_2"
EAGER = "eager"


class AttentionError(Exception):
    """The model cannot keep packed samples apart; the message says which flag to change."""


@dataclass(frozen=True)
class Backend:
    name: str  # the --attn_implementation value
    loaded_as: str | None = None  # the implementation the model is loaded, saved and generates with (None: name)
    flattens_batches: bool = False  # packed batches come as one row, with the sample boundaries from the collator
    packed_training: str | None = None  # the implementation run while training on packed rows, if not `name`
    forward: Callable | None = None  # our attention function, registered under the name it trains as (None: theirs)
    available: Callable[[], bool] | None = None  # whether this machine has what it needs (None: always)
    needs_cuda: bool = False
    half_precision_only: bool = False  # bf16 / fp16
    packing_only: bool = False
    needs: str = ""  # refusal words: "--attn_implementation NAME needs {needs}; {instead}"
    instead: str = ""
    unpacked_instead: str = ""  # refusal words: "... runs packed batches only: add --sample_packing true, or {...}."
    auto_rank: int | None = None  # `auto` picks the lowest-ranked backend that can run here (None: never)

    def trains_as(self, packing: bool) -> str:
        return self.packed_training if packing and self.packed_training else self.name

    def runs_here(self, training_args: TrainingArguments) -> bool:
        return (self.available is None or self.available()) and (not self.needs_cuda or uses_cuda(training_args))


# The attention functions of packed training


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


def varlen_available() -> bool:
    return varlen_attn is not None and torch.cuda.is_available()


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
    """Mask function of our attention functions (packed_sdpa, varlen): they take the samples' boundaries from the
    collator, so no mask is built for packed batches (transformers would build a block-diagonal one for the whole
    flattened row); a batch with padding gets SDPA's mask."""
    if attention_mask is None:
        return None
    return sdpa_mask(attention_mask=attention_mask, **kwargs)


# The registry: the order is the order of the --attn_implementation choices.

BACKENDS: dict[str, Backend] = {
    entry.name: entry
    for entry in (
        Backend(SDPA, flattens_batches=True, packed_training=PACKED_SDPA, forward=packed_sdpa_attention_forward,
                auto_rank=2),
        Backend(VARLEN, loaded_as=SDPA, flattens_batches=True, forward=varlen_attention_forward,
                available=varlen_available, needs_cuda=True, half_precision_only=True, packing_only=True,
                needs="a CUDA GPU and torch >= 2.10 (torch.nn.attention.varlen)", instead="use sdpa (or auto) here.",
                unpacked_instead="use sdpa / flash_attention_2", auto_rank=1),
        Backend(FLASH_ATTENTION_2, flattens_batches=True, available=is_flash_attn_2_available, needs_cuda=True,
                half_precision_only=True, needs="the flash-attn package and a CUDA GPU",
                instead="use varlen, sdpa or auto.", auto_rank=0),
        Backend(EAGER),
    )
}  # fmt: skip
CHOICES = (AUTO, *BACKENDS)  # the --attn_implementation choices
OPTION_HELP = (  # the --attn_implementation help in options.py
    "Attention kernel. 'auto': the fastest exact one for the device and --sample_packing (GPU with bf16/fp16: "
    "flash_attention_2 if flash-attn is installed, else varlen with packing, else sdpa; CPU: sdpa). 'varlen': "
    "PyTorch's varlen flash attention (CUDA, torch >= 2.10, --sample_packing only). 'eager' is the slow reference. "
    "Combinations that would let packed samples see each other are refused."
)


# Questions the rest of the code asks


def backend_problems(backend: Backend, training_args: TrainingArguments, packing: bool) -> list[str]:
    """Why this backend cannot run here, in these words: its needs, packing, the dtype."""
    flag, problems = f"--attn_implementation {backend.name}", []
    if not backend.runs_here(training_args):
        problems.append(f"{flag} needs {backend.needs}; {backend.instead}")
    if backend.packing_only and not packing:
        problems.append(f"{flag} runs packed batches only: add --sample_packing true, or {backend.unpacked_instead}.")
    if backend.half_precision_only and compute_dtype(training_args) == torch.float32:
        problems.append(f"{flag} runs in bf16/fp16 only: add --bf16 true (or --fp16 true).")
    return problems


def attention_problems(model_args: ModelArguments, training_args: TrainingArguments, packing: bool) -> list[str]:
    """--attn_implementation combinations that cannot run, or would let packed samples attend to each other."""
    choice, problems = model_args.attn_implementation, []
    if model_args.use_flash_attention and choice not in (AUTO, FLASH_ATTENTION_2):
        problems.append(f"--use_flash_attention true contradicts --attn_implementation {choice}; drop one of them.")
    if choice != AUTO:
        problems += backend_problems(BACKENDS[choice], training_args, packing)
    if packing and training_args.use_cache:
        problems.append(
            "--use_cache true with --sample_packing true: with a KV cache transformers skips the packed-sequence "
            "detection and samples attend to each other. Drop --use_cache (it only serves generation)."
        )
    return problems


def attention_implementation(
    model_args: ModelArguments, training_args: TrainingArguments, packing: bool, config: PretrainedConfig
) -> str:
    """--attn_implementation resolved (`auto`: the fastest exact one for the device and packing). Packing is refused
    for a model whose attention does not go through transformers' attention interface (state-space and older
    architectures): the boundaries of the packed samples would never reach it."""
    if packing and not supports_packing(config):
        raise AttentionError(
            f"--sample_packing true: {config.model_type} models do not route attention through transformers' "
            "attention interface, so packed samples would attend to each other. Use --sample_packing false."
        )
    choice = model_args.attn_implementation
    if model_args.use_flash_attention and choice == AUTO:
        if BACKENDS[FLASH_ATTENTION_2].runs_here(training_args):
            return FLASH_ATTENTION_2
        logger.warning("--use_flash_attention: flash-attn or a GPU is not available; using --attn_implementation auto.")
    if choice != AUTO:
        return choice
    ranked = sorted((b for b in BACKENDS.values() if b.auto_rank is not None), key=lambda b: b.auto_rank)
    return next(b.name for b in ranked if not backend_problems(b, training_args, packing))


def supports_packing(config: PretrainedConfig) -> bool:
    """Whether the causal-LM class of this config passes attention kwargs through (`_supports_attention_backend`).
    Custom-code models cannot be checked without running their code: they are trusted, with a warning."""
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        logger.warning("--sample_packing: cannot check that %s models keep packed samples apart.", config.model_type)
        return True
    return model_class.is_backend_compatible()


def entry(attn_implementation: str) -> Backend:
    """The registry entry of a name; another name (one of transformers' own) runs as itself, rows kept apart."""
    return BACKENDS.get(attn_implementation) or Backend(attn_implementation)


def flattens_batches(attn_implementation: str) -> bool:
    return entry(attn_implementation).flattens_batches


def training_attention(attn_implementation: str, packing: bool) -> str:
    """The attention implementation the model runs while training."""
    return entry(attn_implementation).trains_as(packing)


def loaded_attention(attn_implementation: str) -> str:
    """The implementation a model is loaded (and saved, and generates) with; training switches to
    training_attention() inside packed_attention."""
    return entry(attn_implementation).loaded_as or attn_implementation


def generation_attention(implementation: str) -> str:
    """The implementation to generate with while the model runs `implementation`: a packed-training one (which
    would read generation's left padding as sample boundaries) gives way to its backend's loaded one."""
    for backend in BACKENDS.values():
        if backend.packed_training == implementation:
            return backend.loaded_as or backend.name
    return implementation


def register_packed_attention() -> None:
    """Make our attention functions (packed_sdpa, varlen) known to transformers (only runs that pack call this)."""
    for backend in BACKENDS.values():
        if backend.forward is not None:
            AttentionInterface.register(backend.trains_as(packing=True), backend.forward)
            AttentionMaskInterface.register(backend.trains_as(packing=True), padding_mask_only)


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
