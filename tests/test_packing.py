"""Sample packing: rows, labels and positions on literal inputs; packed logits equal separate logits; a packed run."""

import signal
from collections import Counter

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from conftest import REPO, logged_losses, run_train
from datasets import Dataset
from test_checkpoints import assert_same_losses, interrupt, step_losses, train
from torch.utils.data import BatchSampler, RandomSampler
from transformers import AutoModelForCausalLM

from data_utils import DataArguments, build_collator, training_columns
from model_utils import ModelArguments, load_tokenizer
from packing import (
    IGNORE_INDEX,
    PACKED_SDPA,
    PackedCollator,
    first_fit_decreasing,
    pack_dataset,
    packing_efficiency,
    split_rows_to_multiple,
)

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
    assert packing_efficiency(lengths, 8, len(rows)) == pytest.approx(18 / 24)
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


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", PACKED_SDPA])
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


def test_rows_split_to_a_multiple_keep_every_sample_once():
    rows = first_fit_decreasing([5, 4, 3, 3, 2, 1], 8)  # [[0, 2], [1, 3, 5], [4]]
    assert split_rows_to_multiple(rows, 4) == [[0, 2], [1, 3], [4], [5]]
    assert split_rows_to_multiple(rows, 3) == rows
    assert split_rows_to_multiple([[0], [1], [2]], 2) == [[0], [1], [2]]  # nothing to split: left as is


@pytest.mark.parametrize("processes, batch_size", [(2, 3), (3, 2), (2, 1)])
def test_each_packed_sample_reaches_exactly_one_process_per_epoch(processes, batch_size):
    """accelerate's own sharding of the Trainer's batches: without the split it repeats rows to even out processes."""
    lengths = [(37 * i) % 29 + 1 for i in range(101)]
    packed = pack_dataset(samples(lengths), 32, rows_multiple=processes * batch_size)
    seen = Counter()
    for rank in range(processes):
        # Every process draws the same permutation (accelerate synchronises the sampler's seed).
        batches = BatchSampler(RandomSampler(packed, generator=torch.Generator().manual_seed(0)), batch_size, False)
        for batch in BatchSamplerShard(batches, processes, rank, even_batches=True):
            assert len(batch) == batch_size
            for index in batch:
                seen.update(tuple(sample["input_ids"]) for sample in split_row(packed[index]))
    assert seen == Counter(tuple(ids) for ids in samples(lengths)["input_ids"])


PACKED_RUN = [
    "--sample_packing", "true", "--max_num_samples", "240", "--max_length", "128", "--learning_rate", "0.003",
    "--max_steps", "10", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3",
    "--eval_strategy", "no", "--eval_size", "0", "--report_to", "none", "--dataloader_num_workers", "0",
    "--warmup_steps", "0",
]  # fmt: skip


def packed_args(model, output_dir, *extra) -> list[str]:
    return ["--model_id", str(model), "--train_data", SAMPLE_CHAT, "--output_dir", str(output_dir), *PACKED_RUN,
            *extra]  # fmt: skip


def test_gradient_accumulation_optimises_the_same_loss(tiny_llama, tmp_path):
    """Loss is the mean over the trained tokens of the whole optimizer step: 2 x 2 accumulated rows train like 4."""
    one_batch = train(packed_args(tiny_llama, tmp_path / "b4", "--per_device_train_batch_size", "4"))
    assert one_batch.returncode == 0, one_batch.stderr[-3000:]
    accumulated = train(
        packed_args(tiny_llama, tmp_path / "b2x2", "--per_device_train_batch_size", "2",
                    "--gradient_accumulation_steps", "2")
    )  # fmt: skip
    assert accumulated.returncode == 0, accumulated.stderr[-3000:]
    expected, losses = step_losses(tmp_path / "b4"), step_losses(tmp_path / "b2x2")
    assert sorted(losses) == sorted(expected) == list(range(1, 11))
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, abs=1e-4), (step, losses[step], loss)
    assert expected[10] < expected[1]


def test_packed_lora_run_resumes_exactly_after_sigterm(tiny_llama, tmp_path):
    lora = ["--use_lora", "true", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    reference = train(packed_args(tiny_llama, tmp_path / "reference", *lora))
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "run"
    code, output = interrupt(packed_args(tiny_llama, out, *lora), 4, [signal.SIGTERM])
    assert code == 143, output[-3000:]
    resumed = train(packed_args(tiny_llama, out, *lora, "--resume_from_checkpoint", "true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout + resumed.stderr
    assert_same_losses(step_losses(out), step_losses(tmp_path / "reference"))


def test_packed_ddp_run_trains_on_two_processes(tiny_llama, tmp_path):
    out = tmp_path / "ddp"
    result = run_train(
        *packed_args(tiny_llama, out, "--use_ddp", "true", "--use_cpu", "true", "--use_lora", "true",
                     "--per_device_train_batch_size", "2", "--learning_rate", "0.01"),
        num_processes=2,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    losses = logged_losses(out)
    assert len(losses) == 10 and losses[-1] < 0.8 * losses[0], losses
