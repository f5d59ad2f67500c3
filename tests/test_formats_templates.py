"""Built-in chat templates render each model family's documented format, and turn masking works
through them."""

from __future__ import annotations

import pytest

from stages import chat_templates
from stages import tokenizer as tokenizer_stage
from test_formats import expect, pipeline, tokenizer_artifacts  # noqa: F401  (fixtures)

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
    "deepseek_v2": "<s>Be terse.\n\nUser: Hi\n\nAssistant: Hello</s>User: Bye\n\nAssistant: Ciao</s>",
    "jamba": "<|startoftext|><|bom|><|system|> Be terse.<|eom|><|bom|><|user|> Hi<|eom|><|bom|><|assistant|> Hello<|eom|>"
             "<|bom|><|user|> Bye<|eom|><|bom|><|assistant|> Ciao<|eom|>",
    "alpaca": "Be terse.\n\n### Instruction: Hi\n\n### Response: Hello</s>### Instruction: Bye\n\n### Response: Ciao</s>",
    "llama3_2_vision": "<s><|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi"
                       "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>user<|end_header_id|>"
                       "\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nCiao<|eot_id|>",
}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_builtin_template_renders_the_model_format(name):
    source = chat_templates.resolve(name, None, None)
    assert chat_templates.render(source, CHAT, bos_token="<s>", eos_token="</s>") == RENDERED[name]


def test_qwen_25_adds_its_default_system_prompt():
    text = chat_templates.render(chat_templates.BUILTIN["qwen_25"], CHAT[1:3])
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi")


def test_jamba_without_system_has_an_empty_system_turn_and_a_generation_prompt():
    text = chat_templates.render(chat_templates.BUILTIN["jamba"], CHAT[1:3], add_generation_prompt=True)
    assert text == "<|startoftext|><|bom|><|system|> <|eom|><|bom|><|user|> Hi<|eom|><|bom|><|assistant|> Hello<|eom|><|bom|><|assistant|>"


def test_llama3_2_vision_renders_image_parts():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = chat_templates.render(chat_templates.BUILTIN["llama3_2_vision"], messages, bos_token="<s>")
    assert text == "<s><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is this?<|eot_id|>"


@pytest.fixture(scope="module")
def cohere_tokenizer(tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer-cohere")
    tokenizer_stage.run(tokenizer_stage.Params(chat_template="cohere"), {"model": tokenizer_dir}, out)
    return out


def test_chosen_template_is_saved_with_the_tokenizer(cohere_tokenizer):
    import json

    saved = json.loads((cohere_tokenizer / "molt_tokenizer.json").read_text())["chat_template"]
    assert saved == chat_templates.BUILTIN["cohere"]
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

    tokenizer = {"chat_template": chat_templates.BUILTIN[template], "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "adds_bos": False}
    made = format_stage.formatter(format_stage.Spec(type="chat_template"))
    segments = made.row(row, tokenizer)
    merged: list[list] = []
    for text, train, _detail in segments:
        if merged and merged[-1][1] == train:
            merged[-1][0] += text
        else:
            merged.append([text, train])
    assert [t for t, train in merged if train] == ["The sky is blue." + TURN_END[template]] * 2
    text = "".join(s.text for s in segments)
    assert text == chat_templates.render(chat_templates.BUILTIN[template], row["messages"], bos_token="<|im_start|>", eos_token="<|im_end|>")
