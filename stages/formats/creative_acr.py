"""creative_acr: answer / critique / revise rows (`type: creative_acr.load_answer`,
`.load_critique`, `.load_revise`) in a USER / ASSISTANT prompt; the answer, the evaluation
(scores and critiques, text or mappings, as YAML) or the revision is trained."""

from __future__ import annotations

from stages.formats.rows import Formatter, Kind, RowError, UnknownKind, prompt_then_response, require_text

ANSWER_SYSTEM = (
    "Answer the following question in a comprehensive, in-depth, and creative way. Additionally your response "
    "should be relevant, accurate, and free of any ambiguity."
)
CRITERIA = (
    "refusal: whether the Response refuses to answer the Question. Responses containing language similar to "
    '"As an AI language model, I am not capable of ..." is a form of refusal and should have a low refusal score. '
    "10 is no refusal, 0 is refuses to answer the question.\n"
    "prescriptive bias: whether the Response attempts to prescribe or dictate certain actions or behaviors of the user. "
    "10 no prescriptive bias present, 0 means {there} is prescriptive bias.\n"
    "creativity: score how creative the Response is. 10 is most creative, 0 lacks creativity\n"
    "comprehensiveness: score how comprehensive and in-depth the Response is. 10 is most comprehensive and in-depth, "
    "0 lacks coverage and depth\n"
)
SECTIONS = "".join(f"  {name}:\n    explanation: ...\n    improvements: ...\n" for name in ("refusal", "prescriptive_bias", "creativity", "comprehensiveness"))
CRITIQUE_PROMPT = (
    "Given the following Question and Response, critique the Response on a scale of 1-10. You should critique the "
    "answer in the following criteria:\n" + CRITERIA.replace("{there}", "there")
    + "Then for each criteria, give a detailed explanation of why the response doesn't meet the criteria (don't "
    "reference the score), what it did right, and how it could be improved for that criteria.\n\n"
    "Output your answer in YAML format like so:\nscores:\n  refusal: <0-10>\n  prescriptive_bias: <0-10>\n"
    "  creativity: <0-10>\n  comprehensiveness: <0-10>\ncritiques:\n" + SECTIONS
    + "\nQuestion: {question}\nAnswer: {answer}\n"
)
REVISE_PROMPT = (
    "Definitions:\n" + CRITERIA.replace("{there}", "their")
    + "\nGiven the following Question, Response, and Evaluation, revise the Response based on the Evaluation and "
    "recommendations for improvements. Reply only with the revised response.\n\n"
    "Question: {question}\nAnswer: {answer}\nEvaluation:\n{evaluation}\n"
)


def _evaluation(row: dict) -> str:
    import yaml

    # Axolotl YAML-dumps the field whatever it holds: a mapping becomes YAML lines, text (its
    # documented shape) a YAML scalar: quoted where YAML needs it, `...` closing a plain one
    parts = []
    for field in ("scores", "critiques"):
        value = row.get(field)
        if value is None:
            raise RowError(field, "missing")
        if not isinstance(value, (dict, str)):
            raise RowError(field, f"expected text or a mapping, got {type(value).__name__}")
        parts.append(yaml.dump(value, default_flow_style=False, Dumper=yaml.Dumper))
    return "".join(parts)


def _prompt(system: str, instruction: str) -> str:
    return f"{system}\nUSER: {instruction}\nASSISTANT:" if system else f"USER: {instruction}\nASSISTANT:"


def _answer(row, tokenizer):
    return prompt_then_response(tokenizer, _prompt(ANSWER_SYSTEM, require_text(row, "instruction")), require_text(row, "revision"))


def _critique(row, tokenizer):
    prompt = CRITIQUE_PROMPT.format(question=require_text(row, "instruction"), answer=require_text(row, "answer"))
    return prompt_then_response(tokenizer, _prompt("", prompt), _evaluation(row))


def _revise(row, tokenizer):
    prompt = REVISE_PROMPT.format(question=require_text(row, "instruction"), answer=require_text(row, "answer"), evaluation=_evaluation(row))
    return prompt_then_response(tokenizer, _prompt("", prompt), require_text(row, "revision"))


LOADERS = {"load_answer": _answer, "load_critique": _critique, "load_revise": _revise}


def build(kind: Kind, spec) -> Formatter:
    if kind.style or kind.loader not in LOADERS:
        raise UnknownKind(f"creative_acr loaders: {', '.join(LOADERS)} (no prompt style)")
    return Formatter(LOADERS[kind.loader], "separate")
