"""Config files: our own options, Axolotl's vocabulary and RunPod-style job bodies; the launcher's Axolotl flags."""

import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, assert_refused, run_python_train, train_ok, write_jsonl
from conftest import parse_options as parse
from datasets import Dataset, load_from_disk

import options
from config_files import ConfigFileError, command_line_tokens, load_config_file, translate_config
from data_utils import prepare_datasets, read_records
from model_utils import load_tokenizer
from options import DataArguments, ModelArguments

KNOWN = options.option_names()
# Flags other branches add; translation must target them once they exist.
LATER_FLAGS = {"sample_packing", "eval_sample_packing", "mlflow_experiment_name"}
PLANTED_HF_TOKEN = "hf_PlantedSecretValue0123456789"
PLANTED_WANDB_KEY = "0123456789abcdefPlantedWandbKey"


def write_yaml(path, config: dict):
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_train_args_then_file_then_command_line(monkeypatch, tmp_path):
    config = write_yaml(tmp_path / "run.yaml", {"model_id": "m", "train_data": "d.jsonl", "learning_rate": 0.01,
                                                "lora_r": 7, "lora_target_modules": ["q_proj", "v_proj"],
                                                "save_strategy": False})  # fmt: skip
    args = parse(monkeypatch, config, "--learning_rate", "0.02")
    assert args["training"].learning_rate == 0.02  # command line beats the file
    assert args["lora"].lora_r == 7  # the file beats the default (32)
    assert args["lora"].lora_target_modules == '["q_proj", "v_proj"]'
    assert args["training"].save_strategy == "no"  # YAML reads an unquoted `no` as false
    assert args["training"].weight_decay == 0.0 and args["lora"].lora_alpha == 64  # defaults


