"""Faults and bad input: every bad option as one exit-2 message before anything is loaded or created, one run per
output dir, huge records bounded by --max_length, Ctrl-C while tokenizing, a full disk while saving, bad data with a
local tracker store, secrets kept out of saved arguments. (The hung tracker and the planted-secrets search over every
saved file and the MLflow store are in test_tracking.py, beside the MLflow server they need.)"""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PYTHON_TRAIN, REPO, RUN_ENV, SAMPLE_CHAT, assert_refused, run_python_train, write_jsonl
from datasets import Dataset

import option_checks
import options
import train
from checkpoint_utils import (
    COMPLETE_MARKER,
    OUTPUT_DIR_LOCK,
    DiskFullError,
    ctrl_c_for_main_process_only,
    explain_disk_full,
    lock_output_dir,
)
from data_utils import max_record_chars, prepare_datasets, read_records, truncated_record
from options import DataArguments
from redaction import MASK, mask_secrets, register_secret


def parse(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", [str(REPO / "train.py"), "--model_id", "m", "--train_data", "d", *args])
    return options.parse_args()


def problems(monkeypatch, *args) -> list[str]:
    return train.find_argument_problems(*parse(monkeypatch, *args))


# Bad options: each alone is found by validation ...


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--learning_rate", "-0.001"], "--learning_rate -0.001 must be a positive number"),
        (["--use_lora", "true", "--lora_r", "0"], "--lora_r 0: the LoRA rank must be at least 1"),
        (["--max_length", "0"], "--max_length 0 must be at least 1"),
        (["--eval_size", "1.5"], "--eval_size 1.5: pass a fraction below 1"),
        (["--eval_size", "-1"], "--eval_size -1: pass a fraction below 1"),
        (["--resume_from_checkpoint", "/nonexistent/checkpoint-5"], "no such checkpoint directory"),
    ],
)
def test_each_bad_value_is_a_problem_naming_its_flag(monkeypatch, flags, named):
    found = problems(monkeypatch, *flags)
    assert any(named in problem for problem in found), found


def test_output_dir_that_is_a_file_or_read_only_is_a_problem(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert "is a file" in option_checks.output_dir_problems(str(a_file))[0]
    assert option_checks.output_dir_problems(str(tmp_path / "new" / "dir")) == []
    read_only = tmp_path / "ro"
    read_only.mkdir()
    # As root, permissions do not stop a write; a read-only mount does (access() reports EROFS).
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)]).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        assert "is not writable (read-only filesystem" in option_checks.output_dir_problems(str(read_only / "o"))[0]
    finally:
        subprocess.run(["umount", "--lazy", str(read_only)], check=True)


def write_safetensors(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"weight": torch.ones(64, 64)}, str(path))
    return path


def test_corrupt_or_truncated_safetensors_is_found_from_the_header(tmp_path):
    good = write_safetensors(tmp_path / "model.safetensors")
    assert option_checks.model_file_problems(str(tmp_path)) == []
    data = good.read_bytes()
    good.write_bytes(data[: len(data) - 100])
    assert "is truncated" in option_checks.model_file_problems(str(tmp_path))[0]
    good.write_bytes(struct.pack("<Q", 40) + b"{not json" + b" " * 40 + data[100:])
    assert "corrupt header" in option_checks.model_file_problems(str(tmp_path))[0]
    good.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    assert "corrupt header" in option_checks.model_file_problems(str(tmp_path))[0]


def test_precision_problems(monkeypatch):
    with pytest.raises(options.ArgumentError, match=r"--bf16 true and --fp16 true: pick one"):
        parse(monkeypatch, "--bf16", "true", "--fp16", "true")
    with pytest.raises(options.ArgumentError, match=r"--bf16 true needs a GPU with bfloat16.*--use_cpu true"):
        parse(monkeypatch, "--bf16", "true")  # this machine has no GPU
    monkeypatch.setattr(options, "cpu_has_bf16", lambda: False)
    with pytest.raises(options.ArgumentError, match=r"--bf16 true: this CPU has no bfloat16 instructions"):
        parse(monkeypatch, "--bf16", "true", "--use_cpu", "true")


