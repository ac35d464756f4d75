"""The record-format registry (data_formats.py) is the one place a shape is defined: the --data_format choices, the
README's table, the Axolotl `type` translation and detection all follow it; and the prepared-data cache key changes
with every module that shapes the tokens."""

import re
import typing
from dataclasses import fields
from types import SimpleNamespace

import pytest
from conftest import REPO, write_jsonl

import data_formats
import data_utils
from config_files import axolotl_source
from data_formats import (
    DETECTION_ORDER,
    FORMATS,
    RECORD_FORMATS,
    RecordFormat,
    detect_format,
    normalize_prompt_completion,
    normalize_record,
)
from data_mixing import SOURCE_OPTIONS, parse_sources
from data_utils import prepared_cache_key, read_records, token_shaping_modules
from loss_masks import SAMPLE_OF_KIND
from options import DataArguments

# One valid record per registered shape: a shape added to FORMATS needs one here too.
VALID = {
    "prompt_completion": {"prompt": "2 + 2 =", "completion": " 4"},
    "alpaca": {"instruction": "Add.", "input": "2 2", "output": "4"},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    "chat": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    "text": {"text": "Once upon a time."},
    "tokenized": {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
}


def test_every_shape_is_detected_and_normalizes_to_a_kind_the_loss_masks_label():
    assert set(VALID) == set(FORMATS) == set(DETECTION_ORDER) and len(DETECTION_ORDER) == len(FORMATS)
    for name, record in VALID.items():
        assert detect_format(record) == name
        row = normalize_record(record, name)
        assert isinstance(row, dict), row
        assert row["kind"] in {*SAMPLE_OF_KIND, "tokenized"}  # tokenized rows keep their own labels
        assert normalize_record(record, "auto") == row


@pytest.mark.parametrize(
    ("record", "shape"),
    [
        ({"prompt": "p", "messages": []}, "chat"),  # e.g. HuggingFaceH4/ultrachat_200k rows
        ({"instruction": "i", "messages": []}, "chat"),
        ({"conversations": [], "instruction": "i"}, "sharegpt"),
        ({"prompt": "p", "completion": "c", "text": "t"}, "prompt_completion"),
        ({"input_ids": [1], "text": "t"}, "tokenized"),
        ({"completion": "c"}, "prompt_completion"),
        ({"foo": 1}, None),
    ],
)
def test_detection_precedence(record, shape):
    assert detect_format(record) == shape


def test_option_choices_follow_the_registry():
    data_format = next(f for f in fields(DataArguments) if f.name == "data_format")
    assert typing.get_args(data_format.type) == RECORD_FORMATS == ("auto", *FORMATS)
    assert ", ".join(RECORD_FORMATS) in SOURCE_OPTIONS["format"]
    assert parse_sources('{"path": "x.jsonl", "format": "sharegpt"}', "--train_data")[0].format == "sharegpt"


def test_readme_table_is_the_registry_table():
    readme = (REPO / "README.md").read_text()
    table = re.search(r"^\| shape \| record \| trained tokens \|\n(?:\|.*\|\n)+", readme, re.MULTILINE)
    assert table, "README.md has no table of record shapes"
    assert table.group(0).rstrip("\n") == data_formats.docs_table()
    assert re.findall(r"^\| `(\w+)` \|", table.group(0), re.MULTILINE) == list(FORMATS)


def test_axolotl_types_translate_to_their_shapes():
    for name, shape in FORMATS.items():
        for kind in shape.axolotl_types:
            assert axolotl_source({"path": "d", "type": kind}, {})["format"] == name
    assert axolotl_source({"path": "d", "type": "completion", "field": "body"}, {})["fields"] == {"text": "body"}


def test_a_shape_added_to_the_registry_alone_is_read_detected_and_translated(monkeypatch, tmp_path):
    """What a maintainer adding a shape writes: one RecordFormat (and its place in DETECTION_ORDER)."""
    question_answer = RecordFormat(
        name="question_answer",
        keys=("question",),
        described_as="question/answer",
        normalize=lambda r: normalize_prompt_completion({"prompt": r["question"], "completion": r.get("answer")}),
        example='`{"question": "...", "answer": "..."}`',
        trained="the answer + EOS",
        axolotl_types=("question_answer",),
    )
    monkeypatch.setitem(FORMATS, "question_answer", question_answer)
    monkeypatch.setattr(data_formats, "DETECTION_ORDER", ("question_answer", *DETECTION_ORDER))
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2 + 2 =", "answer": " 4"}, {"question": "x"}])
    rows = read_records(str(path), "--train_data", DataArguments(train_data=str(path), skip_invalid_samples=True))
    assert [(row["kind"], row["prompt"], row["completion"]) for row in rows] == [("prompt_completion", "2 + 2 =", " 4")]
    assert axolotl_source({"path": "d", "type": "question_answer"}, {})["format"] == "question_answer"
    assert "| `question_answer` | `{" in data_formats.docs_table()


# The prepared-data cache key


def cache_key(path) -> str:
    tokenizer = SimpleNamespace(chat_template=None)  # the key hashes the tokenizer object and its template
    return prepared_cache_key(DataArguments(train_data=str(path)), tokenizer, 128, 0)


def test_cache_key_covers_every_module_that_shapes_the_tokens(monkeypatch, tmp_path):
    modules = token_shaping_modules()
    shaping = {"data_utils", "data_formats", "loss_masks", "chat_masks", "packing", "data_mixing", "data_sources"}
    assert shaping <= set(modules)
    assert "train" not in modules  # nothing imports the entry point
    path = write_jsonl(tmp_path / "train.jsonl", [VALID["text"]])  # written once: its fingerprint holds the mtime
    key, real_source = cache_key(path), data_utils.module_source
    for changed in [*modules, "train"]:  # train.py: code the prepared data does not depend on (negative control)
        edited = lambda name, changed=changed: real_source(name) + ("\n# edited\n" if name == changed else "")  # noqa: E731
        monkeypatch.setattr(data_utils, "module_source", edited)
        assert (cache_key(path) != key) == (changed in modules), changed
    monkeypatch.setattr(data_utils, "module_source", real_source)
    assert cache_key(path) == key
