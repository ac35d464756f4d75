"""Shared test helpers: tiny models built locally once per session, the runners of the real entry point, and readers
of what a run leaves behind.

Two layers: unit tests on literal inputs (in this process), and end-to-end tests, marked `e2e`, that launch train.py or
a script of the repository as a subprocess. `pytest -m "not e2e"` runs the first layer alone; a test outside the
e2e layer that launches an entry point fails (see `entry_points_need_the_e2e_marker`)."""

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# Training runs cache prepared data under $HF_HOME: keep it out of the user's home, fresh for every session.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="llm-finetune-tests-")
sys.path.insert(0, str(REPO))

SAMPLE_CHAT = str(REPO / "sample_data" / "chat.jsonl")
SAMPLE_CHAT_EVAL = str(REPO / "sample_data" / "chat_eval.jsonl")
# What every quick run of train.py shares: short rows, and no checkpoint, evaluation, tracker or warm-up unless the
# test adds the flag after these (the last value of a flag wins).
FAST = [
    "--max_length", "128", "--save_strategy", "no", "--eval_strategy", "no", "--eval_size", "0",
    "--report_to", "none", "--warmup_steps", "0",
]  # fmt: skip
# One thread per process. The tiny models gain nothing from a second one, which on a loaded 2-core machine spins
# waiting for a busy core: a 20-step run trained in 34 s with 2 threads and 2.4 s with 1, with the same losses.
# Runs compared step by step need one thread count anyway: the float reduction order, and so the losses, follow it.
RUN_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
torch.set_num_threads(1)
# How the single-process launchers run it: `accelerate launch` turns exit code 2 into 1, and forwards SIGTERM only
# with several processes.
PYTHON_TRAIN = [sys.executable, str(REPO / "train.py")]


def launch_command(num_processes: int = 1) -> list[str]:
    """`accelerate launch` for one process, or DDP over `num_processes` CPU processes (gloo)."""
    processes = (
        ["--multi_gpu", "--num_processes", str(num_processes)] if num_processes > 1 else ["--num_processes", "1"]
    )
    return [sys.executable, "-m", "accelerate.commands.launch", "--quiet", *processes, "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train.py")]  # fmt: skip


def build_tiny_model(output_dir: Path, *flags: str) -> Path:
    """scripts/make_tiny_model.py in this process (its libraries are loaded here already), leaving the global RNG as
    it was."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "scripts" / "make_tiny_model.py")
    make_tiny_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tiny_model)
    with torch.random.fork_rng(devices=[]):
        make_tiny_model.build(make_tiny_model.parse_args(["--output_dir", str(output_dir), *flags]))
    return output_dir


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama architecture, ChatML template, with a pad token: the quickstart's model."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """GPT-2 architecture (Conv1D layers), Llama-3 style template, no pad token: the 'other model' case."""
    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-gpt2", "--architecture", "gpt2", "--chat_template", "llama3",
        "--no_pad_token",
    )  # fmt: skip


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gpt2"])
def tokenizer(request):
    """Each tiny model's tokenizer as train.py loads it (the GPT-2 one gains a pad token)."""
    from model_utils import load_tokenizer
    from options import ModelArguments

    return load_tokenizer(ModelArguments(model_id=str(request.getfixturevalue(request.param))))


def trained_text(tokenizer, sample) -> str:
    """The tokens of a prepared sample that carry a label, decoded."""
    from data_utils import IGNORE_INDEX

    pairs = zip(sample["input_ids"], sample["labels"], strict=True)
    return tokenizer.decode([token for token, label in pairs if label != IGNORE_INDEX])


def parse_options(monkeypatch, *args) -> dict:
    """Parse as `python train.py ARGS` does (train.args, then a config file, then the command line)."""
    import options

    monkeypatch.setattr(sys, "argv", [str(REPO / "train.py"), *args])
    return dict(zip(("model", "data", "lora", "tracking", "training"), options.parse_args(), strict=True))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def pytest_collection_finish(session):
    """The test modules have imported torch, transformers and the rest: millions of objects that live as long as the
    session. Freezing them keeps each gc.collect() from walking them again (accelerate collects at every retry of
    --auto_find_batch_size: about 1 s per call on an unfrozen heap on this 2-core machine)."""
    gc.freeze()


# Running the entry point


def run_command(command: list[str], *args: str, env: dict | None = None, timeout: int = 600):
    environment = {**os.environ, **RUN_ENV, **(env or {})}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, env=environment, cwd=REPO)


def run_train(*args: str, num_processes: int = 1, env: dict | None = None, timeout: int = 600):
    """`accelerate launch train.py ARGS` in a subprocess, as a user runs it, with train.args defaults applied."""
    return run_command(launch_command(num_processes), *args, env=env, timeout=timeout)