def test_json_file_of_our_options(monkeypatch, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model_id": "m", "train_data": "d.jsonl", "use_qlora": True, "max_length": 99}))
    args = parse(monkeypatch, str(path))
    assert args["lora"].use_qlora is True and args["data"].max_length == 99


AXOLOTL = {
    "base_model": "org/model", "model_type": "LlamaForCausalLM", "tokenizer_type": "AutoTokenizer",
    "datasets": [{"path": "data/train.jsonl", "type": "alpaca", "ds_type": "json"}], "val_set_size": 0.05,
    "adapter": "qlora", "load_in_4bit": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
    "lora_target_modules": ["q_proj", "v_proj"], "lora_modules_to_save": ["embed_tokens", "lm_head"],
    "sequence_len": 512, "sample_packing": True, "eval_sample_packing": False, "pad_to_sequence_len": True,
    "micro_batch_size": 2, "eval_batch_size": 4, "gradient_accumulation_steps": 8, "num_epochs": 2,
    "optimizer": "adamw_torch", "lr_scheduler": "linear", "learning_rate": 1e-4, "warmup_ratio": 0.1,
    "weight_decay": 0.01, "max_grad_norm": 0.5, "adam_beta2": 0.95, "adam_epsilon": 1e-6, "bf16": "auto",
    "fp16": False, "gradient_checkpointing": True, "flash_attention": True, "sdp_attention": True,
    "train_on_inputs": True, "special_tokens": {"pad_token": "<pad>"}, "chat_template": "tokenizer_default",
    "default_system_message": "Be brief.", "output_dir": "out", "saves_per_epoch": 4, "evals_per_epoch": 1,
    "save_total_limit": 3, "early_stopping_patience": 2, "auto_resume_from_checkpoints": True, "seed": 7,
    "logging_steps": 3, "dataset_prepared_path": "prepared", "trust_remote_code": False,
    "mlflow_experiment_name": "exp", "wandb_project": None, "xformers_attention": None, "strict": False,
}  # fmt: skip


BF16_AUTO = str(torch.cuda.is_available() and torch.cuda.is_bf16_supported()).lower()


def flags(values: dict[str, str]) -> dict[str, str]:
    """A translation's values as the flags they stand for."""
    return {f"--{name}": value for name, value in values.items()}


def test_axolotl_keys_are_translated():
    translation = translate_config(AXOLOTL, KNOWN | LATER_FLAGS)
    assert translation.untranslated == []
    assert flags(translation.values) == {
        "--train_data": "data/train.jsonl", "--data_format": "alpaca", "--eval_size": "0.05",
        "--model_id": "org/model", "--use_qlora": "true", "--qlora_bit_length": "4", "--lora_r": "8",
        "--lora_alpha": "16", "--lora_dropout": "0.1", "--lora_target_modules": '["q_proj", "v_proj"]',
        "--lora_modules_to_save": '["embed_tokens", "lm_head"]', "--max_length": "512",
        "--long_sequence_strategy": "drop", "--sample_packing": "true", "--eval_sample_packing": "false",
        "--pad_to_max_length": "true", "--per_device_train_batch_size": "2", "--per_device_eval_batch_size": "4",
        "--gradient_accumulation_steps": "8", "--num_train_epochs": "2", "--optim": "adamw_torch",
        "--lr_scheduler_type": "linear", "--learning_rate": "0.0001", "--warmup_steps": "0.1",
        "--weight_decay": "0.01", "--max_grad_norm": "0.5", "--adam_beta2": "0.95", "--adam_epsilon": "1e-06",
        "--bf16": BF16_AUTO, "--fp16": "false", "--activation_checkpointing": "true", "--use_flash_attention": "true",
        "--train_on_prompt": "true", "--special_tokens": '{"pad_token": "<pad>"}',
        "--default_system_message": "Be brief.", "--output_dir": "out", "--save_strategy": "steps",
        "--save_steps": "0.125", "--eval_strategy": "epoch", "--save_total_limit": "3",
        "--early_stopping_patience": "2", "--resume_from_checkpoint": "true", "--seed": "7", "--logging_steps": "3",
        "--data_cache_dir": "prepared", "--trust_remote_code": "false", "--mlflow_experiment_name": "exp",
        "--strict": "false",
    }  # fmt: skip


def test_axolotl_translation_parses(monkeypatch, tmp_path):
    config = {key: value for key, value in AXOLOTL.items() if key not in LATER_FLAGS}
    args = parse(monkeypatch, write_yaml(tmp_path / "axolotl.yml", config), "--lora_r", "4")
    assert args["model"].model_id == "org/model" and args["lora"].use_qlora and args["lora"].lora_r == 4
    assert args["data"].data_format == "alpaca" and args["data"].train_on_prompt is True
    assert args["training"].per_device_train_batch_size == 2 and args["training"].num_train_epochs == 2
    assert args["training"].warmup_steps == 0.1 and args["training"].activation_checkpointing is True


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"datasets": [{"path": "org/data", "split": "validation", "type": "sharegpt"}]},
         {"--train_data": '[{"path":"org/data","split":"validation"}]', "--data_format": "sharegpt",
          "--eval_size": "0", "--eval_strategy": "no"}),
        ({"datasets": [{"path": "org/data", "data_files": "train.jsonl", "type": "chat_template",
                        "field_messages": "conversations"}], "test_datasets": [{"path": "eval.jsonl"}],
          "evals_per_epoch": 4, "num_epochs": 1},
         {"--train_data": '[{"path":"org/data","data_files":["train.jsonl"],"format":"chat",'
                          '"fields":{"messages":"conversations"},"roles":{"human":"user","gpt":"assistant"}}]',
          "--eval_data": "eval.jsonl", "--eval_strategy": "steps", "--eval_steps": "0.25",
          "--num_train_epochs": "1"}),
        ({"datasets": [{"path": "t.jsonl", "type": "completion"}], "evals_per_epoch": 2, "eval_steps": 5},
         {"--train_data": "t.jsonl", "--data_format": "text", "--eval_size": "0", "--eval_strategy": "no"}),
        ({"base_model": "m", "adapter": "lora", "load_in_8bit": True, "lora_target_linear": True,
          "lora_target_modules": ["q_proj"]},
         {"--model_id": "m", "--use_qlora": "true", "--qlora_bit_length": "8", "--lora_target_modules": "auto",
          "--eval_size": "0", "--eval_strategy": "no"}),
        ({"base_model": "m", "chat_template": "jinja", "chat_template_jinja": "{{ messages }}", "saves_per_epoch": 1},
         {"--model_id": "m", "--chat_template": "{{ messages }}", "--save_strategy": "epoch", "--eval_size": "0",
          "--eval_strategy": "no"}),
    ],
)  # fmt: skip
def test_axolotl_data_and_schedule(config, expected):
    translation = translate_config(config, KNOWN)
    assert translation.untranslated == []
    assert flags(translation.values) == expected


