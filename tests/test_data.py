"""Record shapes, validation, exact loss masks, length policy, cache and preview, with the tiny models' tokenizers."""

import json
import logging

import pytest
from conftest import trained_text, write_jsonl
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_utils import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    TRAINED_SPAN,
    DataError,
    apply_chat_template_option,
    build_collator,
    load_prepared_datasets,
    marked_text,
    prepare_datasets,
    read_records,
    training_columns,
)
from model_utils import load_tokenizer
from options import DataArguments, ModelArguments

CHAT = {
    "messages": [
        {"role": "system", "content": "You are a careful calculator."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": " 4 + 4 = 8 "},
    ]
}
TOOL_CHAT = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Calling the weather tool."},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
    ]
}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 9", "output": "11"}
SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Capital of France?"},
        {"from": "gpt", "value": "Paris."},
        {"from": "human", "value": "And of Italy?"},
        {"from": "gpt", "value": "Rome."},
    ]
}
PROMPT_COMPLETION = {"prompt": "Q: 7 - 2\nA:", "completion": " 5"}
TEXT = {"text": "Seven minus two is five."}


def prepare(tokenizer, tmp_path, records, max_length=512, **options):
    args = DataArguments(train_data=str(write_jsonl(tmp_path / "train.jsonl", records)), eval_size=0, **options)
    raw = Dataset.from_list(read_records(args.train_data, "--train_data", args))
    return prepare_datasets(args, tokenizer, raw, None, max_length)[0]


