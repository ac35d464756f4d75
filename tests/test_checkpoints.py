"""Preemption and resume through the real entry point, checkpoint completeness, clean-up safety and watchdogs."""

import math
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import (
    FAST,
    SAMPLE_CHAT,
    assert_same_step_losses,
    interrupt,
    launch_command,
    run_command,
    run_python_train,
    step_losses,
    trainer_in_process,
)
from transformers import TrainerControl, TrainerState

import checkpoint_utils
import train
from checkpoint_utils import (
    COMPLETE_MARKER,
    OUTPUT_DIR_MARKER,
    WATCHDOG_EXIT_CODE,
    LossWatchdogCallback,
    OutputDirError,
    cleanup_output_dir,
    refusal_to_delete,
)

METHODS = {"full": [], "lora": ["--use_lora", "true"], "qlora": ["--use_qlora", "true"]}
RUN = [
    *FAST, "--max_steps", "20", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
    "--max_num_samples", "400", "--learning_rate", "0.003", "--logging_steps", "1", "--save_strategy", "steps",
    "--save_steps", "5", "--dataloader_num_workers", "0",
]  # fmt: skip


def train_args(model, output_dir, method, *extra) -> list[str]:
    return ["--model_id", str(model), "--train_data", SAMPLE_CHAT, "--output_dir", str(output_dir),
            *METHODS[method], *RUN, *extra]  # fmt: skip


DDP_TRAIN = launch_command(num_processes=2)
DDP = ["--use_ddp", "true", "--use_cpu", "true", "--per_device_train_batch_size", "4"]


@pytest.fixture(scope="module", params=list(METHODS))
def uninterrupted(request, tiny_llama, tmp_path_factory):
    method = request.param
    out = tmp_path_factory.mktemp(f"uninterrupted-{method}")
    result = run_python_train(*train_args(tiny_llama, out, method))
    assert result.returncode == 0, result.stderr[-3000:]
    return method, step_losses(out), out


