"""chat_template: conversations rendered with a chat template; turns of `roles_to_train` trained.

Each turn is located by rendering the conversation again with that turn's content replaced by a
placeholder: the text before the placeholder and after it are exactly the template's text around
the turn, so repeated content, template markers inside content and templates that trim content
cannot misplace a boundary. A message's reasoning (`field_thinking`) goes to the template as
`template_thinking_key`; where the template renders it, a trained turn's span runs from its
reasoning through its content, as in Axolotl. message_field_training_detail spans are marked as
such: tokenize picks their tokens by Axolotl's rule rather than by character coverage.
"""

from __future__ import annotations

from stages import chat_templates
from stages.formats.rows import Formatter, Kind, RowError, Segment, UnknownKind

DEFAULT_ROLES = {"user": ["human", "user"], "assistant": ["gpt", "assistant"], "system": ["system"], "tool": ["tool"]}
# Turn-end markers of common templates; the EOS token is always one too.
TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|END_OF_TURN_TOKEN|>", "<｜end▁of▁sentence｜>", "<|eom|>",
             "<|eot|>", "<turn|>", "[|endofturn|]", "<|END_RESPONSE|>")  # llama4, gemma4, exaone, command_a (its reply's end)
EOT_WINDOW = 16  # characters after a turn's content in which its end marker may start
PLACEHOLDER = "\ue000molt-turn\ue001"  # private-use characters: no real content holds them
THINKING_PLACEHOLDER = "\ue000molt-thinking\ue001"


def _role_map(spec) -> dict[str, str]:
    mapping = {}
    for target, names in (spec.roles or DEFAULT_ROLES).items():
        for name in [names] if isinstance(names, str) else names:
            mapping[name] = target
    return mapping


def messages_of(row: dict, spec) -> list[dict]:
    field = spec.field_messages
    if field not in row or row[field] is None:
        raise RowError(field, "missing")
    raw = row[field]
    if not isinstance(raw, list):
        raise RowError(field, f"expected a list of messages, got {type(raw).__name__}")
    if not raw:
        raise RowError(field, "empty conversation")
    roles = _role_map(spec)
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RowError(f"{field}[{i}]", f"expected a message object, got {type(m).__name__}")
        role_key, content_key = spec.message_property_mappings["role"], spec.message_property_mappings["content"]
        role, content = m.get(role_key), m.get(content_key)
        if role not in roles:
            raise RowError(f"{field}[{i}].{role_key}", f"unknown role {role!r} (known: {', '.join(sorted(roles))}; map it with `roles:`)")
        if isinstance(content, list):
            content = _text_of_parts(content, f"{field}[{i}].{content_key}")
        if not isinstance(content, str):
            raise RowError(f"{field}[{i}].{content_key}", f"expected text or a list of text parts, got {type(content).__name__}")
        message = {"role": roles[role], "content": content}
        thinking = m.get(spec.field_thinking) if spec.field_thinking else None
        if isinstance(thinking, list):
            thinking = _text_of_parts(thinking, f"{field}[{i}].{spec.field_thinking}")
        if thinking is not None and not isinstance(thinking, str):
            raise RowError(f"{field}[{i}].{spec.field_thinking}", f"expected text (the message's reasoning), got {type(thinking).__name__}")
        if thinking:
            message["thinking"] = thinking
        if spec.message_field_training and m.get(spec.message_field_training) is not None:
            message["train"] = bool(m[spec.message_field_training])
        if spec.message_field_training_detail and m.get(spec.message_field_training_detail) is not None:
            detail = _detail(m[spec.message_field_training_detail], content, f"{field}[{i}].{spec.message_field_training_detail}")
            if detail is None:  # Axolotl: an empty list trains the turn only when its training flag says so
                message.setdefault("train", False)
            else:
                message["detail"] = detail
        messages.append(message)
    # as Axolotl: a row's `system` column opens a conversation that has no system message
    if messages[0]["role"] != "system" and row.get("system") is not None:
        if not isinstance(row["system"], str):
            raise RowError("system", f"expected text, got {type(row['system']).__name__}")
        messages.insert(0, {"role": "system", "content": row["system"]})
    if spec.drop_system_message and messages[0]["role"] == "system":
        messages.pop(0)
        if not messages:
            raise RowError(field, "only a system message")
    if spec.default_system_message and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": spec.default_system_message})
    return messages


