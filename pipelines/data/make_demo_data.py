"""Writes the demo datasets (seeded, so the files are reproducible byte for byte).

conversions.jsonl: chats asking for a unit conversion, answered in one terse fixed form.
sorting.jsonl: alpaca rows asking to sort numbers, answered as a comma-separated list.
SmolLM2 answers these loosely out of the box; a few minutes of LoRA teach it the exact forms,
which shows as a lower loss on held-out rows.
"""

import json
import random
from pathlib import Path

UNITS = [
    ("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("h", "min", 60), ("min", "s", 60),
    ("L", "mL", 1000), ("ft", "in", 12), ("yd", "ft", 3), ("day", "h", 24), ("GB", "MB", 1000),
]
ASK = ["Convert {v} {a} to {b}.", "How many {b} are in {v} {a}?", "{v} {a} in {b}?", "Please express {v} {a} in {b}."]


def conversions(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b, factor = rng.choice(UNITS)
        v = rng.randint(2, 99)
        question = rng.choice(ASK).format(v=v, a=a, b=b)
        answer = f"{v} {a} = {v * factor} {b}"
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def sorting(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        numbers = rng.sample(range(1, 100), rng.randint(3, 6))
        rows.append({"instruction": "Sort the numbers from smallest to largest.", "input": " ".join(map(str, numbers)), "output": ", ".join(map(str, sorted(numbers)))})
    return rows


def main() -> None:
    rng = random.Random(1234)
    here = Path(__file__).parent
    for name, rows in (("conversions.jsonl", conversions(rng, 320)), ("sorting.jsonl", sorting(rng, 160))):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
