"""Sample packing: rows, labels and positions on literal inputs; packed logits equal separate logits; a packed run."""

import functools
import runpy
import signal
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from conftest import (
    FAST,
    REPO,
    SAMPLE_CHAT,
    assert_ok,
    assert_refused,
    assert_same_step_losses,
    interrupt,
    logged_losses,
    run_python_train,
    step_losses,
    train_ok,
)
from datasets import Dataset
from torch.utils.data import BatchSampler, RandomSampler
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    LlamaConfig,
    MambaConfig,
    MistralConfig,
    TrainingArguments,
)
from transformers.masking_utils import find_packed_sequence_indices
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

import attention
import packing
from attention import (
    PACKED_SDPA,
    VARLEN,
    attention_implementation,
    attention_problems,
    flattens_batches,
    register_packed_attention,
    training_attention,
)
from data_utils import build_collator, training_columns
from model_utils import load_tokenizer
from options import DataArguments, ModelArguments
from packing import (
    IGNORE_INDEX,
    FlattenedCollator,
    PackedCollator,
    first_fit_decreasing,
    pack_dataset,
    packing_efficiency,
    split_rows_to_multiple,
)


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
    assert packing_efficiency(sum(lengths), 8 * len(rows)) == pytest.approx(18 / 24)
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
    flattening = build_collator(args, tokenizer, 64, flattened=True)
    assert isinstance(flattening, FlattenedCollator)
    for each in (collator, flattening):
        plain = each([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [5], "labels": [5]}])
        assert plain["attention_mask"].tolist() == [[1, 1, 1] + [0] * 5, [1] + [0] * 7]
    packed = training_columns(pack_dataset(samples([3, 2]), 8))
    assert packed.column_names == ["input_ids", "labels", "position_ids"]


@pytest.mark.e2e
def test_packed_qlora_run_trains(tiny_llama, tmp_path):
    out = tmp_path / "packed-qlora"
    result = train_ok(
        "--model_id", str(tiny_llama), "--train_data", SAMPLE_CHAT, "--output_dir", str(out), *FAST,
        "--sample_packing", "true", "--use_qlora", "true", "--learning_rate", "0.005",
        "--max_steps", "20", "--per_device_train_batch_size", "4", "--max_num_samples", "200",
        "--logging_steps", "4", "--eval_strategy", "steps", "--eval_steps", "10", "--eval_size", "0.1",
    )  # fmt: skip
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
    *FAST, "--sample_packing", "true", "--max_num_samples", "240", "--learning_rate", "0.003", "--max_steps", "10",
    "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3", "--dataloader_num_workers", "0",
]  # fmt: skip
ONE_BATCH = ["--per_device_train_batch_size", "4"]
ACCUMULATED = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]


def packed_args(model, output_dir, *extra) -> list[str]:
    return ["--model_id", str(model), "--train_data", SAMPLE_CHAT, "--output_dir", str(output_dir), *PACKED_RUN,
            *extra]  # fmt: skip


@pytest.mark.e2e
def test_gradient_accumulation_optimises_the_same_loss(tiny_llama, tmp_path):
    """Loss is the mean over the trained tokens of the whole optimizer step: 2 x 2 accumulated rows train like 4."""
    assert_ok(run_python_train(*packed_args(tiny_llama, tmp_path / "b4", *ONE_BATCH)))
    assert_ok(run_python_train(*packed_args(tiny_llama, tmp_path / "b2x2", *ACCUMULATED)))
    expected, losses = step_losses(tmp_path / "b4"), step_losses(tmp_path / "b2x2")
    assert sorted(losses) == sorted(expected) == list(range(1, 11))
    assert_same_step_losses(losses, expected, abs_tolerance=1e-4)
    assert expected[10] < expected[1]


@pytest.mark.e2e
def test_packed_lora_run_resumes_exactly_after_sigterm(tiny_llama, tmp_path):
    lora = [*ACCUMULATED, "--use_lora", "true"]
    reference = tmp_path / "reference"
    assert_ok(run_python_train(*packed_args(tiny_llama, reference, *lora)))
    out = tmp_path / "run"
    code, output = interrupt(packed_args(tiny_llama, out, *lora), 4, [signal.SIGTERM])
    assert code == 143, output[-3000:]
    resumed = assert_ok(run_python_train(*packed_args(tiny_llama, out, *lora, "--resume_from_checkpoint", "true")))
    assert "Resuming from" in resumed.stdout + resumed.stderr
    assert_same_step_losses(step_losses(out), step_losses(reference))


