"""Preemption and resume through the real entry point, checkpoint completeness, clean-up safety and watchdogs."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO, launch_command, run_train
from transformers import TrainerState

import checkpoint_utils
from checkpoint_utils import COMPLETE_MARKER, OUTPUT_DIR_MARKER, OutputDirError, cleanup_output_dir, refusal_to_delete

SAMPLE_CHAT = str(REPO / "sample_data" / "chat.jsonl")
METHODS = {"full": [], "lora": ["--use_lora", "true"], "qlora": ["--use_qlora", "true"]}
RUN = [
    "--max_steps", "40", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
    "--max_num_samples", "400", "--max_length", "128", "--learning_rate", "0.003", "--logging_steps", "1",
    "--save_strategy", "steps", "--save_steps", "5", "--eval_strategy", "no", "--eval_size", "0",
    "--report_to", "none", "--dataloader_num_workers", "0",
]  # fmt: skip


def step_losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def train_args(model, output_dir, method, *extra) -> list[str]:
    return ["--model_id", str(model), "--train_data", SAMPLE_CHAT, "--output_dir", str(output_dir),
            *METHODS[method], *RUN, *extra]  # fmt: skip


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "OMP_NUM_THREADS": "1"}  # fmt: skip
# How the single-process launchers run it, so that a signal reaches the trainer. Runs compared step by step share
# one entry point and one thread count: the float reduction order, and so the losses, depend on them.
PYTHON_TRAIN = [sys.executable, str(REPO / "train.py")]
DDP_TRAIN = launch_command(num_processes=2)
DDP = ["--use_ddp", "true", "--use_cpu", "true", "--per_device_train_batch_size", "4"]


def train(args: list[str], command: list[str] = PYTHON_TRAIN) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *args], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)


def interrupt(
    args: list[str], after_step: int, signals: list[signal.Signals], command: list[str] = PYTHON_TRAIN
) -> tuple[int, str]:
    """Run the training command; once `after_step` has been logged send the first signal, and each further one
    once the trainer has acknowledged the previous ("Received SIGTERM"). Return the exit code and the output."""
    process = subprocess.Popen(
        [*command, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO
    )
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


def assert_same_losses(resumed: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(resumed) == sorted(expected)
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-5), (step, resumed[step], loss)


@pytest.fixture(scope="module", params=list(METHODS))
def uninterrupted(request, tiny_llama, tmp_path_factory):
    method = request.param
    out = tmp_path_factory.mktemp(f"uninterrupted-{method}")
    result = train(train_args(tiny_llama, out, method))
    assert result.returncode == 0, result.stderr[-3000:]
    return method, step_losses(out), out


def test_sigterm_saves_a_complete_checkpoint_and_resume_matches(uninterrupted, tiny_llama, tmp_path):
    method, expected, _ = uninterrupted
    out = tmp_path / "run"
    code, output = interrupt(train_args(tiny_llama, out, method), 3, [signal.SIGTERM, signal.SIGINT])
    assert code == 143, output[-3000:]
    assert "Preempted by SIGTERM" in output and "--resume_from_checkpoint true" in output
    checkpoints = checkpoint_utils.checkpoint_dirs(str(out))
    assert checkpoints and all((c / COMPLETE_MARKER).is_file() for c in checkpoints)
    stopped_at = int(checkpoints[-1].name.split("-")[1])
    assert stopped_at < 40
    assert not (out / "config.json").exists()  # no final model from an interrupted run

    # A save killed half-way looks like this: it must be ignored, then removed.
    partial = out / "checkpoint-999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half written")

    result = train(train_args(tiny_llama, out, method, "--resume_from_checkpoint", "true"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from {checkpoints[-1]}" in result.stdout + result.stderr
    assert "Removing incomplete checkpoint" in result.stdout + result.stderr
    assert_same_losses(step_losses(out), expected)
    assert not checkpoint_utils.checkpoint_dirs(str(out))  # removed after success (--keep_checkpoints false)
    assert (out / "config.json").exists()


@pytest.mark.parametrize("uninterrupted", ["full"], indirect=True)  # one method is enough; SIGTERM covers all three
def test_kill_9_after_a_checkpoint_resumes_exactly(uninterrupted, tiny_llama, tmp_path):
    method, expected, _ = uninterrupted
    out = tmp_path / "run"
    code, _ = interrupt(train_args(tiny_llama, out, method), 12, [signal.SIGKILL])
    assert code == -signal.SIGKILL
    assert any((c / COMPLETE_MARKER).is_file() for c in checkpoint_utils.checkpoint_dirs(str(out)))
    result = train(
        train_args(tiny_llama, out, method, "--resume_from_checkpoint", "true", "--keep_checkpoints", "true")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_losses(step_losses(out), expected)
    # --keep_checkpoints true keeps them, rotated to the newest --save_total_limit (2 in train.args).
    assert [c.name for c in checkpoint_utils.checkpoint_dirs(str(out))] == ["checkpoint-35", "checkpoint-40"]


def test_ddp_sigterm_stops_every_rank_at_one_step_and_resumes_exactly(tiny_llama, tmp_path):
    expected_run = train(train_args(tiny_llama, tmp_path / "uninterrupted", "lora", *DDP), DDP_TRAIN)
    assert expected_run.returncode == 0, expected_run.stderr[-3000:]
    out = tmp_path / "run"
    # The launcher (torch elastic agent) passes SIGTERM on to both ranks.
    code, output = interrupt(train_args(tiny_llama, out, "lora", *DDP), 3, [signal.SIGTERM], DDP_TRAIN)
    assert code != 0
    checkpoints = checkpoint_utils.checkpoint_dirs(str(out))
    assert checkpoints and all(checkpoint_utils.is_complete(c) for c in checkpoints)
    # Both ranks stopped after the same step and name the same checkpoint.
    assert output.count(f"Preempted by SIGTERM: the complete checkpoint {checkpoints[-1]} ") == 2, output[-3000:]
    resumed = train(train_args(tiny_llama, out, "lora", *DDP, "--resume_from_checkpoint", "true"), DDP_TRAIN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_losses(step_losses(out), step_losses(tmp_path / "uninterrupted"))


def test_resume_true_without_checkpoint_starts_fresh(tmp_path):
    assert checkpoint_utils.resolve_resume_checkpoint("true", str(tmp_path)) is None
    assert checkpoint_utils.resolve_resume_checkpoint("false", str(tmp_path)) is None
    incomplete = tmp_path / "checkpoint-5"
    incomplete.mkdir()
    assert checkpoint_utils.resolve_resume_checkpoint("true", str(tmp_path)) is None
    with pytest.raises(OutputDirError, match="incomplete"):
        checkpoint_utils.resolve_resume_checkpoint(str(incomplete), str(tmp_path))
    checkpoint_utils.mark_checkpoint_complete(incomplete, 5)
    assert checkpoint_utils.resolve_resume_checkpoint("true", str(tmp_path)) == str(incomplete)


def test_old_checkpoints_are_rotated_only_after_the_new_one_is_complete(tmp_path, monkeypatch):
    for step in (5, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        checkpoint_utils.mark_checkpoint_complete(tmp_path / f"checkpoint-{step}", step)
    (tmp_path / "checkpoint-15").mkdir()  # just written by the Trainer, not yet marked
    marked = checkpoint_utils.mark_checkpoint_complete

    def mark_while_checking(checkpoint, step):
        assert [c.name for c in checkpoint_utils.checkpoint_dirs(str(tmp_path))][:2] == [
            "checkpoint-5",
            "checkpoint-10",
        ]
        marked(checkpoint, step)

    monkeypatch.setattr(checkpoint_utils, "mark_checkpoint_complete", mark_while_checking)
    args, state = SimpleNamespace(output_dir=str(tmp_path)), TrainerState()
    state.global_step = 15
    checkpoint_utils.CheckpointCompletionCallback(save_total_limit=1).on_save(args, state, None)
    assert [c.name for c in checkpoint_utils.checkpoint_dirs(str(tmp_path))] == ["checkpoint-15"]
    assert checkpoint_utils.is_complete(tmp_path / "checkpoint-15")


def test_early_stopping_stops_when_eval_loss_stalls(tiny_llama, tmp_path):
    out = tmp_path / "early"
    args = train_args(tiny_llama, out, "full", "--eval_size", "40", "--eval_strategy", "steps", "--eval_steps", "2",
                      "--early_stopping_patience", "2", "--early_stopping_threshold", "100",
                      "--save_strategy", "no")  # fmt: skip
    result = run_train(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6  # best at the first eval (step 2), then two evals without a 100-nat gain


def test_loss_watchdog_threshold_stops_and_keeps_the_last_good_checkpoint(tiny_llama, tmp_path):
    out = tmp_path / "watchdog"
    args = train_args(tiny_llama, out, "full", "--loss_watchdog_threshold", "0.01", "--loss_watchdog_patience", "3",
                      "--save_steps", "1")  # fmt: skip
    result = run_train(*args)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Loss watchdog stopped training" in output and "for 3 logging steps" in output
    assert "Traceback" not in output
    assert [c.name for c in checkpoint_utils.checkpoint_dirs(str(out))] == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "config.json").exists()


def test_loss_watchdog_catches_nan(tiny_llama, tmp_path):
    out = tmp_path / "nan"
    result = run_train(*train_args(tiny_llama, out, "full", "--learning_rate", "1e9", "--max_grad_norm", "0"))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Loss watchdog stopped training: the training loss is nan" in output or "loss is inf" in output


# Clean-up guard: every refusal, in temporary directories only.


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A fake home, repository root and working directory inside tmp_path."""
    home, repo, work = tmp_path / "home", tmp_path / "repo", tmp_path / "work" / "sub"
    for path in (home, repo, work):
        path.mkdir(parents=True)
        (path / "file.txt").write_text("keep")
        (path / OUTPUT_DIR_MARKER).touch()  # even a marked directory is protected
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(checkpoint_utils, "REPO_ROOT", repo)
    monkeypatch.chdir(work)
    return tmp_path


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("home", "home directory"),
        ("repo", "repository root"),
        ("work/sub", "current directory"),
        ("work", "current directory or one of its parents"),
    ],
)
def test_cleanup_refuses_protected_directories(sandbox, target, reason):
    with pytest.raises(OutputDirError, match=reason):
        cleanup_output_dir(str(sandbox / target))
    assert (sandbox / target / "file.txt").exists() or (sandbox / target / "sub" / "file.txt").exists()


def test_cleanup_refuses_root_and_foreign_directories(sandbox):
    assert "filesystem root" in refusal_to_delete(Path("/"))
    foreign = sandbox / "foreign"
    foreign.mkdir()
    (foreign / "data.txt").write_text("keep me")
    with pytest.raises(OutputDirError, match="not created by this script"):
        cleanup_output_dir(str(foreign))
    assert (foreign / "data.txt").exists()


def test_cleanup_deletes_a_marked_output_dir(sandbox):
    ours = sandbox / "ours"
    (ours / "checkpoint-1").mkdir(parents=True)
    (ours / OUTPUT_DIR_MARKER).touch()
    cleanup_output_dir(str(ours))
    assert not ours.exists()