def run_python_train(*args: str, env: dict | None = None, timeout: int = 600):
    """`python train.py ARGS`, as the single-process launchers run it."""
    return run_command(PYTHON_TRAIN, *args, env=env, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def train_ok(*args: str, num_processes: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    """run_train that must succeed; the failure shows the end of the run's output."""
    return assert_ok(run_train(*args, num_processes=num_processes, env=env))


def assert_refused(result: subprocess.CompletedProcess, *named: str) -> str:
    """Exit 2 (`python train.py`), no traceback, every text in `named` in the output; returns the output."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    for text in named:
        assert text in output, (text, output[-4000:])
    return output


def interrupt(
    args: list[str], after_step: int, signals: list[signal.Signals], command: list[str] = PYTHON_TRAIN
) -> tuple[int, str]:
    """Run the training command; once `after_step` has been logged send the first signal, and each further one
    once the trainer has acknowledged the previous ("Received SIGTERM"). Return the exit code and the output."""
    process = subprocess.Popen(
        [*command, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **RUN_ENV}, cwd=REPO,
    )  # fmt: skip
    output, logged_steps, sent = [], 0, 0
    for line in process.stdout:
        output.append(line)
        logged_steps += line.count("'loss': ")
        due = logged_steps >= after_step if sent == 0 else f"Received {signals[sent - 1].name}" in line
        if due:
            process.send_signal(signals[sent])
            sent += 1
            if sent == len(signals):
                break
    output.append(process.communicate(timeout=300)[0])
    return process.returncode, "".join(output)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# What a run leaves behind


def log_history(output_dir: Path, key: str = "loss") -> list[dict]:
    """The entries of trainer_state.json's log history that hold `key`."""
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if key in entry]


def logged_losses(output_dir: Path, key: str = "loss") -> list[float]:
    return [entry[key] for entry in log_history(output_dir, key)]


def step_losses(output_dir: Path) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in log_history(output_dir)}


def assert_same_step_losses(resumed: dict[int, float], expected: dict[int, float], abs_tolerance=1e-5) -> None:
    assert sorted(resumed) == sorted(expected)
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, abs=abs_tolerance), (step, resumed[step], loss)


def assert_merged_is_base_plus_adapter(output_dir: Path, base_model: Path, trained_at_least: float = 1e-3) -> None:
    """The merged model in output_dir gives the logits of the base with output_dir/adapter, which training changed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 17, 42, 99, 3]])
    merged = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), output_dir / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted.eval()(ids).logits, atol=1e-4, rtol=1e-4)
        with adapted.disable_adapter():
            assert (merged(ids).logits - adapted(ids).logits).abs().max() > trained_at_least


# train.py's Trainer in this process, for behaviour that needs a Trainer but not the entry point


def trainer_in_process(model_dir: Path, output_dir: Path, lora_args=None, callbacks=(), num_samples=64, eval_size=0,
                       **training):  # fmt: skip
    """train.build_trainer on the tiny model and sample_data/chat.jsonl (rows of at most 128 tokens), built from
    the option dataclasses as train.py builds it, with `training` overriding quick defaults."""
    from transformers import set_seed

    import train
    from data_utils import load_prepared_datasets
    from model_utils import load_model, load_tokenizer
    from options import DataArguments, FinetuneTrainingArguments, LoraArguments, ModelArguments

    quick = {"output_dir": str(output_dir), "use_cpu": True, "report_to": "none", "save_strategy": "no",
             "eval_strategy": "no", "logging_steps": 1, "per_device_train_batch_size": 8, "learning_rate": 0.005,
             "dataloader_num_workers": 0}  # fmt: skip
    training_args = FinetuneTrainingArguments(**{**quick, **training})
    model_args, lora_args = ModelArguments(model_id=str(model_dir)), lora_args or LoraArguments()
    data_args = DataArguments(train_data=SAMPLE_CHAT, max_num_samples=num_samples, eval_size=eval_size,
                              data_cache_dir="none")  # fmt: skip
    tokenizer = load_tokenizer(model_args)
    train_rows, eval_rows = load_prepared_datasets(data_args, tokenizer, 128, training_args.seed)
    set_seed(training_args.seed)
    model = load_model(model_args, lora_args, training_args, tokenizer)
    return train.build_trainer(model, tokenizer, training_args, data_args, train_rows, eval_rows, eval_rows, 128,
                               list(callbacks))  # fmt: skip


# The two layers


def launches_an_entry_point(command) -> bool:
    """train.py, a Python script of the repository, or `accelerate launch`. (The launcher tests run scripts/*.sh with
    `python` and `accelerate` replaced by stubs: nothing of the repository runs in a subprocess there.)"""
    words = [command] if isinstance(command, str | os.PathLike) else list(command)
    for word in map(str, words):
        path = Path(word)
        if word == "accelerate.commands.launch" or (path.suffix == ".py" and REPO in path.resolve().parents):
            return True
    return False


@pytest.fixture(autouse=True)
def entry_points_need_the_e2e_marker(request, monkeypatch):
    """Outside the e2e layer, starting an entry point fails the test: the marker stays true as tests change."""
    if request.node.get_closest_marker("e2e"):
        return

    class UnitLayerPopen(subprocess.Popen):
        def __init__(self, args, *rest, **kwargs):
            if launches_an_entry_point(args):
                raise AssertionError(f"{request.node.nodeid} launches {args}: mark it @pytest.mark.e2e")
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", UnitLayerPopen)
