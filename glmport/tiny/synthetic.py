"""A synthetic instruction data set, generated (not copied), for the quick start and tests.

Each record is a ChatGLM3 ``conversations`` sample asking for a small string transformation of random
words: reverse the order, upper-case them, sort them, or count them. The answers are fully determined by
the prompt, so even a tiny random model fine-tuned with LoRA visibly learns (the loss falls well below
that of guessing among the characters).
"""

from __future__ import annotations

import json
import os
import random
import string

ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits

TASKS = {
    "reverse": ("Reverse the order of these words: {words}", lambda w: " ".join(reversed(w))),
    "upper": ("Write these words in capitals: {words}", lambda w: " ".join(x.upper() for x in w)),
    "sort": ("Sort these words alphabetically: {words}", lambda w: " ".join(sorted(w))),
    "count": ("How many words are there in: {words}", lambda w: str(len(w))),
}
SYSTEM = "You are a careful assistant. Answer with the result only."


def make_record(rng: random.Random) -> dict:
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 5))) for _ in range(rng.randint(2, 5))]
    task = rng.choice(sorted(TASKS))
    prompt, solve = TASKS[task]
    messages = [{"role": "user", "content": prompt.format(words=" ".join(words))},
                {"role": "assistant", "content": solve(words)}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"conversations": messages}


def make_records(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_record(rng) for _ in range(count)]


def write_jsonl(path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_synthetic_splits(config, spec: dict) -> None:
    """Write the splits named in ``data_config`` that do not exist yet. ``spec``: {train, val, test, seed}."""
    seed = int(spec.get("seed", 0))
    sizes = {"train": int(spec.get("train", 512)), "val": int(spec.get("val", 32)), "test": int(spec.get("test", 16))}
    for offset, split in enumerate(("train", "val", "test")):
        path = config.data_path(split)
        if path is not None and not path.exists():
            write_jsonl(path, make_records(sizes[split], seed + 1000 * offset))
