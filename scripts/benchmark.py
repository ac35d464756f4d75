"""Sample packing throughput: the same samples trained padded and packed, per attention backend, through train.py.

    python scripts/benchmark.py                       # CPU: 256-wide 4-layer Llama, 400 chats, rows of 1024 tokens
    python scripts/benchmark.py --num_samples 4000 --hidden_size 1024 --num_layers 8 --extra_args "--bf16 true"
    python scripts/benchmark.py --backends varlen sdpa --extra_args "--bf16 true"     # GPU

Builds a random-init Llama of the given size with the local tokenizer, writes a deterministic chat dataset with
log-normal (long-tailed) lengths up to --max_length, prepares it once (every run reads the same cached
tokenization), then trains one epoch padded and one packed for each --backends entry (default: every backend this
machine runs; varlen is packed only). All runs take about the same number of samples (and trained tokens) per
optimizer step, so their losses are comparable: a packed batch is --batch_size x mean sample length / --max_length
rows.

Prints one JSON line per run: attn_implementation, sample_packing, real_tokens (tokens of the samples),
computed_tokens (tokens the model ran, padding included, as the Trainer counts them), padding_efficiency,
train_runtime_s, real_tokens_per_s, peak_memory_mb (peak RSS of the training process; on GPU the peak allocated
memory when the run logs it), final_loss (the last logged training loss) and train_loss (mean over the run); then a
summary line per backend.
"""

import argparse
import json
import math
import os
import random
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

from make_sample_data import SYSTEM_PROMPT, chat_record, random_problem  # noqa: E402

from output_layout import PREPARED_SUBDIR  # noqa: E402

# Log-normal sample lengths (median e^6 = 403 tokens): about a third of the samples are longer than half of a
# 1,024-token row, the share that keeps rows of at most 1,024 tokens from being filled.
LENGTH_MU, LENGTH_SIGMA = 6.0, 0.7


def target_length(rng: random.Random, max_length: int) -> int:
    return max(40, min(int(math.exp(rng.gauss(LENGTH_MU, LENGTH_SIGMA))), max_length))


def available_backends() -> list[str]:
    """The attention backends this machine runs (varlen and flash_attention_2 need a CUDA GPU)."""
    from transformers.utils import is_flash_attn_2_available

    from attention import varlen_available

    return (
        ["sdpa", "eager"]
        + (["varlen"] if varlen_available() else [])
        + (["flash_attention_2"] if is_flash_attn_2_available() else [])
    )


def long_chat(rng: random.Random, tokenizer, length: int, max_length: int) -> dict:
    """Arithmetic exchanges (learnable, so the loss falls) until the chat holds about `length` tokens."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    tokens = len(tokenizer(SYSTEM_PROMPT)["input_ids"]) + 4
    while tokens < length:
        user, assistant = chat_record(rng, random_problem(rng))["messages"][-2:]
        messages += [user, assistant]
        tokens += len(tokenizer(user["content"] + assistant["content"])["input_ids"]) + 8  # + template tokens
    while len(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]) > max_length:
        del messages[-2:]
    return {"messages": messages}


def write_dataset(path: Path, tokenizer, num_samples: int, max_length: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(num_samples):
            handle.write(json.dumps(long_chat(rng, tokenizer, target_length(rng, max_length), max_length)) + "\n")


def run(command: list[str]) -> tuple[int, float]:
    """Run a command; return its exit code and the peak RSS of the process in MiB."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    code = process.returncode = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{shlex.join(command)} failed ({code}):\n{output[-3000:]}")
    return code, usage.ru_maxrss / 1024