@pytest.mark.e2e
def test_packed_ddp_run_trains_on_two_processes(tiny_llama, tmp_path):
    out = tmp_path / "ddp"
    train_ok(
        *packed_args(tiny_llama, out, "--use_ddp", "true", "--use_cpu", "true", "--use_lora", "true",
                     "--per_device_train_batch_size", "2", "--learning_rate", "0.01"),
        num_processes=2,
    )  # fmt: skip
    losses = logged_losses(out)
    assert len(losses) == 10 and losses[-1] < 0.8 * losses[0], losses


# Attention backends: every choice that runs on CPU gives a packed batch the logits of its samples run alone.


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                          enable_gqa=False):  # fmt: skip
    """torch.nn.attention.varlen.varlen_attn (CUDA only) computed another way on CPU: SDPA on each segment of the
    flattened [tokens, heads, dim] tensors, the segment's window as an explicit mask. Same signature and defaults."""
    segments_q, segments_k = cu_seq_q.tolist(), cu_seq_k.tolist()
    lengths = [end - start for start, end in zip(segments_q, segments_q[1:], strict=False)]
    assert isinstance(max_q, int) and max_q == max(lengths) and max_k == max_q and segments_k == segments_q
    outputs = []
    for start, end in zip(segments_q, segments_q[1:], strict=False):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        i, j = torch.arange(end - start)[:, None], torch.arange(end - start)[None]
        allowed = torch.ones(end - start, end - start, dtype=torch.bool)
        if window_size[0] >= 0:
            allowed &= j >= i - window_size[0]
        if window_size[1] >= 0:
            allowed &= j <= i + window_size[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=scale, enable_gqa=enable_gqa
        )
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


def small_model(architecture: str, attn_implementation: str):
    """A random model built in memory with grouped-query attention (4 query heads, 2 key/value heads); Mistral with
    a sliding window shorter than some samples."""
    torch.manual_seed(0)
    shape = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip
    if architecture == "mistral":
        config = MistralConfig(**shape, sliding_window=6)
    else:
        config = LlamaConfig(**shape)
    config._attn_implementation = attn_implementation
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


SAMPLE_LENGTHS = (7, 11, 5, 9, 3, 12)


def packed_rows_of(lengths, max_length=24):
    torch.manual_seed(1)
    separate = [torch.randint(3, 128, (length,)).tolist() for length in lengths]
    dataset = Dataset.from_dict({
        "input_ids": separate, "labels": separate, "length": list(lengths), "num_trained": list(lengths),
    })  # fmt: skip
    packed = pack_dataset(dataset, max_length=max_length)
    assert len(packed) > 1 and max(packed["num_samples"]) > 1  # several rows, several samples per row
    return packed


def alone_logits(model, packed) -> list[torch.Tensor]:
    """Every sample run alone, in the order of the packed rows."""
    with torch.no_grad():
        return [
            model(input_ids=torch.tensor([sample["input_ids"]]), use_cache=False).logits[0]
            for row in packed for sample in split_row(row)
        ]  # fmt: skip


def flattened_batch(packed) -> dict:
    return FlattenedCollator(pad_token_id=0, fallback=None, pad_to_multiple_of=8)(training_columns(packed).to_list())


def worst_difference(logits: torch.Tensor, alone: list[torch.Tensor]) -> float:
    """Largest logit difference between a flattened batch's samples and the same samples alone."""
    start, worst = 0, 0.0
    for sample in alone:
        worst = max(worst, (logits[start : start + len(sample)] - sample).abs().max().item())
        start += len(sample)
    return worst


