"""Untrusted chat templates render within bounds (time, output size, `*`, `**`, size arguments)
and their errors name the template; the built-in templates render as before (test_formats_templates)."""

from __future__ import annotations

import pytest

from stages import chat_templates
from stages.chat_templates import TemplateLimit, TemplateSourceError

CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("source, words", [
    ("{% for i in range(10**9) %}x{% endfor %}", "range(): a size argument over the limit"),
    ("{{ 'x' * 10**10 }}", "str * 10000000000: over the limit"),
    ("{{ [1] * 10**9 }}", "list * 1000000000: over the limit"),
    ("{{ 10 ** (10 ** 10) }}", "bit numbers"),
    ("{{ 'x'|center(10**10) }}", "filter center: a size argument"),
    ("{{ 'x'.ljust(10**10) }}", "ljust(): a size argument"),
    ("{% for i in range(100000) %}{{ 'x' * 60000 }}{% endfor %}", "over the limit of 67108864 characters"),
])
def test_over_the_limits_is_refused_naming_the_template(source, words):
    with pytest.raises(TemplateLimit, match="^my template: ") as info:
        chat_templates.render(source, CHAT, name="my template")
    assert words in str(info.value)


def test_a_rendering_that_runs_too_long_is_stopped(monkeypatch):
    monkeypatch.setattr(chat_templates, "MAX_SECONDS", 0.5)
    source = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateLimit, match="my template: rendering took over 0.5 s"):
        chat_templates.render(source, CHAT, name="my template")
    assert chat_templates.render("{{ messages[0].content }}", CHAT) == "hi"  # the timer is off again


def test_a_syntax_error_names_the_template_and_its_line():
    with pytest.raises(TemplateSourceError, match=r"^my template: syntax error at line 3 of the template"):
        chat_templates.render("a\nb\n{% if %}", CHAT, name="my template")


def test_within_the_limits_renders_as_jinja_does():
    assert chat_templates.render("{{ 'ab' * 3 }}{{ 2 ** 10 }}{{ 'x'|center(5) }}{{ range(3)|list }}", CHAT) == "ababab1024  x  [0, 1, 2]"
