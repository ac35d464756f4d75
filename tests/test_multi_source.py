"""Several data sources in one run: the source syntax, per-source options, deterministic mixing, per-source masks and
counts, and the cache key."""

import json
import logging

import numpy as np
import pytest
from conftest import trained_text, write_jsonl
from datasets import Dataset, load_dataset

import options
from config_files import command_line_tokens, load_config_file
from data_mixing import (
    contiguous_shard,
    mixture_positions,
    parse_sources,
    random_subset,
    weighted_quotas,
)
from data_sources import DataError
from data_utils import (
    load_prepared_datasets,
    load_raw_datasets,
    prepared_cache_key,
    read_records,
    source_summary,
    write_preview,
)
from model_utils import load_tokenizer
from options import DataArguments, ModelArguments

CHATS = [
    {"conversations": [{"from": "human", "value": f"What is {i} + 1?"}, {"from": "gpt", "value": f"It is {i + 1}."},
                       {"from": "human", "value": "Thanks"}, {"from": "gpt", "value": "You are welcome."}]}
    for i in range(6)
]  # fmt: skip
ALPACAS = [{"instruction": "Double the number.", "input": str(i), "output": str(2 * i)} for i in range(8)]
QAS = [{"question": f"Q: {i} - 1\nA:", "answer": f" {i - 1}"} for i in range(10)]
CHAT_SOURCE = {"format": "chat", "fields": {"messages": "conversations"},
               "message_fields": {"role": "from", "content": "value"}, "roles": {"human": "user", "gpt": "assistant"},
               "chat_template_kwargs": {"enable_thinking": False}}  # fmt: skip
QA_SOURCE = {"fields": {"prompt": "question", "completion": "answer"}}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(ModelArguments(model_id=str(tiny_llama)))


@pytest.fixture
def three_sources(tmp_path):
    """A sharegpt-shaped chat file read through field/role mappings, an alpaca file, and a question/answer file."""
    chat = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACAS)
    qa = write_jsonl(tmp_path / "qa.jsonl", QAS)
    return [{"path": str(chat), **CHAT_SOURCE}, str(alpaca), {"path": str(qa), **QA_SOURCE}]


def data_args(sources, **options) -> DataArguments:
    options = {"eval_size": 0, "data_cache_dir": "none", **options}
    return DataArguments(train_data=json.dumps(sources), **options)


# The syntax


def test_source_syntax(tmp_path):
    comma_file = write_jsonl(tmp_path / "a,b.jsonl", QAS)
    assert [s.path for s in parse_sources("a.jsonl, org/data:test ,s3://b/c.jsonl", "--train_data")] == [
        "a.jsonl", "org/data:test", "s3://b/c.jsonl"]  # fmt: skip
    assert [s.path for s in parse_sources(str(comma_file), "--train_data")] == [str(comma_file)]  # an existing path
    url = "https://host/data.jsonl?sig=a,b"
    [source] = parse_sources(json.dumps({"path": url, "records": 0.5, "weight": 2}), "--train_data")
    assert (source.path, source.records, source.weight) == (url, 0.5, 2)
    mixed = parse_sources(json.dumps(["x.jsonl", {"path": "y.jsonl", "split": "train[:20%]"}]), "--eval_data")
    assert [(s.path, s.split) for s in mixed] == [("x.jsonl", None), ("y.jsonl", "train[:20%]")]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('[{"path": "a.jsonl", "wieght": 2}]', "source 1 (a.jsonl): unknown option(s) wieght. Options:"),
        ('["a.jsonl", {"path": "b.jsonl", "records": 1.5}]', "source 2 (b.jsonl): records must be a whole number"),
        ('{"path": "b.jsonl", "shards": 2, "shard_index": 2}', "shard_index must be in 0..1"),
        ('{"path": "b.jsonl", "split": "train[:x]"}', "is not a split with a slice"),
        ('{"path": "b.jsonl", "format": "csv"}', "format 'csv'; expected one of auto, prompt_completion"),
        ('[{"path": "a.jsonl"', "starts like JSON but is not valid JSON"),
        ('[{"weight": 2}]', "expected a path or an object with a 'path'"),
    ],
)
def test_bad_sources_stop_before_loading(value, message):
    with pytest.raises(DataError, match="^--train_data") as error:
        DataArguments(train_data=value)
    assert message in str(error.value)