def test_flattened_batch_boundaries_are_what_transformers_finds():
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [3, 4], "labels": [-100, 4], "position_ids": [0, 1]},
    ]
    batch = FlattenedCollator(pad_token_id=0, fallback=None, pad_to_multiple_of=4)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 4, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, 4, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0]]  # the padding is a sequence of its own
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 8] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 3 and isinstance(batch["max_length_q"], int)
    assert batch["sample_lengths"] == (3, 2, 2, 1)
    # transformers' own detection (flash attention's and the mask's) finds the same samples in the flattened row.
    assert _is_packed_sequence(batch["position_ids"], batch_size=1)
    (cu_seq_lens, _), (max_length, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert cu_seq_lens.tolist() == batch["cu_seq_lens_q"].tolist() and max_length == 3
    assert find_packed_sequence_indices(batch["position_ids"]).tolist() == [[0, 0, 0, 1, 1, 2, 2, 3]]
    # The bug this layout avoids: with two rows per batch flash attention's detection finds no packed sequence.
    rows_batch = PackedCollator(pad_token_id=0, fallback=None)(rows)
    assert not _is_packed_sequence(rows_batch["position_ids"], batch_size=2)
    # --pad_to_max_length: rows x max_length tokens, the padding one more sequence.
    static = FlattenedCollator(pad_token_id=0, fallback=None, pad_to_multiple_of=4, row_length=6)(rows)
    assert static["input_ids"].shape == (1, 12) and static["sample_lengths"] == (3, 2, 2, 5)


@pytest.mark.parametrize("architecture", ["llama", "mistral"])
@pytest.mark.parametrize("backend", ["sdpa", VARLEN, "eager", "sdpa-rows"])
def test_every_cpu_backend_gives_packed_samples_their_logits_alone(monkeypatch, architecture, backend):
    """sdpa: packed_sdpa on the flattened batch; varlen: our varlen attention function with torch's CUDA kernel
    replaced by the CPU reference above; eager: rows kept apart, transformers' block-diagonal mask; sdpa-rows:
    packed_sdpa on rows without the collator's boundaries (found from position_ids). The reference: each sample
    alone, through the model's standard attention (no packing code involved)."""
    register_packed_attention()
    monkeypatch.setattr(attention, "varlen_attn", reference_varlen_attn)
    packed = packed_rows_of(SAMPLE_LENGTHS)
    standard = "eager" if backend == "eager" else "sdpa"
    alone = alone_logits(small_model(architecture, standard), packed)
    model = small_model(architecture, standard)
    model.set_attn_implementation(training_attention({"sdpa-rows": "sdpa"}.get(backend, backend), packing=True))
    with torch.no_grad():
        if flattens_batches(backend):
            logits = model(**flattened_batch(packed), use_cache=False).logits[0]
        else:
            batch = PackedCollator(pad_token_id=0, fallback=None)(training_columns(packed).to_list())
            rows = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            logits = torch.cat([rows[i, : len(row)] for i, row in enumerate(packed["input_ids"])])
    worst = worst_difference(logits, alone)
    print(f"{architecture} {backend}: packed vs alone max abs logit difference {worst:.3g}")
    assert worst <= 1e-5


def test_negative_controls_leak_across_samples(monkeypatch):
    """The logit check catches a packed batch that lets samples see each other: a flash-style single row without
    boundaries (one segment), and a varlen call that is not causal."""
    register_packed_attention()
    packed = packed_rows_of(SAMPLE_LENGTHS)
    alone = alone_logits(small_model("llama", "sdpa"), packed)
    model = small_model("llama", "sdpa")
    model.set_attn_implementation(VARLEN)
    batch = flattened_batch(packed)
    total = batch["input_ids"].shape[1]
    one_segment = torch.tensor([0, total], dtype=torch.int32)
    no_boundaries = {**batch, "cu_seq_lens_q": one_segment, "cu_seq_lens_k": one_segment, "max_length_q": total,
                     "max_length_k": total}  # fmt: skip
    monkeypatch.setattr(attention, "varlen_attn", reference_varlen_attn)
    with torch.no_grad():
        leaking = model(**no_boundaries, use_cache=False).logits[0]
    not_causal = functools.partial(reference_varlen_attn, window_size=(-1, -1))
    monkeypatch.setattr(attention, "varlen_attn", lambda *args, window_size, **kwargs: not_causal(*args, **kwargs))
    with torch.no_grad():
        bidirectional = model(**batch, use_cache=False).logits[0]
    assert worst_difference(leaking, alone) > 1e-2
    assert worst_difference(bidirectional, alone) > 1e-2


def test_packed_sdpa_gradients_equal_the_samples_alone():
    """The split backward of packed_sdpa: the summed loss of a flattened batch has the gradient of the samples'
    losses summed one by one."""
    register_packed_attention()
    packed = packed_rows_of(SAMPLE_LENGTHS)
    model = small_model("llama", "sdpa")
    for row in packed:
        for sample in split_row(row):
            ids = torch.tensor([sample["input_ids"]])
            model(input_ids=ids, labels=ids, use_cache=False).loss.mul(len(sample["input_ids"]) - 1).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_attn_implementation(PACKED_SDPA)
    batch = flattened_batch(packed)
    input_ids = batch["input_ids"]
    labels = torch.where(batch["labels"] == IGNORE_INDEX, IGNORE_INDEX, input_ids)  # every token but the firsts
    output = model(**{**batch, "labels": labels}, use_cache=False)
    output.loss.mul((labels[0, 1:] != IGNORE_INDEX).sum()).backward()
    for param, grad in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad, grad, atol=1e-5, rtol=1e-4)