def test_axolotl_keys_without_equivalent_are_listed():
    config = {"base_model": "m", "datasets": [{"path": "a"}, {"path": "b"}], "chat_template": "chatml",
              "unfrozen_parameters": ["x"], "gptq": False, "rl": None, "sample_packing": True}  # fmt: skip
    translation = translate_config(config, KNOWN - LATER_FLAGS)
    assert [reason.split()[0] for reason in translation.untranslated] == ["unfrozen_parameters:", "sample_packing:"]
    assert "--sample_packing is not available" in translation.untranslated[1]  # a flag this version does not have
    assert [reason.split()[0] for reason in translation.refused] == ["chat_template"]  # changes the data: stops
    assert flags(translation.values)["--train_data"] == '[{"path":"a"},{"path":"b"}]'


def test_unknown_keys_warn_once_and_strict_stops(tmp_path, caplog):
    config = write_yaml(tmp_path / "run.yaml", {"model_id": "m", "learning_rat": 0.1, "num_epoch": 3})
    with caplog.at_level(logging.WARNING, logger="config_files"):
        model, data, *_, training = options.parse_args([config, "--train_data", "d"])
    assert (model.model_id, data.train_data) == ("m", "d")
    assert training.learning_rate == 0.0002 and training.num_train_epochs == 3  # the misspelt keys set nothing
    [record] = caplog.records
    assert "2 key(s)" in record.message and "learning_rat" in record.message and "num_epoch" in record.message
    with pytest.raises(ConfigFileError, match="learning_rat: no such option"):
        options.parse_args([config, "--train_data", "d", "--strict", "true"])
    strict_file = write_yaml(tmp_path / "strict.yaml", {"strict": True, "learning_rat": 0.1})
    with pytest.raises(ConfigFileError, match="1 key"):
        options.parse_args(["--config", strict_file, "--model_id", "m", "--train_data", "d"])


@pytest.mark.e2e
def test_strict_error_exits_2_before_loading_anything(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", {"base_model": "m", "datasets": [{"path": "d"}], "rope_scaling": 2})
    out = tmp_path / "out"
    result = run_python_train(config, "--strict", "true", "--output_dir", str(out))
    assert_refused(result, "rope_scaling: no such option")
    assert not out.exists()


def test_bad_files_are_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_id: [unclosed\n")
    with pytest.raises(ConfigFileError, match="cannot be read as YAML"):
        options.parse_args([str(bad)])
    with pytest.raises(ConfigFileError, match="no such config file"):
        options.parse_args([str(tmp_path / "missing.json")])
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigFileError, match="expected a mapping"):
        options.parse_args([str(listing)])


def test_truefoundry_launcher_axolotl_flags(monkeypatch):
    launcher_flags = ["--base_model", "org/m", "--train_data_uri", "s3://b/train.jsonl", "--val_data_uri", "None",
                      "--val_set_size", "0.2", "--micro_batch_size", "3", "--num_epochs", "2", "--adapter", "qlora",
                      "--lora_target_linear", "true", "--train_on_inputs", "False",
                      "--flash_attention=true"]  # fmt: skip
    args = parse(monkeypatch, *launcher_flags)
    assert args["model"].model_id == "org/m" and args["model"].use_flash_attention is True
    assert args["data"].train_data == "s3://b/train.jsonl" and args["data"].eval_data == "NA"
    assert args["data"].eval_size == 0.2 and args["data"].train_on_prompt is False
    assert args["training"].per_device_train_batch_size == 3 and args["training"].num_train_epochs == 2
    assert args["lora"].use_qlora is True and args["lora"].lora_target_modules == "auto"
    no_eval = parse(monkeypatch, "--base_model", "m", "--train_data_uri", "d", "--val_set_size", "0")
    assert no_eval["data"].eval_size == 0 and no_eval["training"].eval_strategy == "no"
    with pytest.raises(ConfigFileError, match="--adapter prefix"):
        command_line_tokens(["--adapter", "prefix"])


def job_body(args: dict, hf_token: str = PLANTED_HF_TOKEN, wandb_key: str = PLANTED_WANDB_KEY) -> dict:
    return {"input": {"user_id": "u", "model_id": "my-model", "run_id": "run-7",
                      "credentials": {"hf_token": hf_token, "wandb_api_key": wandb_key}, "args": args}}  # fmt: skip


def test_job_body_credentials_go_to_the_environment_only(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "before")  # restored after the test
    monkeypatch.setenv("WANDB_API_KEY", "before")
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job_body({"base_model": "org/m", "datasets": [{"path": "d.jsonl"}]})))
    translation = load_config_file(path, KNOWN)
    assert os.environ["HF_TOKEN"] == "before"  # loading the file sets nothing; a run that parses does
    assert PLANTED_HF_TOKEN not in json.dumps(translation.values) and PLANTED_WANDB_KEY not in json.dumps(
        translation.values
    )
    assert flags(translation.values)["--run_name"] == "run-7" and flags(translation.values)["--model_id"] == "org/m"
    args = parse(monkeypatch, str(path))
    assert os.environ["HF_TOKEN"] == PLANTED_HF_TOKEN and os.environ["WANDB_API_KEY"] == PLANTED_WANDB_KEY
    assert args["training"].run_name == "run-7" and args["model"].model_id == "org/m"
    path.write_text(json.dumps({"input": {"args": {}, "credentials": {"aws_secret": "x"}}}))
    with pytest.raises(ConfigFileError, match="unknown credential 'aws_secret'"):
        load_config_file(path, KNOWN)


