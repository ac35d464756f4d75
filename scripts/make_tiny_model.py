"""Build a tiny random-init causal LM with a locally trained tokenizer and chat template (no download).

    python scripts/make_tiny_model.py --output_dir models/tiny-llama
    python scripts/make_tiny_model.py --output_dir models/tiny-gpt2 --architecture gpt2 --chat_template llama3 \
        --no_pad_token

The output loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained(output_dir). The same arguments give
byte-identical files.
"""

import argparse
import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample_data import sample_texts  # noqa: E402

CHAT_TEMPLATES = {
    "chatml": {
        "bos": "<s>",
        "eos": "<|im_end|>",
        "pad": "<pad>",
        "extra": ["<|im_start|>"],
        "template": (
            "{{ bos_token }}{% for message in messages %}"
            "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        ),
    },
    "llama3": {
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": "<|finetune_pad|>",
        "extra": ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
        "template": (
            "{{ bos_token }}{% for message in messages %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
            "+ '<|eot_id|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
        ),
    },
}
# GPT-2 never prepends BOS to plain text; the Llama-family tokenizers do.
ADDS_BOS = {"llama": True, "mistral": True, "qwen2": True, "gpt2": False}
WORDS = (
    "the a model learns data from small steps each token is trained on answers while prompts are masked "
    "river stone cloud apple tiger lemon piano candle forest silver quick brown fox jumps over lazy dog"
).split()


def english_sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(count)]


def train_tokenizer(args: argparse.Namespace) -> PreTrainedTokenizerFast:
    spec = CHAT_TEMPLATES[args.chat_template]
    specials = [spec["bos"], spec["eos"], *spec["extra"]] + ([] if args.no_pad_token else [spec["pad"]])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sample_texts() + english_sentences(500, args.seed), trainer)
    if ADDS_BOS[args.architecture]:
        bos_id = tokenizer.token_to_id(spec["bos"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A", pair=f"{spec['bos']} $A $B", special_tokens=[(spec["bos"], bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=None if args.no_pad_token else spec["pad"],
        additional_special_tokens=spec["extra"],
        model_max_length=args.max_position_embeddings,
        chat_template=spec["template"],
    )


def model_config(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast):
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        # LoRA trains on a frozen random base: with the usual 0.02 the frozen head caps logits near uniform and the
        # loss can barely fall; 0.1 gives it the range a pretrained head has.
        "initializer_range": 0.1,
        "tie_word_embeddings": False,
        "vocab_size": len(tokenizer),
    }
    if args.architecture == "gpt2":
        return GPT2Config(
            n_embd=args.hidden_size, n_layer=args.num_layers, n_head=args.num_heads,
            n_positions=args.max_position_embeddings, **special_ids,
        )  # fmt: skip
    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[args.architecture]
    return config_class(
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        max_position_embeddings=args.max_position_embeddings,
        **special_ids,
    )


def build(args: argparse.Namespace) -> None:
    tokenizer = train_tokenizer(args)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(model_config(args, tokenizer), dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True, help="Where to save the model and tokenizer.")
    parser.add_argument("--architecture", choices=sorted(ADDS_BOS), default="llama", help="Model architecture.")
    parser.add_argument(
        "--chat_template", choices=sorted(CHAT_TEMPLATES), default="chatml", help="Chat template style."
    )
    parser.add_argument("--no_pad_token", action="store_true", help="Save the tokenizer without a pad token.")
    parser.add_argument("--hidden_size", type=int, default=128, help="Model width.")
    parser.add_argument("--num_layers", type=int, default=2, help="Number of decoder layers.")
    parser.add_argument("--num_heads", type=int, default=4, help="Attention heads.")
    parser.add_argument("--vocab_size", type=int, default=512, help="BPE vocabulary size, special tokens included.")
    parser.add_argument("--max_position_embeddings", type=int, default=512, help="Context length.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights and the tokenizer corpus.")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    build(arguments)
    print(f"Tiny {arguments.architecture} model ({arguments.chat_template} template) written to {arguments.output_dir}")