def refused(tmp_path, *flags: str, model: Path | str = "unused/model") -> str:
    """`python train.py` with these flags: exit 2, no traceback, nothing created; returns the output."""
    out = tmp_path / "out"
    result = run_python_train("--model_id", str(model), "--train_data", SAMPLE_CHAT, "--output_dir", str(out),
                              "--report_to", "none", *flags)  # fmt: skip
    output = assert_refused(result)
    assert not out.exists()
    return output


@pytest.mark.e2e
def test_combinations_that_cannot_run_or_would_leak_are_refused_before_loading(tmp_path):
    """Argument problems are all reported together, before the model config is even read (the model id is bogus)."""
    output = refused(
        tmp_path, "--attn_implementation", "flash_attention_2", "--sample_packing", "true", "--use_cache", "true"
    )
    assert "flash_attention_2 needs the flash-attn package" in output and "bf16/fp16 only" in output
    assert "--use_cache true with --sample_packing true" in output and "samples attend to each other" in output


@pytest.mark.e2e
def test_packing_is_refused_for_a_model_that_ignores_the_boundaries(tmp_path):
    """Mamba's recurrent layers carry state from one packed sample into the next: refused from its config alone."""
    mamba = tmp_path / "mamba"
    MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1).save_pretrained(mamba)
    output = refused(tmp_path, "--sample_packing", "true", model=mamba)
    assert "mamba models do not route attention through transformers' attention interface" in output


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        ({"attn_implementation": "varlen"}, "add --sample_packing true"),
        ({"attn_implementation": "varlen"}, "varlen needs a CUDA GPU and torch >= 2.10"),
        ({"attn_implementation": "eager", "use_flash_attention": True}, "contradicts --attn_implementation eager"),
        ({"attn_implementation": "flash_attention_2"}, "needs the flash-attn package and a CUDA GPU"),
    ],
)
def test_attention_problems(flags, problem):
    model_args = ModelArguments(model_id="m", **flags)
    problems = attention_problems(model_args, TrainingArguments(output_dir="unused", use_cpu=True), packing=False)
    assert any(problem in p for p in problems), problems


def set_available(monkeypatch, name: str, available: bool) -> None:
    """Pretend this machine has (or lacks) what backend `name` needs."""
    monkeypatch.setitem(attention.BACKENDS, name, replace(attention.BACKENDS[name], available=lambda: available))


