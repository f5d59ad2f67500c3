"""Prompt strategies through the real format and tokenize stages, checked token by token.

Each expectation is written as the text pieces a turn should render to, each marked trained or
not; the expected input_ids are the pieces tokenized one by one, and the expected labels are
those ids where the piece is trained and -100 elsewhere.
"""

from __future__ import annotations


import numpy as np
import pytest

from stages import format as format_stage
from stages import tokenize as tokenize_stage
from stages import tokenizer as tokenizer_stage
from stages.store import DataError, read_table, write_table
from stages.context import Context

IGNORE = -100
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="session")
def tokenizer_artifacts(tokenizer_dir, tmp_path_factory):
    """The tokenizer stage's output for a few `chat_template` choices."""
    out = {}
    for choice in ("chatml", "tokenizer_default"):
        d = tmp_path_factory.mktemp(f"tokenizer-{choice}")
        tokenizer_stage.run(tokenizer_stage.Params(chat_template=choice), {"model": tokenizer_dir}, d)
        out[choice] = d
    return out


@pytest.fixture
def pipeline(tokenizer_artifacts, tmp_path):
    """`pipeline(rows, template=..., train_on_inputs=..., **spec)` -> [(input_ids, labels)]."""

    def run(rows, template="chatml", train_on_inputs=False, sequence_len=1024, min_sample_len=2, **spec):
        import pyarrow as pa

        n = len(list(tmp_path.iterdir()))
        data, formatted, tokenized = (tmp_path / f"{n}-{stage}" for stage in ("data", "format", "tokenize"))
        for d in (data, formatted, tokenized):
            d.mkdir()
        write_table(pa.Table.from_pylist(rows), data / "data.arrow")
        tok = tokenizer_artifacts[template]
        format_stage.run(format_stage.Params(dataset=format_stage.Spec(**spec)), {"data": data, "tokenizer": tok}, formatted)
        params = tokenize_stage.Params(sequence_len=sequence_len, train_on_inputs=train_on_inputs, min_sample_len=min_sample_len)
        run.said = []  # what tokenize says through ctx.log
        run.stats = tokenize_stage.run(params, {"formatted": formatted, "tokenizer": tok}, tokenized, Context(log=run.said.append))
        table = read_table(tokenized / "tokenized.arrow")
        return list(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist()))

    return run


