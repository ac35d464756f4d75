"""Data validation and loss masks on literal records, with the tiny models' real tokenizers."""

import pytest
from conftest import write_jsonl
from datasets import Dataset

from data_utils import IGNORE_INDEX, DataArguments, DataError, build_collator, prepare_datasets, read_records
from model_utils import ModelArguments, load_tokenizer

CHAT = {
    "messages": [
        {"role": "system", "content": "You are a careful calculator."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": " 4 + 4 = 8 "},
    ]
}
PROMPT_COMPLETION = {"prompt": "Q: 7 - 2\nA:", "completion": " 5"}


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gpt2"])
def tokenizer(request):
    return load_tokenizer(ModelArguments(model_id=str(request.getfixturevalue(request.param))))


def prepare(tokenizer, tmp_path, records, **options):
    args = DataArguments(train_data=str(write_jsonl(tmp_path / "train.jsonl", records)), eval_size=0, **options)
    train, _ = prepare_datasets(
        args, tokenizer, Dataset.from_list(read_records(args.train_data, "--train_data")), None, 512
    )
    return train


def trained_text(tokenizer, sample) -> str:
    pairs = zip(sample["input_ids"], sample["labels"], strict=True)
    return tokenizer.decode([token for token, label in pairs if label != IGNORE_INDEX])


def test_chat_labels_are_exactly_the_assistant_turns(tokenizer, tmp_path):
    sample = prepare(tokenizer, tmp_path, [CHAT])[0]
    full = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    # ChatML keeps the content's spaces, Llama-3 trims them: the labels hold exactly what the template rendered.
    answers = [m["content"] for m in CHAT["messages"] if m["role"] == "assistant"]
    expected = "".join((a if a in full else a.strip()) + tokenizer.eos_token for a in answers)
    assert trained_text(tokenizer, sample) == expected
    assert tokenizer.decode(sample["input_ids"]) == full


def test_prompt_completion_labels_are_the_completion_and_eos(tokenizer, tmp_path):
    sample = prepare(tokenizer, tmp_path, [PROMPT_COMPLETION])[0]
    assert trained_text(tokenizer, sample) == " 5" + tokenizer.eos_token
    assert "Q: 7 - 2" in tokenizer.decode(sample["input_ids"])
    if tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id:
        assert sample["input_ids"][0] == tokenizer.bos_token_id


@pytest.mark.parametrize("record", [CHAT, PROMPT_COMPLETION])
def test_train_on_prompt_labels_every_token_but_padding(tokenizer, tmp_path, record):
    longer = {"prompt": "Q: " + " + ".join(["1"] * 30) + "\nA:", "completion": " 30"}
    dataset = prepare(tokenizer, tmp_path, [record, longer], train_on_prompt=True)
    assert all(row["labels"] == row["input_ids"] for row in dataset)
    args = DataArguments(train_data="unused", pad_to_multiple_of=None)
    batch = build_collator(args, tokenizer, 512)([dict(row) for row in dataset])
    padding = batch["attention_mask"] == 0
    assert padding.any()
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    assert (batch["labels"][~padding] == batch["input_ids"][~padding]).all()


def test_long_sequences_error_names_the_line(tokenizer, tmp_path):
    long_record = {"prompt": "Q: " + "1 + 1 " * 200, "completion": " 2"}
    with pytest.raises(DataError, match=r"train\.jsonl:2"):
        prepare(tokenizer, tmp_path, [PROMPT_COMPLETION, long_record])


def test_truncate_keeps_labels_aligned_and_drop_counts(tokenizer, tmp_path):
    long_chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "9 " * 600}]}
    truncated = prepare(tokenizer, tmp_path, [long_chat, PROMPT_COMPLETION], long_sequence_strategy="truncate")
    assert [len(row["input_ids"]) == len(row["labels"]) for row in truncated] == [True, True]
    assert max(len(row["input_ids"]) for row in truncated) == 512
    dropped = prepare(tokenizer, tmp_path, [long_chat, PROMPT_COMPLETION], long_sequence_strategy="drop")
    assert len(dropped) == 1


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "a", "completion": "b"}', "{not json"], r"train\.jsonl:2: invalid JSON"),
        (['{"text": "hello"}'], r"train\.jsonl:1: unknown record shape"),
        (['{"prompt": "a", "completion": 3}'], r"train\.jsonl:1: 'completion' must be a string"),
        (['{"messages": [{"role": "user", "content": ["x"]}]}'], r"train\.jsonl:1: messages\[0\]\.content must be"),
        (
            ['{"messages": [{"role": "user", "content": "x"}]}'],
            r"train\.jsonl:1: the chat does not end with an assistant",
        ),
        (['{"messages": [{"role": "robot", "content": "x"}]}'], r"train\.jsonl:1: messages\[0\] has role 'robot'"),
        (["", "[1, 2]"], r"train\.jsonl:2: expected a JSON object"),
        ([], r"train\.jsonl: the file holds no records"),
    ],
)
def test_invalid_records_are_reported_with_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError, match=message):
        read_records(str(path), "--train_data")


def test_every_problem_is_counted_and_the_first_twenty_listed(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["{bad"] * 25)
    with pytest.raises(DataError) as error:
        read_records(str(path), "--train_data")
    assert "25 invalid record(s) (showing 20)" in str(error.value)
    assert str(error.value).count("invalid JSON") == 20


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="--train_data: .*does not exist"):
        read_records(str(tmp_path / "nope.jsonl"), "--train_data")
    with pytest.raises(DataError, match="holds no \\*.jsonl files"):
        read_records(str(tmp_path), "--train_data")


def test_directory_of_jsonl_files_and_max_num_samples(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [PROMPT_COMPLETION] * 3)
    write_jsonl(tmp_path / "a.jsonl", [CHAT] * 2)
    records = read_records(str(tmp_path), "--train_data")
    assert [r["source"].rsplit("/", 1)[1] for r in records] == [
        "a.jsonl:1",
        "a.jsonl:2",
        "b.jsonl:1",
        "b.jsonl:2",
        "b.jsonl:3",
    ]
    assert len(read_records(str(tmp_path), "--train_data", limit=3)) == 3
