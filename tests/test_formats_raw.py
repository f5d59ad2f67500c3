"""Template-free types (input_output, completion, pretokenized) and chat_template's
message_field_training_detail, through the real format and tokenize stages."""

from __future__ import annotations

import pytest

from stages import format as format_stage
from stages import tokenize as tokenize_stage
from stages.store import DataError, read_table, write_table
from test_formats import chatml, expect, pipeline, tokenizer_artifacts  # noqa: F401  (fixtures)

IGNORE = -100
EOS = "<|im_end|>"


def enc(fast_tokenizer, text):
    return fast_tokenizer.encode(text, add_special_tokens=False).ids


# -- input_output ----------------------------------------------------------------------------

SEGMENTS_EXAMPLE = {"segments": [  # the example of Axolotl's input_output documentation
    {"label": True, "text": "<s>Hello\n"},
    {"label": True, "text": "hi there!. "},
    {"label": False, "text": "goodbye "},
    {"label": True, "text": "farewell</s>"},
]}


def test_input_output_encodes_each_segment_alone(pipeline, fast_tokenizer):
    [(ids, labels)] = pipeline([SEGMENTS_EXAMPLE], type="input_output")
    want_ids, want_labels = [], []
    for s in SEGMENTS_EXAMPLE["segments"]:
        piece = enc(fast_tokenizer, s["text"])
        want_ids += piece
        want_labels += piece if s["label"] else [IGNORE] * len(piece)
    assert (ids, labels) == (want_ids, want_labels)
    # no BOS or EOS is added: the segments are all there is
    assert ids[-1] != fast_tokenizer.token_to_id(EOS)


def test_input_output_train_on_inputs(pipeline):
    [(ids, labels)] = pipeline([SEGMENTS_EXAMPLE], type="input_output", train_on_inputs=True)
    assert labels == ids


@pytest.mark.parametrize("row, message", [
    ({"segments": None}, r"row 1: field 'segments': missing"),
    ({"segments": []}, r"row 1: field 'segments': expected a non-empty list"),
    ({"segments": [{"text": "a", "label": "yes"}]}, r"row 1: field 'segments\[0\]\.label': expected true or false"),
    ({"segments": [{"label": True}]}, r"row 1: field 'segments\[0\]\.text': missing"),
])
def test_input_output_bad_rows(pipeline, row, message):
    with pytest.raises(DataError, match=message):
        pipeline([row], type="input_output")


# -- completion ------------------------------------------------------------------------------


def test_completion_trains_everything_with_eos(pipeline, expect):
    [(ids, labels)] = pipeline([{"text": "Once upon a time"}], type="completion")
    assert (ids, labels) == expect([("Once upon a time" + EOS, True)])


def test_completion_splits_long_text_into_sequence_len_pieces(pipeline, fast_tokenizer):
    text = " ".join(f"word{i}" for i in range(60))
    full = enc(fast_tokenizer, text + EOS)
    assert len(full) > 40
    got = pipeline([{"body": text}], type="completion", field="body", sequence_len=16)
    want = [full[i : i + 16] for i in range(0, len(full), 16)]
    want = [w for w in want if len(w) >= 2]
    assert [ids for ids, _ in got] == want
    assert all(labels == ids for ids, labels in got)
    assert pipeline.stats["chunked"] == 1 and pipeline.stats["dropped"]["too_long"] == 0


def test_completion_keeps_text_beyond_64_sequence_lens(pipeline, fast_tokenizer):
    # Axolotl truncates each completion text at sequence_len * 64 tokens and drops the rest
    # unannounced; molt keeps every token: the pieces put back together are the whole text + EOS
    text = " ".join(f"w{i}" for i in range(400))
    full = enc(fast_tokenizer, text + EOS)
    assert len(full) > 64 * 4
    got = pipeline([{"text": text}], type="completion", sequence_len=4)
    pieces = [full[i : i + 4] for i in range(0, len(full), 4)]
    assert [ids for ids, _ in got] == [p for p in pieces if len(p) >= 2]  # only a 1-token tail could go (too short to train)
    assert sum(map(len, (ids for ids, _ in got))) >= len(full) - 1 and pipeline.stats["dropped"]["too_long"] == 0


def test_completion_missing_field_names_it(pipeline):
    with pytest.raises(DataError, match=r"row 2: field 'body': missing"):
        pipeline([{"body": "a b"}, {"text": "c"}], type="completion", field="body")


# -- pretokenized ----------------------------------------------------------------------------


def test_pretokenized_rows_pass_through(pipeline):
    rows = [
        {"input_ids": [271, 299, 99], "attention_mask": [1, 1, 1], "labels": [271, -100, 99]},
        {"input_ids": [87, 227, 8383, 12], "attention_mask": [1, 1, 1, 1], "labels": [87, 227, 8383, 12]},
    ]
    got = pipeline(rows, type=None)
    assert got == [([271, 299, 99], [271, -100, 99]), ([87, 227, 8383, 12], [87, 227, 8383, 12])]


def test_pretokenized_without_labels_trains_all(pipeline):
    assert pipeline([{"input_ids": [5, 6, 7]}], type="") == [([5, 6, 7], [5, 6, 7])]


