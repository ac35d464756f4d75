"""Record shapes: one registry entry per shape a data record may have (how it is detected, validated and normalized
into the common row, how the README shows it, which Axolotl dataset `type`s it is). The --data_format choices, a
source's `format` option, the README's table of shapes and the Axolotl `type` translation are all read from FORMATS.

Every shape normalizes to a row of one Arrow schema (EMPTY_ROW); its `kind` (prompt_completion, chat, text or
tokenized) says how loss_masks.py labels it. To add a shape: write its normalizer under @record_format (to one of
those kinds) and put its name in DETECTION_ORDER, and paste `python -c "import data_formats as f;
print(f.docs_table())"` into the README (tests/test_data_formats.py checks both).
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from packing import IGNORE_INDEX

CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# One Arrow schema for every shape, so mixed files make one table. Chats are kept as JSON text: messages may carry
# tool calls of any structure.
EMPTY_ROW = {"kind": None, "messages": None, "tools": None, "prompt": None, "completion": None, "text": None,
             "input_ids": None, "labels": None}  # fmt: skip


@dataclass(frozen=True)
class RecordFormat:
    name: str
    keys: tuple[str, ...]  # a record holding any of these keys has this shape (DETECTION_ORDER breaks ties)
    described_as: str  # how the "unknown record shape" message names the keys
    normalize: Callable[[dict], dict | str]  # the record as a row of EMPTY_ROW's schema, or the reason it is invalid
    example: str  # the README's record column (Markdown)
    trained: str  # the README's trained-tokens column (Markdown)
    axolotl_types: tuple[str, ...] = ()  # Axolotl dataset `type`s translated to this shape
    axolotl_field: str | None = None  # the record key that Axolotl's `field` option renames, where it applies


# Validation


def string_field_problem(record: dict, key: str, required: bool = True, non_empty: bool = False) -> str | None:
    if key not in record and not required:
        return None
    value = record.get(key)
    if not isinstance(value, str):
        return f"'{key}' must be a string, got {type(value).__name__}"
    if non_empty and not value.strip():
        return f"'{key}' is empty: there is nothing to train on"
    return None


def token_list_problem(record: dict, key: str) -> str | None:
    value = record.get(key)
    if not isinstance(value, list) or not value or not all(type(v) is int for v in value):
        return f"'{key}' must be a non-empty list of integers"
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


# The registry: one entry per shape, each above its normalizer, in the order --data_format, a source's `format` and
# the README list them.

FORMATS: dict[str, RecordFormat] = {}


def record_format(name: str, **entry) -> Callable:
    """Registers the decorated function as the normalizer of shape `name` (the other RecordFormat fields in `entry`)."""

    def register(normalize: Callable[[dict], dict | str]) -> Callable[[dict], dict | str]:
        FORMATS[name] = RecordFormat(name=name, normalize=normalize, **entry)
        return normalize

    return register


@record_format(
    "prompt_completion", keys=("prompt", "completion"), described_as="prompt/completion",
    example='`{"prompt": "Q: 23 + 45\\nA:", "completion": " 68"}`', trained="the completion + EOS",
)  # fmt: skip
def normalize_prompt_completion(record: dict) -> dict | str:
    problem = string_field_problem(record, "prompt") or string_field_problem(record, "completion", non_empty=True)
    return problem or {**EMPTY_ROW, "kind": "prompt_completion", "prompt": record["prompt"],
                       "completion": record["completion"]}  # fmt: skip


@record_format(
    "alpaca", keys=("instruction",), described_as="instruction/output (alpaca)", axolotl_types=("alpaca",),
    example='`{"instruction": "...", "input": "..." (optional), "output": "..."}`',
    trained="the output (rendered as a user/assistant chat)",
)  # fmt: skip
def normalize_alpaca(record: dict) -> dict | str:
    problem = (
        string_field_problem(record, "instruction")
        or string_field_problem(record, "input", required=False)
        or string_field_problem(record, "system", required=False)
        or string_field_problem(record, "output", non_empty=True)
    )
    return problem or chat_row(alpaca_messages(record))


def alpaca_messages(record: dict) -> list[dict]:
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


@record_format(
    "sharegpt", keys=("conversations",), described_as="conversations (sharegpt)",
    example='`{"conversations": [{"from": "system" \\| "human" \\| "gpt", "value": "..."}, ...]}`',
    trained="every `gpt` turn", axolotl_types=("sharegpt",),
)  # fmt: skip
def normalize_sharegpt(record: dict) -> dict | str:
    messages = sharegpt_messages(record["conversations"])
    return messages if isinstance(messages, str) else chat_row(messages)


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


@record_format(
    "chat", keys=("messages",), described_as="messages", trained="every assistant turn + its end-of-turn token",
    example='`{"messages": [{"role": "system" \\| "user" \\| "assistant" \\| "tool", "content": "..."}, ...]}`',
    axolotl_types=("chat_template",),
)  # fmt: skip
def normalize_chat(record: dict) -> dict | str:
    return chat_row(record["messages"], record.get("tools"))


def chat_row(messages: Any, tools: Any = None) -> dict | str:
    """The row of a chat (alpaca and sharegpt records become chats too), or why it cannot be one."""
    problem = chat_problem(messages, tools)
    return problem or {**EMPTY_ROW, "kind": "chat", "messages": json.dumps(messages, ensure_ascii=False),
                       "tools": json.dumps(tools, ensure_ascii=False) if tools else None}  # fmt: skip


@record_format(
    "text", keys=("text",), described_as="text", axolotl_types=("completion",), axolotl_field="text",
    example='`{"text": "..."}`', trained="every token (+ EOS)",
)  # fmt: skip
def normalize_text(record: dict) -> dict | str:
    return string_field_problem(record, "text", non_empty=True) or {**EMPTY_ROW, "kind": "text", "text": record["text"]}


@record_format(
    "tokenized", keys=("input_ids",), described_as="input_ids",
    example='`{"input_ids": [...], "labels": [...] (optional)}`', trained="as given (labels default to input_ids)",
)  # fmt: skip
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


# A record takes the first of these shapes whose key it holds: structured shapes first (a chat dataset may carry a
# `prompt` column beside its messages), text last (many datasets keep a text column beside their real fields).
DETECTION_ORDER = ("chat", "sharegpt", "alpaca", "prompt_completion", "tokenized", "text")
RECORD_FORMATS = ("auto", *FORMATS)  # the --data_format / `format` choices


# Questions the rest of the code asks


def detect_format(record: dict) -> str | None:
    for name in DETECTION_ORDER:
        if any(key in record for key in FORMATS[name].keys):
            return name
    return None


def normalize_record(record: Any, data_format: str) -> dict | str:
    """The record as a row of the common schema, or the reason it is invalid."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    detected = detect_format(record)
    if detected is None:
        shapes = [entry.described_as for entry in FORMATS.values()]
        return (
            f"unknown record shape with keys {sorted(record)[:10]}: expected {', '.join(shapes[:-1])} or {shapes[-1]}"
        )
    if data_format != "auto" and detected != data_format:
        return f"a {detected} record, but --data_format is {data_format}"
    return FORMATS[detected].normalize(record)


def axolotl_formats() -> dict[str, RecordFormat]:
    """The shape each translatable Axolotl dataset `type` names."""
    return {kind: entry for entry in FORMATS.values() for kind in entry.axolotl_types}


def docs_table() -> str:
    """The README's table of record shapes."""
    rows = [f"| `{entry.name}` | {entry.example} | {entry.trained} |" for entry in FORMATS.values()]
    return "\n".join(["| shape | record | trained tokens |", "|---|---|---|", *rows])