def test_transformers_value_errors_become_argument_errors(monkeypatch):
    with pytest.raises(options.ArgumentError, match=r"invalid options: .*load_best_model_at_end"):
        parse(monkeypatch, "--load_best_model_at_end", "true", "--eval_strategy", "steps", "--save_strategy", "epoch")


def test_lora_and_qlora_together_train_qlora_and_say_so(monkeypatch, caplog):
    args = parse(monkeypatch, "--use_lora", "true", "--use_qlora", "true")
    with caplog.at_level("INFO"):
        train.validate_args(*args)
    assert "--use_lora true and --use_qlora true: training QLoRA" in caplog.text


@pytest.mark.parametrize("value", [["tensorboard", "mlflow"], ["tensorboard,mlflow"], ['["tensorboard", "mlflow"]']])
def test_report_to_takes_a_list_as_users_write_it(monkeypatch, value):
    training_args = parse(monkeypatch, "--report_to", *value)[-1]
    assert training_args.report_to == ["tensorboard", "mlflow"]
    assert parse(monkeypatch, "--report_to", "none")[-1].report_to == []


# ... and through the real entry point, all at once: exit 2, no traceback, every flag named, nothing created.


@pytest.mark.e2e
def test_bad_options_exit_2_before_anything_is_loaded_or_created(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    weights = write_safetensors(model / "model.safetensors")
    weights.write_bytes(weights.read_bytes()[:-100])
    output_file = tmp_path / "taken"
    output_file.write_text("not a directory")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = run_python_train(
        "--model_id", str(model), "--train_data", SAMPLE_CHAT, "--output_dir", str(output_file),
        "--learning_rate", "-1", "--use_lora", "true", "--lora_r", "0", "--max_length", "0", "--eval_size", "1.5",
        "--resume_from_checkpoint", str(tmp_path / "missing" / "checkpoint-5"),
    )  # fmt: skip
    assert_refused(
        result, "--learning_rate -1", "--lora_r 0", "--max_length 0", "--eval_size 1.5", "--resume_from_checkpoint",
        "--output_dir", "model.safetensors is truncated",
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    both = run_python_train("--model_id", str(model), "--train_data", SAMPLE_CHAT, "--bf16", "true", "--fp16", "true",
                      "--output_dir", str(tmp_path / "out"))  # fmt: skip
    assert_refused(both, "--bf16 true and --fp16 true")
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_bad_data_with_a_local_mlflow_store_creates_nothing(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "completion": "A"}, "{not json"])
    out = tmp_path / "out"
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the store goes to --output_dir/mlflow.db
    result = run_python_train("--model_id", str(tiny_llama), "--train_data", str(data), "--output_dir", str(out),
                        "--report_to", "mlflow", "--max_length", "64")  # fmt: skip
    assert_refused(result, "bad.jsonl:2")
    assert not out.exists()


# One run per output directory


@pytest.mark.e2e
def test_a_second_run_into_a_directory_in_use_is_refused_and_a_killed_run_leaves_no_lock(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    flags = ["--model_id", str(tiny_llama), "--train_data", SAMPLE_CHAT, "--output_dir", str(out), "--max_length",
             "128", "--max_num_samples", "64"]  # fmt: skip
    first = subprocess.Popen([*PYTHON_TRAIN, *flags], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, **RUN_ENV})  # fmt: skip
    try:
        lock = out / OUTPUT_DIR_LOCK
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().startswith("pid")):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        first.send_signal(signal.SIGSTOP)  # holds the lock, frozen, for as long as the test needs
        second = run_python_train(*flags)
        assert_refused(second, f"--output_dir {out} is in use by another run (pid {first.pid} on ", "started ")
        assert sorted(p.name for p in out.iterdir()) == [OUTPUT_DIR_LOCK]  # the refused run wrote nothing
    finally:
        first.kill()
        first.wait()
    # SIGKILL gives no chance to clean up; the kernel dropped the lock with the process, so it can be taken here.
    lock_output_dir(str(out), create=True)


