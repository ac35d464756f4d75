"""Run train.py in this process, then write this process's peak GPU memory to $PEAK_MEMORY_FILE (rank 0 only)."""

import json
import os
import runpy
import sys
from pathlib import Path

import torch

TRAIN = Path(__file__).resolve().parents[2] / "train.py"

if __name__ == "__main__":
    sys.argv[0] = str(TRAIN)  # as `python train.py` sets it (argparse's prog name)
    sys.path.insert(0, str(TRAIN.parent))
    try:
        runpy.run_path(str(TRAIN), run_name="__main__")
    finally:
        if os.environ.get("RANK", "0") == "0":
            peak = {"max_memory_allocated": torch.cuda.max_memory_allocated(), "device": torch.cuda.get_device_name()}
            Path(os.environ["PEAK_MEMORY_FILE"]).write_text(json.dumps(peak))
