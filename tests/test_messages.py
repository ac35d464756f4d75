"""Honest start-up errors: a missing local model directory and an unreachable Hub are reported at once, exit 2."""

import os
import subprocess
import time

import pytest
from conftest import PYTHON_TRAIN, REPO, SAMPLE_CHAT

import model_utils
from model_utils import ModelLoadError, load_model_config, looks_like_local_path
from options import ModelArguments

UNREACHABLE_HUB = "http://127.0.0.1:9"  # loopback, discard port: refused at once, nothing leaves the machine


@pytest.mark.parametrize("model_id", ["sample_data/no-such-model", "./no-such-model", "/no/such/model", "a/b/c"])
def test_a_missing_local_directory_fails_at_once(model_id):
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model_config(ModelArguments(model_id=model_id))
    assert time.perf_counter() - started < 1


def test_hub_ids_are_not_mistaken_for_paths():
    assert not looks_like_local_path("meta-llama/Llama-3.1-8B")  # no local meta-llama/ directory
    assert not looks_like_local_path("gpt2")
    assert looks_like_local_path("sample_data/model")  # sample_data/ is a local directory


def test_an_unreachable_hub_is_reported_within_seconds(monkeypatch):
    """huggingface_hub alone retries a refused connection for about 25 s (1+2+4+8+8 s) before failing."""
    monkeypatch.setattr(model_utils.hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(model_utils.hub_constants, "ENDPOINT", UNREACHABLE_HUB)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match=f"cannot reach the Hugging Face Hub at {UNREACHABLE_HUB}"):
        load_model_config(ModelArguments(model_id="some-org/some-model-that-is-not-cached"))
    assert time.perf_counter() - started < 5


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("model_id", "message"),
    [
        ("sample_data/no-such-model", "--model_id sample_data/no-such-model: no such directory"),
        ("some-org/not-cached", "cannot reach the Hugging Face Hub"),
    ],
)
def test_train_py_exits_2_without_a_traceback(tmp_path, model_id, message):
    """`python train.py`: accelerate launch turns every failure into exit code 1."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update({"HF_ENDPOINT": UNREACHABLE_HUB, "TOKENIZERS_PARALLELISM": "false"})
    result = subprocess.run(
        [*PYTHON_TRAIN, "--model_id", model_id,
         "--train_data", SAMPLE_CHAT, "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 2 and message in output and "Traceback" not in output, output[-3000:]
    assert "Retrying in" not in output
    assert not (tmp_path / "out").exists()  # nothing created