def test_weight_needs_weighted_mixing():
    with pytest.raises(DataError, match="only --data_mixing weighted uses"):
        DataArguments(train_data='[{"path": "a.jsonl", "weight": 2}, "b.jsonl"]')
    with pytest.raises(DataError, match="evaluation sources are concatenated"):
        DataArguments(train_data="a.jsonl", eval_data='[{"path": "b.jsonl", "weight": 2}]', data_mixing="weighted")
    with pytest.raises(DataError, match="--data_mix_size"):
        DataArguments(train_data="a.jsonl", data_mix_size=10)


def test_repeated_flags_are_joined_and_the_file_is_overridden(tmp_path):
    tokens = command_line_tokens(
        ["--train_data", "a.jsonl,b.jsonl", "--eval_size", "0", "--train_data", '{"path": "c", "weight": 2}']
    )
    assert tokens == ["--eval_size", "0", "--train_data", '["a.jsonl","b.jsonl",{"path":"c","weight":2}]']
    config = tmp_path / "run.yaml"
    config.write_text("train_data: [{path: d.jsonl, records: 5}, e.jsonl]\n")
    values = load_config_file(config, options.option_names()).values
    assert values == {"train_data": '[{"path": "d.jsonl", "records": 5}, "e.jsonl"]'}
    assert [s.path for s in parse_sources(values["train_data"], "--train_data")] == ["d.jsonl", "e.jsonl"]
    # the command line replaces the file's sources (it does not add to them), as for every other option
    _, data, *_ = options.parse_args([str(config), "--model_id", "m", "--train_data", "f.jsonl"])
    assert data.train_data == "f.jsonl"


# Mixing: unit level


@pytest.mark.parametrize(("weights", "target"), [([3, 1, 1], 1000), ([0.5, 0.25, 0.25], 7), ([1, 2], 3001)])
def test_weighted_quotas_follow_the_weights(weights, target):
    quotas = weighted_quotas(weights, target)
    assert sum(quotas) == target
    for quota, weight in zip(quotas, weights, strict=True):
        assert abs(quota - target * weight / sum(weights)) < 1


def test_mixture_over_and_under_samples_exactly():
    positions = mixture_positions([10, 4], [25, 3], np.random.default_rng(0))
    counts = [np.bincount(p, minlength=n) for p, n in zip(positions, [10, 4], strict=True)]
    assert sorted(counts[0]) == [2] * 5 + [3] * 5  # every record twice, five of them a third time
    assert sorted(counts[1]) == [0, 1, 1, 1]  # three distinct records of four
    again = mixture_positions([10, 4], [25, 3], np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(positions, again, strict=True))


def inclusion_frequencies(sample, size: int, wanted: int, draws: int) -> np.ndarray:
    hits = np.zeros(size)
    for seed in range(draws):
        hits[sample(size, wanted, np.random.default_rng(seed))] += 1
    return hits / draws