@pytest.mark.parametrize(
    ("cuda", "flash_attn", "bf16", "packing", "expected"),
    [
        (False, False, False, True, "sdpa"),
        (True, True, True, True, "flash_attention_2"),
        (True, False, True, True, VARLEN),
        (True, False, True, False, "sdpa"),  # varlen runs packed batches only
        (True, True, False, True, "sdpa"),  # flash kernels need 16-bit
    ],
)
def test_auto_picks_the_fastest_exact_backend(monkeypatch, cuda, flash_attn, bf16, packing, expected):
    monkeypatch.setattr(attention, "uses_cuda", lambda training_args: cuda)
    set_available(monkeypatch, "flash_attention_2", flash_attn)
    set_available(monkeypatch, VARLEN, cuda)
    training_args = TrainingArguments(output_dir="unused", use_cpu=True)
    training_args.bf16 = bf16
    chosen = attention_implementation(ModelArguments(model_id="m"), training_args, packing, LlamaConfig())
    assert chosen == expected
    # The old switch still asks for flash attention, and falls back to auto where flash-attn is missing.
    old = attention_implementation(ModelArguments(model_id="m", use_flash_attention=True), training_args, packing,
                                   LlamaConfig())  # fmt: skip
    assert old == ("flash_attention_2" if cuda and flash_attn else expected)


def test_importing_registers_no_attention_function(monkeypatch):
    """Only a run that packs registers packed_sdpa / varlen (packed_attention), not importing attention.py or
    packing.py."""
    for name in (PACKED_SDPA, VARLEN):
        monkeypatch.delitem(AttentionInterface._global_mapping, name, raising=False)
    for module in ("attention.py", "packing.py"):
        runpy.run_path(str(REPO / module))  # the module's import-time code, in a fresh namespace
    assert not {PACKED_SDPA, VARLEN} & set(AttentionInterface._global_mapping)
    register_packed_attention()
    assert {PACKED_SDPA, VARLEN} <= set(AttentionInterface._global_mapping)


@pytest.mark.parametrize(("num_samples", "mu", "sigma"), [(2000, 5.5, 0.8), (400, 6.5, 0.5)])
def test_flattened_batches_compute_real_tokens_on_long_tailed_data(num_samples, mu, sigma):
    """Log-normal lengths up to max_length 1024 (the second set: two thirds of the samples over half a row, so no
    packing into rows of 1024 can fill them), two processes x 4 rows per batch, accelerate's own sharding.
    Efficiency measured on the collated batches: real tokens / tokens the model receives."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(mu, sigma, num_samples).astype(int), 2, 1024).tolist()
    dataset = samples(lengths)
    packed = pack_dataset(dataset, 1024, rows_multiple=8, flattened=True)
    assert pack_dataset(dataset, 1024, rows_multiple=8, flattened=True)["input_ids"] == packed["input_ids"]
    collator = FlattenedCollator(pad_token_id=0, fallback=None, pad_to_multiple_of=8)
    rows = training_columns(packed)
    seen, computed = Counter(), 0
    for rank in range(2):
        batches = BatchSampler(RandomSampler(rows, generator=torch.Generator().manual_seed(0)), 4, False)
        for batch in BatchSamplerShard(batches, 2, rank, even_batches=True):
            collated = collator([rows[index] for index in batch])
            computed += collated["input_ids"].numel()
            ids = collated["input_ids"][0].tolist()
            starts = collated["cu_seq_lens_q"].tolist()
            seen.update(tuple(ids[a:b]) for a, b in zip(starts, starts[1:], strict=False) if ids[a] != 0)
    assert seen == Counter(tuple(ids) for ids in dataset["input_ids"])  # every sample exactly once
    efficiency = sum(lengths) / computed
    rows_apart = packing_efficiency(sum(lengths), 1024 * len(packed))  # the same rows, each padded to 1024
    print(f"{num_samples} samples: flattened {efficiency:.4f}, rows kept apart at most {rows_apart:.4f}")
    assert efficiency >= 0.97
    assert efficiency == pytest.approx(packing.rows_efficiency(packed), abs=0.005)  # the logged figure


def test_packed_sdpa_on_batches_without_boundaries_is_plain_attention():
    """An unpacked batch (a padded one with its mask, and one without any mask, longer than the sliding window)
    gives packed_sdpa the logits of transformers' SDPA."""
    register_packed_attention()
    reference, model = small_model("mistral", "sdpa"), small_model("mistral", "sdpa")
    model.set_attn_implementation(PACKED_SDPA)
    torch.manual_seed(2)
    input_ids = torch.randint(3, 128, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    with torch.no_grad():
        for mask in (None, attention_mask):
            expected = reference(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            torch.testing.assert_close(logits[:, :9], expected[:, :9], atol=1e-5, rtol=1e-5)
