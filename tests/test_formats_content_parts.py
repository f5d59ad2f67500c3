"""Chat messages whose content is a list of parts (OpenAI-style and multimodal data): the text
parts are joined and trained as one content; any other part stops the dataset with the row and
the part named, since molt trains text only."""

from __future__ import annotations

import pytest

from stages.store import DataError
from test_formats import chatml, expect, pipeline, tokenizer_artifacts  # noqa: F401  (fixtures)


def parts(*texts):
    return [{"type": "text", "text": t} for t in texts]


def test_text_parts_are_joined_and_trained_as_the_content(pipeline, expect):
    row = {"messages": [{"role": "user", "content": parts("Name a ", "colour.")},
                        {"role": "assistant", "content": parts("Blue", ", or red.")}]}
    [(ids, labels)] = pipeline([row], type="chat_template")
    assert (ids, labels) == expect([(chatml("user", "Name a colour.") + "<|im_start|>assistant\n", False),
                                    ("Blue, or red.<|im_end|>", True), ("\n", False)])


def test_parts_and_plain_text_render_alike(pipeline):
    plain = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]}
    split = {"messages": [{"role": "user", "content": parts("Hi", " there")}, {"role": "assistant", "content": parts("Hello")}]}
    assert pipeline([split], type="chat_template") == pipeline([plain], type="chat_template")


def test_an_image_part_is_refused_naming_the_row_and_part(pipeline):
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "image": None}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Hello", "image": None}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?", "image": None},
                                                   {"type": "image", "text": None, "image": "cat.png"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A cat.", "image": None}]}]},
    ]
    with pytest.raises(DataError, match=r"row 2: field 'messages\[0\]\.content\[1\]': a 'image' part: molt trains on text only"):
        pipeline(rows, type="chat_template")


@pytest.mark.parametrize("content, error", [
    ([{"type": "audio", "audio": "a.wav"}], r"field 'messages\[0\]\.content\[0\]': a 'audio' part: molt trains on text only"),
    (["Hi"], r"field 'messages\[0\]\.content\[0\]': expected a content part such as"),
    ([{"type": "text", "text": 3}], r"field 'messages\[0\]\.content\[0\]\.text': expected text, got int"),
    ([{"image": "x.png"}], r"field 'messages\[0\]\.content\[0\]': an untyped part: molt trains on text only"),
])
def test_bad_parts_are_named(content, error):
    from stages import format as format_stage
    from stages.formats.rows import RowError

    row = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "Hello"}]}
    tokenizer = {"chat_template": None, "bos_token": "<s>", "eos_token": "</s>", "adds_bos": False}
    with pytest.raises(RowError, match=error):
        format_stage.formatter(format_stage.Spec(type="chat_template", chat_template="chatml")).row(row, tokenizer)


def test_a_file_mixing_text_and_parts_contents_is_read_and_renders_as_text(tmp_path):
    """OpenAI-style rows often give the system text as a string and the user's as parts; datasets
    reads such a file (as JSON-typed content), and so does molt, each text becoming one part."""
    import json

    from stages import fetch_data
    from stages import format as format_stage
    from stages.store import read_table

    rows = [{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": parts("Hi", " there")},
                          {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "user", "content": "Plain"}, {"role": "assistant", "content": parts("Reply")}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    out.mkdir()
    fetch_data.run(fetch_data.Params(dataset=fetch_data.Source(path=str(path))), {}, out)
    read = read_table(out / "data.arrow").to_pylist()
    assert [m["content"] for m in read[0]["messages"]] == [parts("Be terse."), parts("Hi", " there"), parts("Hello")]
    tokenizer = {"chat_template": None, "bos_token": "<s>", "eos_token": "</s>", "adds_bos": False}
    made = format_stage.formatter(format_stage.Spec(type="chat_template", chat_template="chatml"))
    texts = ["".join(s.text for s in made.row(row, tokenizer)) for row in read]
    assert texts == [chatml("system", "Be terse.") + chatml("user", "Hi there") + chatml("assistant", "Hello"),
                     chatml("user", "Plain") + chatml("assistant", "Reply")]


def test_a_file_mixing_text_and_other_shapes_is_still_refused(tmp_path):
    import json

    from stages import fetch_data

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": {"text": "Hi"}}]}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=r"d\.jsonl line 2: field 'messages'"):
        fetch_data.run(fetch_data.Params(dataset=fetch_data.Source(path=str(path))), {}, out)
