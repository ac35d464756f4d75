"""Loss masks: which tokens of a sample carry loss, for every kind of row (data_formats.py normalizes each record
shape into one of these kinds). One home for the labelling rules.

Every sample but a pre-tokenized one is one text and the character spans of it that are trained:
  prompt_completion  BOS (when the tokenizer adds one) + prompt + completion + EOS; the completion and EOS are trained
  text               BOS + text + EOS, all trained
  chat               the whole conversation rendered by the chat template; each assistant turn through its end-of-turn
                     token is trained (chat_masks.py locates the turns)
  tokenized          input_ids and labels used as given (labels default to input_ids)
--train_on_prompt true trains every token of the text-based kinds. The text is tokenized once, as a whole (exactly
what the model sees when it is served), and the spans become labels through the fast tokenizer's offsets.

Boundary rule: a token is trained when any of its characters lies inside a trained span. A token that straddles the
start of an assistant turn (e.g. a SentencePiece piece holding the template's newline and the answer's first word) is
therefore trained, so the model always learns the first token of its answer and the turn's end-of-turn token.
"""

import json
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import numpy as np
from transformers import PreTrainedTokenizerBase

from chat_masks import ChatMaskError, Span, chat_text_and_spans
from data_sources import DataError
from packing import IGNORE_INDEX

Sample = tuple[str, list[Span]]  # a text and its trained character spans


# Text and trained spans of each kind of row


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


def chat_sample(row: dict, tokenizer: PreTrainedTokenizerBase, bos: str, template_kwargs: dict) -> Sample:
    # A row's own kwargs (set per data source) win over --chat_template_kwargs.
    kwargs = {**template_kwargs, **parse_template_kwargs(row.get("chat_template_kwargs"), row["source"])}
    tools = json.loads(row["tools"]) if row.get("tools") else None
    return chat_text_and_spans(tokenizer, json.loads(row["messages"]), tools, kwargs)


def text_sample(row: dict, tokenizer: PreTrainedTokenizerBase, bos: str, template_kwargs: dict) -> Sample:
    text = bos + row["text"] + tokenizer.eos_token
    return text, [(0, len(text))]


def prompt_completion_sample(row: dict, tokenizer: PreTrainedTokenizerBase, bos: str, template_kwargs: dict) -> Sample:
    # The prompt (after BOS, when the tokenizer uses one) is context; the completion and EOS are trained.
    prompt = bos + row["prompt"]
    text = prompt + row["completion"] + tokenizer.eos_token
    return text, [(len(prompt), len(text))]


SAMPLE_OF_KIND: dict[str, Callable[[dict, PreTrainedTokenizerBase, str, dict], Sample]] = {
    "prompt_completion": prompt_completion_sample,
    "chat": chat_sample,
    "text": text_sample,
}


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


# Tokens and labels


@dataclass(frozen=True)
class TokenizedBatch:
    """The samples of a batch end to end, as numpy arrays (no per-token Python objects, which the garbage collector
    would scan again and again): sample i is input_ids[starts[i] : starts[i] + lengths[i]], and the same for labels."""

    lengths: np.ndarray
    input_ids: np.ndarray
    labels: np.ndarray

    @property
    def starts(self) -> np.ndarray:
        return np.cumsum(self.lengths) - self.lengths


def labelled_batch(
    rows: list[dict], tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool, template_kwargs: dict
) -> tuple[TokenizedBatch, list[str | None]]:
    """Every row's input_ids and labels, tokenized in one call. A row that cannot be rendered or masked gets a
    problem (the reason) and no tokens."""
    bos = bos_prefix(tokenizer)
    samples, problems = [], []
    for row in rows:
        sample, problem = ("", []), None
        if row["kind"] == "tokenized":
            problem = token_ids_problem(row["input_ids"], len(tokenizer))
        else:
            try:
                sample = SAMPLE_OF_KIND[row["kind"]](row, tokenizer, bos, template_kwargs)
            except ChatMaskError as error:
                problem = str(error)
        samples.append(sample)
        problems.append(problem)
    tokenized = masked_batch(tokenizer, samples, train_on_prompt)
    if any(row["kind"] == "tokenized" and not problem for row, problem in zip(rows, problems, strict=True)):
        tokenized = with_pretokenized(tokenized, rows, problems)
    return tokenized, problems


def trained_tokens(encoding, span: Span) -> range:
    """The tokens that overlap a character span (the boundary rule), from a tokenizers Encoding."""
    start, end = span
    first = encoding.char_to_token(start) if start < end else None
    last = encoding.char_to_token(end - 1) if start < end else None
    if first is None or last is None:  # a character no token covers (dropped by the normalizer): use the offsets
        offsets = encoding.offsets
        ends = [token_end for _, token_end in offsets]
        starts = [token_start for token_start, _ in offsets]
        return range(bisect_right(ends, start), bisect_left(starts, end))
    return range(first, last + 1)


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list:
    """A tokenizers Encoding (ids, offsets) per text, no special tokens added (templates write BOS themselves). The
    Rust tokenizer is called directly; the Python wrapper must agree with it on the first texts (the same check
    guards against a wrapper that post-processes ids)."""
    if not texts:
        return []
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise DataError("loss masks need a fast tokenizer (a tokenizer.json); this tokenizer has none")
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    if [e.ids for e in encodings[:4]] != tokenizer(texts[:4], add_special_tokens=False)["input_ids"]:
        raise DataError("the tokenizer's Python wrapper and Rust tokenizer disagree; loss masks need them equal")
    return encodings


def masked_batch(tokenizer: PreTrainedTokenizerBase, samples: list[Sample], train_on_prompt: bool) -> TokenizedBatch:
    """Tokenize every (text, trained spans) pair in one call and label the tokens the spans cover."""
    encodings = encode_batch(tokenizer, [text for text, _ in samples])
    ids = [encoding.ids for encoding in encodings]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    input_ids = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    del ids
    if train_on_prompt:
        return TokenizedBatch(lengths, input_ids, input_ids.copy())
    trained = np.zeros(len(input_ids), dtype=bool)
    for start, encoding, (_, spans) in zip(np.cumsum(lengths) - lengths, encodings, samples, strict=True):
        for span in spans:
            tokens = trained_tokens(encoding, span)
            trained[start + tokens.start : start + tokens.stop] = True
    return TokenizedBatch(lengths, input_ids, np.where(trained, input_ids, IGNORE_INDEX))


def with_pretokenized(tokenized: TokenizedBatch, rows: list[dict], problems: list[str | None]) -> TokenizedBatch:
    """The batch with the valid pre-tokenized records' own input_ids and labels in their (empty) places."""
    ids, labels = [], []
    for row, problem, start, length in zip(rows, problems, tokenized.starts, tokenized.lengths, strict=True):
        if row["kind"] == "tokenized" and not problem:
            ids.append(np.asarray(row["input_ids"], dtype=np.int64))
            labels.append(np.asarray(row["labels"], dtype=np.int64))
        else:
            ids.append(tokenized.input_ids[start : start + length])
            labels.append(tokenized.labels[start : start + length])
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return TokenizedBatch(lengths, np.concatenate(ids), np.concatenate(labels))
