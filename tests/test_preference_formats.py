"""Preference and reward dataset types (stages/preference_formats/): the exact strings each type
makes of a documented example row, with the chatml and llama3 built-ins and SmolLM2's own
template; the row errors; and the format_preference stage on a JSON Lines file."""

from __future__ import annotations

import json

import pytest

from stages import chat_templates, fetch_data
from stages import format_preference as fp
from stages import tokenizer as tokenizer_stage
from stages.chat_templates import TemplateChoiceError
from stages.formats.rows import RowError, UnknownKind
from stages.store import DataError, read_table

Q, SYSTEM = "What is 2+2?", "Be brief."
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

# The tokenizer stage's molt_tokenizer.json for `chat_template: chatml` / `llama3` (the special
# tokens of a tokenizer that goes with each); SmolLM2's own is made by the stage (fixture below).
BUILTIN = {
    "chatml": {"chat_template": chat_templates.builtin("chatml"), "chat_template_choice": "chatml",
               "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
    "llama3": {"chat_template": chat_templates.builtin("llama3"), "chat_template_choice": "llama3",
               "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
}
TEMPLATES = ("chatml", "llama3", "smollm2")

# The prompt with the system text ("system") and without it ("plain"), and what ends an answer.
PROMPT = {
    "chatml": {
        "system": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "plain": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    },
    "llama3": {
        "system": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "plain": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n",
    },
    "smollm2": {  # its template adds its own system text when the conversation has none
        "system": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "plain": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                 "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    },
}
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "smollm2": "<|im_end|>"}


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dir, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer_stage.run(tokenizer_stage.Params(chat_template="tokenizer_default"), {"model": tokenizer_dir}, out)
    return {**BUILTIN, "smollm2": json.loads((out / tokenizer_stage.INFO).read_text())}


def params(type_, method: str = "paired", **spec):
    return fp.Params(rl={"paired": "dpo", "unpaired": "kto"}.get(method), process_reward_model=method == "steps",
                     dataset=fp.Spec(type=type_, **spec))


def formatted(type_, row: dict, tokenizer: dict, method: str = "paired", **spec) -> dict:
    return fp.formatter(params(type_, method, **spec)).row(row, tokenizer)


def chat(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


# -- paired (DPO, IPO, SimPO, ORPO, reward models) ------------------------------------------------

PAIRED = {  # type: (a documented example row, whether it has a system text)
    "argilla": ({"system": SYSTEM, "instruction": Q, "chosen_response": "4", "rejected_response": "5"}, True),
    "argilla_chat": ({"chosen": chat(("user", Q), ("assistant", "4")), "rejected": chat(("user", Q), ("assistant", "5"))}, False),
    "icr": ({"system": SYSTEM, "input": Q, "chosen": "4", "rejected": "5"}, True),
    "intel": ({"system": SYSTEM, "question": Q, "chosen": "4", "rejected": "5"}, True),
    "prompt_pairs": ({"system": SYSTEM, "prompt": Q, "chosen": "4", "rejected": "5"}, True),
    "ultra": ({"system": SYSTEM, "prompt": Q, "chosen": chat(("user", Q), ("assistant", "4")),
               "rejected": chat(("user", Q), ("assistant", "5"))}, True),
}
PAIRED_TYPES = {
    **{f"{family}.{loader}": case for family in ("chatml", "llama3") for loader, case in PAIRED.items()},
    "chatml": ({"instruction": Q, "chosen_response": "4", "rejected_response": "5"}, False),  # Axolotl's key guessing
    "chat_template.default": ({"messages": chat(("system", SYSTEM), ("user", Q)), "chosen": {"role": "assistant", "content": "4"},
                               "rejected": {"role": "assistant", "content": "5"}}, True),
    "chat_template.argilla_chat": (PAIRED["argilla_chat"][0], False),
    "chat_template.argilla": ({"system": SYSTEM, "prompt": Q, "chosen": chat(("user", Q), ("assistant", "4")),
                               "rejected": chat(("user", Q), ("assistant", "5"))}, True),
    "bradley_terry.chat_template": ({"system": SYSTEM, "input": Q, "chosen": "4", "rejected": "5"}, True),
}


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("type_", sorted(PAIRED_TYPES))
def test_paired_type_renders_prompt_and_answers(tokenizers, type_, template):
    row, system = PAIRED_TYPES[type_]
    assert formatted(type_, row, tokenizers[template]) == {
        "prompt": PROMPT[template]["system" if system else "plain"], "chosen": "4" + END[template], "rejected": "5" + END[template],
    }


@pytest.mark.parametrize("answer", ["4", {"from": "gpt", "value": "4"}, [{"from": "human", "value": Q}, {"from": "gpt", "value": "4"}]])
def test_chat_template_default_answer_is_a_string_a_message_or_a_conversations_last(tokenizers, answer):
    row = {"turns": [{"from": "human", "value": Q}], "good": answer, "bad": {"from": "gpt", "value": "5"}}
    spec = dict(field_messages="turns", field_chosen="good", field_rejected="bad",
                message_property_mappings={"role": "from", "content": "value"}, roles={"user": ["human"], "assistant": ["gpt"]})
    assert formatted("chat_template.default", row, tokenizers["chatml"], **spec) == {
        "prompt": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "chosen": "4<|im_end|>", "rejected": "5<|im_end|>",
    }


def test_chat_template_default_keeps_earlier_turns_in_the_prompt(tokenizers):
    row = {"messages": chat(("user", "Hi"), ("assistant", "Hello"), ("user", Q)), "chosen": "4", "rejected": "5"}
    assert formatted("chat_template", row, tokenizers["llama3"]) == {
        "prompt": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                  "Hello<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "chosen": "4<|eot_id|>", "rejected": "5<|eot_id|>",
    }


NECTAR = {"prompt": "\n\nHuman: What is 2+2?\n\nAssistant:",
          "answers": [{"answer": "5", "rank": 3}, {"answer": "4", "rank": 1}, {"answer": "four", "rank": 2}]}
NECTAR_PROMPT = {
    "chatml": "<|im_start|>user\n\n\nHuman: What is 2+2?\n\nAssistant:<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHuman: What is 2+2?\n\nAssistant:<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "smollm2": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
               "<|im_start|>user\n\n\nHuman: What is 2+2?\n\nAssistant:<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.mark.parametrize("template", TEMPLATES)
def test_nectar_pairs_the_rank_1_answer_with_the_worst(tokenizers, template):
    assert formatted("zephyr.nectar", NECTAR, tokenizers[template]) == {
        "prompt": NECTAR_PROMPT[template], "chosen": "4" + END[template], "rejected": "5" + END[template],
    }


def test_nectar_without_a_top_level_template_renders_zephyr(tokenizers):
    tokenizer = {**tokenizers["smollm2"], "chat_template_choice": None}
    assert formatted("zephyr.nectar", NECTAR, tokenizer) == {
        "prompt": "<|user|>\n\n\nHuman: What is 2+2?\n\nAssistant:</s>\n<|assistant|>\n", "chosen": "4</s>", "rejected": "5</s>",
    }


@pytest.mark.parametrize("answers, error", [
    ([{"answer": "4", "rank": 1}], "at least two ranked answers"),
    ([{"answer": "4", "rank": 2}, {"answer": "5", "rank": 3}], "no answer of rank 1"),
    ([{"answer": "4", "rank": "first"}, {"answer": "5", "rank": 2}], "expected a whole number"),
])
def test_nectar_refuses_rows_without_a_best_and_a_worse_answer(tokenizers, answers, error):
    with pytest.raises(RowError, match=error):
        formatted("zephyr.nectar", {**NECTAR, "answers": answers}, tokenizers["chatml"])


def test_family_types_render_their_builtin_template_when_no_top_level_one_is_chosen(tokenizers):
    """As Axolotl's hard-coded strings: the SmolLM2 tokenizer's template is not used."""
    tokenizer = {**tokenizers["smollm2"], "chat_template_choice": None}
    row = {"question": Q, "chosen": "4", "rejected": "5"}
    assert formatted("chatml.intel", row, tokenizer) == {
        "prompt": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "chosen": "4<|im_end|>", "rejected": "5<|im_end|>",
    }
    assert formatted("llama3.intel", row, {**tokenizer, "bos_token": "<|begin_of_text|>"}) == {
        "prompt": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "chosen": "4<|eot_id|>", "rejected": "5<|eot_id|>",
    }


def test_a_datasets_own_chat_template_wins(tokenizers):
    row = {"question": Q, "chosen": "4", "rejected": "5"}
    assert formatted("chatml.intel", row, tokenizers["smollm2"], chat_template="llama3")["chosen"] == "4<|eot_id|>"
    assert formatted("chat_template.default", {"messages": Q, "chosen": "4", "rejected": "5"}, tokenizers["llama3"],
                     chat_template="chatml")["prompt"] == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_types_need_a_template(tokenizers):
    tokenizer = {**tokenizers["chatml"], "chat_template": None, "chat_template_choice": None}
    with pytest.raises(TemplateChoiceError, match="no chat template"):
        formatted("chat_template.default", {"messages": Q, "chosen": "4", "rejected": "5"}, tokenizer)


def test_orpo_argilla_continues_a_multi_turn_conversation(tokenizers):
    history = chat(("user", "Hi"), ("assistant", "Hello"), ("user", Q))
    row = {"chosen": [*history, *chat(("assistant", "4"))], "rejected": [*history, *chat(("assistant", "5"))]}
    assert formatted("chat_template.argilla", row, tokenizers["chatml"]) == {
        "prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                  "<|im_start|>assistant\n",
        "chosen": "4<|im_end|>", "rejected": "5<|im_end|>",
    }
    row["rejected"] = chat(("user", "Hey"), ("assistant", "Hello"), ("user", Q), ("assistant", "5"))
    with pytest.raises(RowError, match="field 'rejected': its turns before the answer differ"):
        formatted("chat_template.argilla", row, tokenizers["chatml"])


USER_DEFINED = {"field_prompt": "question", "field_system": "sys", "field_chosen": "good", "field_rejected": "bad",
                "prompt_format": "{system}\n\nQ: {prompt}\nA:", "chosen_format": " {chosen}.", "rejected_format": " {rejected}."}


@pytest.mark.parametrize("template", TEMPLATES)
def test_user_defined_fills_its_formats_without_a_template(tokenizers, template):
    row = {"sys": SYSTEM, "question": Q, "good": "4", "bad": "5"}
    assert formatted(USER_DEFINED, row, tokenizers[template]) == {"prompt": "Be brief.\n\nQ: What is 2+2?\nA:", "chosen": " 4.", "rejected": " 5."}
    assert formatted({}, {"prompt": Q, "chosen": "4", "rejected": "5"}, tokenizers[template]) == {"prompt": Q, "chosen": "4", "rejected": "5"}


def test_user_defined_refuses_keys_and_placeholders_it_does_not_take():
    with pytest.raises(DataError, match="not field_completion"):
        fp.formatter(params({"field_completion": "c"}))
    with pytest.raises(DataError, match="prompt_format '{question}'"):
        fp.formatter(params({"prompt_format": "{question}"}))


# -- unpaired (KTO) ---------------------------------------------------------------------------------

UNPAIRED = {  # loader: (a documented example row, whether it has a system text)
    "argilla": ({"system": SYSTEM, "instruction": Q, "completion": "4", "label": True}, True),
    "argilla_chat": ({"completion": chat(("user", Q), ("assistant", "4")), "label": True}, False),
    "intel": ({"system": SYSTEM, "question": Q, "completion": "4", "label": True}, True),
    "prompt_pairs": ({"system": SYSTEM, "prompt": Q, "completion": "4", "label": True}, True),
    "ultra": ({"system": SYSTEM, "prompt": Q, "completion": "4", "label": True}, True),
}


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("type_", [f"{family}.{loader}" for family in ("chatml", "llama3") for loader in UNPAIRED])
@pytest.mark.parametrize("label", [True, False])
def test_kto_type_renders_prompt_completion_and_label(tokenizers, type_, template, label):
    row, system = UNPAIRED[type_.partition(".")[2]]
    assert formatted(type_, {**row, "label": label}, tokenizers[template], "unpaired") == {
        "prompt": PROMPT[template]["system" if system else "plain"], "completion": "4" + END[template], "label": label,
    }


def test_kto_argilla_chat_as_the_guide_shows_it_prompt_in_chosen(tokenizers):
    row = {"chosen": chat(("user", Q)), "completion": chat(("assistant", "4")), "label": False}
    assert formatted("chatml.argilla_chat", row, tokenizers["chatml"], "unpaired") == {
        "prompt": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "completion": "4<|im_end|>", "label": False,
    }


@pytest.mark.parametrize("template", TEMPLATES)
def test_kto_user_defined(tokenizers, template):
    type_ = {"field_prompt": "q", "field_completion": "a", "field_label": "ok", "prompt_format": "[{system}] {prompt} =", "completion_format": " {completion}"}
    assert formatted(type_, {"q": Q, "a": "4", "ok": True}, tokenizers[template], "unpaired") == {
        "prompt": "[] What is 2+2? =", "completion": " 4", "label": True,
    }


@pytest.mark.parametrize("label", ["true", 1, None])
def test_kto_label_must_be_a_boolean(tokenizers, label):
    with pytest.raises(RowError, match="field 'label': expected true or false"):
        formatted("chatml.intel", {"question": Q, "completion": "4", "label": label}, tokenizers["chatml"], "unpaired")
    with pytest.raises(RowError, match="field 'ok': expected true or false"):
        formatted({"field_label": "ok"}, {"prompt": Q, "completion": "4", "ok": label}, tokenizers["chatml"], "unpaired")


# -- steps (process reward models) ----------------------------------------------------------------

STEPS = {"prompt": "Is 2+2 = 4?", "completions": ["2+2 is 4.", "So yes."], "labels": [True, False]}


@pytest.mark.parametrize("template", TEMPLATES)
def test_stepwise_supervised_keeps_prompt_steps_and_labels_as_they_are(tokenizers, template):
    assert formatted("stepwise_supervised", STEPS, tokenizers[template], "steps") == {
        "prompt": "Is 2+2 = 4?", "completions": ["2+2 is 4.", "So yes."], "labels": [True, False],
    }


@pytest.mark.parametrize("change, error", [
    ({"labels": [True]}, "field 'labels': 1 labels for 2 steps"),
    ({"completions": [], "labels": []}, "field 'completions': no steps"),
    ({"labels": [True, 0]}, r"field 'labels\[1\]': expected true or false"),
    ({"prompt": " "}, "field 'prompt': empty prompt"),
])
def test_stepwise_supervised_refuses_bad_steps(tokenizers, change, error):
    with pytest.raises(RowError, match=error):
        formatted("stepwise_supervised", {**STEPS, **change}, tokenizers["chatml"], "steps")


# -- row errors and unknown types -----------------------------------------------------------------


@pytest.mark.parametrize("type_, row, spec, field, template", [
    ("chatml.intel", {"question": Q, "chosen": "4", "rejected": "4"}, {}, "chosen", "chatml"),
    ("llama3.argilla", {"instruction": Q, "chosen_response": "4", "rejected_response": "4 "}, {}, "chosen_response", "llama3"),  # the same once llama3 trims it
    ("chat_template.default", {"messages": Q, "good": "4", "rejected": "4"}, {"field_chosen": "good"}, "good", "smollm2"),
    ("bradley_terry.chat_template", {"input": Q, "chosen": "4", "rejected": "4"}, {}, "chosen", "chatml"),
    ({"field_chosen": "good"}, {"prompt": Q, "good": "4", "rejected": "4"}, {}, "good", "chatml"),
    ("zephyr.nectar", {"prompt": Q, "answers": [{"answer": "4", "rank": 1}, {"answer": "4", "rank": 2}]}, {}, "answers", "chatml"),
])
def test_the_same_chosen_and_rejected_names_the_chosen_field(tokenizers, type_, row, spec, field, template):
    with pytest.raises(RowError, match=f"field '{field}': the same answer as rejected"):
        formatted(type_, row, tokenizers[template], **spec)


@pytest.mark.parametrize("type_, row, field", [
    ("chatml.intel", {"system": SYSTEM, "question": " \n", "chosen": "4", "rejected": "5"}, "question"),
    ("llama3.prompt_pairs", {"prompt": "", "chosen": "4", "rejected": "5"}, "prompt"),
    ("chatml.argilla_chat", {"chosen": chat(("assistant", "4")), "rejected": chat(("assistant", "5"))}, "chosen"),
    ("chat_template.default", {"messages": chat(("system", SYSTEM)), "chosen": "4", "rejected": "5"}, "messages"),
    ("chat_template.default", {"messages": chat(("user", "  ")), "chosen": "4", "rejected": "5"}, "messages"),
    ({"field_prompt": "q"}, {"q": " ", "chosen": "4", "rejected": "5"}, "q"),
])
def test_an_empty_prompt_names_the_prompt_field(tokenizers, type_, row, field):
    with pytest.raises(RowError, match=f"field '{field}': empty prompt"):
        formatted(type_, row, tokenizers["chatml"])


def test_missing_fields_and_unmapped_roles_name_the_field(tokenizers):
    with pytest.raises(RowError, match="field 'rejected': missing"):
        formatted("chatml.intel", {"question": Q, "chosen": "4"}, tokenizers["chatml"])
    with pytest.raises(RowError, match=r"field 'messages\[0\].role': unknown role 'bot'"):
        formatted("chat_template.default", {"messages": chat(("bot", Q)), "chosen": "4", "rejected": "5"}, tokenizers["chatml"])
    with pytest.raises(RowError, match="the answer must be an assistant turn"):
        formatted("chat_template.default", {"messages": Q, "chosen": {"role": "user", "content": "4"}, "rejected": "5"}, tokenizers["chatml"])


def test_unknown_loader_lists_the_loaders_for_the_method():
    from stages.preference_formats import chatml, zephyr

    with pytest.raises(UnknownKind, match="chatml has no loader 'nope'; chatml's loaders for them: chatml.argilla, "
                                          "chatml.argilla_chat, chatml.default, chatml.icr, chatml.intel, chatml.prompt_pairs, chatml.ultra"):
        chatml.build("nope", fp.Spec(type="chatml.nope"), "paired")
    with pytest.raises(UnknownKind, match="chatml.icr is for preference pairs .*, not KTO rows; chatml's loaders for them: "
                                          "chatml.argilla, chatml.argilla_chat, chatml.intel, chatml.prompt_pairs, chatml.ultra"):
        chatml.build("icr", fp.Spec(type="chatml.icr"), "unpaired")
    with pytest.raises(UnknownKind, match="zephyr.nectar is for preference pairs .*, not KTO rows; zephyr's loaders for them: none"):
        zephyr.build("nectar", fp.Spec(type="zephyr.nectar"), "unpaired")
    # through the stage, at plan time
    with pytest.raises(DataError, match="dataset type 'zephyr.nectar': zephyr.nectar is for preference pairs"):
        fp.code_modules(params("zephyr.nectar", "unpaired"))
    with pytest.raises(DataError, match="stepwise_supervised.default is for process reward model rows"):
        fp.formatter(params("stepwise_supervised"))


# -- through the stage ----------------------------------------------------------------------------


def run_stage(tmp_path, rows: list[dict], type_, method: str = "paired"):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, tokenizer, out = (tmp_path / name for name in ("data", "tokenizer", "out"))
    for d in (data, tokenizer, out):
        d.mkdir()
    fetch_data.run(fetch_data.Params(dataset=fetch_data.Source(path=str(source))), {}, data)
    (tokenizer / tokenizer_stage.INFO).write_text(json.dumps(BUILTIN["chatml"]))
    fp.run(params(type_, method), {"data": data, "tokenizer": tokenizer}, out)
    return read_table(out / "pairs.arrow").to_pylist()


def test_stage_writes_the_pairs(tmp_path):
    rows = [{"system": SYSTEM, "question": Q, "chosen": "4", "rejected": "5"}, {"question": "1+1?", "chosen": "2", "rejected": "3"}]
    assert run_stage(tmp_path, rows, "chatml.intel") == [
        {"prompt": PROMPT["chatml"]["system"], "chosen": "4<|im_end|>", "rejected": "5<|im_end|>", "row": 0},
        {"prompt": "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n", "chosen": "2<|im_end|>", "rejected": "3<|im_end|>", "row": 1},
    ]


def test_stage_writes_kto_labels_as_booleans(tmp_path):
    rows = [{"prompt": Q, "completion": "4", "label": True}, {"prompt": Q, "completion": "5", "label": False}]
    assert [(r["completion"], r["label"]) for r in run_stage(tmp_path, rows, "chatml.prompt_pairs", "unpaired")] == [
        ("4<|im_end|>", True), ("5<|im_end|>", False)]


def test_stage_names_the_file_and_line_of_a_pair_with_one_answer_twice(tmp_path):
    rows = [{"question": Q, "chosen": "4", "rejected": "5"}, {"question": "1+1?", "chosen": "2", "rejected": "2"}]
    with pytest.raises(DataError, match=r"^pairs\.jsonl line 2: field 'chosen': the same answer as rejected"):
        run_stage(tmp_path, rows, "chatml.intel")


def test_a_template_that_renders_the_prompt_differently_once_answered_cuts_at_the_answer(tokenizers):
    # the generation prompt is not how this template opens an answered turn
    jinja = ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '</s>' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<next>' }}{% endif %}")
    row = {"question": Q, "chosen": "4", "rejected": "5"}
    assert formatted("chatml.intel", row, tokenizers["chatml"], chat_template="jinja", chat_template_jinja=jinja) == {
        "prompt": "<user>What is 2+2?</s><next>", "chosen": "4</s>", "rejected": "5</s>",
    }
    silent = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(RowError, match="field 'chosen': .* does not render the answer's text"):
        formatted("chatml.intel", row, tokenizers["chatml"], chat_template="jinja", chat_template_jinja=silent)
