"""Write small deterministic arithmetic datasets for smoke-testing fine-tuning.

Usage:
    python scripts/make_sample_data.py [--output_dir sample_data]

Files written to the output directory (default: the repository's sample_data/):
    chat.jsonl        1000 chat records: {"messages": [{"role": ..., "content": ...}, ...]}
    completion.jsonl  1000 prompt/completion records: {"prompt": "Q: 23 + 45\\nA:", "completion": " 68"}
    chat_eval.jsonl   100 chat records whose arithmetic problems never occur in chat.jsonl

The tasks are simple and templated on purpose: a tiny randomly initialised model picks up
the format within a few minutes of CPU training, so a falling loss is easy to see.

The generator functions are importable (scripts/make_tiny_model.py uses them to build its
tokenizer training corpus).
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

SYSTEM_PROMPT = "You are a careful calculator."
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


def chat_records(num_records=NUM_CHAT_RECORDS, seed=CHAT_SEED, excluded_problems=frozenset()):
    """Generate chat records, skipping any problem listed in `excluded_problems`."""
    rng = random.Random(seed)
    records = []
    while len(records) < num_records:
        problem = random_problem(rng)
        if problem not in excluded_problems:
            records.append(chat_record(rng, problem))
    return records


def chat_eval_records(train_records=None):
    """Generate held-out chat records whose problems never appear in `train_records`."""
    train_records = chat_records() if train_records is None else train_records
    seen = {problem_of(record) for record in train_records}
    return chat_records(NUM_CHAT_EVAL_RECORDS, CHAT_EVAL_SEED, excluded_problems=seen)


def problem_of(record):
    """Recover (a, operator, b) from a chat record's assistant answer."""
    a, operator, b = record["messages"][-1]["content"].split(" = ")[0].split(" ")
    return int(a), operator, int(b)


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
    train = chat_records()
    chats = train + chat_eval_records(train)
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
    train = chat_records()
    datasets = {
        "chat.jsonl": train,
        "completion.jsonl": completion_records(),
        "chat_eval.jsonl": chat_eval_records(train),
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
