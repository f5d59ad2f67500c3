"""Chat templates: the built-in ones users name in configs, and rendering in a sandbox.

Templates come from configs and model repos, so they are untrusted code: they run in Jinja's
immutable sandbox, with the same options transformers uses so renderings match its own.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

_GEN = "{% if add_generation_prompt %}"

BUILTIN = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}" + _GEN + "{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}" + _GEN + "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for message in messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}" + _GEN + "{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    "phi_3": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endfor %}" + _GEN + "{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    "phi_35": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endfor %}" + _GEN + "{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    "qwen_25": (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}" + _GEN + "{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Gemma 3 has no system role: the system text opens the first user turn
    "gemma3": (
        "{{ bos_token }}{% set ns = namespace(system='') %}"
        "{% for message in messages %}{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
        "{% else %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + (ns.system if loop.index0 == 1 or (loop.first and not ns.system) else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endif %}{% endfor %}" + _GEN + "{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    # Mistral v2/v3: [INST] user[/INST] assistant</s>, the system text before the last user turn's text
    "mistral": (
        "{{ bos_token }}{% set ns = namespace(system='') %}"
        "{% for message in messages %}{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + '[/INST]' }}{% set ns.system = '' %}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    # Llama 2 / Mistral v1 style: <s>[INST] user [/INST] assistant</s><s>[INST] ...
    "inst": (
        "{% set ns = namespace(system='') %}"
        "{% for message in messages %}{% if message['role'] == 'system' %}{% set ns.system = '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' %}"
        "{% elif message['role'] == 'user' %}{{ bos_token + '[INST] ' + ns.system + message['content'] + ' [/INST]' }}{% set ns.system = '' %}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "cohere": (
        "{{ bos_token }}{% for message in messages %}"
        "{% set token = {'system': '<|SYSTEM_TOKEN|>', 'user': '<|USER_TOKEN|>', 'assistant': '<|CHATBOT_TOKEN|>'}[message['role']] %}"
        "{{ '<|START_OF_TURN_TOKEN|>' + token + message['content'] + '<|END_OF_TURN_TOKEN|>' }}"
        "{% endfor %}" + _GEN + "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
    ),
    "deepseek_v2": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ 'Assistant: ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}" + _GEN + "{{ 'Assistant:' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction: ' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response: ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}" + _GEN + "{{ '### Response: ' }}{% endif %}"
    ),
}
# AI21 Jamba 1.5: every turn is <|bom|><|role|> content, turns joined and closed by <|eom|>;
# the system turn is always there, empty when the conversation has none
BUILTIN["jamba"] = (
    "{{ '<|startoftext|><|bom|><|system|> ' }}{% set ns = namespace(rest=messages) %}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% set ns.rest = messages[1:] %}{% endif %}"
    "{% for message in ns.rest %}{{ '<|eom|><|bom|><|' + message['role'] + '|> ' + message['content'] }}{% endfor %}"
    "{{ '<|eom|>' }}" + _GEN + "{{ '<|bom|><|assistant|>' }}{% endif %}"
)
BUILTIN["llama3_2_vision"] = BUILTIN["llama3"].replace(
    "message['content'] | trim",
    "(message['content'] if message['content'] is string else message['content'] | map(attribute='text', default='<|image|>') | join('')) | trim",
)
BUILTIN["mistral_v2v3"] = BUILTIN["mistral"]

FALLBACK_PREFIX = "tokenizer_default_fallback_"
FIXED_DATE = datetime(2024, 1, 1)


class TemplateChoiceError(ValueError):
    pass


def resolve(choice: str | None, jinja: str | None, tokenizer_template: str | None) -> str | None:
    """The Jinja source for a config's `chat_template` choice (None: the tokenizer's own, if any)."""
    if choice in (None, "tokenizer_default"):
        if choice and not tokenizer_template:
            raise TemplateChoiceError("chat_template: tokenizer_default, but the tokenizer has no chat template; name one (e.g. chatml)")
        return tokenizer_template
    if choice.startswith(FALLBACK_PREFIX):
        return tokenizer_template or resolve(choice[len(FALLBACK_PREFIX):], jinja, None)
    if choice == "jinja":
        if not jinja:
            raise TemplateChoiceError("chat_template: jinja needs chat_template_jinja")
        return jinja
    if choice not in BUILTIN:
        raise TemplateChoiceError(f"chat_template: unknown template {choice!r}; built-in: {', '.join(sorted(BUILTIN))}, jinja, tokenizer_default")
    return BUILTIN[choice]


def _raise(message):
    raise TemplateError(message)


@lru_cache(maxsize=32)
def compile_template(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    # Training data must not depend on the day it was rendered: dates come out as a fixed day.
    env.globals["strftime_now"] = lambda fmt: FIXED_DATE.strftime(fmt)
    return env.from_string(source)


def render(source: str, messages: list[dict], add_generation_prompt: bool = False, **special_tokens) -> str:
    return compile_template(source).render(messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)