# End to end: every shipped example trains the tiny model (a few steps).

FEW_STEPS = ["--max_steps", "6", "--logging_steps", "2", "--dataloader_num_workers", "0"]


def example_ok(example: str, tiny_llama, output_dir, *flags: str):
    result = train_ok(str(REPO / "examples" / example), "--model_id", str(tiny_llama), "--output_dir",
                      str(output_dir), *FEW_STEPS, *flags)  # fmt: skip
    assert (output_dir / "model.safetensors").exists() and (output_dir / "adapter").is_dir()
    assert "no equivalent" not in result.stderr + result.stdout  # the examples translate completely
    return result, json.loads((output_dir / "run_args.json").read_text())


@pytest.mark.e2e
def test_example_axolotl_qlora_trains(tiny_llama, tmp_path):
    _, args = example_ok("axolotl_qlora_tiny.yaml", tiny_llama, tmp_path / "out", "--report_to", "none")
    assert args["use_qlora"] is True and args["qlora_bit_length"] == 4 and args["lora_target_modules"] == "auto"
    assert json.loads(args["eval_data"]) == [{"path": "sample_data/chat_eval.jsonl",
                                              "roles": {"human": "user", "gpt": "assistant"}}]  # fmt: skip
    assert args["data_format"] == "chat"
    assert args["max_length"] == 128
    assert args["per_device_train_batch_size"] == 8 and args["learning_rate"] == 0.005


@pytest.mark.e2e
def test_example_own_yaml_trains_and_writes_samples(tiny_llama, tmp_path):
    _, args = example_ok("lora_tiny.yaml", tiny_llama, tmp_path / "out", "--report_to", "none")
    assert args["use_lora"] is True and args["lora_r"] == 16 and args["train_data"] == "sample_data/completion.jsonl"
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(sample["prompt"].startswith("<s>Q:") for sample in samples)  # BOS included


