"""Chat loss masks: the text of a chat as its template renders it, and the character spans of it that carry loss.
loss_masks.py turns the spans into labels (its boundary rule trains the first token of every answer).

The conversation is rendered once by the chat template, and each assistant turn's trained span runs from the
end of the assistant header (where the generation prompt ends) through that turn's end-of-turn token, including
whatever the template writes inside the turn (think blocks, reasoning_content, a leading space, trimmed content, tool
calls). The spans are found without assuming that a conversation prefix renders as a prefix of the whole:
  - a template with `{% generation %}` markers gives the spans itself (transformers' generation indices);
  - any other template is rendered a second time with invisible sentinels at both ends of every assistant content,
    reasoning_content and first tool-call name. Removing the sentinels must give the real render back exactly; they
    then place each turn in the real render. The turn starts after the last assistant header before its first
    sentinel (the generation prompt, else the header the template writes for earlier turns, both learned once per
    template from a probe conversation; else the last special token, e.g. Mistral's [/TOOL_RESULTS]) and ends
    with the first end-of-turn token after its last sentinel.
A record the template cannot render, or whose spans cannot be placed exactly, raises ChatMaskError with the reason.
"""

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

logger = logging.getLogger(__name__)

# Private-use characters: never produced by tokenizers' normalizers, and no template strips or tests them.
SENTINEL_OPEN, SENTINEL_CLOSE = "\ue000", "\ue001"
SENTINEL = re.compile(f"{SENTINEL_OPEN}(\\d+)([a-z]){SENTINEL_CLOSE}")
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
PROBE_USER, PROBE_ASSISTANT = "\ue000u\ue001", "\ue000a\ue001"

Span = tuple[int, int]


class ChatMaskError(ValueError):
    """A chat record the template cannot render, or whose trained spans cannot be placed exactly."""


class TemplateRenderError(ChatMaskError):
    """The template raised on the record."""


@dataclass(frozen=True)
class TemplateShape:
    """What one template (with one set of template kwargs) writes around assistant turns, learned from a probe."""

    headers: tuple[str, ...]  # assistant headers to look for, most specific first
    end_of_turn: str | None  # the special token that closes an assistant turn
    special_tokens: tuple[str, ...]  # longest first
    has_generation_markers: bool


# Rendering


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    tools: list | None,
    template_kwargs: dict,
    add_generation_prompt: bool = False,
    generation_indices: bool = False,
) -> tuple[str, list[Span]]:
    """The template's text for a conversation, as tokenizer.apply_chat_template renders it (same variables)."""
    rendered, indices = render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=tokenizer.chat_template,
        return_assistant_tokens_mask=generation_indices,
        add_generation_prompt=add_generation_prompt,
        **{**tokenizer.special_tokens_map, **template_kwargs},
    )
    return rendered[0], [tuple(span) for span in indices[0]] if generation_indices else []


def render_record(tokenizer, messages, tools, template_kwargs, generation_indices=False) -> tuple[str, list[Span]]:
    try:
        return render(tokenizer, messages, tools, template_kwargs, generation_indices=generation_indices)
    except Exception as error:  # jinja2 raises many types (TemplateError, TypeError, ...) for data it cannot take
        raise TemplateRenderError(f"the chat template cannot render this record: {error}") from error


def null_content_as_empty(messages: list[dict]) -> list[dict]:
    """Assistant tool-call turns with `content: null`, given as '' (for templates that concatenate content)."""
    return [{**m, "content": ""} if m.get("content", "") is None else m for m in messages]


# Template shape (once per template and kwargs)


