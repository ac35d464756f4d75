"""Chat loss masks under the verbatim chat templates of nine model families (tests/fixtures/chat_templates/).

Each family runs on a tiny tokenizer trained here with `tokenizers`: byte-level BPE for the tiktoken-style families,
SentencePiece-style (Metaspace) BPE for Llama-2-style / Mistral / Gemma / Phi, with the family's special tokens and
bos/eos. The expected input_ids are the Python tokenizer's ids of the whole render (tokenizer.apply_chat_template),
and the expected trained characters run from each assistant header to the next end-of-turn marker, both written
here per family; expected labels follow from them by the documented boundary rule (a token is trained when it
overlaps a trained character). None of it calls chat_masks.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import write_jsonl
from datasets import Dataset
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data_utils import IGNORE_INDEX, DataError, prepare_datasets, read_records
from options import DataArguments

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
RECORDS = {
    "system_multi_turn": {
        "messages": [
            {"role": "system", "content": "You are a careful calculator."},
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "2 + 3 = 5"},
            {"role": "user", "content": "And 4 + 4?"},
            {"role": "assistant", "content": "4 + 4 = 8."},
        ]
    },
    "unicode_whitespace": {
        "messages": [
            {"role": "user", "content": "  Translate 'coffee' to French, please.  "},
            {"role": "assistant", "content": " café ☕ — 日本語も 🚀\n\n"},
            {"role": "user", "content": "Thanks!\n"},
            {"role": "assistant", "content": "\tYou are welcome.  "},
        ]
    },
    "tool_call": {
        "tools": [WEATHER_TOOL],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call12345",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call12345", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees in Paris."},
        ],
    },  # fmt: skip
    "reasoning_inline": {
        "messages": [
            {"role": "user", "content": "What is 6 * 7?"},
            {"role": "assistant", "content": "<think>\nSix sevens are 42.\n</think>\n\n6 * 7 = 42."},
        ]
    },
    "reasoning_content": {
        "messages": [
            {"role": "user", "content": "What is 9 - 4?"},
            {"role": "assistant", "content": "9 - 4 = 5.", "reasoning_content": "Nine minus four is five."},
        ]
    },
    "reasoning_in_earlier_turn": {
        "messages": [
            {"role": "user", "content": "What is 1 + 1?"},
            {"role": "assistant", "content": "2.", "reasoning_content": "One plus one."},
            {"role": "user", "content": "And 2 + 2?"},
            {"role": "assistant", "content": "4.", "reasoning_content": "Two plus two."},
        ]
    },
}
CORPUS_EXTRA = "the a is of and to in it you what weather degrees think answer tool call " * 20


@dataclass
class Family:
    template: str
    style: str  # "bytelevel" or "sentencepiece"
    bos: str
    eos: str
    special: list[str]
    header: str  # regex: where an assistant turn's trained text starts (after the match)
    end_of_turn: str
    fails: dict[str, str] = field(default_factory=dict)  # record -> expected error text
    skip: tuple[str, ...] = ()  # records that apply_chat_template itself cannot render as given
    kwargs: dict = field(default_factory=dict)
    added: list[str] = field(default_factory=list)  # non-special added tokens


LLAMA3_SPECIAL = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]
QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>"]
QWEN_ADDED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
MISTRAL_SPECIAL = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                   "[/TOOL_RESULTS]"]  # fmt: skip
FAMILIES = {
    "llama-3.2": Family("llama-3.2.jinja", "bytelevel", "<|begin_of_text|>", "<|eot_id|>", LLAMA3_SPECIAL,
                        r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n", "<|eot_id|>"),
    "qwen2.5": Family("qwen2.5.jinja", "bytelevel", "<|endoftext|>", "<|im_end|>", QWEN_SPECIAL,
                      r"<\|im_start\|>assistant\n", "<|im_end|>", added=QWEN_ADDED),
    "qwen3": Family("qwen3.jinja", "bytelevel", "<|endoftext|>", "<|im_end|>", QWEN_SPECIAL,
                    r"<\|im_start\|>assistant\n", "<|im_end|>", added=QWEN_ADDED),
    "qwen3-thinking-off": Family("qwen3.jinja", "bytelevel", "<|endoftext|>", "<|im_end|>", QWEN_SPECIAL,
                                 r"<\|im_start\|>assistant\n(<think>\n\n</think>\n\n)?", "<|im_end|>",
                                 kwargs={"enable_thinking": False}, added=QWEN_ADDED),
    "mistral-7b-v0.3": Family("mistral-7b-v0.3.jinja", "sentencepiece", "<s>", "</s>", MISTRAL_SPECIAL,
                              r"\[/INST\]|\[/TOOL_RESULTS\]", "</s>"),
    "mistral-nemo": Family("mistral-nemo.jinja", "bytelevel", "<s>", "</s>", MISTRAL_SPECIAL,
                           r"\[/INST\]|\[/TOOL_RESULTS\]", "</s>"),
    "gemma-2": Family("gemma-2.jinja", "sentencepiece", "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"],
                      r"<start_of_turn>model\n", "<end_of_turn>",
                      fails={"system_multi_turn": "System role not supported",
                             "tool_call": "Conversation roles must alternate"}),
    "phi-3.5": Family("phi-3.5.jinja", "sentencepiece", "<s>", "<|endoftext|>",
                      ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], r"<\|assistant\|>\n", "<|end|>",
                      fails={"tool_call": "does not render assistant message 1"}),
    "deepseek-r1-distill": Family("deepseek-r1-distill.jinja", "bytelevel", "<｜begin▁of▁sentence｜>",
                                  "<｜end▁of▁sentence｜>", ["<｜User｜>", "<｜Assistant｜>"], r"<｜Assistant｜>",
                                  "<｜end▁of▁sentence｜>", skip=("tool_call",), added=["<think>", "</think>"]),
    "llama3-generation": Family("llama3-generation.jinja", "bytelevel", "<|begin_of_text|>", "<|eot_id|>",
                                LLAMA3_SPECIAL, r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n",
                                "<|eot_id|>", skip=("tool_call",)),
}  # fmt: skip


def build_tokenizer(family: Family) -> PreTrainedTokenizerFast:
    """A tiny tokenizer trained on this file's records, with the family's special tokens."""
    special = [family.bos, family.eos, "<unk>", *family.special]
    if family.style == "bytelevel":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-style: spaces become ▁ and belong to the piece after them
        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        alphabet = []
    corpus = [json.dumps(record, ensure_ascii=False) for record in RECORDS.values()] + [CORPUS_EXTRA]
    corpus += [text for record in RECORDS.values() for m in record["messages"] for text in [m.get("content") or ""]]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, initial_alphabet=alphabet,
                                  show_progress=False)  # fmt: skip
    backend.train_from_iterator(corpus, trainer)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in family.added])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=family.bos, eos_token=family.eos, unk_token="<unk>",
        pad_token=family.eos, extra_special_tokens=family.special,
    )  # fmt: skip
    tokenizer.chat_template = (TEMPLATES / family.template).read_text(encoding="utf-8")
    return tokenizer


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    spec = FAMILIES[request.param]
    return request.param, spec, build_tokenizer(spec)


def prepare(tokenizer, tmp_path, records, **options):
    args = DataArguments(train_data=str(write_jsonl(tmp_path / "train.jsonl", records)), eval_size=0, **options)
    raw = Dataset.from_list(read_records(args.train_data, "--train_data", args))
    return prepare_datasets(args, tokenizer, raw, None, 4096)[0]


def expected_render(tokenizer, record, kwargs) -> str:
    """transformers' own render; a template that cannot take `content: null` gets '' (the documented fallback)."""
    try:
        return tokenizer.apply_chat_template(record["messages"], tools=record.get("tools"), tokenize=False, **kwargs)
    except Exception:
        messages = [{**m, "content": "" if m["content"] is None else m["content"]} for m in record["messages"]]
        return tokenizer.apply_chat_template(messages, tools=record.get("tools"), tokenize=False, **kwargs)


