"""The tracker interface (trackers.py) and the run's tracking (tracking.py) without a training run: the factory picks
by the options, and any Tracker subclass gets the whole lifecycle. MLflow and TrueFoundry against real servers and
the recorded fake client are in test_tracking.py."""

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers.integrations import MLflowCallback

from trackers import TRACKERS, MLflowTracker, Tracker, TrackingError, TrueFoundryTracker, chosen_tracker
from tracking import Tracking, TrackingCallback

SUMMARY = {
    "base_model": "org/Tiny-Base", "method": "full fine-tune", "merged": False,
    "data": {"train_data": "chat.jsonl", "eval_data": "eval.jsonl", "train": {"samples": 9}, "eval": {"samples": 2}},
    "final_metrics": {"eval_loss": 1.5},
}  # fmt: skip


def options(report_to=(), truefoundry=False):
    return SimpleNamespace(mlfoundry_enable_reporting=truefoundry), SimpleNamespace(report_to=list(report_to))


def test_the_options_choose_one_tracker():
    assert chosen_tracker(*options(["tensorboard"])) is None
    assert chosen_tracker(*options(["tensorboard", "mlflow"])) is MLflowTracker
    assert chosen_tracker(*options([], truefoundry=True)) is TrueFoundryTracker
    for tracker in TRACKERS:  # every listed tracker implements the whole interface
        assert issubclass(tracker, Tracker) and not inspect.isabstract(tracker), tracker


class RecordingTracker(Tracker):
    """A tracker written only against the interface; it records every call."""

    name, choice = "Recorder", "--report_to recorder"
    calls: list = []
    fail_open = False

    @staticmethod
    def chosen(tracking_args, training_args):
        return "recorder" in training_args.report_to

    @staticmethod
    def location(tracking_args):
        return "the recorder"

    @classmethod
    def open(cls, tracking_args, training_args):
        if cls.fail_open:
            raise ConnectionError("connection refused")
        return cls()

    def log_params(self, params):
        self.calls.append(("log_params", dict(params)))

    def log_metrics(self, metrics, step):
        self.calls.append(("log_metrics", step))

    def log_checkpoint(self, checkpoint, step):
        self.calls.append(("log_checkpoint", step))

    def download_latest_checkpoint(self, destination):
        return None

    def log_model(self, model_dir, name, metadata, step):
        self.calls.append(("log_model", name, sorted(p.name for p in Path(model_dir).iterdir()), step))

    def log_file(self, path):
        self.calls.append(("log_file", path.name))

    def end(self, status):
        self.calls.append(("end", status))


class FakeTrainer:
    def __init__(self):
        self.callbacks = [MLflowCallback]

    def remove_callback(self, callback):
        self.callbacks.remove(callback)

    def add_callback(self, callback):
        self.callbacks.append(callback)


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setattr(RecordingTracker, "calls", [])
    return RecordingTracker


def test_any_tracker_gets_the_whole_run(recorder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "README.md", "training_curves.png", "samples.jsonl",
                 "eval_answers.jsonl", "mlflow.db", ".finetune.lock"):  # fmt: skip
        (out / name).write_text(name)
    tracking_args = SimpleNamespace(tracker_upload_timeout=30)
    training_args = SimpleNamespace(output_dir=str(out), report_to=["recorder"], resume_from_checkpoint=None)
    tracking = Tracking(recorder, tracking_args, training_args, {"learning_rate": "0.003"})
    tracking.log_data({"train": []})  # opens the run first, as for a store kept in --output_dir
    trainer = FakeTrainer()
    tracking.attach(trainer)
    assert [type(c) for c in trainer.callbacks] == [TrackingCallback]  # transformers' MLflowCallback replaced
    tracking.finish(SUMMARY, step=7)
    assert recorder.calls == [
        ("log_params", {"learning_rate": "0.003"}),
        ("log_model", "finetuned-Tiny-Base", ["README.md", "config.json", "model.safetensors", "training_curves.png"],
         7),
        ("log_file", "README.md"), ("log_file", "training_curves.png"), ("log_file", "samples.jsonl"),
        ("log_file", "eval_answers.jsonl"), ("end", "FINISHED"),
    ]  # fmt: skip
    tracking.end("FAILED")  # at exit: the run has ended already
    assert recorder.calls[-1] == ("end", "FINISHED")
    assert not (out / ".tracker-uploads").exists()


def test_an_unreachable_tracker_is_one_error_naming_it(recorder, monkeypatch):
    monkeypatch.setattr(recorder, "fail_open", True)
    tracking = Tracking(recorder, SimpleNamespace(tracker_upload_timeout=1), SimpleNamespace(), {})
    with pytest.raises(TrackingError, match="cannot reach the experiment tracker, the recorder: connection refused"):
        tracking.open()


def test_without_a_tracker_every_call_does_nothing(tmp_path):
    tracking = Tracking()
    tracking.log_data({"train": []})
    tracking.restore_checkpoint()
    trainer = FakeTrainer()
    tracking.attach(trainer)
    assert trainer.callbacks == []  # MLflowCallback removed all the same
    tracking.finish(SUMMARY, step=1)
    tracking.end("FAILED")
