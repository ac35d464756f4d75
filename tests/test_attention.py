"""The attention-backend registry (attention.py) is the one place a backend is defined: the --attn_implementation
choices and help, the refusals, `auto` and the packed-training switch all follow BACKENDS, so a backend added there
alone is selected, refused and trained with (and a packed batch keeps its samples apart only if its function does)."""

import itertools
import typing
from dataclasses import fields

import pytest
import torch
from conftest import parse_options
from test_packing import SAMPLE_LENGTHS, alone_logits, flattened_batch, packed_rows_of, small_model, worst_difference
from transformers import AttentionInterface, LlamaConfig, TrainingArguments
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

import attention
import options
from attention import (
    BACKENDS,
    CHOICES,
    Backend,
    attention_implementation,
    attention_problems,
    flattens_batches,
    generation_attention,
    loaded_attention,
    packed_attention,
    packed_sdpa_attention_forward,
    training_attention,
)
from options import ModelArguments


def choosing(attn_implementation: str = "auto") -> ModelArguments:
    return ModelArguments(model_id="m", attn_implementation=attn_implementation)


def cpu_args(bf16: bool = False) -> TrainingArguments:
    training_args = TrainingArguments(output_dir="unused", use_cpu=True)
    training_args.bf16 = bf16  # set after construction: TrainingArguments refuses bf16 on some CPUs
    return training_args


def test_option_choices_and_help_follow_the_registry():
    option = next(f for f in fields(ModelArguments) if f.name == "attn_implementation")
    assert typing.get_args(option.type) == CHOICES == ("auto", *BACKENDS)
    text = " ".join(options.build_parser().format_help().split())  # argparse wraps the help to the terminal
    assert f"--attn_implementation {{{','.join(CHOICES)}}}" in text
    assert attention.OPTION_HELP in text


def test_a_value_outside_the_registry_is_refused_by_the_parser(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_options(monkeypatch, "--model_id", "m", "--train_data", "d.jsonl", "--attn_implementation", "flex")
    assert exited.value.code == 2
    assert "--attn_implementation/--attn-implementation: invalid choice: 'flex'" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "packing", "bf16"), list(itertools.product(BACKENDS, [False, True], [False, True])))
def test_refusals_on_this_cpu_follow_each_entry(name, packing, bf16):
    """On a CPU a backend is refused exactly when its entry says it needs CUDA or its availability check fails, it
    is packing-only and the run does not pack, or it is 16-bit only and the run is fp32; every refusal names the
    flag. `auto` never resolves to a refused backend."""
    backend = BACKENDS[name]
    problems = attention_problems(choosing(name), cpu_args(bf16), packing)
    cannot_run = backend.needs_cuda or (backend.available is not None and not backend.available())
    refused = cannot_run or (backend.packing_only and not packing) or (backend.half_precision_only and not bf16)
    assert bool(problems) == refused, problems
    assert all(problem.startswith(f"--attn_implementation {name} ") for problem in problems)
    chosen = attention_implementation(choosing(), cpu_args(bf16), packing, LlamaConfig())
    assert not attention_problems(choosing(chosen), cpu_args(bf16), packing)


def register_only_in_the_registry(monkeypatch, backend: Backend) -> None:
    """Add `backend` to BACKENDS for this test only; what its use registers with transformers is removed after."""
    monkeypatch.setitem(BACKENDS, backend.name, backend)
    for interface in (AttentionInterface, AttentionMaskInterface):
        monkeypatch.setitem(interface._global_mapping, backend.name, None)  # undone: the name is deleted again


# A new CPU backend: sdpa's packed attention under another name, preferred by `auto`.
ALIAS = Backend("sdpa_alias", loaded_as="sdpa", flattens_batches=True, forward=packed_sdpa_attention_forward,
                auto_rank=-1)  # fmt: skip


def test_a_backend_added_to_the_registry_alone_is_selected_and_refused_by_its_entry(monkeypatch):
    register_only_in_the_registry(monkeypatch, ALIAS)
    gpu_only = Backend("gpu_alias", needs_cuda=True, needs="a CUDA GPU", instead="use sdpa_alias.")
    register_only_in_the_registry(monkeypatch, gpu_only)
    for packing in (False, True):
        assert not attention_problems(choosing("sdpa_alias"), cpu_args(), packing)
        assert attention_implementation(choosing(), cpu_args(), packing, LlamaConfig()) == "sdpa_alias"
    refused = attention_problems(choosing("gpu_alias"), cpu_args(), True)
    assert refused == ["--attn_implementation gpu_alias needs a CUDA GPU; use sdpa_alias."]
    assert flattens_batches("sdpa_alias") and loaded_attention("sdpa_alias") == "sdpa"
    assert training_attention("sdpa_alias", packing=True) == "sdpa_alias"


def test_generation_leaves_a_packed_training_implementation_for_its_backends_loaded_one(monkeypatch):
    assert generation_attention("packed_sdpa") == "sdpa"
    assert [generation_attention(name) for name in ("sdpa", "varlen", "eager")] == ["sdpa", "varlen", "eager"]
    register_only_in_the_registry(monkeypatch, Backend("sdpa_alias", loaded_as="eager", packed_training="alias_rows"))
    assert generation_attention("alias_rows") == "eager" and generation_attention("sdpa_alias") == "sdpa_alias"


@pytest.mark.parametrize(("forward", "keeps_samples_apart"), [(packed_sdpa_attention_forward, True),
                                                              (sdpa_attention_forward, False)])  # fmt: skip
def test_a_backend_added_to_the_registry_alone_trains_packed_batches_with_its_function(
    monkeypatch, forward, keeps_samples_apart
):
    """packed_attention switches the model (loaded as the entry says) to the new backend's function and back. With
    packed_sdpa's function each packed sample gets its logits alone; the negative control, transformers' SDPA without
    the collator's boundaries, lets the samples of a flattened row see each other."""
    register_only_in_the_registry(monkeypatch, Backend(ALIAS.name, loaded_as="sdpa", flattens_batches=True,
                                                       forward=forward))  # fmt: skip
    packed = packed_rows_of(SAMPLE_LENGTHS)
    alone = alone_logits(small_model("llama", "sdpa"), packed)
    model = small_model("llama", loaded_attention(ALIAS.name))
    with packed_attention(model, ALIAS.name, packing=True), torch.no_grad():
        assert model.config._attn_implementation == ALIAS.name
        logits = model(**flattened_batch(packed), use_cache=False).logits[0]
    assert model.config._attn_implementation == "sdpa"  # generation and the saved model see the loaded one
    assert (worst_difference(logits, alone) <= 1e-5) == keeps_samples_apart
