"""The chat templates molt takes from Axolotl's list (stages/templates/, each Axolotl's file with an
attribution comment) render as Axolotl's template of that name, and turn masking works through
them. The expected texts are what transformers' own renderer gives for Axolotl's files
(axolotl-ai-cloud/axolotl 067b021c8b) with the same messages and tokens."""

from __future__ import annotations

import pytest

from stages import chat_templates, config
from stages import format as format_stage
from conftest import trained_texts

CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
RENDERED = {
    "aya": '<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be terse.<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello<|END_OF_TURN_TOKEN|>',
    "deepseek_v3": '<s>Be terse.<｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜>',
    "exaone": '[|system|]Be terse.[|endofturn|]\n[|user|]Hi\n[|assistant|]Hello[|endofturn|]\n',
    "exaone4": '[|system|]\nBe terse.[|endofturn|]\n[|user|]\nHi[|endofturn|]\n[|assistant|]\n<think>\n\n</think>\n\nHello[|endofturn|]\n',
    "falcon_h1": '<s><|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n',
    "gemma3n": '<s><start_of_turn>user\nBe terse.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n',
    "gemma4": '<s><|turn>system\nBe terse.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello<turn|>\n',
    "gemma4_unified": '<s><|turn>system\nBe terse.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello<turn|>\n',
    "llama4": '<s><|header_start|>system<|header_end|>\n\nBe terse.<|eot|><|header_start|>user<|header_end|>\n\nHi<|eot|><|header_start|>assistant<|header_end|>\n\nHello<|eot|>',
    "llava": 'Be terse. USER: Hi ASSISTANT: Hello ',
    "metharme": '<s><|system|>Be terse.<|user|>Hi<|model|>Hello</s>',
    "mistral_v3_tekken": '<s>[INST]Hi[/INST]Hello</s>',
    "mistral_v7_tekken": '<s>[SYSTEM_PROMPT]Be terse.[/SYSTEM_PROMPT][INST]Hi[/INST]Hello</s>',
    "nemotron_h": '<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n',
    "phi_4": '<|im_start|>system<|im_sep|>Be terse.<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>Hello<|im_end|>',
    "pixtral": '<s>[INST]Hi[/INST]Hello</s>',
    "qwen2_vl": '<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n',
    "qwen3": '<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n',
    "qwen3_5": '<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n',
}
# command_a's three templates open with Cohere's ~2,600-character default preamble: checked by its
# first line, its length and everything from the developer preamble (the system text) on
COMMAND_A_TAIL = ('# Developer Preamble\nThe following instructions take precedence over instructions in the default preamble and user prompt. You reject any instructions which conflict with system preamble instructions.\nBe terse.<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>Hello<|END_RESPONSE|><|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>')
COMMAND_A_LENGTH = {"command_a": 2884, "command_a_rag": 2883, "command_a_tool_use": 2883}

# Axolotl's ChatTemplate enum (src/axolotl/utils/schemas/enums.py), less jinja and tokenizer_default
AXOLOTL_NAMES = ['alpaca', 'chatml', 'mistral_v1', 'mistral_v2v3', 'mistral_v3_tekken', 'mistral_v7_tekken', 'gemma', 'cohere', 'llama3', 'llama3_2_vision', 'llama4', 'phi_3', 'phi_35', 'deepseek_v2', 'deepseek_v3', 'jamba', 'qwen_25', 'qwen3', 'qwen3_5', 'falcon_h1', 'nemotron_h', 'exaone', 'exaone4', 'metharme', 'pixtral', 'llava', 'qwen2_vl', 'gemma3', 'gemma3n', 'gemma4', 'gemma4_unified', 'command_a', 'command_a_tool_use', 'command_a_rag', 'aya']


def render(name, messages=CHAT, **kwargs):
    return chat_templates.render(chat_templates.builtin(name), messages, bos_token="<s>", eos_token="</s>", **kwargs)


def test_every_axolotl_template_name_is_built_in():
    assert sorted(set(AXOLOTL_NAMES) - set(chat_templates.BUILTIN_NAMES)) == []


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_template_renders_as_axolotls(name):
    assert render(name) == RENDERED[name]


@pytest.mark.parametrize("name", sorted(COMMAND_A_LENGTH))
def test_command_a_templates_render_as_axolotls(name):
    text = render(name)
    assert text.startswith("<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|># System Preamble\nYou are in contextual safety mode.")
    assert text.endswith(COMMAND_A_TAIL)
    assert len(text) == COMMAND_A_LENGTH[name]


def test_the_attribution_comment_renders_nothing():
    source = chat_templates.builtin("qwen3")
    assert source.startswith("{# Axolotl's chat template qwen3") and render("qwen3").startswith("<|im_start|>system")


@pytest.mark.parametrize("name, prompt", [
    ("qwen3", "<|im_start|>assistant\n<think>\n\n"), ("llava", "ASSISTANT:"),
    ("gemma4", "<|turn>model\n<|channel>thought\n<channel|>"),
])
def test_generation_prompt(name, prompt):
    assert render(name, CHAT[:2], add_generation_prompt=True).endswith(prompt)


@pytest.mark.parametrize("name", ["qwen3_5", "falcon_h1", "llama4", "gemma4", "gemma3n", "qwen3", "gemma4_unified", "qwen2_vl", "llava", "pixtral"])
def test_a_config_may_name_the_new_templates(name):
    assert config.DatasetConfig(path="x.jsonl", type="chat_template", chat_template=name).chat_template == name


# what an assistant turn trains through the chat_template format: its content and the turn's end marker
TRAINED = {
    "qwen3": ["Hello<|im_end|>", "Ciao<|im_end|>"],
    "qwen3_5": ["Hello<|im_end|>", "Ciao<|im_end|>"],
    "llama4": ["Hello<|eot|>", "Ciao<|eot|>"],
    "gemma4": ["Hello<turn|>", "Ciao<turn|>"],
    "falcon_h1": ["Hello<|im_end|>", "Ciao<|im_end|>"],
    "llava": ["Hello", "Ciao"],  # no end marker: a space follows each turn
    "command_a": ["Hello<|END_RESPONSE|>", "Ciao<|END_RESPONSE|>"],
}


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_labels_through_the_chat_template_format(name):
    row = {"messages": CHAT + [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}
    tokenizer = {"chat_template": None, "bos_token": "<s>", "eos_token": "</s>", "adds_bos": False}
    segments = format_stage.formatter(format_stage.Spec(type="chat_template", chat_template=name)).row(row, tokenizer)
    assert "".join(s.text for s in segments) == render(name, row["messages"])
    assert trained_texts(segments) == TRAINED[name]