@pytest.mark.e2e
def test_sigterm_saves_a_complete_checkpoint_and_resume_matches(uninterrupted, tiny_llama, tmp_path):
    method, expected, _ = uninterrupted
    out = tmp_path / "run"
    code, output = interrupt(train_args(tiny_llama, out, method), 3, [signal.SIGTERM, signal.SIGINT])
    assert code == 143, output[-3000:]
    assert "Preempted by SIGTERM" in output and "--resume_from_checkpoint true" in output
    checkpoints = checkpoint_utils.checkpoint_dirs(str(out))
    assert checkpoints and all((c / COMPLETE_MARKER).is_file() for c in checkpoints)
    stopped_at = int(checkpoints[-1].name.split("-")[1])
    assert stopped_at < 20
    assert not (out / "config.json").exists()  # no final model from an interrupted run

    # A save killed half-way looks like this: it must be ignored, then removed.
    partial = out / "checkpoint-999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half written")

    result = run_python_train(*train_args(tiny_llama, out, method, "--resume_from_checkpoint", "true"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from {checkpoints[-1]}" in result.stdout + result.stderr
    assert "Removing incomplete checkpoint" in result.stdout + result.stderr
    assert_same_step_losses(step_losses(out), expected)
    assert not checkpoint_utils.checkpoint_dirs(str(out))  # removed after success (--keep_checkpoints false)
    assert (out / "config.json").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("uninterrupted", ["full"], indirect=True)  # one method is enough; SIGTERM covers all three
def test_kill_9_after_a_checkpoint_resumes_exactly(uninterrupted, tiny_llama, tmp_path):
    method, expected, _ = uninterrupted
    out = tmp_path / "run"
    code, _ = interrupt(train_args(tiny_llama, out, method), 12, [signal.SIGKILL])
    assert code == -signal.SIGKILL
    assert any((c / COMPLETE_MARKER).is_file() for c in checkpoint_utils.checkpoint_dirs(str(out)))
    result = run_python_train(
        *train_args(tiny_llama, out, method, "--resume_from_checkpoint", "true", "--keep_checkpoints", "true")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_step_losses(step_losses(out), expected)
    # --keep_checkpoints true keeps them, rotated to the newest --save_total_limit (2 in train.args).
    assert [c.name for c in checkpoint_utils.checkpoint_dirs(str(out))] == ["checkpoint-15", "checkpoint-20"]


@pytest.mark.e2e
def test_ddp_sigterm_stops_every_rank_at_one_step_and_resumes_exactly(tiny_llama, tmp_path):
    expected_run = run_command(DDP_TRAIN, *train_args(tiny_llama, tmp_path / "uninterrupted", "lora", *DDP))
    assert expected_run.returncode == 0, expected_run.stderr[-3000:]
    out = tmp_path / "run"
    # The launcher (torch elastic agent) passes SIGTERM on to both ranks.
    code, output = interrupt(train_args(tiny_llama, out, "lora", *DDP), 3, [signal.SIGTERM], DDP_TRAIN)
    assert code != 0
    checkpoints = checkpoint_utils.checkpoint_dirs(str(out))
    assert checkpoints and all(checkpoint_utils.is_complete(c) for c in checkpoints)
    # Both ranks stopped after the same step and name the same checkpoint.
    assert output.count(f"Preempted by SIGTERM: the complete checkpoint {checkpoints[-1]} ") == 2, output[-3000:]
    resumed = run_command(DDP_TRAIN, *train_args(tiny_llama, out, "lora", *DDP, "--resume_from_checkpoint", "true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_step_losses(step_losses(out), step_losses(tmp_path / "uninterrupted"))


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
    trainer = trainer_in_process(tiny_llama, tmp_path, num_samples=120, eval_size=40, max_steps=20,
                                 learning_rate=0.003, eval_strategy="steps", eval_steps=2, early_stopping_patience=2,
                                 early_stopping_threshold=100)  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 6  # best at the first eval (step 2), then two evals without a 100-nat gain
    assert [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry] == [2, 4, 6]


def watchdog_steps(watchdog: LossWatchdogCallback, losses: list[float]) -> list[TrainerControl]:
    """The callback's answer to each logged loss, one logging step each."""
    controls = []
    for step, loss in enumerate(losses, 1):
        controls.append(TrainerControl(should_save=True))
        watchdog.on_log(None, SimpleNamespace(global_step=step), controls[-1], logs={"loss": loss})
    return controls


def test_loss_watchdog_counts_consecutive_steps_above_the_threshold():
    watchdog = LossWatchdogCallback(threshold=1.0, patience=3)
    controls = watchdog_steps(watchdog, [2.0, 3.0, 0.5, 2.0, 2.0, 1.5])  # the good step at 3 resets the count
    assert [c.should_training_stop for c in controls] == [False] * 5 + [True]
    assert [c.should_save for c in controls] == [True] * 5 + [False]  # the bad step is not saved
    assert watchdog.reason == (
        "the training loss stayed above --loss_watchdog_threshold 1.0 for 3 logging steps (last: 1.5000 at step 6)"
    )
    assert not watchdog_steps(LossWatchdogCallback(None, 3), [1e6] * 5)[-1].should_training_stop  # no threshold


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_loss_watchdog_stops_at_the_first_non_finite_loss(bad):
    watchdog = LossWatchdogCallback(threshold=None, patience=3)
    controls = watchdog_steps(watchdog, [2.0, bad])
    assert [(c.should_training_stop, c.should_save) for c in controls] == [(False, True), (True, False)]
    assert watchdog.reason == f"the training loss is {bad} at step 2"


def test_loss_watchdog_in_the_trainer_keeps_the_last_good_checkpoint(tiny_llama, tmp_path):
    """The Trainer asks the callback after logging and before saving the same step: the bad step is never saved."""
    watchdog = LossWatchdogCallback(threshold=0.01, patience=3)
    trainer = trainer_in_process(tiny_llama, tmp_path, callbacks=[watchdog], max_steps=20, save_strategy="steps",
                                 save_steps=1)  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 3 and "for 3 logging steps" in watchdog.reason
    assert [c.name for c in checkpoint_utils.checkpoint_dirs(str(tmp_path))] == ["checkpoint-1", "checkpoint-2"]
    assert all(checkpoint_utils.is_complete(c) for c in checkpoint_utils.checkpoint_dirs(str(tmp_path)))
    with pytest.raises(train.TrainingStopped, match="Loss watchdog stopped training: the training loss stayed above"):
        train.raise_if_stopped_early(SimpleNamespace(received=None), watchdog)


@pytest.mark.e2e
def test_loss_watchdog_catches_nan_and_the_run_exits_with_one_message(tiny_llama, tmp_path):
    out = tmp_path / "nan"
    result = run_python_train(*train_args(tiny_llama, out, "full", "--learning_rate", "1e9", "--max_grad_norm", "0"))
    output = result.stdout + result.stderr
    assert result.returncode == WATCHDOG_EXIT_CODE, output[-3000:]
    assert "Loss watchdog stopped training: the training loss is nan" in output or "loss is inf" in output
    assert "Traceback" not in output
    assert not (out / "config.json").exists()  # no final model


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