def test_under_sampling_is_uniform_over_records():
    """Over 3000 seeded draws of 3 of 10 records, each record is drawn 30% of the time (binomial sd 0.84%)."""
    frequencies = inclusion_frequencies(random_subset, 10, 3, 3000)
    assert np.abs(frequencies - 0.3).max() < 0.035
    # negative control: a sampler that favours the first records fails the same check
    biased = inclusion_frequencies(
        lambda n, k, rng: np.sort(rng.choice(n // 2 + 1, size=k, replace=False)), 10, 3, 3000
    )
    assert np.abs(biased - 0.3).max() > 0.035


def test_shards_and_slices_match_datasets(tmp_path):
    """A source's shards and split slices keep the rows that `datasets` keeps (reference: datasets itself)."""
    rows = Dataset.from_list([{"i": i} for i in range(23)])
    for shards, index in ((3, 0), (3, 2), (5, 4)):
        assert list(range(23))[contiguous_shard(23, shards, index)] == rows.shard(shards, index)["i"]
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(23)])
    for split in ("train[:20%]", "train[5:9]", "train[-30%:]"):
        expected = [r["prompt"] for r in load_dataset("json", data_files=str(path), split=split)]
        source = {"path": str(path), "split": split}
        got = [r["prompt"] for r in read_records(parse_sources(json.dumps(source), "-")[0], "--train_data",
                                                 DataArguments(train_data=str(path)))]  # fmt: skip
        assert got == expected, split
    sharded = {"path": str(path), "shards": 4, "shard_index": 1}
    got = [r["prompt"] for r in read_records(parse_sources(json.dumps(sharded), "-")[0], "--train_data",
                                             DataArguments(train_data=str(path)))]  # fmt: skip
    assert got == load_dataset("json", data_files=str(path), split="train").shard(4, 1)["prompt"]


# Several sources in one run


def test_every_kept_record_traces_to_its_source(three_sources):
    args = data_args(three_sources)
    train_set, evaluation, counts = load_raw_datasets(args, seed=1)
    assert evaluation is None and len(train_set) == len(CHATS) + len(ALPACAS) + len(QAS)
    files = ["chat.jsonl", "alpaca.jsonl", "qa.jsonl"]
    for row in train_set:
        assert row["source"].split("/")[-1].split(":")[0] == files[row["source_id"]]
    assert [row["kind"] for row in train_set] == ["chat"] * 6 + ["chat"] * 8 + ["prompt_completion"] * 10
    kwargs = [row["chat_template_kwargs"] for row in train_set]
    assert kwargs == ['{"enable_thinking": false}'] * 6 + [None] * 18  # only the chat source's rows carry them
    assert [c["read"] for c in counts["train"]] == [6, 8, 10]


def test_weighted_mixture_proportions_counts_and_seed(three_sources):
    sources = [{**three_sources[0], "weight": 3}, {"path": three_sources[1], "weight": 1}, three_sources[2]]
    args = data_args(sources, data_mixing="weighted", data_mix_size=2000)
    mixed, _, _ = load_raw_datasets(args, seed=7)
    assert np.bincount(mixed["source_id"]).tolist() == [1200, 400, 400]  # 3 : 1 : 1 of 2000
    assert [mixed["source"].count(f"{three_sources[2]['path']}:{line}") for line in range(1, 11)] == [40] * 10
    again, _, _ = load_raw_datasets(args, seed=7)
    assert again["source"] == mixed["source"]  # same seed, same mixture in the same order
    other, _, _ = load_raw_datasets(args, seed=8)
    assert other["source"] != mixed["source"] and sorted(other["source"]) == sorted(mixed["source"])
    small = load_raw_datasets(data_args(sources, data_mixing="weighted", data_mix_size=10), seed=7)[0]
    assert np.bincount(small["source_id"]).tolist() == [6, 2, 2] and len(set(small["source"])) == 10


def test_records_option_and_eval_split_before_mixing(three_sources):
    sources = [{**three_sources[0], "records": 0.5}, {"path": three_sources[1], "records": 3}, three_sources[2]]
    args = data_args(sources, eval_size=4)
    train_set, evaluation, counts = load_raw_datasets(args, seed=3)
    assert [c["skipped"] for c in counts["train"]] == [3, 5, 0]
    assert len(train_set) + len(evaluation) == 3 + 3 + 10 and len(evaluation) == 4
    assert not set(train_set["source"]) & set(evaluation["source"])