@pytest.mark.e2e
def test_example_job_body_trains_without_leaking_credentials(tiny_llama, tmp_path):
    body = json.loads((REPO / "examples" / "runpod_job.json").read_text())
    body["input"]["credentials"] = {"hf_token": PLANTED_HF_TOKEN, "wandb_api_key": PLANTED_WANDB_KEY}
    job = tmp_path / "job.json"
    job.write_text(json.dumps(body))
    out = tmp_path / "out"
    result = train_ok(str(job), "--model_id", str(tiny_llama), "--output_dir", str(out), *FEW_STEPS,
                      "--report_to", "tensorboard")  # fmt: skip
    assert json.loads((out / "run_args.json").read_text())["run_name"] == "tiny-llama-lora"
    written = b"".join(path.read_bytes() for path in out.rglob("*") if path.is_file())
    assert b"tiny-llama-lora" in written  # the run's arguments reached the tracker (TensorBoard) and run_args.json
    for secret in (PLANTED_HF_TOKEN, PLANTED_WANDB_KEY):
        assert secret not in result.stdout + result.stderr
        assert secret.encode() not in written


# Real Axolotl configs (tests/fixtures/axolotl, verbatim; SOURCES.md says where each came from), with their datasets
# pointed at local files of the right shape and base_model at the tiny model.

AXOLOTL_FIXTURES = REPO / "tests" / "fixtures" / "axolotl"
# What each cannot honour here: the start of every reason it stops with (nothing: it reads all of its data).
FIXTURE_REFUSALS = {
    "code-llama_7b_lora.yml": [],
    "llama-3_lora-1b.yml": [],
    "llama-3_instruct-lora-8b.yml": ["chat_template 'llama3'"],
    "gemma3_gemma-3-1b-qlora.yml": ["chat_template 'gemma3'"],
    "qwen3_32b-qlora.yaml": ["chat_template 'qwen3'"],
    "phi_phi3-ft.yml": ["datasets[0] (PATH): type 'alpaca:phi'", "chat_template 'phi_3'"],
    "tiny-llama_pretrain.yml": ["pretraining_dataset: streamed pretraining datasets are not read here"],
}


def local_records(entry: dict, count: int = 12) -> list[dict]:
    """Records of the shape an Axolotl dataset entry describes."""
    if entry.get("type") == "chat_template":
        mapping = {"role": "role", "content": "content", **(entry.get("message_property_mappings") or {})}
        names = {"user": "human", "assistant": "gpt"} if mapping["role"] == "from" else {}
        turns = [("user", "What is {i} + {i}?"), ("assistant", "{i} + {i} = {d}"), ("user", "Thanks"),
                 ("assistant", "Glad to help.")]  # fmt: skip
        return [{entry.get("field_messages", "messages"): [
            {mapping["role"]: names.get(role, role), mapping["content"]: text.format(i=i, d=2 * i)}
            for role, text in turns]} for i in range(count)]  # fmt: skip
    if entry.get("type") in (None, "pretrain", "completion"):
        return [{"text": f"Record {i} of a plain text corpus."} for i in range(count)]
    return [{"instruction": "Double the number.", "input": str(i), "output": str(2 * i)} for i in range(count)]


def localized_fixture(name: str, tmp_path, tiny_llama, **changes) -> tuple[Path, dict]:
    """The fixture with local data files and the tiny model, written to tmp_path (the original stays verbatim)."""
    config = yaml.safe_load((AXOLOTL_FIXTURES / name).read_text())
    config.update(base_model=str(tiny_llama), output_dir=str(tmp_path / "out"), **changes)
    if config.get("dataset_prepared_path"):  # a relative cache path would land in the repository
        config["dataset_prepared_path"] = str(tmp_path / "prepared-cache")
    for key in ("datasets", "test_datasets", "pretraining_dataset"):
        for index, entry in enumerate(config.get(key) or []):
            entry["path"] = str(write_jsonl(tmp_path / f"{key}{index}.jsonl", local_records(entry)))
            entry.pop("name", None) if key != "pretraining_dataset" else None
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path, config


@pytest.mark.parametrize("name", sorted(FIXTURE_REFUSALS))
def test_axolotl_fixtures_translate_or_name_what_they_cannot_honour(name, tmp_path, tiny_llama):
    path, config = localized_fixture(name, tmp_path, tiny_llama)
    translation = translate_config(config, KNOWN)
    expected = [reason.replace("PATH", str(tmp_path / "datasets0.jsonl")) for reason in FIXTURE_REFUSALS[name]]
    assert len(translation.refused) == len(expected)
    for reason, start in zip(translation.refused, expected, strict=True):
        assert reason.startswith(start), reason
    if expected:
        with pytest.raises(ConfigFileError) as error:
            load_config_file(path, KNOWN)
        assert str(error.value).startswith(f"{path}: {len(expected)} data key(s) cannot be honoured")
        return
    tokens = flags(translation.values)  # every entry became a source: nothing dropped
    sources = json.loads(tokens["--train_data"]) if tokens["--train_data"].startswith("[") else [tokens["--train_data"]]
    assert len(sources) == len(config["datasets"]) and tokens["--data_format"] == "alpaca"


