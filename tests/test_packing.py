"""Sample packing: rows, labels and positions on literal inputs; packed logits equal separate logits; a packed run."""

from collections import Counter

import pytest
import torch
from conftest import REPO, logged_losses, run_train
from datasets import Dataset
from transformers import AutoModelForCausalLM

from data_utils import DataArguments, build_collator, training_columns
from model_utils import ModelArguments, load_tokenizer
from packing import IGNORE_INDEX, PackedCollator, first_fit_decreasing, pack_dataset, packing_efficiency

SAMPLE_CHAT = str(REPO / "sample_data" / "chat.jsonl")


def samples(lengths: list[int]) -> Dataset:
    """Sample i holds tokens 1000*i + 1, 1000*i + 2, ...; its first label is trained so masking is visible."""
    input_ids = [[1000 * i + t + 1 for t in range(length)] for i, length in enumerate(lengths)]
    return Dataset.from_dict({
        "input_ids": input_ids, "labels": [list(ids) for ids in input_ids],
        "source": [f"s{i}" for i in range(len(lengths))], "length": lengths, "num_trained": lengths,
    })  # fmt: skip


def split_row(row: dict) -> list[dict]:
    """The samples of a packed row, cut where position_ids restart at 0."""
    starts = [i for i, position in enumerate(row["position_ids"]) if position == 0] + [len(row["input_ids"])]
    return [
        {key: row[key][start:end] for key in ("input_ids", "labels", "position_ids")}
        for start, end in zip(starts, starts[1:], strict=False)
    ]


def test_ffd_rows_and_efficiency_on_a_known_list():
    lengths = [5, 4, 3, 3, 2, 1]
    rows = first_fit_decreasing(lengths, 8)
    # 5 -> row 0; 4 -> row 1; 3 (index 2) -> row 0 (full); 3 (index 3) -> row 1; 2 -> row 2; 1 -> row 1 (full).
    assert rows == [[0, 2], [1, 3, 5], [4]]
    assert packing_efficiency(lengths, 8, rows) == pytest.approx(18 / 24)
    assert first_fit_decreasing(lengths, 8) == rows  # deterministic


def test_every_sample_once_rows_fit_boundaries_masked_and_positions_restart():
    lengths = [7, 3, 12, 1, 5, 5, 9, 2, 16, 4, 6, 11, 3, 3, 8]
    dataset = samples(lengths)
    packed = pack_dataset(dataset, max_length=16)
    assert len(packed) < len(dataset)
    assert sum(packed["num_samples"]) == len(dataset)
    reconstructed = []
    for row in packed:
        assert len(row["input_ids"]) == row["length"] <= 16
        assert len(row["labels"]) == len(row["position_ids"]) == row["length"]
        assert row["num_trained"] == sum(label != IGNORE_INDEX for label in row["labels"])
        for sample in split_row(row):
            assert sample["position_ids"] == list(range(len(sample["input_ids"])))
            assert sample["labels"][0] == IGNORE_INDEX  # no label predicted across a boundary
            assert sample["labels"][1:] == sample["input_ids"][1:]
            reconstructed.append(tuple(sample["input_ids"]))
    assert Counter(reconstructed) == Counter(tuple(ids) for ids in dataset["input_ids"])


def test_collator_pads_positions_as_a_separate_sequence_and_sends_no_mask():
    collator = PackedCollator(pad_token_id=0, fallback=None, pad_to_multiple_of=8)
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [3, 4], "labels": [-100, 4], "position_ids": [0, 1]},
    ]
    batch = collator(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [3, 4, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100], [-100, 4] + [-100] * 6]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]]


def test_unpacked_eval_rows_use_the_padding_collator(tiny_llama):
    tokenizer = load_tokenizer(ModelArguments(model_id=str(tiny_llama)))
    args = DataArguments(train_data="unused", sample_packing=True)
    collator = build_collator(args, tokenizer, 64)
    assert isinstance(collator, PackedCollator)
    plain = collator([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    assert plain["attention_mask"].tolist() == [[1, 1, 1] + [0] * 5, [1] + [0] * 7]
    packed = training_columns(pack_dataset(samples([3, 2]), 8))
    assert packed.column_names == ["input_ids", "labels", "position_ids"]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_logits_equal_separate_logits(tiny_llama, attn_implementation):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn_implementation).eval()
    vocab = model.config.vocab_size
    separate = [torch.randint(3, vocab, (length,)).tolist() for length in (7, 11, 5)]
    dataset = Dataset.from_dict({
        "input_ids": separate, "labels": separate, "length": [len(s) for s in separate],
        "num_trained": [len(s) for s in separate],
    })  # fmt: skip
    packed = pack_dataset(dataset, max_length=32)
    assert len(packed) == 1 and packed[0]["num_samples"] == 3
    batch = PackedCollator(pad_token_id=0, fallback=None, pad_to_multiple_of=8)(
        training_columns(packed).to_list()
    )  # 23 tokens padded to 24: the padding is a fourth, dummy sequence
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[
            0
        ]
        start, worst = 0, 0.0
        for sample in split_row(packed[0]):
            alone = model(input_ids=torch.tensor([sample["input_ids"]]), use_cache=False).logits[0]
            end = start + len(sample["input_ids"])
            worst = max(worst, (packed_logits[start:end] - alone).abs().max().item())
            start = end
        # Control: one running position sequence makes it one causal sequence, and the later samples change.
        leaking = model(input_ids=batch["input_ids"], position_ids=torch.arange(24)[None], use_cache=False).logits[0]
    print(f"{attn_implementation}: packed vs separate max abs logit difference {worst:.3g}")
    assert worst <= 1e-4
    assert (leaking[:23] - packed_logits[:23]).abs().max() > 1e-2


def test_packed_qlora_run_trains(tiny_llama, tmp_path):
    out = tmp_path / "packed-qlora"
    result = run_train(
        "--model_id", str(tiny_llama), "--train_data", SAMPLE_CHAT, "--output_dir", str(out),
        "--sample_packing", "true", "--use_qlora", "true", "--learning_rate", "0.005",
        "--max_steps", "20", "--per_device_train_batch_size", "4", "--max_num_samples", "200", "--max_length", "128",
        "--logging_steps", "4", "--save_strategy", "no", "--eval_strategy", "steps", "--eval_steps", "10",
        "--eval_size", "0.1", "--report_to", "none", "--warmup_steps", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "packing efficiency" in result.stdout + result.stderr
    losses = logged_losses(out)
    assert len(losses) >= 4, losses
    assert losses[-1] < 0.8 * losses[0], losses
    assert logged_losses(out, "eval_loss")
