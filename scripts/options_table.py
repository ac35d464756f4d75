"""Print the README's option tables from options.py, so the help text lives in one place.

    python scripts/options_table.py > /tmp/options.md   # then paste between the README's option-table markers
tests/test_args.py checks that the README holds exactly this output.
"""

import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from huggingface_hub.constants import HF_HOME  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import options  # noqa: E402

UPSTREAM = {field.name: field for field in fields(TrainingArguments)}


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def listed_fields(group) -> list:
    """Every field of our own groups; of the training arguments, what we add or change (train.args included)."""
    if group is not options.FinetuneTrainingArguments:
        return [field for field in fields(group) if field.init]
    changed = set(options.read_defaults_file())
    return [field for field in fields(group)
            if field.init and (field.name not in UPSTREAM or field is not UPSTREAM[field.name]
                               or field.name in changed)]  # fmt: skip


def table(group, defaults: dict, helps: dict) -> list[str]:
    title = group.__name__ + (" (additions and changed defaults)" if group is options.FinetuneTrainingArguments else "")
    lines = [f"#### {title}", "", "| flag | default | what it does |", "|---|---|---|"]
    for field in listed_fields(group):
        default = "required" if helps[field.name][1] else defaults[field.name]
        if isinstance(default, list):
            default = " ".join(map(str, default))
        default = str(default).replace(HF_HOME, "$HF_HOME")  # the same table on every machine
        lines.append(f"| `--{field.name}` | `{cell(default)}` | {cell(helps[field.name][0])} |")
    return lines + [""]


def options_tables() -> str:
    parser = options.build_parser()
    helps = {action.dest: (action.help or "", action.required) for action in parser._actions}
    defaults = {action.dest: action.default for action in parser._actions}
    lines = []
    for group in options.ARGUMENT_GROUPS:
        lines += table(group, defaults, helps)
    return "\n".join(lines)


if __name__ == "__main__":
    print(options_tables())
