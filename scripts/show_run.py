"""Summarize a finished run: loss before and after training, and one generation from the saved model.

python scripts/show_run.py outputs/quickstart --prompt "What is 12 + 30?"
"""

import argparse
import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer


def first_and_last(log_history: list[dict], key: str) -> tuple[float, float] | None:
    values = [entry[key] for entry in log_history if key in entry]
    return (values[0], values[-1]) if values else None


def print_losses(output_dir: Path) -> None:
    log_history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    for label, key in (("train loss", "loss"), ("eval loss", "eval_loss")):
        values = first_and_last(log_history, key)
        if values:
            print(f"{label:>10}: {values[0]:.4f} (first logged) -> {values[1]:.4f} (last logged)")


def generate(output_dir: Path, prompt: str, max_new_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path, help="The --output_dir of a finished train.py run.")
    parser.add_argument("--prompt", default="What is 12 + 30?", help="User message to answer with the chat template.")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="Most tokens to generate.")
    args = parser.parse_args()
    print_losses(args.output_dir)
    print(f"    prompt: {args.prompt}")
    print(f"    answer: {generate(args.output_dir, args.prompt, args.max_new_tokens)}")


if __name__ == "__main__":
    main()