def expected_spans(text: str, family: Family) -> list[tuple[int, int]]:
    """From each assistant header through the next end-of-turn marker, scanning the whole render."""
    spans, position = [], 0
    while match := re.compile(family.header).search(text, position):
        end = text.index(family.end_of_turn, match.end()) + len(family.end_of_turn)
        spans.append((match.end(), end))
        position = end
    return spans


def expected_labels(tokenizer, text: str, spans) -> tuple[list[int], list[int]]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        overlaps = any(start < span_end and end > span_start for span_start, span_end in spans)
        labels.append(token if overlaps else IGNORE_INDEX)
    return encoded["input_ids"], labels


def mismatch(sample, input_ids, labels) -> str | None:
    if sample["input_ids"] != input_ids:
        return "input_ids differ from the whole render's tokenization"
    if sample["labels"] != labels:
        wrong = [i for i, (a, b) in enumerate(zip(sample["labels"], labels, strict=True)) if a != b]
        return f"labels differ at tokens {wrong[:10]}"
    return None


def renderable(spec: Family) -> list[str]:
    return [name for name in RECORDS if name not in spec.fails and name not in spec.skip]


def test_every_record_is_exact_under_the_real_template(family, tmp_path):
    name, spec, tokenizer = family
    names = renderable(spec)
    options = {"chat_template_kwargs": json.dumps(spec.kwargs)} if spec.kwargs else {}
    dataset = prepare(tokenizer, tmp_path, [RECORDS[n] for n in names], **options)
    assert len(dataset) == len(names)
    for record_name, sample in zip(names, dataset, strict=True):
        text = expected_render(tokenizer, RECORDS[record_name], spec.kwargs)
        spans = expected_spans(text, spec)
        assert len(spans) == sum(m["role"] == "assistant" for m in RECORDS[record_name]["messages"]) or name in (
            "deepseek-r1-distill",
        )
        assert mismatch(sample, *expected_labels(tokenizer, text, spans)) is None, (name, record_name, text)


