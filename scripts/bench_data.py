"""Data preparation throughput: read + validate + tokenize (with loss masks) a synthetic chat dataset.

    python scripts/bench_data.py                      # 50,000 chats, the tiny local model's tokenizer
    python scripts/bench_data.py --model_id Qwen/Qwen2.5-0.5B-Instruct --num_samples 100000
    python scripts/bench_data.py --chat_template tests/fixtures/chat_templates/qwen3.jinja  # another template

Prints one JSON line: samples, tokens, seconds per phase, samples/s and tokens/s. The cache is off, so every run
does the full work.
"""

import argparse
import json
import logging
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from datasets import Dataset, disable_progress_bars  # noqa: E402

from data_utils import apply_chat_template_option, prepare_datasets, read_records  # noqa: E402
from model_utils import load_tokenizer  # noqa: E402
from options import DataArguments, ModelArguments  # noqa: E402

WORDS = "the a model data train token loss mask chat answer question number value result step check".split()


def synthetic_chat(rng: random.Random) -> dict:
    """One to three user/assistant exchanges with a system prompt half of the time."""
    messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.5 else []
    for _ in range(rng.choice([1, 1, 2, 3])):
        messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(5, 40)))})
        messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(5, 80)))})
    return {"messages": messages}


def write_dataset(path: Path, num_samples: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(num_samples):
            handle.write(json.dumps(synthetic_chat(rng)) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_id", default=None, help="Tokenizer to use. Default: the tiny local model.")
    parser.add_argument("--num_samples", type=int, default=50_000)
    parser.add_argument("--num_workers", type=int, default=None, help="--preprocessing_num_workers (default: auto).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat_template", default=None, help="--chat_template (a Jinja file or string) for the chats.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    disable_progress_bars()

    with tempfile.TemporaryDirectory() as scratch:
        model_id = args.model_id
        if model_id is None:
            model_id = str(Path(scratch) / "tiny-llama")
            subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), "--output_dir", model_id],
                           check=True, capture_output=True)  # fmt: skip
        data = Path(scratch) / "chats.jsonl"
        write_dataset(data, args.num_samples, args.seed)
        tokenizer = load_tokenizer(ModelArguments(model_id=model_id))
        data_args = DataArguments(
            train_data=str(data), eval_size=0, long_sequence_strategy="truncate",
            preprocessing_num_workers=args.num_workers, data_cache_dir="none", chat_template=args.chat_template,
        )  # fmt: skip
        apply_chat_template_option(tokenizer, data_args)

        start = time.perf_counter()
        raw = Dataset.from_list(read_records(data_args.train_data, "--train_data", data_args))
        read_s = time.perf_counter() - start
        train, _ = prepare_datasets(data_args, tokenizer, raw, None, max_length=4096)
        total_s = time.perf_counter() - start

    tokens = sum(len(ids) for ids in train["input_ids"])
    print(json.dumps({
        "samples": len(train), "tokens": tokens, "read_validate_s": round(read_s, 2),
        "tokenize_s": round(total_s - read_s, 2), "total_s": round(total_s, 2),
        "samples_per_s": round(len(train) / total_s), "tokens_per_s": round(tokens / total_s),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
