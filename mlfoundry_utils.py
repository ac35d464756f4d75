"""The run's arguments as they may be shown to a tracker or written to disk, secrets masked."""

import dataclasses
import json
from pathlib import Path

from redaction import mask_secrets


def run_arguments(*argument_groups) -> dict:
    """Every option of the run, as JSON-ready values with secrets masked."""
    merged = {}
    for group in argument_groups:
        values = group.to_dict() if hasattr(group, "to_dict") else dataclasses.asdict(group)
        merged.update(values)
    return mask_secrets(json.loads(json.dumps(merged, default=str)))


def save_run_arguments(output_dir: str, *argument_groups) -> None:
    path = Path(output_dir) / "run_args.json"
    path.write_text(json.dumps(run_arguments(*argument_groups), indent=2, sort_keys=True) + "\n")
