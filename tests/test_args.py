"""Argument parsing: train.args defaults, command-line overrides, launcher compatibility, refusals."""

import json
import re
import shlex
import sys
from dataclasses import fields

import pytest
from conftest import REPO, run_command
from conftest import parse_options as parse
from transformers import TrainingArguments

import options
import quick_help
import train
from config_files import ConfigFileError

# Every flag of the TrueFoundry launcher, with values as users pass them.
TRUEFOUNDRY_LAUNCHER_FLAGS = """
--deepspeed '' --bf16 false --fp16 false --use_flash_attention false --model_id some/model --train_data data.jsonl
--max_num_samples 0 --eval_data NA --eval_size 0.1 --num_train_epochs 2 --max_steps -1 --gradient_accumulation_steps 4
--gradient_checkpointing true --learning_rate 0.0001 --output_dir out --train_on_prompt false --logging_strategy steps
--logging_steps 5 --save_strategy steps --save_steps 0.05 --evaluation_strategy steps --eval_steps 0.05
--use_lora true --use_qlora true --qlora_bit_length 4 --lora_target_modules auto --lora_r 16 --lora_alpha 32
--lora_dropout 0.05 --lora_bias none --mlfoundry_enable_reporting false --mlfoundry_ml_repo my-repo
--mlfoundry_run_name run-1 --mlfoundry_checkpoint_artifact_name ckpt --mlfoundry_log_checkpoints true
--resume_from_checkpoint true --auto_find_batch_size false --per_device_train_batch_size 2
--per_device_eval_batch_size 2 --cleanup_output_dir_on_start false --torch_compile false --use_ddp false
--max_length 2048 --pad_to_max_length false --early_stopping_patience 3 --early_stopping_threshold 0.01
"""


def test_train_args_supplies_defaults_that_differ_from_upstream(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/elsewhere/launcher.py"])  # found beside options.py, not via sys.argv[0]
    model, data, lora, tracking, training = options.parse_args(["--model_id", "m", "--train_data", "d.jsonl"])
    defaults = options.read_defaults_file()
    assert training.learning_rate == float(defaults["learning_rate"]) == 0.0002
    assert training.logging_steps == float(defaults["logging_steps"])
    assert lora.lora_r == 32  # our own options' defaults live in options.py
    upstream = {f.name: f.default for f in fields(TrainingArguments)}
    for name, value in defaults.items():  # only what differs from upstream TrainingArguments
        assert name in upstream and str(upstream[name]) != value, name


def test_help_shows_the_effective_defaults_and_where_they_come_from():
    text = options.build_parser().format_help()
    assert re.search(r"--learning_rate LEARNING_RATE.*?\(default:\s+0\.0002\)", text, re.S)
    assert re.search(r"--output_dir OUTPUT_DIR.*?\(default:\s+\./outputs/run\)", text, re.S)
    assert str(options.TRAIN_ARGS_FILE) in " ".join(text.split()) and "--config FILE" in text


def test_a_bare_help_is_stored_as_the_parser_prints_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quick_help, "HELP_DIR", tmp_path)
    monkeypatch.setenv("COLUMNS", "100")
    quick_help.print_cached_help_and_exit(["--help"])  # nothing stored yet: returns, the parser answers
    with pytest.raises(SystemExit):
        options.parse_args(["--help"])
    printed = capsys.readouterr().out
    assert printed == options.build_parser().format_help() and "--learning_rate" in printed
    with pytest.raises(SystemExit) as exited:
        quick_help.print_cached_help_and_exit(["-h"])
    assert exited.value.code == 0 and capsys.readouterr().out == printed
    for argv in (["--help", "--lora_r", "3"], ["run.yaml", "--help"], ["--model_id", "m"]):
        quick_help.print_cached_help_and_exit(argv)  # only a bare --help is answered from the cache


def test_the_help_key_changes_with_what_the_text_is_made_from(tmp_path, monkeypatch):
    monkeypatch.setattr(quick_help, "PROJECT_DIR", tmp_path)
    (tmp_path / "options.py").write_text("X = 1\n")
    (tmp_path / "train.args").write_text("--learning_rate 2e-4\n")
    key = quick_help.help_key()
    assert quick_help.help_key() == key
    (tmp_path / "train.args").write_text("--learning_rate 1e-4\n")
    after_defaults = quick_help.help_key()
    (tmp_path / "options.py").write_text("X = 2\n")
    after_code = quick_help.help_key()
    monkeypatch.setenv("COLUMNS", "57")
    assert len({key, after_defaults, after_code, quick_help.help_key()}) == 4


