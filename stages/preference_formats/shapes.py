"""What the preference types share: picking a loader for the training method, the chat template
a row renders with, reading messages and answers out of a row, and rendering a prompt and its
answers.

A prompt is the system (when given and non-empty) and user turns rendered with the generation
prompt; an answer is the same conversation with the answer as an assistant turn, less the
prompt's text at its front, right-stripped: with chatml that is Axolotl's
`<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n` and `{a}<|im_end|>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from stages import chat_templates
from stages.formats.rows import RowError, UnknownKind, optional_text, require_text

# SFT's chat_template defaults (stages/formats/chat_template.py), kept here so that editing the
# SFT strategy does not change these types' fingerprints
DEFAULT_ROLES = {"user": ["human", "user"], "assistant": ["gpt", "assistant"], "system": ["system"], "tool": ["tool"]}

METHODS = {"paired": "preference pairs (DPO, IPO, SimPO, ORPO, reward models)", "unpaired": "KTO rows",
           "steps": "process reward model rows"}


@dataclass(frozen=True)
class Formatter:
    row: Callable[[dict, dict], dict]  # (row, tokenizer info) -> the method's columns


def pick(module: str, loaders: dict[str, dict[str, Callable]], loader: str, method: str) -> Callable:
    """loaders[method][loader], or UnknownKind naming the loaders `module` has for this method."""
    known = loaders.get(method, {})
    if loader in known:
        return known[loader]
    have = ", ".join(f"{module}.{name}" for name in sorted(known)) or "none"
    other = [METHODS[m] for m, table in loaders.items() if loader in table]
    why = f"{module}.{loader} is for {' and '.join(other)}, not {METHODS[method]}" if other else f"{module} has no loader {loader!r}"
    raise UnknownKind(f"{why}; {module}'s loaders for them: {have}")


# -- the chat template ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Chat:
    source: str
    name: str  # how messages name the template
    bos: str
    eos: str

    def render(self, messages: list[dict], generation: bool = False) -> str:
        return chat_templates.render(self.source, messages, add_generation_prompt=generation, name=self.name,
                                     bos_token=self.bos, eos_token=self.eos)


@lru_cache(maxsize=16)
def _resolve(choice: str | None, jinja: str | None, tokenizer_template: str | None) -> str | None:
    return chat_templates.resolve(choice, jinja, tokenizer_template)  # cached: a built-in is read from disk


def chat(spec, tokenizer: dict, family: str | None = None) -> Chat:
    """The template a row renders with: the dataset's own chat_template; else, for a family type
    (chatml.*, llama3.*, zephyr.*), that family's built-in unless the config chose a top-level
    template (as Axolotl's hard-coded strings do); else the tokenizer's."""
    if spec.chat_template:
        source, choice = _resolve(spec.chat_template, spec.chat_template_jinja, tokenizer["chat_template"]), spec.chat_template
    elif family and tokenizer.get("chat_template_choice") is None:
        source, choice = _resolve(family, None, None), family
    else:
        source, choice = tokenizer["chat_template"], tokenizer.get("chat_template_choice")
    if source is None:
        raise chat_templates.TemplateChoiceError("the tokenizer has no chat template: set chat_template (e.g. chatml)")
    return Chat(source, chat_templates.template_name(choice), tokenizer.get("bos_token") or "", tokenizer.get("eos_token") or "")


# -- reading a row -------------------------------------------------------------------------------


def _role_map(spec) -> dict[str, str]:
    """`roles:` ({target: [names in the data]}) inverted: name -> role."""
    return {name: target for target, names in (spec.roles or DEFAULT_ROLES).items()
            for name in ([names] if isinstance(names, str) else names)}


def single_turn(row: dict, field: str, system_field: str = "system") -> list[dict]:
    """The optional system text and one user turn from `field`, as most Axolotl shapes hold them."""
    system = optional_text(row, system_field)
    question = require_text(row, field)
    if not question.strip():
        raise RowError(field, "empty prompt (no user text)")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def _message(m, where: str, spec, roles: dict[str, str]) -> dict:
    if not isinstance(m, dict):
        raise RowError(where, f"expected a message object, got {type(m).__name__}")
    role_key, content_key = spec.message_property_mappings["role"], spec.message_property_mappings["content"]
    role, content = m.get(role_key), m.get(content_key)
    if role not in roles:
        raise RowError(f"{where}.{role_key}", f"unknown role {role!r} (known: {', '.join(sorted(roles))}; map it with `roles:`)")
    if not isinstance(content, str):
        raise RowError(f"{where}.{content_key}", f"expected text, got {type(content).__name__}")
    return {"role": roles[role], "content": content}


def conversation(row: dict, field: str, spec) -> list[dict]:
    """The list of messages in `field`, roles mapped by `roles:` and message_property_mappings."""
    raw = row.get(field)
    if raw is None:
        raise RowError(field, "missing")
    if not isinstance(raw, list):
        raise RowError(field, f"expected a list of messages, got {type(raw).__name__}")
    if not raw:
        raise RowError(field, "empty conversation")
    roles = _role_map(spec)
    return [_message(m, f"{field}[{i}]", spec, roles) for i, m in enumerate(raw)]


def answer(row: dict, field: str, spec) -> str:
    """An answer's text: a string, an assistant message, or a conversation whose last message it is."""
    raw = row.get(field)
    if raw is None:
        raise RowError(field, "missing")
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        if not raw:
            raise RowError(field, "empty conversation")
        raw, where = raw[-1], f"{field}[{len(raw) - 1}]"
    elif isinstance(raw, dict):
        where = field
    else:
        raise RowError(field, f"expected text, a message or a list of messages, got {type(raw).__name__}")
    message = _message(raw, where, spec, _role_map(spec))
    if message["role"] != "assistant":
        raise RowError(where, f"the answer must be an assistant turn, got role {message['role']!r}")
    return message["content"]


def require_label(row: dict, field: str = "label") -> bool:
    value = row.get(field)
    if not isinstance(value, bool):  # 0 / 1 or "true" would be a guess about what the data means
        raise RowError(field, f"expected true or false, got {value!r}")
    return value


def require_user_text(messages: list[dict], field: str) -> None:
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise RowError(field, "empty prompt (no user text)")


def distinct(chosen: str, rejected: str, field: str) -> None:
    if chosen == rejected:
        raise RowError(field, "the same answer as rejected (a pair needs two different answers)")


# -- rendering -----------------------------------------------------------------------------------


def answer_text(chat: Chat, history: list[dict], prompt: str, content: str, field: str) -> str:
    full = chat.render([*history, {"role": "assistant", "content": content}])
    if full.startswith(prompt):
        return full[len(prompt):].rstrip()
    # some templates render earlier turns differently once an answer follows (e.g. drop a
    # reasoning part): then the answer is its own text to the end
    needle = content.strip()
    at = full.rfind(needle) if needle else -1
    if at < 0:
        raise RowError(field, f"{chat.name} does not render the answer's text")
    return full[at:].rstrip()


def paired(chat: Chat, history: list[dict], chosen: str, rejected: str, fields: tuple[str, str, str]) -> dict:
    """prompt / chosen / rejected; `fields` names (prompt, chosen, rejected) in errors."""
    prompt_field, chosen_field, rejected_field = fields
    require_user_text(history, prompt_field)
    prompt = chat.render(history, generation=True)
    result = {"prompt": prompt, "chosen": answer_text(chat, history, prompt, chosen, chosen_field),
              "rejected": answer_text(chat, history, prompt, rejected, rejected_field)}
    distinct(result["chosen"], result["rejected"], chosen_field)
    return result


def unpaired(chat: Chat, history: list[dict], completion: str, label: bool, fields: tuple[str, str]) -> dict:
    """prompt / completion / label; `fields` names (prompt, completion) in errors."""
    require_user_text(history, fields[0])
    prompt = chat.render(history, generation=True)
    return {"prompt": prompt, "completion": answer_text(chat, history, prompt, completion, fields[1]), "label": label}