def expected(tokenizer, pieces):
    """(input_ids, labels) of `pieces` = [(text, trained), ...], tokenized piece by piece; also
    checks that the pieces tokenize the same as their joined text (so boundaries are clean)."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False).ids
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    whole = "".join(t for t, _ in pieces)
    assert tokenizer.encode(whole, add_special_tokens=False).ids == ids, "test pieces split a token"
    return ids, labels


@pytest.fixture
def expect(fast_tokenizer):
    """`expect([(text, trained), ...])` -> (input_ids, labels) with the SmolLM2 tokenizer."""
    return lambda pieces: expected(fast_tokenizer, pieces)


def chatml(role, content):
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


# -- alpaca ----------------------------------------------------------------------------------


def test_alpaca_with_input_trains_response_and_eos(pipeline, expect):
    row = {"instruction": "Sort the numbers.", "input": "51 35 6", "output": "6, 35, 51"}
    [(ids, labels)] = pipeline([row], type="alpaca")
    prompt = ALPACA_WITH_INPUT.format(instruction="Sort the numbers.", input="51 35 6")
    assert (ids, labels) == expect([(prompt, False), ("6, 35, 51<|im_end|>", True)])


@pytest.mark.parametrize("row", [
    {"instruction": "Say hello.", "output": "Hello!"},
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    {"instruction": "Say hello.", "input": None, "output": "Hello!"},
])
def test_alpaca_without_input(pipeline, expect, row):
    [(ids, labels)] = pipeline([row], type="alpaca")
    prompt = ALPACA_NO_INPUT.format(instruction="Say hello.")
    assert (ids, labels) == expect([(prompt, False), ("Hello!<|im_end|>", True)])


def test_alpaca_train_on_inputs_trains_everything(pipeline):
    [(ids, labels)] = pipeline([{"instruction": "Say hello.", "output": "Hello!"}], type="alpaca", train_on_inputs=True)
    assert labels == ids


def test_alpaca_missing_output_names_row_and_field(pipeline):
    with pytest.raises(DataError, match=r"row 2: field 'output': missing"):
        pipeline([{"instruction": "a", "output": "b"}, {"instruction": "c"}], type="alpaca")


# -- chat_template ---------------------------------------------------------------------------

REPEAT = msgs(
    ("user", "Say: The sky is blue."),
    ("assistant", "The sky is blue."),
    ("user", "Again."),
    ("assistant", "The sky is blue."),
)


def test_chat_repeated_sentence_trains_both_assistant_turns(pipeline, expect):
    [(ids, labels)] = pipeline([REPEAT], type="chat_template")
    assert (ids, labels) == expect([
        (chatml("user", "Say: The sky is blue.") + "<|im_start|>assistant\n", False),
        ("The sky is blue.<|im_end|>", True),
        ("\n" + chatml("user", "Again.") + "<|im_start|>assistant\n", False),
        ("The sky is blue.<|im_end|>", True),
        ("\n", False),
    ])


def test_chat_tokenizer_default_template_masks_its_system_prompt(pipeline, expect, hf_tokenizer):
    [(ids, labels)] = pipeline([REPEAT], template="tokenizer_default", type="chat_template")
    pieces = [
        (SMOL_SYSTEM + chatml("user", "Say: The sky is blue.") + "<|im_start|>assistant\n", False),
        ("The sky is blue.<|im_end|>", True),
        ("\n" + chatml("user", "Again.") + "<|im_start|>assistant\n", False),
        ("The sky is blue.<|im_end|>", True),
        ("\n", False),
    ]
    # the pieces are what transformers itself renders with SmolLM2's template
    assert "".join(t for t, _ in pieces) == hf_tokenizer.apply_chat_template(REPEAT["messages"], tokenize=False)
    assert (ids, labels) == expect(pieces)


def test_chat_template_markers_inside_content(pipeline, expect):
    row = msgs(
        ("user", "Write <|im_start|>user\nhi<|im_end|> literally."),
        ("assistant", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok"),
    )
    [(ids, labels)] = pipeline([row], type="chat_template")
    assert (ids, labels) == expect([
        (chatml("user", "Write <|im_start|>user\nhi<|im_end|> literally.") + "<|im_start|>assistant\n", False),
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>", True),
        ("\n", False),
    ])


def test_chat_train_on_inputs_trains_everything(pipeline):
    [(ids, labels)] = pipeline([REPEAT], template="tokenizer_default", type="chat_template", train_on_inputs=True)
    assert labels == ids


SYSTEM_CHAT = msgs(("system", "Be terse."), ("user", "2 h in min?"), ("assistant", "120 min"), ("user", "3 h?"), ("assistant", "180 min"))


def test_chat_roles_to_train_user_and_assistant(pipeline, expect):
    [(ids, labels)] = pipeline([SYSTEM_CHAT], type="chat_template", roles_to_train=["user", "assistant"])
    assert (ids, labels) == expect([
        ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n", False),
        ("2 h in min?<|im_end|>", True),
        ("\n<|im_start|>assistant\n", False),
        ("120 min<|im_end|>", True),
        ("\n<|im_start|>user\n", False),
        ("3 h?<|im_end|>", True),
        ("\n<|im_start|>assistant\n", False),
        ("180 min<|im_end|>", True),
        ("\n", False),
    ])


PREFIX = "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n2 h in min?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("train_on_eos, pieces", [
    ("none", [
        (PREFIX, False), ("120 min", True),
        ("<|im_end|>\n<|im_start|>user\n3 h?<|im_end|>\n<|im_start|>assistant\n", False),
        ("180 min", True), ("<|im_end|>\n", False),
    ]),
    ("turn", [
        (PREFIX, False), ("120 min<|im_end|>", True),
        ("\n<|im_start|>user\n3 h?<|im_end|>\n<|im_start|>assistant\n", False),
        ("180 min<|im_end|>", True), ("\n", False),
    ]),
    ("all", [
        ("<|im_start|>system\nBe terse.", False), ("<|im_end|>", True),
        ("\n<|im_start|>user\n2 h in min?", False), ("<|im_end|>", True),
        ("\n<|im_start|>assistant\n", False), ("120 min<|im_end|>", True),
        ("\n<|im_start|>user\n3 h?", False), ("<|im_end|>", True),
        ("\n<|im_start|>assistant\n", False), ("180 min<|im_end|>", True), ("\n", False),
    ]),
    ("last", [
        (PREFIX, False), ("120 min", True),
        ("<|im_end|>\n<|im_start|>user\n3 h?<|im_end|>\n<|im_start|>assistant\n", False),
        ("180 min<|im_end|>", True), ("\n", False),
    ]),
])
def test_chat_train_on_eos(pipeline, expect, train_on_eos, pieces):
    [(ids, labels)] = pipeline([SYSTEM_CHAT], type="chat_template", train_on_eos=train_on_eos)
    assert (ids, labels) == expect(pieces)


def test_chat_message_field_training_overrides_roles(pipeline, expect):
    row = {"messages": [
        {"role": "user", "content": "a?", "train": None},
        {"role": "assistant", "content": "wrong", "train": False},
        {"role": "user", "content": "b?", "train": True},
        {"role": "assistant", "content": "right", "train": None},
    ]}
    [(ids, labels)] = pipeline([row], type="chat_template", message_field_training="train")
    assert (ids, labels) == expect([
        (chatml("user", "a?") + chatml("assistant", "wrong") + "<|im_start|>user\n", False),
        ("b?<|im_end|>", True),
        ("\n<|im_start|>assistant\n", False),
        ("right<|im_end|>", True),
        ("\n", False),
    ])


def test_chat_roles_mapping_and_field_names(pipeline, expect):
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    [(ids, labels)] = pipeline(
        [row], type="chat_template", field_messages="conversations",
        message_property_mappings={"role": "from", "content": "value"},
    )
    assert (ids, labels) == expect([
        (chatml("user", "hi") + "<|im_start|>assistant\n", False),
        ("hello<|im_end|>", True),
        ("\n", False),
    ])


def test_chat_unknown_role_names_row_and_field(pipeline):
    rows = [REPEAT, msgs(("user", "hi"), ("robot", "beep"))]
    with pytest.raises(DataError, match=r"row 2: field 'messages\[1\]\.role': unknown role 'robot'"):
        pipeline(rows, type="chat_template")


def test_rows_with_nothing_trained_or_too_long_are_dropped(pipeline, expect):
    rows = [msgs(("user", "only a question")), msgs(("user", "q"), ("assistant", "word " * 300)), msgs(("user", "q"), ("assistant", "a"))]
    kept = pipeline(rows, type="chat_template", sequence_len=128)
    assert kept == [expect([(chatml("user", "q") + "<|im_start|>assistant\n", False), ("a<|im_end|>", True), ("\n", False)])]
    assert pipeline.stats["dropped"] == {"too_long": 1, "too_short": 0, "nothing_trained": 1}
    assert pipeline.said == [
        "tokenize: dropped 1 of 3 rows longer than sequence_len 128 tokens (excess_length_strategy: drop; raise sequence_len "
        "or set excess_length_strategy: truncate to keep them); the first is row 2",
        "tokenize: dropped 1 of 3 rows with no trained token (check roles_to_train / train_on_inputs); the first is row 1",
    ]


def test_rows_under_min_sample_len_are_dropped(pipeline, expect):
    short, long = msgs(("user", "q"), ("assistant", "a")), msgs(("user", "q"), ("assistant", "a longer answer"))
    assert len(pipeline([short, long], type="chat_template")) == 2
    size = len(pipeline([short], type="chat_template")[0][0])
    kept = pipeline([short, long], type="chat_template", min_sample_len=size + 1)  # Axolotl keeps rows of at least min_sample_len tokens
    assert pipeline.stats["dropped"]["too_short"] == 1
    assert pipeline.said == [f"tokenize: dropped 1 of 2 rows under {size + 1} tokens (min_sample_len); the first is row 1"]
    assert kept == pipeline([long], type="chat_template")


def test_labels_for_marks_tokens_covering_trained_characters():
    # row 0: "ab" untrained, "cd" trained, "e" untrained; row 1: "x" trained
    seg_chars, seg_trained, row_segments = np.array([2, 2, 1, 1]), np.array([0, 1, 0, 1]), np.array([3, 1])
    # row 0's tokens: "a", "bc" (straddles the boundary: trained), "d", "e", a zero-width token at 4
    # and one at the row's end (next to row 1's trained "x": not trained); row 1's: "x"
    spans = np.array([(0, 1), (1, 3), (3, 4), (4, 5), (4, 4), (5, 5), (0, 1)])
    ids = np.array([10, 11, 12, 13, 14, 15, 16])
    labels = tokenize_stage.labels_for(seg_chars, seg_trained, row_segments, spans, np.array([6, 1]), ids)
    assert labels.tolist() == [IGNORE, 11, 12, IGNORE, IGNORE, IGNORE, 16]


def _offsets_rule(tokenizer, rows):
    """Labels by each token's character offsets (labels_for), row by row: what the joined encoder must equal."""
    labels = []
    for row in rows:
        encoding = tokenizer.encode("".join(t for t, _ in row), add_special_tokens=False)
        spans = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        labels += tokenize_stage.labels_for(np.array([len(t) for t, _ in row]), np.array([int(trained) for _, trained in row]),
                                            np.array([len(row)]), spans, np.array([len(encoding.ids)]), np.array(encoding.ids)).tolist()
    return labels


