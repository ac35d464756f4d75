"""Exact-match answer accuracy of a model on a JSONL file, with the code train.py --eval_accuracy logs.

python scripts/eval_accuracy.py models/tiny-llama --data sample_data/chat_eval.jsonl   # a base model
python scripts/eval_accuracy.py outputs/quickstart --data sample_data/chat_eval.jsonl  # a fine-tuned one

Each record is prepared as train.py prepares evaluation data (chat template, loss mask); the prompt is everything
before the first trained answer and the model's greedy answer must equal that answer exactly.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import quiet  # noqa: E402  (first: bitsandbytes warns while the libraries below are imported)

# isort: split
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from data_utils import prepare_datasets, read_records  # noqa: E402
from evaluation import answer_accuracy  # noqa: E402
from model_utils import load_for_generation  # noqa: E402
from options import DataArguments


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="A model directory (merged or base) or an adapter directory.")
    parser.add_argument("--data", required=True, help="JSONL evaluation records, in any format train.py reads.")
    parser.add_argument("--limit", type=int, default=0, help="Most prompts answered (0: all).")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Most tokens generated per answer.")
    parser.add_argument("--max_length", type=int, default=1024, help="Longest prepared sample, as in train.py.")
    parser.add_argument("--examples", type=int, default=3, help="Answers printed beside the accuracy.")
    parser.add_argument("--label", default="accuracy", help="Printed before the figure, e.g. 'before fine-tuning'.")
    parser.add_argument("--output", type=Path, help="Also write every prompt, reference and answer here (JSONL).")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    quiet.quiet_run(uses_deepspeed=False)
    model, tokenizer = load_for_generation(args.model_dir, None, torch.float32, None, trust_remote_code=False)
    data_args = DataArguments(train_data=args.data, eval_size=0)
    raw = Dataset.from_list(read_records(args.data, "--data", data_args))
    dataset, _ = prepare_datasets(data_args, tokenizer, raw, None, args.max_length)
    accuracy, results = answer_accuracy(model, tokenizer, dataset, args.limit, args.max_new_tokens)
    correct = sum(result["exact_match"] for result in results)
    print(f"{args.label}: {accuracy:.0%} exact match ({correct}/{len(results)} held-out prompts)")
    for result in results[: args.examples]:
        question = result["prompt"]
        print(f"  {question!r}\n    -> {result['answer']!r} (reference {result['reference']!r})")
    if args.output:
        args.output.write_text("".join(json.dumps(result, ensure_ascii=False) + "\n" for result in results))


if __name__ == "__main__":
    main()