@pytest.mark.e2e
def test_axolotl_chat_template_fixture_prepares_exact_masks(tiny_llama, tmp_path):
    """gemma-3's config (sharegpt-style conversations read through message_property_mappings), with the named
    template replaced by the tokenizer's: the prepared samples equal those of the same chats in our own shape."""
    path, config = localized_fixture("gemma3_gemma-3-1b-qlora.yml", tmp_path, tiny_llama,
                                     chat_template="tokenizer_default")  # fmt: skip
    result = train_ok(str(path), "--prepare_data_only", "true", "--max_length", "128", "--tf32", "false")
    assert "no equivalent" not in result.stdout + result.stderr
    prepared = load_from_disk(str(tmp_path / "out" / "prepared" / "train"))
    native = [{"messages": [{"role": {"human": "user", "gpt": "assistant"}[m["from"]], "content": m["value"]}
                            for m in record["conversations"]]}
              for record in local_records(config["datasets"][0])]  # fmt: skip
    args = DataArguments(train_data=str(write_jsonl(tmp_path / "native.jsonl", native)), eval_size=0)
    tokenizer = load_tokenizer(ModelArguments(model_id=str(tiny_llama)))
    reference = prepare_datasets(args, tokenizer, Dataset.from_list(read_records(args.train_data, "-", args)), None,
                                 128)[0]  # fmt: skip
    assert prepared["input_ids"] == reference["input_ids"] and prepared["labels"] == reference["labels"]
    assert "--train_data sources: read / invalid / skipped / kept" in result.stdout + result.stderr


@pytest.mark.e2e
def test_axolotl_fixture_trains_end_to_end(tiny_llama, tmp_path):
    """llama-3's LoRA example on local alpaca records: trains (a few steps), every record accounted for."""
    path, _ = localized_fixture("llama-3_lora-1b.yml", tmp_path, tiny_llama)
    # CPU stand-ins for what needs a GPU, and a loss watchdog for an untrained tiny model (loss ~6.3, the file
    # stops above 5); the data options stay as the file says.
    result = train_ok(str(path), "--optim", "adamw_torch", "--use_flash_attention", "false", "--max_length", "128",
                      "--report_to", "none", "--loss_watchdog_threshold", "100", *FEW_STEPS)  # fmt: skip
    out = result.stdout + result.stderr
    assert "datasets0.jsonl: 12 / 0 / 0 / 10 / 2 /" in out  # read / invalid / skipped / kept / eval (val_set_size)
    assert (tmp_path / "out" / "adapter").is_dir()


@pytest.mark.e2e
def test_config_file_problems_never_print_the_usage(monkeypatch, tmp_path, capsys):
    """Two datasets, one training roles Axolotl's default does not; a file with no data at all; a bad value: one
    message naming the file and the key, exit 2, no argparse usage text, nothing created."""
    two = write_yaml(tmp_path / "two.yaml", {"base_model": "m", "datasets": [
        {"path": "a.jsonl", "type": "alpaca"},
        {"path": "b.jsonl", "type": "chat_template", "roles_to_train": ["user", "assistant"], "train_on_eos": "all",
         "drop_system_message": True}]})  # fmt: skip
    output = assert_refused(run_python_train(two, "--output_dir", str(tmp_path / "out")), two)
    assert "datasets[1] (b.jsonl): drop_system_message: no equivalent here; roles_to_train ['user', 'assistant']" in (
        output
    )
    assert "; train_on_eos 'all': the end-of-turn token" in output
    assert "usage:" not in output and not (tmp_path / "out").exists()
    # the same path in process: parse errors of a config-file run raise ConfigFileError, argparse prints nothing
    empty = write_yaml(tmp_path / "empty.yaml", {"base_model": "m", "learning_rate": 0.1})
    bad_value = write_yaml(tmp_path / "bad.yaml", {"base_model": "m", "datasets": ["a.jsonl"], "lora_r": "many"})
    bad_source = write_yaml(tmp_path / "own.yaml", {"model_id": "m", "train_data": [{"path": "d.jsonl", "wieght": 2}]})
    for config, message in (
        (empty, "no training data: add datasets (Axolotl) or train_data"),
        (bad_value, "argument --lora_r/--lora-r: invalid int value: 'many'"),
        (bad_source, "--train_data source 1 (d.jsonl): unknown option(s) wieght"),
    ):
        with pytest.raises(ConfigFileError, match="^" + re.escape(f"{config}: {message}")):
            parse(monkeypatch, config)
        assert capsys.readouterr().err == ""