@lru_cache(maxsize=64)
def template_shape(tokenizer: PreTrainedTokenizerBase, template: str, kwargs_json: str) -> TemplateShape:
    """Probe the template with a sentinel conversation: its generation prompt, assistant header and end-of-turn."""
    del template  # part of the cache key only: a tokenizer's template can be replaced
    kwargs = json.loads(kwargs_json)
    special = tuple(sorted(special_token_strings(tokenizer), key=len, reverse=True))
    has_markers = bool(GENERATION_BLOCK.search(tokenizer.chat_template))
    user = [{"role": "user", "content": PROBE_USER}]
    two_turns = [*user, {"role": "assistant", "content": PROBE_ASSISTANT}, *user,
                 {"role": "assistant", "content": PROBE_ASSISTANT}]  # fmt: skip
    try:
        prompt = render(tokenizer, user, None, kwargs, add_generation_prompt=True)[0]
        without_prompt = render(tokenizer, user, None, kwargs)[0]
        conversation = render(tokenizer, two_turns, None, kwargs)[0]
    except Exception as error:
        raise ChatMaskError(f"the chat template cannot render a plain user/assistant conversation: {error}") from error
    if PROBE_USER not in prompt or PROBE_ASSISTANT not in conversation:
        raise ChatMaskError("the chat template does not render message contents as given; loss masks cannot be placed")
    generation_prompt = prompt[len(without_prompt) :] if prompt.startswith(without_prompt) else ""
    after_user = prompt[prompt.index(PROBE_USER) + len(PROBE_USER) :]  # the user turn's end + the generation prompt
    user_end = after_user[: len(after_user) - len(generation_prompt)]
    first_user = conversation.index(PROBE_USER) + len(PROBE_USER)
    history_header = conversation[first_user : conversation.index(PROBE_ASSISTANT, first_user)]
    bare_header = common_prefix(after_user, history_header)
    headers = [after_user, generation_prompt, bare_header, bare_header[len(user_end) :]]
    written_header = history_header[len(user_end) :] if history_header.startswith(user_end) else ""
    if not generation_prompt and written_header.strip():
        # No generation prompt: the role header written before earlier assistant turns is the header. Whitespace
        # alone (Mistral's space after [/INST]) belongs to the turn.
        headers = [history_header, written_header, *headers]
    last_turn_end = conversation[conversation.rindex(PROBE_ASSISTANT) + len(PROBE_ASSISTANT) :]
    end_of_turn = first_special_token(last_turn_end, special)
    if end_of_turn is None and not has_markers:
        logger.warning(
            "The chat template closes assistant turns with no special token: trained spans end with the content, "
            "so the model does not learn to stop. Use a template that ends turns with EOS or an end-of-turn token."
        )
    return TemplateShape(tuple(dict.fromkeys(h for h in headers if h)), end_of_turn, special, has_markers)


def special_token_strings(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    added = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return {token for token in added | set(tokenizer.all_special_tokens) if token}


def common_prefix(a: str, b: str) -> str:
    length = 0
    while length < min(len(a), len(b)) and a[length] == b[length]:
        length += 1
    return a[:length]


def first_special_token(text: str, special_tokens: Iterable[str]) -> str | None:
    found = [(text.find(token), -len(token), token) for token in special_tokens if token in text]
    return min(found)[2] if found else None


# Locating the assistant turns in the whole render


def chat_text_and_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list | None, template_kwargs: dict
) -> tuple[str, list[Span]]:
    """The whole render of a chat and the character spans of its assistant turns (see the module docstring)."""
    shape = template_shape(tokenizer, tokenizer.chat_template, json.dumps(template_kwargs, sort_keys=True))
    try:
        return located_turns(tokenizer, shape, messages, tools, template_kwargs)
    except TemplateRenderError:
        # Templates that concatenate content (Qwen3) fail on a tool-call turn's `content: null`: give them ''.
        if not any(m["role"] == "assistant" and m.get("content", "") is None for m in messages):
            raise
    return located_turns(tokenizer, shape, null_content_as_empty(messages), tools, template_kwargs)