def test_help_texts_are_pruned_and_an_unwritable_cache_only_costs_speed(tmp_path, monkeypatch):
    monkeypatch.setattr(quick_help, "HELP_DIR", tmp_path / "help")
    for width in range(20, 20 + quick_help.KEPT_TEXTS + 3):
        monkeypatch.setenv("COLUMNS", str(width))  # a new key each time
        quick_help.store_help(f"text {width}")
    kept = list((tmp_path / "help").iterdir())
    assert len(kept) == quick_help.KEPT_TEXTS and all(path.suffix == ".txt" for path in kept)
    assert quick_help.cached_help_path().read_text() == f"text {width}"  # the newest is kept
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(quick_help, "HELP_DIR", tmp_path / "file" / "help")  # a directory that cannot be made
    quick_help.store_help("text")
    quick_help.print_cached_help_and_exit(["--help"])  # nothing stored: returns, the parser answers


@pytest.mark.e2e
def test_a_repeated_help_does_not_import_the_libraries(tmp_path):
    env = {"HF_HOME": str(tmp_path), "COLUMNS": "100"}
    first = run_command([sys.executable, "-X", "importtime", str(REPO / "train.py"), "--help"], env=env)
    second = run_command([sys.executable, "-X", "importtime", str(REPO / "train.py"), "--help"], env=env)
    assert first.returncode == second.returncode == 0 and "--learning_rate" in first.stdout
    assert second.stdout == first.stdout
    imported = [re.findall(r"\|\s+(transformers|torch)$", run.stderr, re.M) for run in (first, second)]
    assert imported[0] and not imported[1]  # the first run builds the parser (the check can fail), the second reads


def test_config_flag_and_positional_file_are_the_same(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model_id": "m", "train_data": "d.jsonl", "lora_r": 5}))
    for argv in ([str(config)], ["--config", str(config)], [f"--config={config}"]):
        model, _, lora, *_ = options.parse_args([*argv, "--lora_alpha", "3"])
        assert (model.model_id, lora.lora_r, lora.lora_alpha) == ("m", 5, 3)


def test_a_config_value_outside_the_choices_names_the_file(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model_id": "m", "train_data": "d.jsonl", "lr_scheduler_type": "cosinus"}))
    with pytest.raises(ConfigFileError, match=r"run.json: lr_scheduler_type: 'cosinus' is not one of linear, cosine"):
        options.parse_args([str(config)])
    config.write_text(json.dumps({"model_id": "m", "train_data": "d.jsonl", "qlora_bit_length": "four"}))
    with pytest.raises(ConfigFileError, match=r"run.json: qlora_bit_length: 'four' is not one of 4, 8"):
        options.parse_args([str(config)])


def test_command_line_overrides_train_args(monkeypatch):
    args = parse(monkeypatch, "--model_id", "m", "--train_data", "d.jsonl", "--learning_rate", "0.123", "--lora_r", "3")
    assert args["training"].learning_rate == 0.123
    assert args["lora"].lora_r == 3


def test_every_truefoundry_launcher_flag_parses_with_its_meaning(monkeypatch):
    args = parse(monkeypatch, *shlex.split(TRUEFOUNDRY_LAUNCHER_FLAGS))
    training = args["training"]
    assert training.eval_strategy == "steps"  # --evaluation_strategy is the old name
    assert training.save_steps == 0.05 and training.eval_steps == 0.05
    assert training.gradient_checkpointing is True and training.bf16 is False
    assert training.metric_for_best_model == "eval_loss"  # early stopping watches the eval loss
    assert args["lora"].use_qlora is True and args["lora"].qlora_bit_length == 4
    assert args["data"].max_length == 2048 and args["data"].eval_data == "NA"
    assert args["tracking"].mlfoundry_ml_repo == "my-repo"


def test_bare_boolean_flags_mean_true(monkeypatch):
    args = parse(monkeypatch, "--model_id", "m", "--train_data", "d", "--use_lora", "--train_on_prompt")
    assert args["lora"].use_lora is True and args["data"].train_on_prompt is True


def validation_problems(monkeypatch, *extra):
    args = parse(monkeypatch, "--model_id", "m", "--train_data", "d", *extra)
    return train.find_argument_problems(args["model"], args["data"], args["lora"], args["tracking"], args["training"])


def test_valid_defaults_have_no_problems(monkeypatch):
    assert validation_problems(monkeypatch) == []


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--mlfoundry_enable_reporting", "true"], "--mlfoundry_enable_reporting true needs --mlfoundry_ml_repo"),
        (["--report_to", "mlflow", "--mlfoundry_enable_reporting", "true", "--mlfoundry_ml_repo", "r"], "pick one"),
        (["--mlflow_log_checkpoints", "true"], "--mlflow_log_checkpoints true needs --report_to mlflow"),
        (["--eval_size", "0", "--eval_strategy", "steps"], "--eval_strategy needs evaluation data"),
        (["--eval_size", "0", "--eval_accuracy", "true"], "--eval_accuracy needs evaluation data"),
        (["--eval_strategy", "no", "--eval_accuracy_during_training", "true"], "needs evaluation: set --eval_strategy"),
        (["--eval_strategy", "no", "--early_stopping_patience", "2"], "--early_stopping_patience needs evaluation"),
        (["--use_lora", "true", "--lora_target_modules", "q_proj"], "--lora_target_modules must be 'auto' or a JSON"),
        (["--cleanup_output_dir_on_start", "true", "--resume_from_checkpoint", "true"], "would delete the checkpoints"),
        (["--enable_jit_checkpoint", "true"], "this script handles SIGTERM itself"),
    ],
)
def test_unsupported_or_incompatible_options_are_refused(monkeypatch, flags, problem):
    assert any(problem in p for p in validation_problems(monkeypatch, *flags))