def test_lock_is_per_process_and_reentrant(tmp_path):
    lock_output_dir(str(tmp_path / "new"), create=False)
    assert not (tmp_path / "new").exists()  # nothing is created before the data is valid
    lock_output_dir(str(tmp_path / "new"), create=True)
    lock_output_dir(str(tmp_path / "new"), create=True)  # already held here: nothing happens
    assert f"pid {os.getpid()} on " in (tmp_path / "new" / OUTPUT_DIR_LOCK).read_text()


# Huge records


@pytest.mark.e2e
def test_a_20_mb_line_meets_the_length_policy_in_seconds_with_its_line(tiny_llama, tmp_path):
    data = tmp_path / "train.jsonl"
    normal = json.dumps({"prompt": "Q: 2 + 2\nA:", "completion": " 4"})
    with open(data, "w") as handle:
        handle.write(f"{normal}\n{normal}\n")
        handle.write(json.dumps({"text": "forty two " * 2_000_000}) + "\n")  # 20 MB on line 3
        handle.write(f"{normal}\n")
    flags = ["--model_id", str(tiny_llama), "--train_data", str(data), "--max_length", "64", "--eval_size", "0",
             "--eval_strategy", "no", "--prepare_data_only", "true", "--data_cache_dir", "none"]  # fmt: skip
    started = time.monotonic()
    refused = run_python_train(*flags, "--output_dir", str(tmp_path / "refused"), timeout=120)
    # Tokenizing the line in full took more than 300 s and 3.8 GB; the pre-check reads and measures it.
    assert time.monotonic() - started < 100
    assert_refused(refused, "1 record(s) hold more than", f"{data}:3: 20000000 characters", "--long_sequence_strategy")
    assert not (tmp_path / "refused").exists()
    dropped = run_python_train(*flags, "--output_dir", str(tmp_path / "dropped"), "--long_sequence_strategy", "drop")
    assert dropped.returncode == 0, (dropped.stdout + dropped.stderr)[-4000:]
    assert "dropped 1 record(s) longer than" in dropped.stdout + dropped.stderr
    assert Dataset.load_from_disk(str(tmp_path / "dropped" / "prepared" / "train")).num_rows == 3


LONG = "The quick brown fox jumps over the lazy dog; 12 + 30 = 42. " * 60  # 3,540 characters
LONG_RECORDS = [
    {"messages": [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": LONG}]},
    {"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": "No."}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi!"},
                  {"role": "user", "content": "More?"}, {"role": "assistant", "content": LONG}]},
    {"prompt": "Q: " + LONG, "completion": " 42"},
    {"prompt": "Q: 12 + 30\nA:", "completion": LONG},
    {"text": LONG},
    {"prompt": "Q: 7 - 2\nA:", "completion": " 5"},
]  # fmt: skip


def prepared(tokenizer, tmp_path, max_length, max_chars, strategy="truncate") -> list[dict]:
    args = DataArguments(train_data=str(write_jsonl(tmp_path / "train.jsonl", LONG_RECORDS)), eval_size=0,
                         long_sequence_strategy=strategy)  # fmt: skip
    raw = Dataset.from_list(read_records(args.train_data, "--train_data", args, max_chars=max_chars))
    return [{k: row[k] for k in ("input_ids", "labels")} for row in prepare_datasets(args, tokenizer, raw, None,
                                                                                      max_length)[0]]  # fmt: skip


def test_character_pre_check_truncates_exactly_where_tokens_would(tokenizer, tmp_path):
    max_length = 24
    max_chars = max_record_chars(tokenizer, max_length)
    assert max_chars < len(LONG)  # every long record is cut before tokenizing
    # Reference: every record tokenized in full, then truncated to max_length tokens.
    assert prepared(tokenizer, tmp_path, max_length, max_chars) == prepared(tokenizer, tmp_path, max_length, None)
    # Negative control: a cut far below the bound (6 characters kept) changes the samples.
    assert prepared(tokenizer, tmp_path, max_length, 3) != prepared(tokenizer, tmp_path, max_length, None)


def test_character_pre_check_drops_only_records_that_are_surely_too_long(tokenizer, tmp_path):
    max_length = 24
    dropped = prepared(tokenizer, tmp_path, max_length, max_record_chars(tokenizer, max_length), "drop")
    assert dropped == prepared(tokenizer, tmp_path, max_length, None, "drop")


