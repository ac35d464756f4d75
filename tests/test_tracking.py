"""Experiment tracking end to end: a real `mlflow server` (SQLite store in a temp dir) on 127.0.0.1, and the
TrueFoundry back end against a recorded fake of the `truefoundry.ml` client (tests/fake_truefoundry)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import PYTHON_TRAIN, REPO, RUN_ENV, SAMPLE_CHAT, assert_ok, free_port, launch_command, run_train
from mlflow import MlflowClient
from transformers import TrainingArguments

from output_layout import unknown_entries
from redaction import MASK, mask_secrets
from reporting import TRAINING_PARAMS
from trackers import TrackingError, TrueFoundryTracker, tracking_problems

FAKE_TRUEFOUNDRY = REPO / "tests" / "fake_truefoundry"
ENV_SECRET = "hf_planted_env_secret_9731"
URL_SECRET = "planted-url-password-4410"
FLAG_SECRET = "planted_flag_token_5521"
QUERY_SECRET = "planted-query-token-6618"  # a ?token= data URL
USER_SECRET = "planted-user-token-2207"  # an https://TOKEN@host data URL
API_KEY_SECRET = "planted-api-key-7302"  # the value of a *_API_KEY environment variable, inside a data URL
SECRETS = (ENV_SECRET, URL_SECRET, FLAG_SECRET, QUERY_SECRET, USER_SECRET, API_KEY_SECRET)
FAST = [
    "--per_device_train_batch_size", "8", "--max_num_samples", "160", "--max_length", "128", "--logging_steps", "1",
    "--save_strategy", "steps", "--save_steps", "3", "--eval_strategy", "steps", "--eval_steps", "3",
    "--eval_size", "16", "--warmup_steps", "0", "--learning_rate", "0.003",
]  # fmt: skip
SECRET_FLAGS = ["--run_name", f"https://user:{URL_SECRET}@example.com/run", "--hub_token", FLAG_SECRET]


def start_mlflow_server(directory: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(directory / "server.log", "w")  # noqa: SIM115 - closed with the process
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
         "--artifacts-destination", str(directory / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own process group, to freeze it whole
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert server.poll() is None, (directory / "server.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise AssertionError("mlflow server did not start in 180 s:\n" + (directory / "server.log").read_text()[-3000:])


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> Path:
    """Everything the MLflow server holds: its SQLite database and its artifacts."""
    return tmp_path_factory.mktemp("mlflow-server")


@pytest.fixture(scope="module")
def mlflow_server(mlflow_store):
    server, url = start_mlflow_server(mlflow_store)
    yield url
    stop(server)


@pytest.fixture(scope="module")
def data_server():
    """sample_data/ over HTTP, for data URLs that carry credentials (the server ignores them)."""

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(REPO / "sample_data")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(autouse=True)
def planted_env_secret(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ENV_SECRET)


def train_ok(*args, env: dict) -> str:
    result = assert_ok(run_train(*args, env=env))
    return result.stdout + result.stderr


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def assert_no_secret_in_files(*directories: Path) -> None:
    """Every byte of every file: databases, pickles (training_args.bin), TensorBoard events, checkpoints."""
    files = [path for directory in directories for path in directory.rglob("*") if path.is_file()]
    assert len(files) > 20
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in data, f"{secret} in {path}"


def logged_steps(output_dir: Path, key: str = "loss") -> list[int]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["step"] for entry in state["log_history"] if key in entry]


def assert_model_card_and_curves(output_dir: Path, base_model: Path) -> None:
    card = (output_dir / "README.md").read_text()
    assert f"**Base model:** `{base_model}`" in card and "full fine-tune" in card
    assert "| eval_loss |" in card and "| learning_rate | `0.003` |" in card and "144 samples" in card
    assert (output_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# MLflow


@pytest.mark.e2e
def test_mlflow_run_is_tracked_and_a_fresh_machine_resumes_from_it(
    tiny_llama, tmp_path, mlflow_server, mlflow_store, data_server
):
    # transformers' own MLflowCallback would log to MLFLOW_EXPERIMENT_NAME: one run there proves it is replaced.
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "resume-test",
           "DATA_SERVICE_API_KEY": API_KEY_SECRET}  # fmt: skip
    first = tmp_path / "first"
    data_url = f"http://{data_server}/chat.jsonl?token={QUERY_SECRET}&v={API_KEY_SECRET}"
    output = train_ok(
        "--model_id", str(tiny_llama), "--train_data", data_url, "--output_dir", str(first), "--max_steps", "6",
        "--keep_checkpoints", "true",
        "--report_to", "mlflow", "--mlflow_log_checkpoints", "true", "--mlflow_run_name", "job-1", *FAST,
        "--sample_packing", "true", *SECRET_FLAGS, env=env,
    )  # fmt: skip
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("resume-test")
    [run] = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.run_name == "job-1" and run.info.status == "FINISHED"

    # Params: curated options and hyperparameters, secrets masked everywhere.
    params = run.data.params
    assert params["learning_rate"] == "0.003" and params["model_id"] == str(tiny_llama) and params["max_steps"] == "6"
    assert params["run_name"] == f"https://user:{MASK}@example.com/run" and "hub_token" not in params
    untracked = set(TrainingArguments.__dataclass_fields__) - set(TRAINING_PARAMS)  # e.g. ddp_timeout
    assert not untracked & set(params)  # the curated hyperparameters, not all of TrainingArguments
    for split in ("train", "eval"):  # the efficiency that the start-up log reports
        logged = re.search(rf"Packing {split}: .* packing efficiency ([\d.]+)%", output).group(1)
        assert f"{100 * float(params[f'{split}_packing_efficiency']):.1f}" == logged
    counts = re.search(r"\[0\] (.+): (\d+) / (\d+) / (\d+) / (\d+) / (\d+) / (\d+)\n", output)  # per-source summary
    assert params["data_train_source_0"] == (
        f"{counts[1]}: read {counts[2]}, invalid {counts[3]}, skipped {counts[4]}, kept {counts[5]}, eval {counts[6]}, "
        f"trained_tokens {counts[7]}"
    )
    files = [(first / name).read_text() for name in ("run_args.json", "README.md")]
    assert_no_secret(json.dumps(params), json.dumps(run.data.tags), output, *files)
    assert json.loads((first / "run_args.json").read_text())["hub_token"] == MASK

    # Metrics at every logging step.
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in client.get_metric_history(run_id, "eval_loss")] == [3, 6]
    for key in ("learning_rate", "grad_norm", "epoch", "tokens_per_second", "samples_per_second"):
        history = client.get_metric_history(run_id, key)
        assert {m.step for m in history} == {1, 2, 3, 4, 5, 6} and all(m.value > 0 for m in history), key

    # Checkpoint versions, each with its completion marker.
    versions = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    assert versions == ["checkpoints/checkpoint-3", "checkpoints/checkpoint-6"]
    for version in versions:
        assert "checkpoint_complete.json" in {Path(a.path).name for a in client.list_artifacts(run_id, version)}

    # The final model as a model version with its metadata, and the model card.
    [model_version] = client.search_model_versions("name='finetuned-tiny-llama'")
    assert model_version.run_id == run_id and model_version.tags["base_model"] == str(tiny_llama)
    assert model_version.tags["method"] == "full fine-tune" and float(model_version.tags["final_eval_loss"]) > 0
    [logged_model] = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert logged_model.source_run_id == run_id and model_version.source == logged_model.artifact_location
    files = {Path(a.path).name for a in client.list_logged_model_artifacts(logged_model.model_id)}
    assert {"config.json", "model.safetensors", "README.md", "training_curves.png"} <= files
    assert not any(name.startswith(("checkpoint-", "mlflow", "runs")) for name in files)
    assert not unknown_entries(first)  # every entry of the output dir (checkpoints kept) is named by output_layout
    assert {"README.md", "training_curves.png"} <= {a.path for a in client.list_artifacts(run_id)}
    assert_model_card_and_curves(first, tiny_llama)

    # A fresh output dir (a new machine) resumes from the uploaded checkpoint-6 and continues the same run.
    second = tmp_path / "second"
    output = train_ok(
        "--model_id", str(tiny_llama), "--train_data", f"http://{USER_SECRET}@{data_server}/chat.jsonl",
        "--output_dir", str(second), "--max_steps", "9",
        "--report_to", "mlflow", "--mlflow_log_checkpoints", "true", "--mlflow_run_name", "job-1",
        "--resume_from_checkpoint", "true", *FAST, "--sample_packing", "true", env=env,
    )  # fmt: skip
    assert "Downloaded checkpoint-6 from MLflow" in output
    assert logged_steps(second) == list(range(1, 10))  # the checkpoint's history, then steps 7 to 9
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 10))
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")][-1] == "checkpoints/checkpoint-9"
    assert len(client.search_model_versions("name='finetuned-tiny-llama'")) == 2

    # No planted secret in any file of either output dir (checkpoints, adapter, training_args.bin, TensorBoard
    # events, run_args.json, the model card), in the server's store (params, tags, artifacts) or in the logs.
    assert_no_secret(output)
    assert_no_secret_in_files(first, second, mlflow_store)


@pytest.mark.e2e
def test_hung_mlflow_server_costs_one_bounded_wait_after_the_model_is_saved(tiny_llama, tmp_path):
    """A server frozen with SIGSTOP accepts connections and never answers: every pending call would wait for its
    HTTP timeout in turn. The run saves the model, waits --tracker_upload_timeout for all of them, and ends 0."""
    server, url = start_mlflow_server(tmp_path)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [*launch_command(), "--model_id", str(tiny_llama), "--train_data", SAMPLE_CHAT,
         "--output_dir", str(out), "--max_steps", "6", "--report_to", "mlflow", "--mlflow_log_checkpoints", "true",
         "--mlflow_run_name", "hung", "--tracker_upload_timeout", "5", *FAST],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**os.environ, **RUN_ENV, "MLFLOW_TRACKING_URI": url},  # unbuffered: the server is frozen mid-training
    )  # fmt: skip
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "'loss': " in line:
                os.killpg(server.pid, signal.SIGSTOP)  # training is under way: every later call hangs
                break
        waiting_since = None
        for line in process.stdout:
            lines.append(line)
            if "Waiting up to 5 s (--tracker_upload_timeout)" in line:
                waiting_since = time.monotonic()
        assert process.wait(timeout=300) == 0, "".join(lines)[-6000:]
        waited = time.monotonic() - waiting_since
    finally:
        process.kill()
        os.killpg(server.pid, signal.SIGCONT)
        stop(server)
    output = "".join(lines)
    # The model and its card were written before the wait; the wait is one deadline for everything pending.
    assert output.index("Model card and training curves written") < output.index("Waiting up to 5 s")
    assert list(out.glob("*.safetensors")) and (out / "README.md").is_file()
    assert waited < 60, f"the run ended {waited:.0f} s after the 5 s wait began"  # 60 s per call without the deadline
    warning = re.search(r"MLflow did not answer within --tracker_upload_timeout 5 s; not done: (.*)\.", output)
    assert warning and "logging the model" in warning.group(1) and "marking the run FINISHED" in warning.group(1)
    assert "Traceback" not in output


@pytest.mark.e2e
def test_mlflow_server_stopped_mid_training_lets_training_complete(tiny_llama, tmp_path):
    server, url = start_mlflow_server(tmp_path)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [*launch_command(), "--model_id", str(tiny_llama), "--train_data", SAMPLE_CHAT,
         "--output_dir", str(out), "--max_steps", "6", "--report_to", "mlflow", "--mlflow_log_checkpoints", "true",
         "--mlflow_run_name", "gone", *FAST],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**os.environ, **RUN_ENV, "MLFLOW_TRACKING_URI": url},
    )  # fmt: skip
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "'loss': " in line:
            stop(server)  # training is under way: the metrics, uploads and model logging after this point fail
            break
    lines.extend(process.stdout)
    output = "".join(lines)
    assert process.wait(timeout=600) == 0, output[-6000:]
    assert list(out.glob("*.safetensors")) and (out / "README.md").is_file()
    assert "uploading checkpoint-6 failed" in output and "logging the model failed" in output
    assert "training goes on without it" in output and "Traceback" not in output
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the stopped server's store, read directly
    [run] = client.search_runs([client.get_experiment_by_name("llm-finetune").experiment_id])
    assert run.data.params["max_steps"] == "6"
    assert len(client.get_metric_history(run.info.run_id, "loss")) < 6  # the later steps never reached it


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["mlflow", "truefoundry"])
def test_unreachable_tracker_stops_before_the_model_is_loaded(tiny_llama, tmp_path, backend):
    out = tmp_path / "out"
    if backend == "mlflow":
        flags, env = ["--report_to", "mlflow"], {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    else:
        flags = ["--mlfoundry_enable_reporting", "true", "--mlfoundry_ml_repo", "my-repo", "--report_to", "none"]
        env = {"PYTHONPATH": str(FAKE_TRUEFOUNDRY), "FAKE_TRUEFOUNDRY_DIR": str(tmp_path),
               "FAKE_TRUEFOUNDRY_UNREACHABLE": "1"}  # fmt: skip
    # `python train.py`, as the single-process launchers run it: accelerate launch would turn exit code 2 into 1.
    result = subprocess.run(
        [*PYTHON_TRAIN, "--model_id", str(tiny_llama), "--train_data", SAMPLE_CHAT,
         "--output_dir", str(out), "--max_steps", "2", *flags, *FAST],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    assert "cannot reach the experiment tracker" in output and "Traceback" not in output
    assert "samples, tokens p50" not in output and not out.exists()  # stopped before the data, let alone the model


# TrueFoundry, against the recorded fake of truefoundry.ml


def fake_calls(store: Path, method: str) -> list[dict]:
    calls = [json.loads(line) for line in (store / "calls.jsonl").read_text().splitlines()]
    return [c for c in calls if c["method"] == method]


@pytest.mark.e2e
def test_truefoundry_run_is_tracked_and_resumes_from_the_ml_repo(tiny_llama, tmp_path):
    store = tmp_path / "truefoundry"
    store.mkdir()
    env = {"PYTHONPATH": str(FAKE_TRUEFOUNDRY), "FAKE_TRUEFOUNDRY_DIR": str(store)}
    flags = ["--mlfoundry_enable_reporting", "true", "--mlfoundry_ml_repo", "my-repo", "--report_to", "none",
             "--mlfoundry_run_name", "tfy-job"]  # fmt: skip
    first = tmp_path / "first"
    first.mkdir()
    (first / "samples.jsonl").write_text('{"prompt": "2 + 2", "generation": "4"}\n')  # as --sample_generations leaves
    output = train_ok("--model_id", str(tiny_llama), "--train_data", SAMPLE_CHAT, "--output_dir", str(first),
                      "--max_steps", "6", *flags, *FAST, *SECRET_FLAGS, env=env)  # fmt: skip
    assert [c["run_name"] for c in fake_calls(store, "MlFoundry.create_run")] == ["tfy-job"]
    options, sources = [c["param_dict"] for c in fake_calls(store, "MlFoundryRun.log_params")]  # at start, after data
    assert options["learning_rate"] == "0.003" and options["mlfoundry_ml_repo"] == "my-repo"
    assert list(sources) == ["data_train_source_0"]
    assert_no_secret((store / "calls.jsonl").read_text(), output)
    metric_calls = fake_calls(store, "MlFoundryRun.log_metrics")
    assert [c["step"] for c in metric_calls if "loss" in c["metric_dict"]] == [1, 2, 3, 4, 5, 6]
    assert all("tokens_per_second" in c["metric_dict"] for c in metric_calls if "loss" in c["metric_dict"])
    uploads = fake_calls(store, "MlFoundryRun.log_artifact")
    checkpoints = [c for c in uploads if c["name"] == "ckpt-tfy-job"]
    assert [c["step"] for c in checkpoints] == [3, 6]
    files = {c["name"]: Path(c["artifact_paths"][0][0]).name for c in uploads if c not in checkpoints}
    assert files == {"tfy-job-README": "README.md", "tfy-job-training-curves": "training_curves.png",
                     "tfy-job-samples": "samples.jsonl"}  # fmt: skip
    [model] = fake_calls(store, "MlFoundryRun.log_model")
    assert model["name"] == "finetuned-tiny-llama" and model["framework"] == "transformers"
    assert {"config.json", "model.safetensors", "README.md", "training_curves.png"} <= set(model["files"])
    assert not any(f.startswith(("checkpoint-", "runs", "samples")) for f in model["files"])
    assert model["metadata"]["base_model"] == str(tiny_llama) and model["metadata"]["train_samples"] == 144
    assert [c["status"] for c in fake_calls(store, "MlFoundryRun.end")] == ["FINISHED"]
    assert_model_card_and_curves(first, tiny_llama)

    second = tmp_path / "second"
    output = train_ok("--model_id", str(tiny_llama), "--train_data", SAMPLE_CHAT, "--output_dir", str(second),
                      "--max_steps", "8", "--resume_from_checkpoint", "true", *flags, *FAST, env=env)  # fmt: skip
    assert "Downloaded checkpoint-6 from TrueFoundry" in output
    assert len(fake_calls(store, "MlFoundry.create_run")) == 1  # the second attempt continued the run
    assert [c["fqn"] for c in fake_calls(store, "ArtifactVersion.download")] == [
        "artifact:truefoundry/my-repo/ckpt-tfy-job:2"
    ]
    assert logged_steps(second) == list(range(1, 9))  # the checkpoint's history, then steps 7 and 8
    steps = [c["step"] for c in fake_calls(store, "MlFoundryRun.log_metrics") if "loss" in c["metric_dict"]]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]


def test_truefoundry_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "truefoundry", None)
    with pytest.raises(TrackingError, match="pip install truefoundry"):
        TrueFoundryTracker("my-repo", "run", "ckpt-run")


# Options and masking


def test_tracking_option_problems(monkeypatch):
    def problems(report_to, cleanup=False, **tracking):
        defaults = {"mlfoundry_enable_reporting": False, "mlfoundry_ml_repo": None, "mlflow_log_checkpoints": False,
                    "tracker_upload_timeout": 600}  # fmt: skip
        training = SimpleNamespace(report_to=report_to, cleanup_output_dir_on_start=cleanup)
        return tracking_problems(SimpleNamespace(**{**defaults, **tracking}), training)

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert "would delete the local MLflow store" in problems(["mlflow"], cleanup=True)[0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert problems(["mlflow"], cleanup=True) == []

    assert problems(["tensorboard", "mlflow"], mlflow_log_checkpoints=True) == []
    assert problems([], mlfoundry_enable_reporting=True, mlfoundry_ml_repo="repo") == []
    assert "--mlfoundry_ml_repo" in problems([], mlfoundry_enable_reporting=True)[0]
    assert "pick one tracker" in problems(["mlflow"], mlfoundry_enable_reporting=True, mlfoundry_ml_repo="r")[0]
    assert "needs --report_to mlflow" in problems(["tensorboard"], mlflow_log_checkpoints=True)[0]


def test_secret_environment_values_are_masked_anywhere(monkeypatch):
    monkeypatch.setenv("MY_API_KEY", "abcdefgh12345")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # a short value is no secret
    masked = mask_secrets({"url": "s3://bucket/abcdefgh12345/x", "flag": "false", "hub_token": "t"})
    assert masked == {"url": f"s3://bucket/{MASK}/x", "flag": "false", "hub_token": MASK}
