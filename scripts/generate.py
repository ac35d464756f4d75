"""Chat with a fine-tuned model: the --output_dir of a train.py run (a merged model, or an adapter with its base).

Prompts come from the command line, a file (--prompts_file, one per line) or stdin (one per line); with a terminal
on stdin and no prompts, it is an interactive chat that keeps the conversation (/reset clears it, Ctrl-D ends it).
Each prompt is sent as a user turn through the model's chat template (--raw: continued as plain text, a literal \\n
becoming a newline). Greedy decoding unless --do_sample.

    python scripts/generate.py outputs/quickstart "What is 12 + 30?"
    echo "What is 2 + 2?" | python scripts/generate.py outputs/quickstart --format jsonl
    python scripts/generate.py outputs/run/adapter --base_model meta-llama/Llama-3.1-8B-Instruct
    python scripts/generate.py outputs/quickstart        # interactive
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import set_seed  # noqa: E402

from model_utils import chat_prompt_ids, generate_text, load_for_generation  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESET_COMMAND = "/reset"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="A train.py --output_dir (merged model or adapter), or any model directory.")
    parser.add_argument("prompts", nargs="*", help="User messages to answer (each on its own).")
    parser.add_argument("--prompts_file", type=Path, help="A text file with one user message per line.")
    parser.add_argument("--system", help="System message put before every conversation.")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="Continue each prompt as plain text, without the chat template "
        "(models trained on prompt/completion or text records).",
    )
    parser.add_argument(
        "--base_model", help="Base model of an adapter directory, when the path saved in the adapter moved."
    )
    parser.add_argument("--max_new_tokens", type=int, default=256, help="Most tokens per answer.")
    parser.add_argument("--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature (with --do_sample).")
    parser.add_argument("--top_p", type=float, default=0.9, help="Nucleus sampling mass (with --do_sample).")
    parser.add_argument("--top_k", type=int, default=50, help="Top-k sampling (with --do_sample).")
    parser.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeats.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed for sampling.")
    parser.add_argument("--format", choices=("text", "jsonl"), default="text", help="How answers are printed.")
    parser.add_argument(
        "--dtype", choices=("auto", *DTYPES), default="auto", help="auto: bfloat16 on a GPU that has it, else fp32."
    )
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="Run code shipped with the model repo (trusted repos only)."
    )
    return parser.parse_args()


def resolve_dtype(name: str) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def generation_options(args: argparse.Namespace) -> dict:
    options = {"max_new_tokens": args.max_new_tokens, "repetition_penalty": args.repetition_penalty}
    if args.do_sample:
        options.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    else:
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return options


def system_turn(args: argparse.Namespace) -> list[dict]:
    return [{"role": "system", "content": args.system}] if args.system else []


def batch_prompts(args: argparse.Namespace) -> list[str] | None:
    """Prompts from the command line, a file or piped stdin; None means an interactive chat."""
    if args.prompts:
        return args.prompts
    if args.prompts_file:
        return [line for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if sys.stdin.isatty():
        return None
    return [line for line in sys.stdin.read().splitlines() if line.strip()]


def answer(model, tokenizer, messages: list[dict], options: dict) -> str:
    return generate_text(model, tokenizer, chat_prompt_ids(tokenizer, messages), **options).strip()


def continue_text(model, tokenizer, prompt: str, options: dict) -> str:
    return generate_text(model, tokenizer, tokenizer(prompt)["input_ids"], **options)


def answer_each(model, tokenizer, prompts: list[str], args: argparse.Namespace) -> None:
    options = generation_options(args)
    for prompt in prompts:
        if args.raw:
            reply = continue_text(model, tokenizer, prompt.replace("\\n", "\n"), options)
        else:
            reply = answer(model, tokenizer, [*system_turn(args), {"role": "user", "content": prompt}], options)
        if args.format == "jsonl":
            print(json.dumps({"prompt": prompt, "answer": reply}, ensure_ascii=False), flush=True)
        else:
            print(f"> {prompt}\n{reply}\n", flush=True)


def chat(model, tokenizer, args: argparse.Namespace) -> None:
    options = generation_options(args)
    messages = system_turn(args)
    print(f"Chatting with {args.model_dir}. {RESET_COMMAND} starts over, Ctrl-D ends.")
    while True:
        try:
            prompt = input("> ").strip()
        except EOFError:
            print()
            return
        if prompt == RESET_COMMAND:
            messages = system_turn(args)
            continue
        if prompt:
            messages.append({"role": "user", "content": prompt})
            reply = answer(model, tokenizer, messages, options)
            messages.append({"role": "assistant", "content": reply})
            print(reply)


def main() -> None:
    args = parse_args()
    set_seed(args.seed)
    prompts = batch_prompts(args)
    device_map = "auto" if torch.cuda.is_available() else None
    model, tokenizer = load_for_generation(
        args.model_dir, args.base_model, resolve_dtype(args.dtype), device_map, args.trust_remote_code
    )
    if prompts is None and args.raw:
        sys.exit("--raw needs prompts (arguments, --prompts_file or piped stdin).")
    if prompts is None:
        chat(model, tokenizer, args)
    else:
        answer_each(model, tokenizer, prompts, args)


if __name__ == "__main__":
    main()