def test_negative_control_a_content_only_mask_is_caught(family, tmp_path):
    """The old rule (only the assistant content + end-of-turn) differs from the exact mask where the template adds
    text inside the turn; and any single flipped label is caught."""
    name, spec, tokenizer = family
    record = RECORDS["system_multi_turn" if "system_multi_turn" in renderable(spec) else "unicode_whitespace"]
    text = expected_render(tokenizer, record, spec.kwargs)
    input_ids, labels = expected_labels(tokenizer, text, expected_spans(text, spec))
    flipped = list(labels)
    first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    flipped[first_trained] = IGNORE_INDEX
    assert mismatch({"input_ids": input_ids, "labels": flipped}, input_ids, labels) is not None
    shifted = [IGNORE_INDEX, *labels[:-1]]
    assert mismatch({"input_ids": input_ids, "labels": shifted}, input_ids, labels) is not None


@pytest.mark.parametrize("name", [name for name, spec in FAMILIES.items() if spec.fails])
def test_records_the_template_cannot_render_are_located_errors_and_skippable(name, tmp_path):
    spec = FAMILIES[name]
    tokenizer = build_tokenizer(spec)
    names = list(spec.fails)
    records = [RECORDS["unicode_whitespace"], *(RECORDS[n] for n in names)]
    with pytest.raises(DataError) as error:
        prepare(tokenizer, tmp_path, records)
    for line, reason in enumerate(spec.fails.values(), start=2):
        assert re.search(rf"train\.jsonl:{line}: .*{re.escape(reason)}", str(error.value)), str(error.value)
    assert "--skip_invalid_samples true" in str(error.value)
    dataset = prepare(tokenizer, tmp_path, records, skip_invalid_samples=True)
    assert [row["source"].rsplit(":", 1)[1] for row in dataset] == ["1"]


def test_reasoning_is_trained_where_the_template_writes_it():
    """Qwen3: reasoning_content of the last turn is rendered as a think block and trained; with thinking off the
    empty think block is part of the generation prompt (context), and earlier turns' reasoning is not rendered."""
    spec = FAMILIES["qwen3"]
    tokenizer = build_tokenizer(spec)
    text = expected_render(tokenizer, RECORDS["reasoning_content"], {})
    assert "<think>\nNine minus four is five.\n</think>\n\n9 - 4 = 5." in text
    from chat_masks import chat_text_and_spans

    rendered, spans = chat_text_and_spans(tokenizer, RECORDS["reasoning_content"]["messages"], None, {})
    assert [rendered[s:e] for s, e in spans] == ["<think>\nNine minus four is five.\n</think>\n\n9 - 4 = 5.<|im_end|>"]
    rendered, spans = chat_text_and_spans(
        tokenizer, RECORDS["system_multi_turn"]["messages"], None, {"enable_thinking": False}
    )
    assert [rendered[s:e] for s, e in spans] == ["2 + 3 = 5<|im_end|>", "4 + 4 = 8.<|im_end|>"]
    rendered, spans = chat_text_and_spans(tokenizer, RECORDS["system_multi_turn"]["messages"], None, {})
    assert [rendered[s:e] for s, e in spans][-1] == "<think>\n\n</think>\n\n4 + 4 = 8.<|im_end|>"