def test_axolotl_datasets_become_one_source_each():
    config = {
        "base_model": "m", "chat_template": "tokenizer_default", "chat_template_kwargs": {"enable_thinking": False},
        "datasets": [
            {"path": "org/alpaca", "type": "alpaca", "name": "en", "split": "train[:10%]", "shards": 4,
             "shards_idx": 2},
            {"path": "chats/", "type": "chat_template", "data_files": ["a.jsonl", "b.jsonl"], "ds_type": "json",
             "field_messages": "conversations", "message_field_role": "from", "message_field_content": "value",
             "roles": {"user": ["human"], "assistant": ["gpt", "bot"]}, "roles_to_train": ["assistant"],
             "train_on_eos": "turn", "chat_template": "tokenizer_default"},
            {"path": "corpus.parquet", "type": "completion", "field": "body", "ds_type": "parquet"},
        ],
        "test_datasets": [{"path": "eval.jsonl", "type": "chat_template"}],
    }  # fmt: skip
    translation = translate_config(config, KNOWN)
    assert translation.refused == [] and translation.untranslated == []
    tokens = flags(translation.values)
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    assert json.loads(tokens["--train_data"]) == [
        {"path": "org/alpaca", "split": "train[:10%]", "name": "en", "shards": 4, "shard_index": 2,
         "format": "alpaca", **kwargs},
        {"path": "chats/", "data_files": ["a.jsonl", "b.jsonl"], "format": "chat",
         "fields": {"messages": "conversations"}, "message_fields": {"role": "from", "content": "value"},
         "roles": {"human": "user", "gpt": "assistant", "bot": "assistant"}, **kwargs},
        {"path": "corpus.parquet", "format": "text", "fields": {"text": "body"}, **kwargs},
    ]  # fmt: skip
    assert json.loads(tokens["--eval_data"]) == [
        {"path": "eval.jsonl", "format": "chat", "roles": {"human": "user", "gpt": "assistant"}, **kwargs}
    ]
    assert "--data_format" not in tokens  # the shapes differ: each source carries its own
    assert [s.path for s in DataArguments(train_data=tokens["--train_data"]).sources("train")] == [
        "org/alpaca", "chats/", "corpus.parquet"]  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"path": "d", "type": "input_output"}, "type 'input_output': supported types are alpaca, sharegpt"),
        ({"path": "d", "type": "chat_template", "chat_template": "chatml"}, "chat_template 'chatml': every source is"),
        ({"path": "d", "ds_type": "csv"}, "ds_type 'csv': only JSON / JSON Lines and Parquet files are read"),
        ({"path": "d", "split": "test", "data_files": "x.jsonl"}, "split 'test' with data_files"),
        ({"path": "d", "type": "alpaca", "field_messages": "m"}, "field_messages apply to type: chat_template only"),
        ({"path": "d", "type": "chat_template", "train_on_eos": "last"}, "train_on_eos 'last': the end-of-turn"),
        ({"path": "d", "revision": "abc"}, "revision: no equivalent here"),
    ],
)
def test_axolotl_entries_that_cannot_be_honoured(entry, reason):
    translation = translate_config({"base_model": "m", "datasets": ["ok.jsonl", entry]}, KNOWN)
    [refused] = translation.refused
    assert refused.startswith("datasets[1] (d): ") and reason in refused, refused