@pytest.mark.parametrize("row, message", [
    ({"input_ids": [1, 2], "labels": [1]}, r"row 2: field 'labels': 1 labels for 2 input_ids"),
    ({"input_ids": [1, 2], "attention_mask": [1, 1, 1]}, r"row 2: field 'attention_mask': 3 values for 2 input_ids"),
    ({"input_ids": [1, 2], "attention_mask": [1, 2]}, r"row 2: field 'attention_mask': values must be 0 or 1"),
    ({"input_ids": None}, r"row 2: field 'input_ids': missing"),
    ({"input_ids": [1, 2], "labels": [1, -5]}, r"row 2: field 'labels': a negative label other than -100"),
    ({"input_ids": [1, 10_000_000]}, r"row 2: field 'input_ids': token id 10000000 is outside the tokenizer's vocabulary"),
])
def test_pretokenized_bad_rows_name_row_and_field(pipeline, row, message):
    good = {"input_ids": [1, 2], "labels": [1, 2], "attention_mask": [1, 1]}
    with pytest.raises(DataError, match=message):
        pipeline([good, {**{"labels": None, "attention_mask": None}, **row}], type=None)


# -- chat_template: message_field_training_detail ----------------------------------------------


def test_chat_training_detail_trains_only_the_given_characters(pipeline, expect):
    content = "Sure. The answer is 42."
    begin = content.index("The")
    row = {"messages": [
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": content,
         "detail": [{"begin_offset": 0, "end_offset": begin - 1, "train": False},
                    {"begin_offset": begin, "end_offset": len(content) - 1, "train": True}]},
    ]}
    [(ids, labels)] = pipeline([row], type="chat_template", message_field_training_detail="detail")
    assert (ids, labels) == expect([
        (chatml("user", "Q?") + "<|im_start|>assistant\nSure.", False),
        (" The answer is 42.", True), (EOS, True), ("\n", False),
    ])


def test_chat_training_detail_out_of_range_names_row_and_field(pipeline):
    row = {"messages": [{"role": "user", "content": "Q?"},
                        {"role": "assistant", "content": "ok", "detail": [{"begin_offset": 0, "end_offset": 5, "train": True}]}]}
    with pytest.raises(DataError, match=r"row 1: field 'messages\[1\]\.detail\[0\]': offsets 0\.\.5 are not inside"):
        pipeline([row], type="chat_template", message_field_training_detail="detail")


# -- determinism -----------------------------------------------------------------------------


@pytest.mark.parametrize("type_, rows", [
    ("input_output", [SEGMENTS_EXAMPLE] * 3),
    ("alpaca:chatml", [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]),
    (None, [{"input_ids": [1, 2, 3]}]),
])
def test_format_and_tokenize_are_byte_identical_across_runs(tokenizer_artifacts, tmp_path, type_, rows):
    import pyarrow as pa

    data = tmp_path / "data"
    data.mkdir()
    write_table(pa.Table.from_pylist(rows), data / "data.arrow")
    outputs = []
    for n in range(2):
        formatted, tokenized = tmp_path / f"f{n}", tmp_path / f"t{n}"
        formatted.mkdir()
        tokenized.mkdir()
        tok = tokenizer_artifacts["chatml"]
        format_stage.run(format_stage.Params(dataset=format_stage.Spec(type=type_)), {"data": data, "tokenizer": tok}, formatted)
        tokenize_stage.run(tokenize_stage.Params(sequence_len=64), {"formatted": formatted, "tokenizer": tok}, tokenized)
        outputs.append(((formatted / "formatted.arrow").read_bytes(), (tokenized / "tokenized.arrow").read_bytes()))
    assert outputs[0] == outputs[1]
    assert read_table(tmp_path / "t0" / "tokenized.arrow").num_rows == len(rows)


# -- a tokenizer that adds BOS ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer_dir, tmp_path_factory):
    """SmolLM2's tokenizer changed to add `<|endoftext|>` as BOS, through the tokenizer stage."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from stages import tokenizer as tokenizer_stage

    source = tmp_path_factory.mktemp("bos-source")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.bos_token = "<|endoftext|>"
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.convert_tokens_to_ids("<|endoftext|>"))])
    tok.save_pretrained(source)
    out = tmp_path_factory.mktemp("bos-tokenizer")
    tokenizer_stage.run(tokenizer_stage.Params(chat_template="chatml"), {"model": source}, out)
    return out


def _run(tok_dir, tmp_path, rows, sequence_len=1024, **spec):
    import pyarrow as pa

    data, formatted, tokenized = (tmp_path / d for d in ("data", "format", "tokenize"))
    for d in (data, formatted, tokenized):
        d.mkdir(parents=True)
    write_table(pa.Table.from_pylist(rows), data / "data.arrow")
    format_stage.run(format_stage.Params(dataset=format_stage.Spec(**spec)), {"data": data, "tokenizer": tok_dir}, formatted)
    tokenize_stage.run(tokenize_stage.Params(sequence_len=sequence_len), {"formatted": formatted, "tokenizer": tok_dir}, tokenized)
    table = read_table(tokenized / "tokenized.arrow")
    return list(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist()))


def test_bos_is_masked_before_the_prompt_and_trained_in_completion(bos_tokenizer, fast_tokenizer, tmp_path):
    import json

    assert json.loads((bos_tokenizer / "molt_tokenizer.json").read_text())["adds_bos"] is True
    bos = fast_tokenizer.token_to_id("<|endoftext|>")
    [(ids, labels)] = _run(bos_tokenizer, tmp_path / "a", [{"question": "2+2?", "answer": " 4"}], type="alpaca_chat.load_qa")
    prompt = enc(fast_tokenizer, "SYSTEM: Below is an instruction from a USER that describes a task. The ASSISTANT writes a response "
                 "that appropriately and concisely completes the request.\n\n\nUSER: 2+2?\nASSISTANT:")
    response = enc(fast_tokenizer, " 4" + EOS)
    assert (ids, labels) == ([bos] + prompt + response, [IGNORE] * (1 + len(prompt)) + response)

    [(ids, labels)] = _run(bos_tokenizer, tmp_path / "c", [{"text": "Once upon a time"}], type="completion")
    assert ids == [bos] + enc(fast_tokenizer, "Once upon a time" + EOS) and labels == ids