def test_masks_are_exact_per_source(tokenizer, tmp_path, three_sources, caplog):
    """Each source's samples equal those of the same records written in our own shape and read alone."""
    with caplog.at_level(logging.INFO):
        train_set, _ = load_prepared_datasets(data_args(three_sources), tokenizer, 256, seed=1)
    native = {
        0: [{"messages": [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
                          for t in chat["conversations"]]} for chat in CHATS],
        1: ALPACAS,
        2: [{"prompt": qa["question"], "completion": qa["answer"]} for qa in QAS],
    }  # fmt: skip
    for source_id, records in native.items():
        alone = write_jsonl(tmp_path / f"native{source_id}.jsonl", records)
        reference, _ = load_prepared_datasets(data_args([str(alone)]), tokenizer, 256, seed=1)
        mine = train_set.filter(lambda row, wanted=source_id: row["source_id"] == wanted)
        assert mine["input_ids"] == reference["input_ids"] and mine["labels"] == reference["labels"]
    first_chat = train_set[0]
    assert trained_text(tokenizer, first_chat) == "It is 1." + tokenizer.eos_token + "You are welcome." + (
        tokenizer.eos_token
    )
    assert trained_text(tokenizer, train_set[6]) == "0" + tokenizer.eos_token  # alpaca: the output only
    assert trained_text(tokenizer, train_set[14]) == " -1" + tokenizer.eos_token  # prompt/completion
    assert "--train_data sources: read / invalid / skipped / kept" in caplog.text


