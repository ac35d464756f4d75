"""Write the small deterministic sample datasets: the quickstart's unit-conversion chats, and arithmetic.

Usage:
    python scripts/make_sample_data.py [--output_dir sample_data]

Files written to the output directory (default: the repository's sample_data/):
    chat.jsonl        1000 chat records: {"messages": [{"role": ..., "content": ...}, ...]}, each a question such
                      as "How many metres are in 47 kilometres?" answered "47 km = 47000 m"
    chat_eval.jsonl   100 chat records whose conversions never occur in chat.jsonl, nor in the text the tiny model
                      is pretrained on (scripts/make_tiny_model.py --pretrain_steps)
    completion.jsonl  1000 prompt/completion records: {"prompt": "Q: 23 + 45\\nA:", "completion": " 68"}

The conversion task is what scripts/quickstart.sh measures: the tiny model is pretrained on plain text
("Q: How many metres are in 47 kilometres?\nA: 47 km = 47000 m", `pretraining_texts`), so it knows conversions
as text but cannot answer a chat question;
fine-tuning on chat.jsonl teaches it to answer, and chat_eval.jsonl measures that on conversions it never saw.

The generator functions are importable (scripts/make_tiny_model.py uses them for its tokenizer and pretraining corpus).
"""

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent.parent / "sample_data"

NUM_CHAT_RECORDS = 1000
NUM_COMPLETION_RECORDS = 1000
NUM_CHAT_EVAL_RECORDS = 100
CHAT_SEED = 1234
COMPLETION_SEED = 5678
CHAT_EVAL_SEED = 4321
PRETRAINING_SEED = 8765

SYSTEM_PROMPT = "You are a careful calculator."
CONVERSION_SYSTEM_PROMPT = "You convert units."
SYSTEM_MESSAGE_PROBABILITY = 0.8
MAX_OPERAND = 99
MAX_TIMES_TABLE_OPERAND = 12

USER_PHRASINGS = {
    "+": (
        "What is {a} + {b}?",
        "Compute {a} + {b}.",
        "Please add {a} and {b}.",
        "What do you get if you add {a} and {b}?",
        "{a} + {b} = ?",
    ),
    "-": (
        "What is {a} - {b}?",
        "Compute {a} - {b}.",
        "Please subtract {b} from {a}.",
        "What do you get if you take {b} away from {a}?",
        "{a} - {b} = ?",
    ),
}

# (from symbol, from name, to symbol, to name, factor): every factor a power of ten, so an answer is the number
# followed by zeros, a skill a two-layer model learns from a few thousand statements.
CONVERSIONS = (
    ("km", "kilometres", "m", "metres", 1000),
    ("m", "metres", "cm", "centimetres", 100),
    ("cm", "centimetres", "mm", "millimetres", 10),
    ("kg", "kilograms", "g", "grams", 1000),
    ("L", "litres", "mL", "millilitres", 1000),
)
MAX_QUANTITY = 999
CONVERSION_PHRASINGS = (
    "How many {to_name} are in {n} {from_name}?",
    "Convert {n} {from_symbol} to {to_symbol}.",
    "What is {n} {from_name} in {to_name}?",
    "{n} {from_symbol} is how many {to_symbol}?",
    "Please express {n} {from_name} in {to_name}.",
)

OPERATIONS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}


def random_problem(rng, operators=("+", "-")):
    """Draw (a, operator, b); subtraction keeps a >= b so answers are never negative."""
    operator = rng.choice(operators)
    limit = MAX_TIMES_TABLE_OPERAND if operator == "*" else MAX_OPERAND
    a, b = rng.randint(0, limit), rng.randint(0, limit)
    if operator == "-" and a < b:
        a, b = b, a
    return a, operator, b


def chat_record(rng, problem):
    """Build one chat record for `problem`, sometimes without a system message."""
    a, operator, b = problem
    answer = OPERATIONS[operator](a, b)
    messages = []
    if rng.random() < SYSTEM_MESSAGE_PROBABILITY:
        messages.append({"role": "system", "content": SYSTEM_PROMPT})
    question = rng.choice(USER_PHRASINGS[operator]).format(a=a, b=b)
    messages.append({"role": "user", "content": question})
    messages.append({"role": "assistant", "content": f"{a} {operator} {b} = {answer}"})
    return {"messages": messages}


