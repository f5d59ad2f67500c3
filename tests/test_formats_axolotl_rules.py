"""Where Axolotl's labels depend on how a piece of text is tokenized, molt follows its rule, shown
with a hand-built BPE whose merges cross the boundaries that matter (no pre-tokenizer, so `|> M`,
`:\\n#`, `Hello` and ` world` are single tokens): pygmalion's bot turns and reflection are encoded
with their prompt in one piece and as many leading tokens masked as the prompt has alone;
message_field_training_detail spans grow to whole tokens except at a token's last (first)
character, as Axolotl's offset adjustment does. Expected tokens are written out literally; Axolotl
0.19.0's own strategies give the same ids and labels with this tokenizer (compared).
"""

from __future__ import annotations

import pytest

from stages import format as format_stage
from stages import tokenize as tokenize_stage
from stages import tokenizer as tokenizer_stage
from stages.formats.alpaca import REFLECT_SYSTEM
from stages.store import read_table, write_table

IGNORE = -100
MERGES = [("|", ">"), ("|>", " "), ("|> ", "M"), (":", "\n"), (":\n", "#"), ("H", "e"), ("l", "l"), ("He", "ll"), ("Hell", "o"),
          (" ", "w"), ("o", "r"), (" w", "or"), ("l", "d"), (" wor", "ld")]


@pytest.fixture(scope="module")
def merging_dir(tmp_path_factory):
    from tokenizers import AddedToken, Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)] + ["\n"])}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>"))
    bpe.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>", "<|im_start|>", "<|im_end|>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    source = tmp_path_factory.mktemp("merging-source")
    fast.save_pretrained(source)
    out = tmp_path_factory.mktemp("merging-tokenizer")
    tokenizer_stage.run(tokenizer_stage.Params(chat_template="chatml"), {"model": source}, out)
    return out


@pytest.fixture(scope="module")
def tok(merging_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(merging_dir / "tokenizer.json"))


@pytest.fixture
def run(merging_dir, tmp_path):
    def go(rows, **spec):
        import pyarrow as pa

        n = len(list(tmp_path.iterdir()))
        data, formatted, tokenized = (tmp_path / f"{n}-{stage}" for stage in ("data", "format", "tokenize"))
        for d in (data, formatted, tokenized):
            d.mkdir()
        write_table(pa.Table.from_pylist(rows), data / "data.arrow")
        format_stage.run(format_stage.Params(dataset=format_stage.Spec(**spec)), {"data": data, "tokenizer": merging_dir}, formatted)
        tokenize_stage.run(tokenize_stage.Params(sequence_len=4096), {"formatted": formatted, "tokenizer": merging_dir}, tokenized)
        table = read_table(tokenized / "tokenized.arrow")
        return list(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist()))

    return go


def names(tok, ids):
    return [tok.id_to_token(i) for i in ids]


def trained(tok, ids, labels):
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels))
    return [tok.id_to_token(i) for i, label in zip(ids, labels) if label != IGNORE]


def test_merges_cross_the_boundaries(tok):
    assert names(tok, tok.encode("<|model|> Meow.").ids) == ["<", "|", "m", "o", "d", "e", "l", "|> M", "e", "o", "w", "."]
    assert names(tok, tok.encode("<|model|>").ids) == ["<", "|", "m", "o", "d", "e", "l", "|>"]
    assert names(tok, tok.encode("Hello world").ids) == ["Hello", " world"]


def test_pygmalion_bot_turn_is_one_piece_with_its_marker_masked_by_count(run, tok):
    row = {"conversations": [{"role": "human", "value": "Hi"}, {"role": "bot", "value": "Meow."}]}
    [(ids, labels)] = run([row], type="pygmalion")
    # the user turn on its own; the bot turn "<|model|> Meow.</s>" in one piece, its first 8 tokens
    # (as many as "<|model|>" has alone) masked: the merged "|> M" too
    assert names(tok, ids) == ["<", "|", "u", "s", "e", "r", "|> ", "H", "i",
                               "<", "|", "m", "o", "d", "e", "l", "|> M", "e", "o", "w", ".", "</s>"]
    assert trained(tok, ids, labels) == ["e", "o", "w", ".", "</s>"]
    assert labels[:17] == [IGNORE] * 17


def test_reflection_masks_as_many_tokens_as_the_prompt_has_alone(run, tok):
    row = {"instruction": "Hi", "output": "A", "reflection": "B", "corrected": "C"}
    [(ids, labels)] = run([row], type="reflection:instruct")
    prompt = REFLECT_SYSTEM[1] + "### Instruction:\nHi\n\n### Response:\n"
    label = "### Thought:\nA\n\n### Agent Reflection:\nB\n\n### Final Response:\nC</s>"
    assert ids == tok.encode(prompt + label).ids
    n = len(tok.encode(prompt).ids)
    # the prompt's last ":\n" merges with the label's first "#": that token is masked, the rest trained
    assert names(tok, ids[n - 1 : n + 4]) == [":\n#", "#", "#", " ", "T"]
    assert labels == [IGNORE] * n + ids[n:]


def chat(detail):
    return {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Hello world", "detail": detail}]}


@pytest.mark.parametrize("begin, end, expected", [
    (4, 10, [" world"]),  # begins at the last character of "Hello": that token is left out
    (0, 5, ["Hello"]),  # ends at the first character of " world" (its space): left out
    (2, 2, ["Hello"]),  # inside one token: the whole token
    (5, 6, [" world"]),
    (0, 10, ["Hello", " world"]),
])
def test_training_detail_follows_axolotls_token_rule(run, tok, begin, end, expected):
    row = chat([{"begin_offset": begin, "end_offset": end, "train": True}])
    [(ids, labels)] = run([row], type="chat_template", message_field_training_detail="detail")
    assert names(tok, ids)[-5:] == ["\n", "Hello", " world", "<|im_end|>", "\n"]
    assert trained(tok, ids, labels) == expected + ["<|im_end|>"]


def test_training_detail_empty_list_leaves_the_turn_untrained_unless_flagged(run, tok):
    second = {"role": "assistant", "content": "Hello"}
    rows = [
        {"messages": chat([])["messages"] + [{"role": "user", "content": "Q?"}, second]},
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Hello world", "detail": [], "train": True}]},
    ]
    [(ids, labels), (ids2, labels2)] = run(rows, type="chat_template", message_field_training_detail="detail", message_field_training="train")
    assert trained(tok, ids, labels) == ["Hello", "<|im_end|>"]  # only the second assistant turn
    assert trained(tok, ids2, labels2) == ["Hello", " world", "<|im_end|>"]


def test_training_detail_without_a_true_span_trains_only_the_turn_end(run, tok):
    [(ids, labels)] = run([chat([{"begin_offset": 0, "end_offset": 10, "train": False}])], type="chat_template",
                          message_field_training_detail="detail")
    assert trained(tok, ids, labels) == ["<|im_end|>"]
