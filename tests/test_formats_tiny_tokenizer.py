"""chat_template masking through a second tokenizer, unlike SmolLM2's in every way that matters:
a byte-level BPE trained here on a few sentences, its own Gemma-style chat template, a BOS
(`<bos>`) that it adds itself, and `<end_of_turn>` as its EOS. Expectations are exact input_ids
and labels, built by tokenizing the expected text pieces one by one with this tokenizer.
"""

from __future__ import annotations

import json

import pytest
from test_formats import expected

from stages import chat_templates
from stages import format as format_stage
from stages import tokenize as tokenize_stage
from stages import tokenizer as tokenizer_stage
from stages.store import read_table, write_table

IGNORE = -100
OWN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' + message['content'] + '<end_of_turn>\\n' }}{% endfor %}"
)
# every marker of the built-in templates tested below is one token, as in the real tokenizers
SPECIAL = [
    "<pad>", "<bos>", "<end_of_turn>", "<start_of_turn>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]",
    "<|startoftext|>", "<|bom|>", "<|eom|>",
]
CORPUS = [
    "Be terse. Hello there. Ciao, friend. Bye now. Hi!", "The sky is blue and the grass is green.",
    "user assistant system model tool", "Convert 12 km to m. 12 km = 12000 m.", "You are Qwen, created by Alibaba Cloud.",
] * 20


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer)
    bos = bpe.token_to_id("<bos>")
    bpe.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<bos>", eos_token="<end_of_turn>", pad_token="<pad>",
        additional_special_tokens=SPECIAL[3:], chat_template=OWN_TEMPLATE,
    )
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_artifacts(tiny_dir, tmp_path_factory):
    """The tokenizer stage's output for `chat_template` choice -> its directory (built on demand)."""
    made = {}

    def get(choice):
        if choice not in made:
            d = tmp_path_factory.mktemp(f"tiny-{choice}")
            tokenizer_stage.run(tokenizer_stage.Params(chat_template=choice), {"model": tiny_dir}, d)
            made[choice] = d
        return made[choice]

    return get


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))


@pytest.fixture
def pipeline(tiny_artifacts, tmp_path):
    def run(rows, template="tokenizer_default", sequence_len=1024, eot_tokens=None, **spec):
        import pyarrow as pa

        n = len(list(tmp_path.iterdir()))
        data, formatted, tokenized = (tmp_path / f"{n}-{stage}" for stage in ("data", "format", "tokenize"))
        for d in (data, formatted, tokenized):
            d.mkdir()
        write_table(pa.Table.from_pylist(rows), data / "data.arrow")
        tok = tiny_artifacts(template)
        format_stage.run(format_stage.Params(dataset=format_stage.Spec(**spec), eot_tokens=eot_tokens), {"data": data, "tokenizer": tok}, formatted)
        tokenize_stage.run(tokenize_stage.Params(sequence_len=sequence_len), {"formatted": formatted, "tokenizer": tok}, tokenized)
        table = read_table(tokenized / "tokenized.arrow")
        return list(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist()))

    return run


@pytest.fixture
def expect(tiny):
    return lambda pieces: expected(tiny, pieces)


def test_tiny_tokenizer_differs_from_smollm2(tiny_artifacts, tiny):
    info = json.loads((tiny_artifacts("tokenizer_default") / "molt_tokenizer.json").read_text())
    assert (info["bos_token"], info["eos_token"], info["adds_bos"]) == ("<bos>", "<end_of_turn>", True)
    assert info["chat_template"] == OWN_TEMPLATE
    assert tiny.get_vocab_size() <= 400  # SmolLM2 has 49152
    assert tiny.encode("Hi").ids[0] == tiny.token_to_id("<bos>")


def turn(role, content):
    return f"<start_of_turn>{role}\n{content}<end_of_turn>\n"