def summarise(output_dir: Path, backend: str, packing: bool, real_tokens: int, peak_rss_mb: float) -> dict:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    final = history[-1]
    gpu_peaks = [value for entry in history for key, value in entry.items() if "peak" in key and "mem" in key]
    computed = final["num_input_tokens_seen"]
    return {
        "attn_implementation": backend,
        "sample_packing": packing,
        "real_tokens": real_tokens,
        "computed_tokens": computed,
        "padding_efficiency": round(real_tokens / computed, 4),
        "train_runtime_s": round(final["train_runtime"], 2),
        "real_tokens_per_s": round(real_tokens / final["train_runtime"], 1),
        "peak_memory_mb": round(max(gpu_peaks) if gpu_peaks else peak_rss_mb),
        "final_loss": [entry["loss"] for entry in history if "loss" in entry][-1],
        "train_loss": round(final["train_loss"], 4),
        "optimizer_steps": final["step"],
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_samples", type=int, default=400, help="Chats in the dataset (one epoch is trained).")
    parser.add_argument("--max_length", type=int, default=1024, help="Row length (packed) and longest sample.")
    parser.add_argument("--batch_size", type=int, default=8, help="Samples per batch without packing.")
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["packed", "unpacked"], default=None, help="Run one of the two only.")
    parser.add_argument(
        "--backends", nargs="+", choices=["sdpa", "eager", "varlen", "flash_attention_2"], default=None,
        help="--attn_implementation values to compare (default: every one this machine runs).",
    )  # fmt: skip
    parser.add_argument("--extra_args", default="", help='More train.py flags for both runs, e.g. "--bf16 true".')
    parser.add_argument("--work_dir", type=Path, default=None, help="Keep model, data and runs here (default: temp).")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        model = work / "model"
        subprocess.run([
            sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), "--output_dir", str(model),
            "--hidden_size", str(args.hidden_size), "--num_layers", str(args.num_layers),
            "--num_heads", str(args.num_heads), "--vocab_size", str(args.vocab_size),
            "--max_position_embeddings", str(args.max_length),
        ], check=True, capture_output=True)  # fmt: skip

        from transformers import AutoTokenizer

        data = work / "chats.jsonl"
        write_dataset(data, AutoTokenizer.from_pretrained(model), args.num_samples, args.max_length, args.seed)
        common = [
            sys.executable, str(REPO / "train.py"), "--model_id", str(model), "--train_data", str(data),
            "--data_cache_dir", str(work / "cache"), "--max_length", str(args.max_length), "--eval_size", "0",
            "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--num_train_epochs", "1",
            "--learning_rate", str(args.learning_rate), "--warmup_steps", "0", "--logging_steps", "5",
            "--seed", str(args.seed), "--dataloader_num_workers", "0", "--include_num_input_tokens_seen", "all",
            "--cleanup_output_dir_on_start", "true", *shlex.split(args.extra_args),
        ]  # fmt: skip

        # Prepare once: both runs read the same cached tokenization, and neither timing includes it.
        run([*common, "--output_dir", str(work / "prepared"), "--prepare_data_only", "true"])
        from datasets import load_from_disk

        lengths = load_from_disk(str(work / "prepared" / PREPARED_SUBDIR / "train"))["length"]
        real_tokens, mean_length = sum(lengths), sum(lengths) / len(lengths)
        packed_rows = max(1, round(args.batch_size * mean_length / args.max_length))
        print(
            f"{len(lengths)} samples, {real_tokens} tokens, mean {mean_length:.0f}, max {max(lengths)}; "
            f"batches: {args.batch_size} samples unpacked, {packed_rows} packed rows of <= {args.max_length} tokens",
            file=sys.stderr,
        )

        results = {}
        for backend in args.backends or available_backends():
            for packing in (False, True):
                if (args.only and args.only != ("packed" if packing else "unpacked")) or (backend, packing) == (
                    "varlen", False
                ):  # fmt: skip
                    continue
                output_dir = work / f"{backend}-{'packed' if packing else 'padded'}"
                batch_size = packed_rows if packing else args.batch_size
                _, peak_rss_mb = run([
                    *common, "--output_dir", str(output_dir), "--sample_packing", str(packing).lower(),
                    "--per_device_train_batch_size", str(batch_size), "--attn_implementation", backend,
                ])  # fmt: skip
                results[backend, packing] = summarise(output_dir, backend, packing, real_tokens, peak_rss_mb)
                print(json.dumps(results[backend, packing]), flush=True)
    report_speedups(results)


def report_speedups(results: dict) -> None:
    """Packed vs padded real tokens/s per backend, and every run against padded SDPA (the usual baseline)."""
    baseline = results.get(("sdpa", False))
    for (backend, packing), result in results.items():
        line = f"{backend} {'packed' if packing else 'padded'}: {result['real_tokens_per_s']:,.0f} real tokens/s"
        line += f", padding efficiency {result['padding_efficiency']:.3f}, train loss {result['train_loss']}"
        padded = results.get((backend, False))
        if packing and padded:
            line += f"; {result['real_tokens_per_s'] / padded['real_tokens_per_s']:.2f}x its padded run"
        if baseline and result is not baseline:
            line += f"; {result['real_tokens_per_s'] / baseline['real_tokens_per_s']:.2f}x padded sdpa"
        print(line, file=sys.stderr)


if __name__ == "__main__":
    main()
