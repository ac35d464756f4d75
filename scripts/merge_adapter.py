"""Merge a LoRA/DoRA/IA3 adapter into a 16/32-bit reload of its base model and save the full model with its tokenizer.

The base is never the quantized one a QLoRA run trained on: merging into 4-bit weights would re-quantize them. This
is what train.py does at the end of a run with --merge_adapters true (the default); use it for runs saved with
--merge_adapters false, for an intermediate checkpoint, or to merge in another dtype.

    python scripts/merge_adapter.py outputs/run --output_dir outputs/run-merged
    python scripts/merge_adapter.py outputs/run/checkpoint-200 --output_dir merged --dtype bfloat16 --device cuda
"""

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from model_utils import adapter_base_model, merge_adapter  # noqa: E402
from options import ModelArguments  # noqa: E402

logger = logging.getLogger("merge_adapter")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir", type=Path, help="Directory holding adapter_config.json (a train.py output).")
    parser.add_argument("--output_dir", type=Path, required=True, help="New (or empty) directory for the model.")
    parser.add_argument("--base_model", help="Base model id or directory. Default: the one saved in the adapter.")
    parser.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="Precision of the merged weights. auto: bfloat16 on a GPU that supports it, float32 otherwise.",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="Where the merge runs.")
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="Run code shipped with the model repo (trusted repos only)."
    )
    return parser.parse_args()


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    gpu_bf16 = device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if gpu_bf16 else torch.float32


def check_paths(args: argparse.Namespace) -> str:
    """The base model to merge into; exits with a message when a path is wrong."""
    base = adapter_base_model(args.adapter_dir)
    if base is None:
        sys.exit(f"{args.adapter_dir}: no adapter_config.json; pass the directory holding the adapter.")
    if args.output_dir.exists() and any(args.output_dir.iterdir()):
        sys.exit(f"--output_dir {args.output_dir} is not empty; choose a new directory.")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU is available; use --device cpu.")
    return args.base_model or base


def main() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args()
    base = check_paths(args)
    model_args = ModelArguments(model_id=base, trust_remote_code=args.trust_remote_code)
    has_tokenizer = (args.adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(
        args.adapter_dir if has_tokenizer else base, trust_remote_code=args.trust_remote_code
    )
    dtype = resolve_dtype(args.dtype, args.device)
    device_map = {"": args.device} if args.device == "cuda" else None
    merged = merge_adapter(model_args, str(args.adapter_dir), tokenizer, dtype, device_map)
    merged.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    logger.info("Merged %s into %s (%s); saved in %s.", args.adapter_dir, base, dtype, args.output_dir)


if __name__ == "__main__":
    main()
