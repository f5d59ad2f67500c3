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
    # Gemma has no system role, and user and model turns must alternate
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}" + _GEN + "{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    # Phi-3: a user turn already opens the assistant's, so there is no separate generation prompt
    "phi_3": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n<|assistant|>\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + '<|end|>\\n' }}{% endif %}{% endfor %}"
    ),
    "phi_35": (
        "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% elif message['role'] in ('user', 'assistant') %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}"
        "{% endfor %}" + _GEN + "{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    # tool results go back as a user turn of <tool_response> blocks
    "qwen_25": (
        "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{% for message in messages %}{% if message['role'] in ('user', 'assistant') or (message['role'] == 'system' and not loop.first) %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% elif message['role'] == 'tool' %}{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
        "{{ '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
        "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}{% endif %}"
        "{% endfor %}" + _GEN + "{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Gemma 3 has no system role: the system text opens the first user turn
    "gemma3": (
        "{{ bos_token }}{% set ns = namespace(prefix='', rest=messages) %}"
        "{% if messages[0]['role'] == 'system' %}{% set ns.prefix = messages[0]['content'] + '\\n\\n' %}{% set ns.rest = messages[1:] %}{% endif %}"
        "{% for message in ns.rest %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + (ns.prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}" + _GEN + "{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    # molt's own names (Axolotl has mistral_v1 / mistral_v2v3 below): the [INST] format with the
    # system text in the first user turn, and the Llama 2 format with <<SYS>>
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
    # the system text only as the first message; user and assistant turns alternate, trimmed
    "cohere": (
        "{{ bos_token }}{% set ns = namespace(rest=messages) %}{% if messages[0]['role'] == 'system' %}{% set ns.rest = messages[1:] %}"
        "{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + messages[0]['content'] + '<|END_OF_TURN_TOKEN|>' }}{% endif %}"
        "{% for message in ns.rest %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + message['content'] | trim + '<|END_OF_TURN_TOKEN|>' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' + message['content'] | trim + '<|END_OF_TURN_TOKEN|>' }}{% endif %}"
        "{% endfor %}" + _GEN + "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
    ),
    "deepseek_v2": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}" + _GEN + "{{ '<｜Assistant｜>' }}{% endif %}"
    ),
    # a system text only as the first message; messages are separated by a blank line
    "alpaca": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' and loop.first %}{{ message['content'] }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token }}{% endif %}"
        "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endfor %}" + _GEN + "{{ '\\n\\n### Response:\\n' }}{% endif %}"
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
# Mistral's templates: the optional first system message goes into the first user turn (v1), or
# into the user turn only when it is the conversation's last message (v2/v3: so a conversation that
# ends with the assistant's reply, as training data does, carries no system text)
_MISTRAL_SYSTEM = (
    "{% set ns = namespace(system=none, rest=messages, index=0) %}"
    "{% if messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] %}{% set ns.rest = messages[1:] %}{% endif %}"
    "{% for message in ns.rest %}{% if message['role'] != 'tool' %}{% if (message['role'] == 'user') != (ns.index % 2 == 0) %}"
    "{{ raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% set ns.index = ns.index + 1 %}{% endif %}{% endfor %}"
)
_MISTRAL_ROLES = "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}{% endif %}{% endfor %}"
BUILTIN["mistral_v1"] = (
    _MISTRAL_SYSTEM.replace("if message['role'] != 'tool'", "if true") + "{{ bos_token }}{% for message in ns.rest %}"
    "{% if message['role'] == 'user' %}{{ ' [INST] ' + (ns.system + '\\n\\n' if loop.first and ns.system is not none else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}" + _MISTRAL_ROLES
)
BUILTIN["mistral_v2v3"] = (
    _MISTRAL_SYSTEM + "{{ bos_token }}{% for message in ns.rest %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + (ns.system + '\\n\\n' if loop.last and ns.system is not none else '') + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + eos_token }}"
    # a tool result needs its call's id, which a molt message does not carry
    "{% elif message['role'] == 'tool' %}{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}" + _MISTRAL_ROLES
)
# Llama 3.2 Vision: a system header with the knowledge cut-off and the day (fixed, see FIXED_DATE)
# unless the conversation has images; image parts render as <|image|>; tool turns as ipython JSON
BUILTIN["llama3_2_vision"] = (
    "{{ bos_token }}{% set ns = namespace(system='', rest=messages, images=false) %}"
    "{% if messages[0]['role'] == 'system' %}{% set ns.rest = messages[1:] %}"
    "{% set ns.system = (messages[0]['content'] if messages[0]['content'] is string"
    " else messages[0]['content'] | selectattr('text', 'defined') | map(attribute='text') | join('')) | trim %}{% endif %}"
    "{% for message in ns.rest %}{% if message['content'] is not string %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set ns.images = true %}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if ns.images and ns.system != '' %}{{ raise_exception('Prompting with images is incompatible with system messages.') }}{% endif %}"
    "{% if not ns.images %}{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\nToday Date: '"
    " + strftime_now('%d %b %Y') + '\\n\\n' + ns.system + '<|eot_id|>' }}{% endif %}"
    "{% for message in ns.rest %}{% if message['role'] in ('tool', 'ipython') %}"
    "{{ '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message['content'] | tojson + '<|eot_id|>' }}"
    "{% else %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{{ '<|image|>' if part['type'] == 'image' else (part['text'] if part['type'] == 'text' else '') }}{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}{% endif %}{% endfor %}" + _GEN + "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

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
