"""creative_acr.load_critique / load_revise with `scores` and `critiques` as text (the shape
Axolotl documents) render as Axolotl's yaml.dump of them: a YAML scalar, quoted where YAML needs
quotes, a plain one followed by YAML's `...` document end. The prompt and the trained part are
encoded apart, as Axolotl does for these types."""

from __future__ import annotations

import pytest

from stages.store import DataError
from test_formats import pipeline, tokenizer_artifacts  # noqa: F401  (fixtures)
from test_formats_instruct import encode_apart

EOS = "<|im_end|>"
ROW = {"instruction": "Describe the sea.", "answer": "Wet.", "revision": " Vast, deep and blue.",
       "scores": "refusal: 10, creativity: 2", "critiques": "Flat; add imagery."}
# yaml.dump("refusal: 10, creativity: 2") needs quotes (": " would start a mapping); the critique does not
EVALUATION = "'refusal: 10, creativity: 2'\nFlat; add imagery.\n...\n"


def test_critique_with_text_scores_trains_their_yaml(pipeline, fast_tokenizer):
    [(ids, labels)] = pipeline([ROW], type="creative_acr.load_critique")
    prompt_end = "\nQuestion: Describe the sea.\nAnswer: Wet.\n\nASSISTANT:"
    from stages.formats.creative_acr import CRITIQUE_PROMPT

    prompt = "USER: " + CRITIQUE_PROMPT.format(question="Describe the sea.", answer="Wet.") + "\nASSISTANT:"
    assert prompt.endswith(prompt_end)
    assert (ids, labels) == encode_apart(fast_tokenizer, [(prompt, False), (EVALUATION + EOS, True)])


def test_revise_with_text_scores_puts_their_yaml_in_the_prompt(pipeline, fast_tokenizer):
    from stages.formats.creative_acr import REVISE_PROMPT

    [(ids, labels)] = pipeline([ROW], type="creative_acr.load_revise")
    prompt = "USER: " + REVISE_PROMPT.format(question="Describe the sea.", answer="Wet.", evaluation=EVALUATION) + "\nASSISTANT:"
    assert prompt.endswith("Question: Describe the sea.\nAnswer: Wet.\nEvaluation:\n'refusal: 10, creativity: 2'\n"
                           "Flat; add imagery.\n...\n\n\nASSISTANT:")
    assert (ids, labels) == encode_apart(fast_tokenizer, [(prompt, False), (" Vast, deep and blue." + EOS, True)])


def test_revise_with_mappings_as_before(pipeline, fast_tokenizer):
    from stages.formats.creative_acr import REVISE_PROMPT

    row = {**ROW, "scores": {"refusal": 10, "creativity": 2}, "critiques": {"creativity": {"explanation": "Flat."}}}
    [(ids, labels)] = pipeline([row], type="creative_acr.load_revise")
    evaluation = "creativity: 2\nrefusal: 10\ncreativity:\n  explanation: Flat.\n"
    prompt = "USER: " + REVISE_PROMPT.format(question="Describe the sea.", answer="Wet.", evaluation=evaluation) + "\nASSISTANT:"
    assert (ids, labels) == encode_apart(fast_tokenizer, [(prompt, False), (" Vast, deep and blue." + EOS, True)])


@pytest.mark.parametrize("change, message", [
    ({"scores": None}, r"row 1: field 'scores': missing"),
    ({"critiques": 7}, r"row 1: field 'critiques': expected text or a mapping, got int"),
])
def test_bad_evaluation_fields(pipeline, change, message):
    with pytest.raises(DataError, match=message):
        pipeline([{**ROW, **change}], type="creative_acr.load_critique")