def expected_chat_labels(tokenizer, messages) -> str:
    """The assistant contents, as the template renders them (ChatML keeps spaces, Llama-3 trims), each + EOT."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    return "".join((a if a in full else a.strip()) + tokenizer.eos_token for a in answers)


@pytest.mark.parametrize("record", [CHAT, TOOL_CHAT], ids=["multi-turn", "tool"])
def test_chat_labels_are_exactly_the_assistant_turns(tokenizer, tmp_path, record):
    sample = prepare(tokenizer, tmp_path, [record])[0]
    assert trained_text(tokenizer, sample) == expected_chat_labels(tokenizer, record["messages"])
    assert tokenizer.decode(sample["input_ids"]) == tokenizer.apply_chat_template(record["messages"], tokenize=False)


def test_alpaca_trains_the_output_after_instruction_and_input(tokenizer, tmp_path):
    sample = prepare(tokenizer, tmp_path, [ALPACA])[0]
    assert trained_text(tokenizer, sample) == "11" + tokenizer.eos_token
    assert "Add the numbers.\n\n2 and 9" in tokenizer.decode(sample["input_ids"])


def test_sharegpt_trains_every_gpt_turn(tokenizer, tmp_path):
    sample = prepare(tokenizer, tmp_path, [SHAREGPT])[0]
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    messages = [{"role": roles[t["from"]], "content": t["value"]} for t in SHAREGPT["conversations"]]
    assert trained_text(tokenizer, sample) == expected_chat_labels(tokenizer, messages)
    assert trained_text(tokenizer, sample) == "Paris." + tokenizer.eos_token + "Rome." + tokenizer.eos_token


def test_prompt_completion_labels_are_the_completion_and_eos(tokenizer, tmp_path):
    sample = prepare(tokenizer, tmp_path, [PROMPT_COMPLETION])[0]
    assert trained_text(tokenizer, sample) == " 5" + tokenizer.eos_token
    assert "Q: 7 - 2" in tokenizer.decode(sample["input_ids"])
    if tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id:
        assert sample["input_ids"][0] == tokenizer.bos_token_id


def test_raw_text_trains_every_token(tokenizer, tmp_path):
    sample = prepare(tokenizer, tmp_path, [TEXT])[0]
    assert sample["labels"] == sample["input_ids"]
    assert tokenizer.decode(sample["input_ids"], skip_special_tokens=True) == TEXT["text"]
    assert sample["input_ids"][-1] == tokenizer.eos_token_id


def test_pretokenized_records_are_used_as_is(tokenizer, tmp_path):
    with_labels = {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}
    without_labels = {"input_ids": [9, 10, 11]}
    dataset = prepare(tokenizer, tmp_path, [with_labels, without_labels])
    assert dataset[0]["input_ids"] == [5, 6, 7, 8] and dataset[0]["labels"] == [-100, -100, 7, 8]
    assert dataset[1]["labels"] == [9, 10, 11]
    with pytest.raises(DataError, match=r"train\.jsonl:1: 'input_ids' holds token ids outside"):
        prepare(tokenizer, tmp_path, [{"input_ids": [len(tokenizer) + 5]}])


def test_one_batch_of_every_shape_equals_each_record_prepared_alone(tokenizer, tmp_path):
    """The batch is tokenized end to end in flat arrays: each row must be what that record gives on its own, with a
    dropped record (token ids outside the vocabulary) and pre-tokenized records between the rendered ones."""
    records = [CHAT, {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, ALPACA, {"input_ids": [len(tokenizer) + 5]},
               TEXT, {"input_ids": [9, 10]}, SHAREGPT, PROMPT_COMPLETION]  # fmt: skip
    folders = [tmp_path / str(index) for index in range(len(records))]
    for folder in folders:
        folder.mkdir()
    batch = prepare(tokenizer, folders[0], records, skip_invalid_samples=True)
    valid = [record for index, record in enumerate(records) if index != 3]
    alone = [prepare(tokenizer, folder, [record])[0] for folder, record in zip(folders[1:], valid, strict=False)]
    assert len(batch) == len(alone)
    for row, reference in zip(batch, alone, strict=True):
        assert {k: row[k] for k in ("input_ids", "labels", "length", "num_trained")} == {
            k: reference[k] for k in ("input_ids", "labels", "length", "num_trained")
        }


def test_mixed_shapes_in_one_file(tokenizer, tmp_path):
    dataset = prepare(tokenizer, tmp_path, [CHAT, ALPACA, SHAREGPT, PROMPT_COMPLETION, TEXT])
    assert [row["source"].rsplit(":", 1)[1] for row in dataset] == ["1", "2", "3", "4", "5"]


def test_data_format_forces_one_shape(tokenizer, tmp_path):
    prepare(tokenizer, tmp_path, [ALPACA], data_format="alpaca")
    with pytest.raises(DataError, match=r"train\.jsonl:2: a chat record, but --data_format is alpaca"):
        prepare(tokenizer, tmp_path, [ALPACA, CHAT], data_format="alpaca")


def test_tokenizer_without_template_gets_the_default_and_override_replaces_it(tiny_gpt2, tmp_path):
    tokenizer = load_tokenizer(ModelArguments(model_id=str(tiny_gpt2)))
    tokenizer.chat_template = None
    sample = prepare(tokenizer, tmp_path, [CHAT])[0]
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert trained_text(tokenizer, sample) == expected_chat_labels(tokenizer, CHAT["messages"])

    template_file = tmp_path / "template.jinja"
    template_file.write_text("{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}{{ eos_token }}{% endfor %}")
    apply_chat_template_option(tokenizer, DataArguments(train_data="unused", chat_template=str(template_file)))
    assert tokenizer.apply_chat_template(CHAT["messages"][:2], tokenize=False).startswith("[system]\nYou are")
    sample = prepare(tokenizer, tmp_path, [CHAT])[0]
    assert trained_text(tokenizer, sample) == expected_chat_labels(tokenizer, CHAT["messages"])
    with pytest.raises(DataError, match="neither a Jinja template nor a file"):
        apply_chat_template_option(tokenizer, DataArguments(train_data="unused", chat_template="missing.jinja"))


@pytest.mark.parametrize("record", [CHAT, PROMPT_COMPLETION])
def test_train_on_prompt_labels_every_token_but_padding(tokenizer, tmp_path, record):
    longer = {"prompt": "Q: " + " + ".join(["1"] * 30) + "\nA:", "completion": " 30"}
    dataset = prepare(tokenizer, tmp_path, [record, longer], train_on_prompt=True)
    assert all(row["labels"] == row["input_ids"] for row in dataset)
    args = DataArguments(train_data="unused", pad_to_multiple_of=None)
    batch = build_collator(args, tokenizer, 512)([dict(row) for row in training_columns(dataset)])
    padding = batch["attention_mask"] == 0
    assert padding.any()
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    assert (batch["labels"][~padding] == batch["input_ids"][~padding]).all()


def test_long_sequences_error_names_the_line(tokenizer, tmp_path):
    long_record = {"prompt": "Q: " + "1 + 1 " * 200, "completion": " 2"}
    with pytest.raises(DataError, match=r"1 train sample\(s\) are longer .*longest: \d+ tokens at .*train\.jsonl:2"):
        prepare(tokenizer, tmp_path, [PROMPT_COMPLETION, long_record])


def test_truncate_keeps_labels_aligned_and_drop_counts(tokenizer, tmp_path, caplog):
    long_chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "9 " * 600}]}
    truncated = prepare(tokenizer, tmp_path, [long_chat, PROMPT_COMPLETION], long_sequence_strategy="truncate")
    assert [len(row["input_ids"]) == len(row["labels"]) for row in truncated] == [True, True]
    assert max(len(row["input_ids"]) for row in truncated) == 512
    full = prepare(tokenizer, tmp_path, [long_chat], max_length=10_000)[0]
    assert truncated[0]["labels"] == full["labels"][:512]
    with caplog.at_level(logging.WARNING):
        dropped = prepare(tokenizer, tmp_path, [long_chat, PROMPT_COMPLETION], long_sequence_strategy="drop")
    assert len(dropped) == 1
    assert "Dropping 1 train sample(s) longer than --max_length 512" in caplog.text


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "a", "completion": "b"}', "{not json"], r"train\.jsonl:2: invalid JSON"),
        (['{"foo": "hello"}'], r"train\.jsonl:1: unknown record shape"),
        (['{"prompt": "a", "completion": 3}'], r"train\.jsonl:1: 'completion' must be a string"),
        (['{"prompt": "a", "completion": ""}'], r"train\.jsonl:1: 'completion' is empty"),
        (['{"messages": [{"role": "user", "content": ["x"]}]}'], r"train\.jsonl:1: messages\[0\]\.content must be"),
        (['{"messages": [{"role": "user", "content": "x"}]}'], r"train\.jsonl:1: the chat does not end with an assis"),
        (['{"messages": [{"role": "robot", "content": "x"}]}'], r"train\.jsonl:1: messages\[0\] has role 'robot'"),
        (
            ['{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}'],
            r"train\.jsonl:1: no assistant turn has content",
        ),
        (['{"instruction": "a", "output": ""}'], r"train\.jsonl:1: 'output' is empty"),
        (['{"instruction": "a", "input": 3, "output": "b"}'], r"train\.jsonl:1: 'input' must be a string"),
        (['{"conversations": [{"from": "bot", "value": "x"}]}'], r"train\.jsonl:1: conversations\[0\] has from 'bot'"),
        (['{"text": ""}'], r"train\.jsonl:1: 'text' is empty"),
        (['{"input_ids": [1, 2], "labels": [1]}'], r"train\.jsonl:1: 'labels' has 1 tokens but 'input_ids' has 2"),
        (['{"input_ids": ["a"]}'], r"train\.jsonl:1: 'input_ids' must be a non-empty list of integers"),
        (["", "[1, 2]"], r"train\.jsonl:2: expected a JSON object"),
        ([], r"train\.jsonl: the file holds no records"),
    ],
)
def test_invalid_records_are_reported_with_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError, match=message):
        read_records(str(path), "--train_data", DataArguments(train_data=str(path)))


def test_every_problem_is_counted_and_the_first_twenty_listed(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["{bad"] * 25)
    with pytest.raises(DataError) as error:
        read_records(str(path), "--train_data", DataArguments(train_data=str(path)))
    assert "25 invalid record(s) (showing 20)" in str(error.value)
    assert str(error.value).count("invalid JSON") == 20
    assert "--skip_invalid_samples true" in str(error.value)


def test_skip_invalid_samples_drops_and_reports(tmp_path, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", [PROMPT_COMPLETION, "{bad", {"foo": 1}, CHAT])
    with caplog.at_level(logging.WARNING):
        records = read_records(
            str(path), "--train_data", DataArguments(train_data=str(path), skip_invalid_samples=True)
        )
    assert [r["source"].rsplit(":", 1)[1] for r in records] == ["1", "4"]
    assert "dropped 2 invalid record(s)" in caplog.text and "train.jsonl:2: invalid JSON" in caplog.text


def test_dedup_drops_exact_duplicates(tmp_path, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", [PROMPT_COMPLETION, CHAT, PROMPT_COMPLETION, CHAT, ALPACA])
    with caplog.at_level(logging.WARNING):
        records = read_records(str(path), "--train_data", DataArguments(train_data=str(path), dedup=True))
    assert [r["source"].rsplit(":", 1)[1] for r in records] == ["1", "2", "5"]
    assert "dropped 2 exact duplicate record(s)" in caplog.text
    assert len(read_records(str(path), "--train_data", DataArguments(train_data=str(path)))) == 5


def test_prepared_data_is_cached_and_reused(tokenizer, tmp_path, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", [CHAT, PROMPT_COMPLETION, ALPACA] * 4)
    args = DataArguments(train_data=str(data), eval_size=3, data_cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO):
        first = load_prepared_datasets(args, tokenizer, 512, seed=1)
        assert "Cached the prepared data" in caplog.text
        caplog.clear()
        second = load_prepared_datasets(args, tokenizer, 512, seed=1)
        assert "Using the prepared data cached" in caplog.text
        for split in (0, 1):
            assert first[split].to_list() == second[split].to_list()
        caplog.clear()
        load_prepared_datasets(args, tokenizer, 512, seed=2)  # another eval split: another entry
        assert "Cached the prepared data" in caplog.text
        caplog.clear()
        write_jsonl(data, [CHAT, PROMPT_COMPLETION] * 4)  # new content: the cache must not be used
        assert len(load_prepared_datasets(args, tokenizer, 512, seed=1)[0]) == 5
        assert "Cached the prepared data" in caplog.text


def test_marked_text_wraps_exactly_the_trained_tokens(tokenizer, tmp_path):
    sample = prepare(tokenizer, tmp_path, [PROMPT_COMPLETION])[0]
    text = marked_text(tokenizer, sample["input_ids"], sample["labels"])
    assert text.endswith(f"{TRAINED_SPAN[0]} 5{tokenizer.eos_token}{TRAINED_SPAN[1]}")
    assert text.count(TRAINED_SPAN[0]) == 1


# Property: any content either prepares correctly or stops with a clear DataError, never a crash.

TEXTS = st.one_of(st.just(""), st.text(max_size=30), st.text(min_size=2000, max_size=4000))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(prompt=TEXTS, answer=TEXTS, shape=st.sampled_from(["chat", "prompt_completion", "alpaca", "text"]))
def test_any_content_prepares_or_gives_a_clear_error(tiny_llama_tokenizer, tmp_path_factory, prompt, answer, shape):
    record = {
        "chat": {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]},
        "prompt_completion": {"prompt": prompt, "completion": answer},
        "alpaca": {"instruction": prompt, "output": answer},
        "text": {"text": answer},
    }[shape]
    path = tmp_path_factory.mktemp("hypothesis") / "train.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    args = DataArguments(train_data=str(path), eval_size=0, long_sequence_strategy="truncate")
    try:
        raw = Dataset.from_list(read_records(str(path), "--train_data", args))
        sample = prepare_datasets(args, tiny_llama_tokenizer, raw, None, 512)[0][0]
    except DataError as error:
        assert "train.jsonl" in str(error) or "trained token" in str(error)
        return
    assert len(sample["input_ids"]) == len(sample["labels"]) <= 512
    assert any(label != IGNORE_INDEX for label in sample["labels"])


@pytest.fixture(scope="module")
def tiny_llama_tokenizer(tiny_llama):
    return load_tokenizer(ModelArguments(model_id=str(tiny_llama)))