def located_turns(tokenizer, shape: TemplateShape, messages, tools, template_kwargs) -> tuple[str, list[Span]]:
    if shape.has_generation_markers:
        text, spans = render_record(tokenizer, messages, tools, template_kwargs, generation_indices=True)
        if not spans:
            raise ChatMaskError("the template's {% generation %} blocks mark no assistant text in this record")
        return text, spans
    text = render_record(tokenizer, messages, tools, template_kwargs)[0]
    if SENTINEL_OPEN in text or SENTINEL_CLOSE in text:
        raise ChatMaskError("the record contains the private-use characters U+E000/U+E001, used to locate turns")
    marked = render_record(tokenizer, with_sentinels(messages), tools, template_kwargs)[0]
    anchors = sentinel_positions(marked, text)
    spans, turn_start = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        positions = anchors.get(index)
        if not positions:
            raise ChatMaskError(f"the chat template does not render assistant message {index}")
        start = header_end(text, turn_start, min(positions), shape)
        end = turn_end(text, max(positions), shape)
        spans.append((start, end))
        turn_start = end
    return text, spans


def with_sentinels(messages: list[dict]) -> list[dict]:
    """Assistant messages with sentinels around their content and reasoning, and after their first tool call name.
    Sentinels sit inside surrounding whitespace, so templates that trim content render the same text."""
    marked = []
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            message = dict(message)
            for key, kind in (("content", "c"), ("reasoning_content", "r")):
                if isinstance(message.get(key), str) and message[key].strip():
                    message[key] = wrap(message[key], f"{index}{kind}")
            if message.get("tool_calls"):
                message["tool_calls"] = with_named_sentinel(message["tool_calls"], index)
        marked.append(message)
    return marked


def wrap(text: str, label: str) -> str:
    core = text.strip()
    start = text.index(core)
    tag = f"{SENTINEL_OPEN}{label}{SENTINEL_CLOSE}"
    return f"{text[:start]}{tag}{core}{tag}{text[start + len(core) :]}"


def with_named_sentinel(tool_calls: list, index: int) -> list:
    first = tool_calls[0]
    tag = f"{SENTINEL_OPEN}{index}t{SENTINEL_CLOSE}"
    if (
        isinstance(first, dict)
        and isinstance(first.get("function"), dict)
        and isinstance(first["function"].get("name"), str)
    ):
        return [{**first, "function": {**first["function"], "name": first["function"]["name"] + tag}}, *tool_calls[1:]]
    return tool_calls


def sentinel_positions(marked: str, text: str) -> dict[int, list[int]]:
    """Where each assistant message's sentinels fall in the real render; the marked render must reduce to it."""
    positions: dict[int, list[int]] = {}
    removed = 0
    for match in SENTINEL.finditer(marked):
        positions.setdefault(int(match.group(1)), []).append(match.start() - removed)
        removed += len(match.group(0))
    if SENTINEL.sub("", marked) != text:
        raise ChatMaskError(
            "the chat template renders this record differently when assistant contents change, so its turns "
            "cannot be located exactly"
        )
    return positions


def header_end(text: str, search_from: int, first_anchor: int, shape: TemplateShape) -> int:
    """Where the assistant turn starts: after the last assistant header before the turn's first sentinel."""
    window = text[search_from:first_anchor]
    for header in shape.headers:
        found = window.rfind(header)
        if found >= 0:
            return search_from + found + len(header)
    found = [(window.rfind(token) + len(token)) for token in shape.special_tokens if token in window]
    if not found:
        raise ChatMaskError("no assistant header or special token precedes an assistant turn")
    return search_from + max(found)


def turn_end(text: str, last_anchor: int, shape: TemplateShape) -> int:
    """Through the first end-of-turn token after the turn's last sentinel."""
    if shape.end_of_turn is None:
        return last_anchor
    found = text.find(shape.end_of_turn, last_anchor)
    if found < 0:
        raise ChatMaskError(f"an assistant turn is not closed by {shape.end_of_turn!r}")
    return found + len(shape.end_of_turn)
