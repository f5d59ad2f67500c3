"""Built-in chat templates render each model family's documented format, and turn masking works
through them. The renderings below are Axolotl 0.19.0's for the same template names (checked by
rendering its templates with transformers; molt's dates are fixed, see FIXED_DATE)."""

from __future__ import annotations

import pytest

from stages import chat_templates
from stages import tokenizer as tokenizer_stage
from test_formats import expect, pipeline, tokenizer_artifacts  # noqa: F401  (fixtures)
from conftest import trained_texts

CHAT = [
    {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"},
]
RENDERED = {
    "phi_35": "<|system|>\nBe terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n<|user|>\nBye<|end|>\n<|assistant|>\nCiao<|end|>\n",
    "qwen_25": "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
               "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nCiao<|im_end|>\n",
    "gemma3": "<s><start_of_turn>user\nBe terse.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
              "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\nCiao<end_of_turn>\n",
    "mistral": "<s>[INST] Be terse.\n\nHi[/INST] Hello</s>[INST] Bye[/INST] Ciao</s>",
    "inst": "<s>[INST] <<SYS>>\nBe terse.\n<</SYS>>\n\nHi [/INST] Hello</s><s>[INST] Bye [/INST] Ciao</s>",
    "cohere": "<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be terse.<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi"
              "<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>"
              "<|USER_TOKEN|>Bye<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Ciao<|END_OF_TURN_TOKEN|>",
    "deepseek_v2": "<s>Be terse.\n\n<｜User｜>Hi<｜Assistant｜>Hello</s><｜User｜>Bye<｜Assistant｜>Ciao</s>",
    "jamba": "<|startoftext|><|bom|><|system|> Be terse.<|eom|><|bom|><|user|> Hi<|eom|><|bom|><|assistant|> Hello<|eom|>"
             "<|bom|><|user|> Bye<|eom|><|bom|><|assistant|> Ciao<|eom|>",
    "alpaca": "<s>Be terse.\n\n### Instruction:\nHi\n\n### Response:\nHello</s>\n\n### Instruction:\nBye\n\n### Response:\nCiao</s>",
    "llama3_2_vision": "<s><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 01 Jan 2024\n\n"
                       "Be terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi"
                       "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>user<|end_header_id|>"
                       "\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nCiao<|eot_id|>",
    "phi_3": "<s><|system|>\nBe terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n<|user|>\nBye<|end|>\n<|assistant|>\nCiao<|end|>\n",
    "mistral_v1": "<s> [INST] Be terse.\n\nHi [/INST] Hello</s> [INST] Bye [/INST] Ciao</s>",
    # v2/v3 put the system text only into a last user turn: none here
    "mistral_v2v3": "<s>[INST] Hi[/INST] Hello</s>[INST] Bye[/INST] Ciao</s>",
}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_builtin_template_renders_the_model_format(name):
    source = chat_templates.resolve(name, None, None)
    assert chat_templates.render(source, CHAT, bos_token="<s>", eos_token="</s>") == RENDERED[name]


def test_qwen_25_adds_its_default_system_prompt():
    text = chat_templates.render(chat_templates.builtin("qwen_25"), CHAT[1:3])
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi")


def test_jamba_without_system_has_an_empty_system_turn_and_a_generation_prompt():
    text = chat_templates.render(chat_templates.builtin("jamba"), CHAT[1:3], add_generation_prompt=True)
    assert text == "<|startoftext|><|bom|><|system|> <|eom|><|bom|><|user|> Hi<|eom|><|bom|><|assistant|> Hello<|eom|><|bom|><|assistant|>"


@pytest.mark.parametrize("name, messages, error", [
    ("gemma", CHAT, "System role not supported"),
    ("gemma", [CHAT[2], CHAT[1]], "Conversation roles must alternate"),
    ("cohere", [CHAT[1], CHAT[1]], "Conversation roles must alternate"),
    ("mistral_v1", CHAT[1:4] + [{"role": "tool", "content": "42"}], "Only user and assistant roles are supported"),
])
def test_builtin_templates_refuse_what_the_model_format_cannot_say(name, messages, error):
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match=error):
        chat_templates.render(chat_templates.builtin(name), messages, bos_token="<s>", eos_token="</s>")


def test_mistral_v2v3_puts_the_system_text_into_a_last_user_turn():
    text = chat_templates.render(chat_templates.builtin("mistral_v2v3"), CHAT[:4], bos_token="<s>", eos_token="</s>")
    assert text == "<s>[INST] Hi[/INST] Hello</s>[INST] Be terse.\n\nBye[/INST]"