def test_per_source_summary_counts(tokenizer, tmp_path, three_sources):
    chat = write_jsonl(tmp_path / "chat.jsonl", [*CHATS, "{broken", {"conversations": []}, CHATS[0]])
    sources = [{**three_sources[0], "path": str(chat)}, three_sources[1], three_sources[2]]
    args = data_args(sources, skip_invalid_samples=True, dedup=True, eval_size=5)
    train_set, evaluation = load_prepared_datasets(args, tokenizer, 256, seed=2)
    rows = source_summary(train_set, evaluation)["train"]
    assert [(r["read"], r["invalid"], r["skipped"]) for r in rows] == [(9, 2, 1), (8, 0, 0), (10, 0, 0)]
    for source_id, row in enumerate(rows):
        mine = [t for t, s in zip(train_set["num_trained"], train_set["source_id"], strict=True) if s == source_id]
        assert row["kept"] == len(mine) and row["trained_tokens"] == sum(mine) > 0
        assert row["eval"] == evaluation["source_id"].count(source_id)
    assert sum(row["eval"] for row in rows) == 5 and sum(row["kept"] for row in rows) == 6 + 8 + 10 - 5
    cached_args = data_args(sources, skip_invalid_samples=True, dedup=True, eval_size=5,
                            data_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    load_prepared_datasets(cached_args, tokenizer, 256, seed=2)
    cached = load_prepared_datasets(cached_args, tokenizer, 256, seed=2)
    assert source_summary(*cached)["train"] == rows  # a cache hit reports the same counts


def test_invalid_records_of_every_source_in_one_report(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", [{"prompt": "p", "completion": "c"}, "{bad"])
    second = write_jsonl(tmp_path / "second.jsonl", [{"instruction": "x"}, ALPACAS[0]])
    with pytest.raises(DataError) as error:
        load_raw_datasets(data_args([str(first), str(second)]), seed=0)
    assert "2 invalid record(s)" in str(error.value)
    assert f"{first}:2: invalid JSON" in str(error.value) and f"{second}:1: 'output'" in str(error.value)


def test_a_source_left_empty_is_named(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ALPACAS)
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{bad"])
    with pytest.raises(DataError, match=f"{bad} holds no valid record"):
        load_raw_datasets(data_args([str(good), str(bad)], skip_invalid_samples=True), seed=0)


def test_cache_key_covers_per_source_options(tokenizer, three_sources):
    key = prepared_cache_key(data_args(three_sources), tokenizer, 256, 1)
    assert key == prepared_cache_key(data_args(three_sources), tokenizer, 256, 1)
    changed = [
        [{**three_sources[0], "roles": {"human": "user", "gpt": "assistant", "x": "system"}}, *three_sources[1:]],
        [{**three_sources[0], "chat_template_kwargs": {"enable_thinking": True}}, *three_sources[1:]],
        [three_sources[0], {"path": three_sources[1], "records": 4}, three_sources[2]],
        [three_sources[0], three_sources[2], three_sources[1]],
    ]
    keys = {prepared_cache_key(data_args(sources), tokenizer, 256, 1) for sources in changed}
    assert key not in keys and len(keys) == len(changed)
    weighted = data_args([{**three_sources[0], "weight": 2}, *three_sources[1:]], data_mixing="weighted")
    assert prepared_cache_key(weighted, tokenizer, 256, 1) != key


def test_source_ids_survive_records_the_template_cannot_render(tokenizer, tmp_path):
    refuses_boom = "{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('no boom') }}{% endif %}"
    tokenizer.chat_template = refuses_boom + "{% endfor %}" + tokenizer.chat_template

    def chat(text):
        return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text}]}

    first = write_jsonl(tmp_path / "first.jsonl", [chat("one"), chat("boom"), chat("two")])
    second = write_jsonl(tmp_path / "second.jsonl", [chat("boom"), chat("three")])
    args = data_args([str(first), str(second)], skip_invalid_samples=True)
    train_set, _ = load_prepared_datasets(args, tokenizer, 256, seed=1)
    kept = sorted(zip(train_set["source"], train_set["source_id"], strict=True))
    assert [(source.rsplit("/", 1)[1], source_id) for source, source_id in kept] == [
        ("first.jsonl:1", 0), ("first.jsonl:3", 0), ("second.jsonl:2", 1)]  # fmt: skip


def test_eval_sources_summary_and_preview_of_every_source(tokenizer, tmp_path, three_sources):
    args = data_args(three_sources[:2], eval_data=json.dumps([three_sources[2], three_sources[1]]))
    train_set, evaluation = load_prepared_datasets(args, tokenizer, 256, seed=1)
    summary = source_summary(train_set, evaluation)
    assert [(r["kept"], r["eval"]) for r in summary["train"]] == [(6, 0), (8, 0)]
    assert [r["kept"] for r in summary["eval"]] == [10, 8]
    trained = [sum(t for t, s in zip(evaluation["num_trained"], evaluation["source_id"], strict=True) if s == i)
               for i in range(2)]  # fmt: skip
    assert [r["trained_tokens"] for r in summary["eval"]] == trained
    write_preview(tmp_path / "preview.txt", tokenizer, train_set)
    headers = [line for line in (tmp_path / "preview.txt").read_text().splitlines() if line.startswith("=====")]
    assert [header.split()[1].rsplit("/", 1)[1] for header in headers] == [
        "chat.jsonl:1", "chat.jsonl:2", "chat.jsonl:3", "chat.jsonl:4", "chat.jsonl:5", "alpaca.jsonl:1"]  # fmt: skip


def test_chat_template_kwargs_apply_to_their_source_only(tiny_llama, tmp_path):
    """A source's chat_template_kwargs reach its renders only (chat_masks merges the row's over the run's)."""
    tokenizer = load_tokenizer(ModelArguments(model_id=str(tiny_llama)))
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (tag if tag is defined and m['role'] == 'user'"
        " else '') + m['content'] + eos_token + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    first = write_jsonl(tmp_path / "first.jsonl", CHATS[:2])
    second = write_jsonl(tmp_path / "second.jsonl", CHATS[:2])
    chat = {key: CHAT_SOURCE[key] for key in ("format", "fields", "message_fields", "roles")}
    sources = [
        {"path": str(first), **chat, "chat_template_kwargs": {"tag": "[tagged] "}},
        {"path": str(second), **chat},
    ]
    train_set, _ = load_prepared_datasets(data_args(sources), tokenizer, 256, seed=1)
    texts = [tokenizer.decode(ids) for ids in train_set["input_ids"]]
    assert [text.count("[tagged] ") for text in texts] == [2, 2, 0, 0]  # both user turns of the first source's chats
    assert [trained_text(tokenizer, row) for row in train_set.select([0, 1])] == [
        trained_text(tokenizer, row) for row in train_set.select([2, 3])
    ]