def test_truncated_record_keeps_turn_order():
    row = {"kind": "chat", "messages": json.dumps(LONG_RECORDS[2]["messages"]), "prompt": None, "completion": None,
           "text": None}  # fmt: skip
    messages = json.loads(truncated_record(row, 20)["messages"])
    assert [m["content"] for m in messages] == ["Hi", "Hi!", "More?", LONG[:10]]


# Ctrl-C while tokenizing


def test_ctrl_c_while_tokenizing_interrupts_only_the_main_process():
    """Inside the block, a forked worker (datasets' tokenizing pool) ignores Ctrl-C and exits normally, while the main
    process raises KeyboardInterrupt, which train.py turns into one line and exit 130."""
    with pytest.raises(KeyboardInterrupt), ctrl_c_for_main_process_only():
        worker = os.fork()
        if worker == 0:
            os.kill(os.getpid(), signal.SIGINT)
            os._exit(0)
        assert os.waitstatus_to_exitcode(os.waitpid(worker, 0)[1]) == 0
        os.kill(os.getpid(), signal.SIGINT)


# A full disk while saving


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs: a real full disk (needs root to mount)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # a failed writer may still hold its file open


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_full_disk_while_saving_names_the_disk_and_the_intact_checkpoint(tiny_disk, writer):
    intact = tiny_disk / "checkpoint-2"
    intact.mkdir()
    (intact / COMPLETE_MARKER).write_text('{"global_step": 2}')
    (tiny_disk / "checkpoint-4").mkdir()  # the save that fails: no marker
    big = {"weight": torch.zeros(1_000_000)}  # 4 MB on a 1 MiB disk
    with pytest.raises(DiskFullError) as raised, explain_disk_full(str(tiny_disk)):
        if writer == "torch.save":  # fails with "basic_ios::clear: iostream error", no errno
            torch.save(big, tiny_disk / "checkpoint-4" / "optimizer.pt")
        else:
            from safetensors.torch import save_file

            save_file(big, str(tiny_disk / "checkpoint-4" / "model.safetensors"))
    message = str(raised.value)
    assert f"the disk holding {tiny_disk} is full" in message
    assert f"The last complete checkpoint, {intact}, is intact" in message
    assert "--resume_from_checkpoint true" in message


def test_other_save_errors_are_not_called_a_full_disk(tmp_path):
    with pytest.raises(PermissionError), explain_disk_full(str(tmp_path)):
        raise PermissionError(13, "Permission denied")


# Secrets


def test_one_masking_function_covers_urls_flags_and_environment(monkeypatch):
    monkeypatch.setenv("SERVICE_API_KEY", "env-secret-value-123")
    register_secret("flag-secret-value-456")
    text = ("https://user:pw@h/x https://tok@h/d.jsonl?token=abc&sig=def s3://b/env-secret-value-123 "
            "flag-secret-value-456 az://container@account/x")  # fmt: skip
    assert mask_secrets(text) == (
        f"https://user:{MASK}@h/x https://{MASK}@h/d.jsonl?token={MASK}&sig={MASK} s3://b/{MASK} {MASK} "
        "az://container@account/x"
    )
    masked = mask_secrets({"hub_token": "x", "sample_max_new_tokens": 64, "include_num_input_tokens_seen": "all"})
    assert masked == {"hub_token": MASK, "sample_max_new_tokens": 64, "include_num_input_tokens_seen": "all"}


def test_trainer_arguments_hold_no_hub_token_yet_push_can_use_it(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    secret = "hf_planted_hub_token_8812"
    args = parse(monkeypatch, "--hub_token", secret, "--run_name", f"https://{secret}@host/run",
                 "--output_dir", str(tmp_path))[-1]  # fmt: skip
    torch.save(args, tmp_path / "as_given.bin")
    torch.save(train.trainer_copy_of_arguments(args), tmp_path / "training_args.bin")
    assert secret.encode() in (tmp_path / "as_given.bin").read_bytes()  # negative control: the leak it fixes
    assert secret.encode() not in (tmp_path / "training_args.bin").read_bytes()
    assert os.environ["HF_TOKEN"] == secret  # what huggingface_hub's push uses when the Trainer passes no token
    assert args.hub_token == secret  # the caller's arguments are unchanged
