"""Writes unit_conversions.jsonl, the rows of the `molt_unit_conversions` lm-eval task:
`python pipelines/lm_eval/make_unit_conversions.py` (deterministic: the same file every time).

Each row asks one conversion ("Convert 3 km to m.") with four choices: the right value and the
three a model gets by a wrong factor (a tenth of it, ten times it, the number unconverted); the
right one is at each position in a quarter of the rows (the wrong ones in a seeded order), so
always picking one position scores chance, 0.25.
"""

import json
import random
from pathlib import Path

CONVERSIONS = [("km", "m", 1000), ("kg", "g", 1000), ("L", "mL", 1000), ("m", "mm", 1000),
               ("g", "mg", 1000), ("m", "cm", 100), ("h", "min", 60), ("min", "s", 60)]


def rows() -> list[dict]:
    rng = random.Random(0)
    out = []
    for source, target, factor in CONVERSIONS:
        for n in rng.sample(range(2, 50), 5):
            values = [n * factor // 10, n * factor * 10, n]
            rng.shuffle(values)
            label = len(out) % 4  # each position holds the answer in a quarter of the rows
            values.insert(label, n * factor)
            out.append({"question": f"Convert {n} {source} to {target}.", "choices": [f"{v} {target}" for v in values], "label": label})
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("unit_conversions.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    print(f"wrote {len(rows())} rows to {path}")