def _text_of_parts(parts: list, where: str) -> str:
    """OpenAI-style content, `[{"type": "text", "text": ...}, ...]`: the text parts joined as the
    multimodal templates join them (with nothing between). Any other part is refused: molt trains
    language models on text, so an image or audio part cannot be rendered or trained."""
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict):
            raise RowError(f"{where}[{j}]", f"expected a content part such as {{\"type\": \"text\", \"text\": ...}}, got {type(part).__name__}")
        # rows read through Arrow carry every part's keys, absent ones as null
        kind = part.get("type") or ("text" if part.get("text") is not None else None)
        if kind != "text":
            raise RowError(f"{where}[{j}]", f"{'a ' + repr(kind) if kind else 'an untyped'} part: molt trains on text only (text-only models, no image or audio "
                                            "inputs); keep only the text parts of this message")
        if not isinstance(part.get("text"), str):
            raise RowError(f"{where}[{j}].text", f"expected text, got {type(part.get('text')).__name__}")
        texts.append(part["text"])
    return "".join(texts)


def _detail(value, content: str, where: str) -> list[tuple[int, int]] | None:
    """Trained character ranges [begin, end) of a turn's content, from Axolotl-style
    `[{begin_offset, end_offset, train}]` with end_offset inclusive; None for an empty list."""
    if not isinstance(value, list):
        raise RowError(where, f"expected a list of {{begin_offset, end_offset, train}}, got {type(value).__name__}")
    if not value:
        return None
    spans = []
    for j, d in enumerate(value):
        if not isinstance(d, dict):
            raise RowError(f"{where}[{j}]", f"expected an object, got {type(d).__name__}")
        begin, end, train = d.get("begin_offset"), d.get("end_offset"), d.get("train")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (begin, end)) or not 0 <= begin <= end < len(content):
            raise RowError(f"{where}[{j}]", f"offsets {begin!r}..{end!r} are not inside the content (0..{len(content) - 1})")
        if not isinstance(train, bool):
            raise RowError(f"{where}[{j}].train", f"expected true or false, got {train!r}")
        if train:
            spans.append((begin, end + 1))
    return spans


def build(kind: Kind, spec) -> Formatter:
    if kind.style or kind.loader != "load":
        raise UnknownKind("chat_template takes no loader or prompt style")
    return Formatter(lambda row, tokenizer: format_row(row, spec, tokenizer))


def format_row(row: dict, spec, tokenizer: dict) -> list[tuple[str, bool]]:
    template = chat_templates.resolve(spec.chat_template, spec.chat_template_jinja, tokenizer["chat_template"])
    if template is None:
        raise chat_templates.TemplateChoiceError("the tokenizer has no chat template: set chat_template (e.g. chatml)")
    messages = messages_of(row, spec)
    special = {"bos_token": tokenizer["bos_token"] or "", "eos_token": tokenizer["eos_token"] or ""}
    key = spec.template_thinking_key
    plain = [{"role": m["role"], "content": m["content"], **({key: m["thinking"]} if "thinking" in m else {})} for m in messages]
    # a dataset's own chat_template, else the top-level choice the tokenizer stage resolved
    name = chat_templates.template_name(spec.chat_template or tokenizer.get("chat_template_choice"))
    text = chat_templates.render(template, plain, name=name, **special)
    # `eot_tokens` (Axolotl's key) names the turn ends; by default the EOS and common templates' markers
    turn_ends = tuple(t for t in (*(tokenizer.get("eot_tokens") or TURN_ENDS), special["eos_token"]) if t)

    spans: list[tuple[int, int, bool]] = []  # (start, end, from a training detail)
    eots: list[tuple[int, int, bool]] = []  # (start, end, after a trained turn)
    # as Axolotl: the turn's training flag, else "it has a training detail", else its role
    trained_turns = [m.get("train", True if m.get("detail") is not None else m["role"] in spec.roles_to_train) for m in messages]
    wanted = [i for i, trained in enumerate(trained_turns) if trained or spec.train_on_eos == "all"]
    found = _locate_verbatim(template, plain, wanted, text, special, name, key)
    for i in wanted:
        message, trained = messages[i], trained_turns[i]
        detail = message.get("detail")
        start, end = found[i] if found else _locate(template, plain, i, text, special, name, key)
        if trained and detail is not None:  # character ranges decide inside the content
            spans += _detail_spans(detail, start, end, text, message["content"])
        elif trained:
            spans.append((start, end, False))
        eot = _turn_end(text, end, turn_ends)
        if eot:
            eots.append((*eot, trained))
    if spec.train_on_eos == "turn":
        spans += [(s, e, False) for s, e, trained in eots if trained]
    elif spec.train_on_eos == "all":
        spans += [(s, e, False) for s, e, _ in eots]
    elif spec.train_on_eos == "last" and eots:
        trained_eots = [(s, e, False) for s, e, trained in eots if trained]
        spans += trained_eots[-1:]
    return _segments(text, spans)