def conversion_problems():
    """Every (quantity, conversion index) the task can ask about, in a fixed order."""
    return [(n, index) for index in range(len(CONVERSIONS)) for n in range(1, MAX_QUANTITY + 1)]


def conversion_statement(problem):
    """The answer, also the pretraining text: (47, 0) -> '47 km = 47000 m'."""
    n, index = problem
    from_symbol, _, to_symbol, _, factor = CONVERSIONS[index]
    return f"{n} {from_symbol} = {n * factor} {to_symbol}"


def conversion_question(rng, problem):
    """`problem` asked in one of several phrasings: (47, 0) -> 'How many metres are in 47 kilometres?'."""
    n, index = problem
    from_symbol, from_name, to_symbol, to_name, _ = CONVERSIONS[index]
    return rng.choice(CONVERSION_PHRASINGS).format(
        n=n, from_symbol=from_symbol, from_name=from_name, to_symbol=to_symbol, to_name=to_name
    )


def conversion_record(rng, problem):
    """One chat asking for `problem`, sometimes with a system message."""
    messages = []
    if rng.random() < SYSTEM_MESSAGE_PROBABILITY:
        messages.append({"role": "system", "content": CONVERSION_SYSTEM_PROMPT})
    messages.append({"role": "user", "content": conversion_question(rng, problem)})
    messages.append({"role": "assistant", "content": conversion_statement(problem)})
    return {"messages": messages}


def split_conversion_problems():
    """(held-out problems, the others): the held-out ones appear in no training chat and no pretraining text."""
    problems = conversion_problems()
    held_out = random.Random(CHAT_EVAL_SEED).sample(problems, NUM_CHAT_EVAL_RECORDS)
    excluded = set(held_out)
    return held_out, [problem for problem in problems if problem not in excluded]


def chat_records(num_records=NUM_CHAT_RECORDS, seed=CHAT_SEED):
    """Training chats: distinct conversions, none of them held out."""
    rng = random.Random(seed)
    _, trainable = split_conversion_problems()
    return [conversion_record(rng, problem) for problem in rng.sample(trainable, num_records)]


def chat_eval_records():
    """Held-out evaluation chats: conversions that never occur in chat.jsonl or the pretraining statements."""
    rng = random.Random(CHAT_EVAL_SEED)
    held_out, _ = split_conversion_problems()
    return [conversion_record(rng, problem) for problem in held_out]


def pretraining_texts():
    """Plain text, no chat template: 'Q: <question>\nA: <statement>' for every problem that is not held out, the
    way a base model reads worked examples on web pages (scripts/make_tiny_model.py --pretrain_steps). The line
    between question and answer teaches copying the quantity across a gap, as a chat template's turn markers need."""
    rng = random.Random(PRETRAINING_SEED)
    _, trainable = split_conversion_problems()
    return [f"Q: {conversion_question(rng, problem)}\nA: {conversion_statement(problem)}" for problem in trainable]


def completion_records(num_records=NUM_COMPLETION_RECORDS, seed=COMPLETION_SEED):
    """Generate prompt/completion records mixing addition, subtraction and times tables."""
    rng = random.Random(seed)
    records = []
    for _ in range(num_records):
        a, operator, b = random_problem(rng, operators=("+", "-", "*"))
        answer = OPERATIONS[operator](a, b)
        records.append({"prompt": f"Q: {a} {operator} {b}\nA:", "completion": f" {answer}"})
    return records


def sample_texts():
    """Return every string of the sample datasets, as plain text for tokenizer training."""
    chats = chat_records() + chat_eval_records()
    texts = [f"{message['role']}\n{message['content']}" for record in chats for message in record["messages"]]
    texts += [record["prompt"] + record["completion"] for record in completion_records()]
    return texts


def write_jsonl(path, records):
    """Write records one JSON object per line, UTF-8, with a trailing newline."""
    lines = (json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(lines)


def write_sample_data(output_dir):
    """Write all sample datasets into `output_dir` and return the written paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    datasets = {
        "chat.jsonl": chat_records(),
        "completion.jsonl": completion_records(),
        "chat_eval.jsonl": chat_eval_records(),
    }
    paths = []
    for name, records in datasets.items():
        path = output_dir / name
        write_jsonl(path, records)
        paths.append(path)
    return paths


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    return parser.parse_args()


def main():
    args = parse_args()
    paths = write_sample_data(args.output_dir)
    print(f"Wrote {', '.join(str(path) for path in paths)}")


if __name__ == "__main__":
    main()