JOINED_ROWS = [
    [("Hi ", False), ("☕☕ 日本語", True), ("です", False), ("", True), ("🦜x", True)],  # bytes of one character split over tokens, at run ends
    [("a", True), ("b", True), (" c", False), ("  d ", True)],  # runs of touching trained segments; spaces at the ends
    [("<|im_start|>user\n", False), ("🦜", True), ("<|im_end|>", True), ("\n", False)],
    [("nothing trained", False)],
]


@pytest.mark.parametrize("kind", ["smollm2", "whitespace"])
def test_joined_labels_from_run_ends_equal_the_offsets_rule(tokenizer_dir, kind):
    # the joined encoder finds a trained run's tokens from its two ends; it must equal the per-token
    # offsets rule, also where characters are split over tokens and where (whitespace
    # pre-tokenizer) a character belongs to no token, so that the ends fall back to offsets
    import pyarrow as pa
    from tokenizers import Tokenizer, models, pre_tokenizers

    if kind == "smollm2":
        tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    else:
        words = sorted({w for row in JOINED_ROWS for w in "".join(t for t, _ in row).split()})
        tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    segments = pa.array([[{"text": t, "train": trained, "detail": False} for t, trained in row] for row in JOINED_ROWS])
    ids, labels, row_tokens = tokenize_stage._encode_joined(tokenizer, segments, train_all=False)
    assert labels.tolist() == _offsets_rule(tokenizer, JOINED_ROWS)
    assert (labels != IGNORE).any() and (labels == IGNORE).any()
    assert row_tokens.tolist() == [len(tokenizer.encode("".join(t for t, _ in row), add_special_tokens=False).ids) for row in JOINED_ROWS]


