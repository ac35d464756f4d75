"""Build a tiny causal LM with a locally trained tokenizer and chat template (no download), optionally pretrained.

Usage:
    python scripts/make_tiny_model.py --output_dir models/tiny-llama
    python scripts/make_tiny_model.py --output_dir models/tiny-llama-units --pretrain_steps 600  # quickstart's base
    python scripts/make_tiny_model.py --output_dir models/tiny-gpt2 --architecture gpt2 --chat_template llama3 \
        --no_pad_token

The byte-level BPE tokenizer is trained on the sample data (see make_sample_data.py) plus generated English
sentences, so any Unicode text round-trips; digits are split one per token, as in Llama 3 and Qwen. The output
loads with AutoTokenizer / AutoModelForCausalLM .from_pretrained(output_dir).

Without --pretrain_steps the weights are random and the same arguments always give byte-identical files. With it,
the model is first trained on plain text (make_sample_data.pretraining_texts: unit-conversion questions followed by
their answers, the held-out evaluation conversions excluded, no chat template, no end-of-turn token), like a base
model that has read worked examples but never held a chat. Pretraining is seeded; the files are reproducible on
one machine with one thread count.
"""

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The script directory is only on sys.path when this file is run directly, not when it is imported.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import quiet  # noqa: E402  (first: bitsandbytes warns while the libraries below are imported)

# isort: split
import torch  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX  # noqa: E402

# isort: split
from make_sample_data import pretraining_texts, sample_texts  # noqa: E402


@dataclass(frozen=True)
class ChatFormat:
    bos: str
    eos: str
    pad: str
    extra: tuple[str, ...]
    template: str