def _locate_verbatim(template: str, messages: list[dict], wanted: list[int], text: str, special: dict, name: str, thinking_key: str) -> dict | None:
    """{turn: (start, end)} for the `wanted` turns from one rendering with a placeholder in each,
    when the template puts every content in verbatim and the rest of the text does not depend on
    them (the same spans `_locate` finds one turn at a time); None when that is not so."""
    if len(wanted) < 2 or any(thinking_key in messages[i] for i in wanted):
        return None  # one turn: _locate renders as often; reasoning: _locate's own rule
    marks = {i: f"\ue000molt-turn-{i}\ue001" for i in wanted}
    probe = [dict(m, content=marks[i]) if i in marks else m for i, m in enumerate(messages)]
    rendered = chat_templates.render(template, probe, name=name, **special)
    at = {i: rendered.find(mark) for i, mark in marks.items()}
    if any(p < 0 or rendered.count(marks[i]) != 1 for i, p in at.items()):
        return None
    pieces, cursor, shift, spans = [], 0, 0, {}
    for i in sorted(wanted, key=at.get):
        content = messages[i]["content"]
        pieces += [rendered[cursor:at[i]], content]
        spans[i] = (at[i] + shift, at[i] + shift + len(content))
        cursor, shift = at[i] + len(marks[i]), shift + len(content) - len(marks[i])
    pieces.append(rendered[cursor:])
    return spans if "".join(pieces) == text else None


def _locate(template: str, messages: list[dict], i: int, text: str, special: dict, name: str, thinking_key: str) -> tuple[int, int]:
    """The turn's span in `text`: its content, and its reasoning too where the template renders it."""
    probe = [dict(m) for m in messages]
    probe[i]["content"] = PLACEHOLDER
    if thinking_key in probe[i]:
        probe[i][thinking_key] = THINKING_PLACEHOLDER
    rendered = chat_templates.render(template, probe, name=name, **special)
    if PLACEHOLDER not in rendered:
        raise RowError(f"messages[{i}]", "the chat template does not render this turn's content")
    found = [(at, at + len(mark)) for mark in (PLACEHOLDER, THINKING_PLACEHOLDER) if (at := rendered.find(mark)) >= 0]
    start = min(a for a, _ in found)
    tail = len(rendered) - max(b for _, b in found)
    end = len(text) - tail
    if len(found) == 2:  # as Axolotl, the turn starts where the text leaves the turn rendered without reasoning (tags included)
        bare = [dict(m) for m in probe]
        del bare[i][thinking_key]
        without = chat_templates.render(template, bare, name=name, **special)
        start = min(start, next((k for k, (a, b) in enumerate(zip(without, text)) if a != b), start))
    if rendered[:start] != text[:start] or rendered[len(rendered) - tail:] != text[end:] or end < start:
        raise RowError(f"messages[{i}]", "the chat template renders this turn's surroundings differently depending on its content")
    return start, end


def _detail_spans(detail: list[tuple[int, int]], start: int, end: int, text: str, content: str) -> list[tuple[int, int, bool]]:
    if text[start:end] != content:
        raise RowError("messages", "message_field_training_detail needs a template that renders the content unchanged (this one trims or escapes it)")
    return [(start + b, start + e, True) for b, e in detail]


def _turn_end(text: str, end: int, turn_ends: tuple[str, ...]) -> tuple[int, int] | None:
    window = text[end : end + EOT_WINDOW + max(map(len, turn_ends))]  # a marker must start within EOT_WINDOW
    found = [(at, t) for t in turn_ends if 0 <= (at := window.find(t)) < EOT_WINDOW]
    if not found:
        return None
    offset, token = min(found)
    return end + offset, end + offset + len(token)


def _segments(text: str, spans: list[tuple[int, int, bool]]) -> list[Segment]:
    segments, cursor = [], 0
    for start, end, detail in sorted(spans):
        start = max(start, cursor)
        if start > cursor:
            segments.append(Segment(text[cursor:start], False))
        if end > start:
            segments.append(Segment(text[start:end], True, detail))
        cursor = max(cursor, end)
    if cursor < len(text):
        segments.append(Segment(text[cursor:], False))
    return segments