CHAT = {"messages": [
    {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
    {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao, friend."},
]}
HEAD = "<bos>" + turn("system", "Be terse.") + turn("user", "Hi") + "<start_of_turn>assistant\n"


@pytest.mark.parametrize("train_on_eos, pieces", [
    ("turn", [
        (HEAD, False), ("Hello there.<end_of_turn>", True),
        ("\n" + turn("user", "Bye") + "<start_of_turn>assistant\n", False), ("Ciao, friend.<end_of_turn>", True), ("\n", False),
    ]),
    ("none", [
        (HEAD, False), ("Hello there.", True),
        ("<end_of_turn>\n" + turn("user", "Bye") + "<start_of_turn>assistant\n", False), ("Ciao, friend.", True),
        ("<end_of_turn>\n", False),
    ]),
    ("last", [
        (HEAD, False), ("Hello there.", True),
        ("<end_of_turn>\n" + turn("user", "Bye") + "<start_of_turn>assistant\n", False), ("Ciao, friend.<end_of_turn>", True),
        ("\n", False),
    ]),
    ("all", [
        ("<bos><start_of_turn>system\nBe terse.", False), ("<end_of_turn>", True),
        ("\n<start_of_turn>user\nHi", False), ("<end_of_turn>", True),
        ("\n<start_of_turn>assistant\n", False), ("Hello there.<end_of_turn>", True),
        ("\n<start_of_turn>user\nBye", False), ("<end_of_turn>", True),
        ("\n<start_of_turn>assistant\n", False), ("Ciao, friend.<end_of_turn>", True), ("\n", False),
    ]),
])
def test_own_template_train_on_eos(pipeline, expect, train_on_eos, pieces):
    [(ids, labels)] = pipeline([CHAT], type="chat_template", train_on_eos=train_on_eos)
    assert (ids, labels) == expect(pieces)


def test_own_template_bos_once_and_masked(pipeline, tiny):
    [(ids, labels)] = pipeline([CHAT], type="chat_template")
    bos = tiny.token_to_id("<bos>")
    assert ids[0] == bos and ids.count(bos) == 1 and labels[0] == IGNORE


def test_own_template_roles_to_train(pipeline, expect):
    [(ids, labels)] = pipeline([CHAT], type="chat_template", roles_to_train=["user", "system"])
    assert (ids, labels) == expect([
        ("<bos><start_of_turn>system\n", False), ("Be terse.<end_of_turn>", True),
        ("\n<start_of_turn>user\n", False), ("Hi<end_of_turn>", True),
        ("\n<start_of_turn>assistant\nHello there.<end_of_turn>\n<start_of_turn>user\n", False), ("Bye<end_of_turn>", True),
        ("\n<start_of_turn>assistant\nCiao, friend.<end_of_turn>\n", False),
    ])


def test_own_template_repeated_content_and_markers_in_content(pipeline, expect):
    row = {"messages": [
        {"role": "user", "content": "Say <end_of_turn> twice."}, {"role": "assistant", "content": "Hi<end_of_turn>"},
        {"role": "user", "content": "Again."}, {"role": "assistant", "content": "Hi<end_of_turn>"},
    ]}
    [(ids, labels)] = pipeline([row], type="chat_template")
    assert (ids, labels) == expect([
        ("<bos>" + turn("user", "Say <end_of_turn> twice.") + "<start_of_turn>assistant\n", False),
        ("Hi<end_of_turn><end_of_turn>", True),
        ("\n" + turn("user", "Again.") + "<start_of_turn>assistant\n", False),
        ("Hi<end_of_turn><end_of_turn>", True), ("\n", False),
    ])


# The built-ins rendered with this tokenizer's BOS / EOS: the trained text of each, run by run
# (contiguous labelled tokens, mapped back to the rendered characters).
BUILTIN_TRAINED = {
    "chatml": ["Hello there.<|im_end|>", "Ciao, friend.<|im_end|>"],
    "qwen_25": ["Hello there.<|im_end|>", "Ciao, friend.<|im_end|>"],
    "llama3": ["Hello there.<|eot_id|>", "Ciao, friend.<|eot_id|>"],
    "gemma": ["Hello there.<end_of_turn>", "Ciao, friend.<end_of_turn>"],
    "gemma3": ["Hello there.<end_of_turn>", "Ciao, friend.<end_of_turn>"],
    "phi_3": ["Hello there.<|end|>", "Ciao, friend.<|end|>"],
    "phi_35": ["Hello there.<|end|>", "Ciao, friend.<|end|>"],
    # ' ' + content: the byte-level token " Hello" holds the space, and covers trained text
    "mistral": [" Hello there.<end_of_turn>", " Ciao, friend.<end_of_turn>"],
    "inst": [" Hello there.<end_of_turn>", " Ciao, friend.<end_of_turn>"],
    "jamba": [" Hello there.<|eom|>", " Ciao, friend.<|eom|>"],
    "mistral_v1": [" Hello there.<end_of_turn>", " Ciao, friend.<end_of_turn>"],
    "mistral_v2v3": [" Hello there.<end_of_turn>", " Ciao, friend.<end_of_turn>"],
    "alpaca": ["Hello there.<end_of_turn>", "Ciao, friend.<end_of_turn>"],
    "deepseek_v2": ["Hello there.<end_of_turn>", "Ciao, friend.<end_of_turn>"],
    "llama3_2_vision": ["Hello there.<|eot_id|>", "Ciao, friend.<|eot_id|>"],
    # its turn end is no single token here: still trained, as the pieces it splits into
    "cohere": ["Hello there.<|END_OF_TURN_TOKEN|>", "Ciao, friend.<|END_OF_TURN_TOKEN|>"],
}
NO_SYSTEM = {"gemma"}  # Gemma's template refuses a system message


@pytest.mark.parametrize("template", sorted(BUILTIN_TRAINED))
def test_builtin_templates_through_the_tiny_tokenizer(pipeline, tiny, template):
    messages = CHAT["messages"][1:] if template in NO_SYSTEM else CHAT["messages"]
    [(ids, labels)] = pipeline([{"messages": messages}], template=template, type="chat_template")
    text = chat_templates.render(chat_templates.builtin(template), messages, bos_token="<bos>", eos_token="<end_of_turn>")
    encoding = tiny.encode(text, add_special_tokens=False)
    assert ids == encoding.ids
    runs, current = [], None
    for (start, end), label, token in zip(encoding.offsets, labels, ids):
        if label == IGNORE:
            current = None
            continue
        assert label == token
        if current is None:
            current = [start, end]
            runs.append(current)
        current[1] = end
    assert [text[s:e] for s, e in runs] == BUILTIN_TRAINED[template]
    assert ids.count(tiny.token_to_id("<bos>")) == (0 if template in ("chatml", "qwen_25", "phi_35", "jamba") else 1 + (template == "inst"))


def test_alpaca_prompt_gets_the_tokenizers_bos(pipeline, expect):
    [(ids, labels)] = pipeline([{"instruction": "Hi", "output": "Hello there."}], type="alpaca")
    prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nHi\n\n### Response:\n"
    )
    assert (ids, labels) == expect([("<bos>", False), (prompt, False), ("Hello there.<end_of_turn>", True)])


@pytest.mark.parametrize("eot_tokens, trained", [
    # only the EOS, as Axolotl without eot_tokens: Llama 3's <|eot_id|> is left untrained (same labels as Axolotl 0.19.0)
    (["<end_of_turn>"], [["H", "ello", "Ġthere", "."], ["C", "iao", ",", "Ġfriend", "."]]),
    (["<|eot_id|>"], [["H", "ello", "Ġthere", ".", "<|eot_id|>"], ["C", "iao", ",", "Ġfriend", ".", "<|eot_id|>"]]),
])
def test_eot_tokens_name_the_turn_ends(pipeline, tiny, eot_tokens, trained):
    [(ids, labels)] = pipeline([CHAT], template="llama3", type="chat_template", eot_tokens=eot_tokens)
    runs, previous = [], False
    for token, label in zip(ids, labels):
        if label != IGNORE:
            if not previous:
                runs.append([])
            runs[-1].append(tiny.id_to_token(token))
        previous = label != IGNORE
    assert runs == trained