CHAT_FORMATS = {
    "chatml": ChatFormat(
        bos="<s>",
        eos="<|im_end|>",
        pad="<pad>",
        extra=("<|im_start|>",),
        template=(
            "{{ bos_token }}{% for message in messages %}"
            "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        ),
    ),
    "llama3": ChatFormat(
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_pad|>",
        extra=("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"),
        template=(
            "{{ bos_token }}{% for message in messages %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
            "+ '<|eot_id|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
        ),
    ),
}
ARCHITECTURES = ("llama", "gpt2", "qwen2", "mistral")
LLAMA_LIKE_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
NUM_ENGLISH_SENTENCES = 300

SUBJECTS = "the teacher|a small dog|my neighbour|the old captain|a curious child|the baker|the river".split("|")
VERBS = "reads|paints|finds|carries|watches|builds|remembers|opens|follows|explains".split("|")
OBJECTS = "a long letter|the blue door|an empty box|the morning news|a quiet song|a strange map".split("|")
ENDINGS = "in the garden|before breakfast|after the storm|near the station|every Sunday|for the first time".split("|")


def english_sentences(count: int, seed: int) -> list[str]:
    """Simple varied English, so that common words and punctuation get their own merges."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(ENDINGS)]
        sentence = " ".join(words)
        sentences.append(sentence[0].upper() + sentence[1:] + rng.choice(".!?"))
    return sentences


def untrained_tokenizer(architecture: str) -> Tokenizer:
    """An empty byte-level BPE with the pre-tokenization the architecture's tokenizer class loads with."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.decoder = decoders.ByteLevel()
    if architecture == "qwen2":
        # AutoTokenizer always loads qwen2 checkpoints as Qwen2Tokenizer, which rebuilds the backend around the saved
        # vocab and merges with this normalizer and pre-tokenizer; training with the same ones keeps them consistent.
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        # One token per digit (as Llama 3 and Qwen split numbers): "47000" shares its digits with "47", so a small
        # model can learn to copy numbers and append zeros.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    return tokenizer


def special_tokens(chat_format: ChatFormat, with_pad: bool) -> list[str]:
    """Special tokens in id order; the pad token goes last so the other ids do not depend on --no_pad_token."""
    return [chat_format.bos, chat_format.eos, *chat_format.extra] + ([chat_format.pad] if with_pad else [])


def train_tokenizer(args: argparse.Namespace, chat_format: ChatFormat) -> Tokenizer:
    tokenizer = untrained_tokenizer(args.architecture)
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=special_tokens(chat_format, with_pad=not args.no_pad_token),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = sample_texts() + english_sentences(NUM_ENGLISH_SENTENCES, args.seed)
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def wrap_tokenizer(args: argparse.Namespace, chat_format: ChatFormat, backend: Tokenizer) -> PreTrainedTokenizerFast:
    """Attach the special tokens, chat template and BOS behaviour that transformers saves alongside tokenizer.json."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=chat_format.bos,
        eos_token=chat_format.eos,
        pad_token=None if args.no_pad_token else chat_format.pad,
        # Explicit, or Qwen2Tokenizer would add its default '<|endoftext|>' beyond the model's vocabulary.
        unk_token=None,
        extra_special_tokens=list(chat_format.extra),
        # GPT-2 never prepends BOS to plain text; the Llama-family tokenizers do.
        add_bos_token=args.architecture != "gpt2",
        add_eos_token=False,
        model_max_length=args.max_position_embeddings,
        chat_template=chat_format.template,
    )


def model_config(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> PreTrainedConfig:
    shared = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
        # LoRA trains on a frozen random base: with the usual 0.02 the frozen head caps logits near uniform and the
        # loss can barely fall; 0.1 gives it the range a pretrained head has.
        "initializer_range": 0.1,
    }
    if args.architecture == "gpt2":
        return GPT2Config(
            n_embd=args.hidden_size,
            n_layer=args.num_layers,
            n_head=args.num_heads,
            n_positions=args.max_position_embeddings,
            **shared,
        )
    return LLAMA_LIKE_CONFIGS[args.architecture](
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        max_position_embeddings=args.max_position_embeddings,
        **shared,
    )


def build_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(model_config(args, tokenizer), dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def padded_batch(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows])
    labels = torch.tensor([row + [-100] * (width - len(row)) for row in rows])
    return {"input_ids": input_ids, "attention_mask": (labels != -100).long(), "labels": labels}


def pretrain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, args: argparse.Namespace) -> None:
    """Full-parameter next-token training on plain text: AdamW, linear warm-up then linear decay to zero."""
    rows = tokenizer(pretraining_texts())["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_learning_rate, weight_decay=0.0)
    warmup = max(1, args.pretrain_steps // 15)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * (1 - step / args.pretrain_steps)
    )
    # Matrices this small gain nothing from a second thread (on a busy machine it was 20x slower), and one thread
    # gives the same weights whatever the number of cores.
    torch.set_num_threads(1)
    model.train()
    started = time.perf_counter()
    for step in range(1, args.pretrain_steps + 1):
        loss = model(**padded_batch(rng.sample(rows, args.pretrain_batch_size), pad_id)).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == args.pretrain_steps:
            print(f"pretraining step {step}/{args.pretrain_steps}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    model.eval()


def build(args: argparse.Namespace) -> None:
    chat_format = CHAT_FORMATS[args.chat_template]
    tokenizer = wrap_tokenizer(args, chat_format, train_tokenizer(args, chat_format))
    model = build_model(args, tokenizer)
    if args.pretrain_steps:
        pretrain(model, tokenizer, args)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True, help="Where to save the model and tokenizer.")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="llama", help="Model architecture.")
    parser.add_argument("--chat_template", choices=sorted(CHAT_FORMATS), default="chatml", help="Chat template style.")
    parser.add_argument("--no_pad_token", action="store_true", help="Save the tokenizer without a pad token.")
    parser.add_argument("--hidden_size", type=int, default=128, help="Model width.")
    parser.add_argument("--num_layers", type=int, default=2, help="Number of decoder layers.")
    parser.add_argument("--num_heads", type=int, default=4, help="Attention heads.")
    parser.add_argument("--vocab_size", type=int, default=512, help="BPE vocabulary size, special tokens included.")
    parser.add_argument("--max_position_embeddings", type=int, default=1024, help="Context length.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights, English sentences and batches.")
    parser.add_argument(
        "--pretrain_steps", type=int, default=0, help="Steps of plain-text pretraining (0: random weights)."
    )
    parser.add_argument("--pretrain_batch_size", type=int, default=32, help="Texts per pretraining step.")
    parser.add_argument("--pretrain_learning_rate", type=float, default=3e-3, help="Peak pretraining learning rate.")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    quiet.quiet_run(uses_deepspeed=False)
    build(args)
    state = f"pretrained for {args.pretrain_steps} steps" if args.pretrain_steps else "random weights"
    print(f"Tiny {args.architecture} model ({state}) with a {args.chat_template} chat template written to "
          f"{args.output_dir}")  # fmt: skip


if __name__ == "__main__":
    main()