def test_chat_non_ascii_content(pipeline, expect):
    row = msgs(("user", "naïve? 日本"), ("assistant", "日本語です ☕ — ok"))
    [(ids, labels)] = pipeline([row], type="chat_template")
    assert (ids, labels) == expect([
        (chatml("user", "naïve? 日本") + "<|im_start|>assistant\n", False),
        ("日本語です ☕ — ok<|im_end|>", True),
        ("\n", False),
    ])


# Axolotl 0.19.0 gives the same ids and labels for these rows (compared)
@pytest.mark.parametrize("row, drop, head", [
    ({"system": "Be terse.", **msgs(("user", "Hi"), ("assistant", "Hello"))}, False, chatml("system", "Be terse.")),
    ({"system": "Ignored.", **msgs(("system", "Be terse."), ("user", "Hi"), ("assistant", "Hello"))}, False, chatml("system", "Be terse.")),
    ({"system": None, **msgs(("user", "Hi"), ("assistant", "Hello"))}, False, ""),
    ({"system": "Be terse.", **msgs(("user", "Hi"), ("assistant", "Hello"))}, True, ""),
    (msgs(("system", "Be terse."), ("user", "Hi"), ("assistant", "Hello")), True, ""),
])
def test_chat_system_column_and_drop_system_message(pipeline, expect, row, drop, head):
    [(ids, labels)] = pipeline([row], type="chat_template", drop_system_message=drop)
    assert (ids, labels) == expect([(head + chatml("user", "Hi") + "<|im_start|>assistant\n", False), ("Hello<|im_end|>", True), ("\n", False)])


def test_chat_system_column_must_be_text(pipeline):
    with pytest.raises(DataError, match=r"row 1: field 'system': expected text, got int"):
        pipeline([{"system": 3, **msgs(("user", "Hi"), ("assistant", "Hello"))}], type="chat_template")
