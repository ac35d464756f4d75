"""Summarize a finished run: loss and answer accuracy (train.py --eval_accuracy), before and after, with examples.

python scripts/show_run.py outputs/quickstart --before outputs/quickstart-base-answers.jsonl
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from output_layout import ANSWERS_FILE  # noqa: E402


def first_and_last(log_history: list[dict], key: str) -> tuple[float, float] | None:
    values = [entry[key] for entry in log_history if key in entry]
    return (values[0], values[-1]) if values else None


def print_losses(output_dir: Path) -> None:
    log_history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    for label, key in (("train loss", "loss"), ("eval loss", "eval_loss")):
        values = first_and_last(log_history, key)
        if values:
            print(f"{label:>10}: {values[0]:.4f} (first logged) -> {values[1]:.4f} (last logged)")


def read_answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def accuracy_line(label: str, answers: list[dict]) -> str:
    correct = sum(answer["exact_match"] for answer in answers)
    return f"{label}: {correct / len(answers):.0%} exact match ({correct}/{len(answers)} held-out prompts)"


def question_of(prompt: str) -> str:
    """The last user turn of a rendered chat prompt, or the whole prompt when it has none."""
    marker = "user\n"
    return prompt.rsplit(marker, 1)[-1].split("<|im_end|>")[0] if marker in prompt else prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path, help="The --output_dir of a finished train.py run.")
    parser.add_argument("--before", type=Path, help="scripts/eval_accuracy.py --output of the base model.")
    parser.add_argument("--examples", type=int, default=3, help="Example answers to print.")
    args = parser.parse_args()
    print_losses(args.output_dir)
    after = read_answers(args.output_dir / ANSWERS_FILE)
    before = read_answers(args.before) if args.before else None
    if before:
        print(accuracy_line("before fine-tuning", before))
    print(accuracy_line(" after fine-tuning", after))
    for index, answer in enumerate(after[: args.examples]):
        print(f"  Q: {question_of(answer['prompt'])}")
        if before:
            print(f"     before: {before[index]['answer'][:60]!r}")
        print(f"     after:  {answer['answer']!r} (expected {answer['reference']!r})")


if __name__ == "__main__":
    main()