def test_all_problems_are_reported_together(monkeypatch):
    problems = validation_problems(
        monkeypatch, "--eval_size", "0", "--eval_strategy", "steps", "--mlfoundry_enable_reporting", "true"
    )
    assert len(problems) == 2


def test_no_eval_data_turns_the_default_evaluation_off(monkeypatch, tmp_path):
    """train.args evaluates every 20% of training; --eval_size 0 without --eval_data turns that default off, while
    an --eval_strategy the user gives (here in a config file) is kept and refused."""
    assert parse(monkeypatch, "--model_id", "m", "--train_data", "d")["training"].eval_strategy == "steps"
    args = parse(monkeypatch, "--model_id", "m", "--train_data", "d", "--eval_size", "0")
    assert args["training"].eval_strategy == "no" and args["training"].do_eval is False
    assert train.find_argument_problems(*args.values()) == []
    config = tmp_path / "run.yaml"
    config.write_text("model_id: m\ntrain_data: d\neval_size: 0\neval_strategy: steps\n")
    monkeypatch.setattr(sys, "argv", [str(REPO / "train.py"), str(config)])
    model, data, lora, tracking, training = train.parse_args()
    assert training.eval_strategy == "steps"
    assert (
        "--eval_strategy needs evaluation data"
        in train.find_argument_problems(model, data, lora, tracking, training)[0]
    )


def test_deepspeed_config_must_exist(monkeypatch):
    with pytest.raises(options.ArgumentError, match="--deepspeed ds.json: no such file; see deepspeed_configs/"):
        parse(monkeypatch, "--model_id", "m", "--train_data", "d", "--deepspeed", "ds.json")
    config = str(REPO / "deepspeed_configs" / "3_ds_z2_config.json")
    args = parse(monkeypatch, "--model_id", "m", "--train_data", "d", "--deepspeed", config, "--use_cpu", "true")
    assert args["training"].hf_deepspeed_config.config["zero_optimization"]["stage"] == 2


def test_every_option_has_help():
    parser = options.HfArgumentParser(options.ARGUMENT_GROUPS)
    own_options = {f for group in options.ARGUMENT_GROUPS[:-1] for f in group.__dataclass_fields__}
    own_options |= set(options.FinetuneTrainingArguments.__dataclass_fields__) - set(
        TrainingArguments.__dataclass_fields__
    )
    for action in parser._actions:
        if action.dest in own_options:
            assert action.help, action.dest


def test_readme_option_tables_are_generated_from_options_py():
    sys.path.insert(0, str(REPO / "scripts"))
    from options_table import options_tables

    readme = (REPO / "README.md").read_text()
    start = readme.index("-->\n", readme.index("<!-- options tables:")) + 4
    end = readme.index("<!-- end of options tables -->")
    assert readme[start:end].strip() == options_tables().strip(), "run python scripts/options_table.py; paste it in"