def test_qwen_25_tool_results_are_a_user_turn():
    messages = CHAT[1:3] + [{"role": "tool", "content": "42"}, {"role": "tool", "content": "43"}]
    text = chat_templates.render(chat_templates.builtin("qwen_25"), messages)
    assert text.endswith("<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response>"
                         "\n<tool_response>\n43\n</tool_response><|im_end|>\n")


def test_llama3_2_vision_renders_image_parts():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = chat_templates.render(chat_templates.builtin("llama3_2_vision"), messages, bos_token="<s>")
    assert text == "<s><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is this?<|eot_id|>"


@pytest.fixture(scope="module")
def cohere_tokenizer(tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer-cohere")
    tokenizer_stage.run(tokenizer_stage.Params(chat_template="cohere"), {"model": tokenizer_dir}, out)
    return out


def test_chosen_template_is_saved_with_the_tokenizer(cohere_tokenizer):
    import json

    saved = json.loads((cohere_tokenizer / "molt_tokenizer.json").read_text())["chat_template"]
    assert saved == chat_templates.builtin("cohere")
    assert json.loads((cohere_tokenizer / "tokenizer_config.json").read_text()).get("chat_template", saved) == saved


TURN_END = {"cohere": "<|END_OF_TURN_TOKEN|>", "deepseek_v2": "<|im_end|>", "mistral": "<|im_end|>", "gemma3": "<end_of_turn>",
            "phi_35": "<|end|>", "qwen_25": "<|im_end|>", "jamba": "<|eom|>"}


@pytest.mark.parametrize("template", sorted(TURN_END))
def test_repeated_assistant_content_is_masked_per_turn(template):
    """Each assistant turn's content (and turn end, where the template has one) is trained, the
    rest is not, even though both turns say the same thing."""
    row = {"messages": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "The sky is blue."},
                        {"role": "user", "content": "Again."}, {"role": "assistant", "content": "The sky is blue."}]}
    from stages import format as format_stage

    tokenizer = {"chat_template": chat_templates.builtin(template), "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "adds_bos": False}
    made = format_stage.formatter(format_stage.Spec(type="chat_template"))
    segments = made.row(row, tokenizer)
    assert trained_texts(segments) == ["The sky is blue." + TURN_END[template]] * 2
    text = "".join(s.text for s in segments)
    assert text == chat_templates.render(chat_templates.builtin(template), row["messages"], bos_token="<|im_start|>", eos_token="<|im_end|>")


def test_reasoning_goes_to_the_template_and_is_trained_with_its_turn():
    """A message's reasoning (field_thinking, Axolotl's default reasoning_content) is handed to the
    template as template_thinking_key; qwen3 renders it inside <think>…</think> and the trained span
    of the turn runs from it through the answer (Axolotl's span too: qwen3 writes the <think> tag
    with or without reasoning in a last turn; a template that writes tags only around reasoning has
    them trained too, as Axolotl finds the turn by rendering it without reasoning). A template that does
    not render it (chatml) trains the answer alone."""
    from stages import format as format_stage

    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "Add them."}]}
    tokenizer = {"chat_template": chat_templates.builtin("qwen3"), "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "adds_bos": False}
    segments = format_stage.formatter(format_stage.Spec(type="chat_template")).row(row, tokenizer)
    assert trained_texts(segments) == ["Add them.\n</think>\n\n4<|im_end|>"]
    assert "".join(s.text for s in segments) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nAdd them.\n</think>\n\n4<|im_end|>\n"
    # gpt-oss style keys: the reasoning in `thinking`, the template reading message.thinking
    own = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "thinking": "Add them."}]}
    jinja = ("{% for m in messages %}<|{{ m.role }}|>{% if m.thinking %}[{{ m.thinking }}]{% endif %}{{ m.content }}<|end|>{% endfor %}")
    spec = format_stage.Spec(type="chat_template", chat_template="jinja", chat_template_jinja=jinja, field_thinking="thinking", template_thinking_key="thinking")
    segments = format_stage.formatter(spec).row(own, {**tokenizer, "chat_template": None})
    assert trained_texts(segments) == ["[Add them.]4<|end|>"]
    segments = format_stage.formatter(format_stage.Spec(type="chat_template", chat_template="jinja", chat_template_jinja=jinja)).row(own, tokenizer)
    assert trained_texts(segments) == ["4<|end|>"]  # the default field_thinking (reasoning_content) is absent: no reasoning
    tokenizer["chat_template"] = chat_templates.builtin("chatml")
    assert trained_texts(format_stage.formatter(format_stage.Spec(type="chat_template")).row(row, tokenizer)) == ["4<|im_end|>"]