def test_mistral_trains_the_space_after_inst_and_preview_shows_it(tmp_path):
    from data_utils import marked_text

    tokenizer = build_tokenizer(FAMILIES["mistral-7b-v0.3"])
    sample = prepare(tokenizer, tmp_path, [RECORDS["system_multi_turn"]])[0]
    preview = marked_text(tokenizer, sample["input_ids"], sample["labels"])
    assert "[/INST][[ 2 + 3 = 5</s>]]" in preview, preview


def test_tool_shapes_pass_validation_and_bad_ones_are_located(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [
        RECORDS["tool_call"],
        {"tools": {"not": "a list"}, "messages": RECORDS["tool_call"]["messages"]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": "f()"}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "reasoning_content": 3}]},
    ])  # fmt: skip
    with pytest.raises(DataError) as error:
        read_records(str(path), "--train_data", DataArguments(train_data=str(path)))
    message = str(error.value)
    assert "3 invalid record(s)" in message and "train.jsonl:1" not in message
    assert "train.jsonl:2: 'tools' must be a list of objects" in message
    assert "train.jsonl:3: messages[1].tool_calls must be a list of objects" in message
    assert "train.jsonl:4: messages[1].reasoning_content must be a string" in message


def test_a_rows_template_kwargs_win_over_the_flag(tmp_path):
    """The contract with multi-source data: a row's chat_template_kwargs column (JSON) is merged over the flag's."""
    tokenizer = build_tokenizer(FAMILIES["qwen3"])
    args = DataArguments(train_data="unused", eval_size=0, chat_template_kwargs='{"enable_thinking": true}')
    record = RECORDS["system_multi_turn"]
    rows = read_records(str(write_jsonl(tmp_path / "train.jsonl", [record, record])), "--train_data", args)
    rows[1]["chat_template_kwargs"] = json.dumps({"enable_thinking": False})
    rows[0]["chat_template_kwargs"] = None
    dataset = prepare_datasets(args, tokenizer, Dataset.from_list(rows), None, 4096)[0]
    off = {"enable_thinking": False}
    cases = ((dataset[0], {}, FAMILIES["qwen3"]), (dataset[1], off, FAMILIES["qwen3-thinking-off"]))
    for sample, kwargs, header in cases:
        text = expected_render(tokenizer, record, kwargs)
        assert mismatch(sample, *expected_labels(tokenizer, text, expected_spans(text, header))) is None
    assert dataset[0]["labels"] != dataset[1]["labels"]
    with pytest.raises(DataError, match="--chat_template_kwargs: chat_template_kwargs must be a JSON object"):
        prepare_datasets(DataArguments(train_data="unused", chat_template_kwargs="[1]"), tokenizer,
                         Dataset.from_list(rows), None, 4096)  # fmt: skip


@pytest.mark.e2e
def test_train_py_reports_unrenderable_records_by_line_before_loading_the_model(tiny_llama, tmp_path):
    from conftest import run_train

    data = write_jsonl(tmp_path / "train.jsonl", [RECORDS["unicode_whitespace"], RECORDS["system_multi_turn"]])
    result = run_train(
        "--model_id", str(tiny_llama), "--train_data", str(data), "--eval_size", "0", "--eval_strategy", "no",
        "--chat_template", str(TEMPLATES / "gemma-2.jinja"), "--chat_template_kwargs", '{"unused_variable": 1}',
        "--prepare_data_only", "true", "--data_cache_dir", "none", "--output_dir", str(tmp_path / "out"),
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "train.jsonl:2: the chat template cannot render this record: System role not supported" in output
    assert "--skip_invalid_samples true" in output
    assert "data_utils.py" not in output and not (tmp_path / "out").exists()  # no traceback of ours, nothing written
