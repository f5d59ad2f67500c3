"""Writes unit_preferences.jsonl (seeded, so the file is reproducible byte for byte): preference
rows (chat_template.default: `messages` is the user's question, `chosen` the right conversion,
`rejected` a wrong one) for the DPO demo, pipelines/smollm2-dpo.yml.

The wrong answers are the usual slips: the factor off by ten, divided instead of multiplied, the
factor added, the target unit mislabelled, or an arithmetic slip by a few units, so the model
has to learn the arithmetic of the conversion rather than a single surface cue.
"""

import json
import random
from pathlib import Path

UNITS = [
    ("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("kg", "g", 1000), ("h", "min", 60), ("min", "s", 60),
    ("L", "mL", 1000), ("ft", "in", 12), ("yd", "ft", 3), ("day", "h", 24), ("week", "day", 7), ("GB", "MB", 1000),
]
ASK = ["Convert {v} {a} to {b}.", "How many {b} are in {v} {a}?", "{v} {a} in {b}?", "Please express {v} {a} in {b}."]


def wrong(rng: random.Random, v: int, a: str, b: str, factor: int) -> str:
    kind = rng.choice(["tenth", "tenfold", "divided", "added", "unit", "slip"])
    if kind == "tenth" and factor >= 100:
        return f"{v} {a} = {v * factor // 10} {b}"
    if kind == "tenfold":
        return f"{v} {a} = {v * factor * 10} {b}"
    if kind == "divided" and v % factor:
        return f"{v} {a} = {v / factor:g} {b}"
    if kind == "added":
        return f"{v} {a} = {v + factor} {b}"
    if kind == "unit":
        return f"{v} {a} = {v * factor} {a}"
    return f"{v} {a} = {v * factor + rng.choice([-2, -1, 1, 2]) * max(1, factor // 10)} {b}"


def rows(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        a, b, factor = rng.choice(UNITS)
        v = rng.randint(2, 99)
        out.append({"messages": rng.choice(ASK).format(v=v, a=a, b=b), "chosen": f"{v} {a} = {v * factor} {b}",
                    "rejected": wrong(rng, v, a, b, factor)})
    return out


if __name__ == "__main__":
    here = Path(__file__).parent
    with open(here / "unit_preferences.jsonl", "w") as f:
        for r in rows(random.Random(11), 120):
            f.write(json.dumps(r) + "\n")
