"""zephyr.nectar: Nectar's ranked answers (berkeley-nest/Nectar) as DPO pairs, rendered with the
built-in zephyr template unless the config chooses a chat_template (see shapes.chat).

Row: prompt, answers: [{answer, rank}, ...], rank 1 the best. chosen is the rank-1 answer;
rejected is the worst-ranked one (the highest rank; the first of them on a tie), so every row
pairs its best answer with its worst. (Axolotl's own loader takes the worst-ranked answer as
chosen, which inverts the preference.) A row needs at least two answers and one of rank 1.

Nectar's prompts are already a dialogue, "\\n\\nHuman: ...\\n\\nAssistant:". As Axolotl does, the
text is kept whole as the one user turn, markers included: splitting it into turns would guess
at a format the answers were not ranked in. Axolotl always writes an empty system turn before
it; molt writes a system turn only for a system text, and Nectar has none.
"""

from __future__ import annotations

from functools import partial

from stages.preference_formats import shapes


def _ranked(r: dict) -> list[tuple[int, str]]:
    answers = r.get("answers")
    if not isinstance(answers, list):
        raise shapes.RowError("answers", "missing" if answers is None else f"expected a list of {{answer, rank}}, got {type(answers).__name__}")
    ranked = []
    for i, a in enumerate(answers):
        if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
            raise shapes.RowError(f"answers[{i}].answer", "expected text")
        rank = a.get("rank")
        if isinstance(rank, float) and rank.is_integer():  # JSON readers may give 1.0
            rank = int(rank)
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise shapes.RowError(f"answers[{i}].rank", f"expected a whole number, got {rank!r}")
        ranked.append((rank, a["answer"]))
    if len(ranked) < 2:
        raise shapes.RowError("answers", f"a pair needs at least two ranked answers, got {len(ranked)}")
    return ranked


def _nectar(spec, r, tokenizer):
    history = shapes.single_turn(r, "prompt")
    ranked = _ranked(r)
    best = [text for rank, text in ranked if rank == 1]
    if not best:
        raise shapes.RowError("answers", "no answer of rank 1 (the best)")
    worst = max(rank for rank, _ in ranked)
    rejected = next(text for rank, text in ranked if rank == worst)
    return shapes.paired(shapes.chat(spec, tokenizer, "zephyr"), history, best[0], rejected, ("prompt", "answers", "answers"))


LOADERS = {"paired": {"nectar": _nectar}}


def build(loader: str, spec, method: str) -> shapes.Formatter:
    return shapes.Formatter(partial(shapes.pick("zephyr", LOADERS, loader, method), spec))
