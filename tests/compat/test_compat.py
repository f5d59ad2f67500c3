"""The compatibility suite: configs written the way Axolotl's examples are written (configs/, one per
family of features), each run through `molt preprocess` on the local rows of data/, and checked:
train and validation row counts, and for chosen rows the whole rendered text and the decoded runs of
trained tokens (for preference rows: prompt, chosen, rejected).

Every config names `base_model: HuggingFaceTB/SmolLM2-135M-Instruct`, as a user's would; the test
points it at the tiny random Llama with the SmolLM2 tokenizer, which is all preprocess reads. The
expected texts are the SmolLM2 tokenizer's (its EOS `<|im_end|>`, its BOS `<|im_start|>`).

Compared with Axolotl 0.19.0's `preprocess` of the same configs, model and data (2026-12-02, its
prepared rows matched to molt's by input_ids): the same input_ids and labels for every row of
alpaca_chat_style, alpaca_open_orca, alpaca_train_on_inputs, chat_content_mixed,
chat_content_parts, chat_template_jinja, chat_template_qwen3, chat_template_tokenizer_default,
completion_text, creative_acr_critique, dataset_prepared_path, empty_values, eot_tokens,
eval_settings, evals_per_epoch_zero, fft_chat_chatml, input_output_segments, jeopardy,
kernel_keys and legacy_message_fields, and the same prompt / chosen / rejected strings for
dpo_chat_template_default and dpo_chatml_intel. Different on purpose: chat_template_llama3,
chat_template_gemma3 and dataset_chat_template_override, where molt also trains the template's
end marker (`<|eot_id|>`, `<end_of_turn>`) and Axolotl, with eot_tokens unset, only the
tokenizer's EOS (llama3_axolotl_labels gives Axolotl's labels). Different: kto_llama3's prompt,
which in molt starts with the tokenizer's BOS. Not comparable offline: data_files_json (Axolotl
looks `path: json` up on the hub) and pretraining_dataset (Axolotl streams it, saving nothing).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import invoke_molt

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
EOS = "<|im_end|>"
NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n")


def chatml(*turns: tuple[str, str]) -> str:
    return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)


def llama3(*turns: tuple[str, str], generation: bool = False) -> str:
    text = "<|im_start|>" + "".join(f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>" for role, content in turns)
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if generation else "")


@dataclass
class Row:
    """One prepared row, found by a fragment of its text (rows are shuffled when mixed)."""

    find: str
    trained: list[str] | None = None  # the decoded runs of tokens whose label is not -100
    text: str | None = None  # the whole decoded input
    split: str | None = None  # where it must be; None: train or validation
    prompt: str | None = None  # preference rows
    prompt_end: str | None = None  # what the prompt ends with (all of it that Axolotl's matches)
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: bool | None = None


@dataclass
class Case:
    train: int
    validation: int
    rows: list[Row] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)  # fragments no prepared row may contain
    warns: list[str] = field(default_factory=list)  # keys a `warning:` line must name, saying what molt does instead
    prepared_under: str | None = None


CASES = {
    "qlora_alpaca": Case(18, 2, [Row("Add 5 and 7.", ["12" + EOS], NO_INPUT + "### Instruction:\nAdd 5 and 7.\n\n### Response:\n12" + EOS)]),
    "lora_alpaca_modules": Case(20, 0, [Row("Add 6 and 8.", ["14" + EOS],
                                            WITH_INPUT + "### Instruction:\nAdd 6 and 8.\n\n### Input:\nAnswer with digits only.\n\n### Response:\n14" + EOS)]),
    # 0.05 of 20 rows is 1.0: one validation row
    "fft_chat_chatml": Case(19, 1, [Row("Convert 6 km to m.", ["6 km = 6000 m" + EOS],
                                        chatml(("system", "Answer in one line."), ("user", "Convert 6 km to m."), ("assistant", "6 km = 6000 m"))),
                                    Row("Convert 8 km to m.", ["8 km = 8000 m" + EOS, "8 m = 800 cm" + EOS])]),
    "multi_dataset_chat": Case(57, 3, [Row("Spell tiger backwards.", ["regit" + EOS]),
                                       Row("What is 7 squared?", ["49" + EOS], chatml(("system", "You only answer with numbers."),
                                                                                       ("user", "What is 7 squared?"), ("assistant", "49"))),
                                       Row("Convert 5 km to m.", ["5 km = 5000 m" + EOS])]),
    "sharegpt_fields": Case(20, 0, [Row("Spell lemon backwards.", ["nomel" + EOS], chatml(("user", "Spell lemon backwards."), ("assistant", "nomel")))]),
    "legacy_message_fields": Case(20, 0, [Row("first letter of piano", ["P" + EOS],
                                              chatml(("user", "What is the first letter of piano?"), ("assistant", "P")))]),
    # train[:50%] of 20 rows: the first 10
    "split_slice_percent": Case(10, 0, [Row("Add 3 and 5.", ["8" + EOS]), Row("Add 10 and 12.", ["22" + EOS])],
                                absent=["Add 11 and 13.", "Add 20 and 22."]),
    # train[5:15] of the chats (n = 6..15) and train[:8] of the ShareGPT rows (apple .. candle)
    "split_slice_range": Case(18, 0, [Row("Convert 6 km to m."), Row("Convert 15 km to m."), Row("Spell candle backwards.", ["eldnac" + EOS])],
                              absent=["Convert 5 km to m.", "Convert 16 km to m.", "Spell forest backwards."]),
    "test_datasets": Case(20, 5, [Row("Double 3.", ["6" + EOS], split="validation"), Row("Add 5 and 7.", ["12" + EOS], split="train")],
                          prepared_under="prepared/"),
    # 0.01 of 20 rows is 0.2: train_test_split holds out ceil(0.2) = 1 row
    "val_set_size_small": Case(19, 1),
    "val_set_size_rows": Case(17, 3),
    "eval_settings": Case(16, 4, [Row("Convert 5 km to m.", ["5 km = 5000 m" + EOS])]),
    "evals_per_epoch_zero": Case(20, 0, [Row("Add 5 and 7.", ["12" + EOS])]),
    "kernel_keys": Case(20, 0, [Row("Convert 5 km to m.", ["5 km = 5000 m" + EOS])], warns=["lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel"]),
    # molt trains the template's end marker; Axolotl only the tokenizer's EOS, which a llama3 turn
    # rendered for SmolLM2 does not contain: eot_tokens set to that EOS gives Axolotl's labels
    "llama3_axolotl_labels": Case(20, 0, [Row("Convert 5 km to m.", ["5 km = 5000 m"])]),
    "chat_template_llama3": Case(20, 0, [Row("Convert 5 km to m.", ["5 km = 5000 m<|eot_id|>"],
                                             llama3(("user", "Convert 5 km to m."), ("assistant", "5 km = 5000 m")))]),
    # Qwen3's template opens an empty think block in the last assistant turn; only the content is trained
    "chat_template_qwen3": Case(6, 0, [Row("Convert 5 km to m.", ["5 km = 5000 m" + EOS],
                                           "<|im_start|>user\nConvert 5 km to m.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n5 km = 5000 m<|im_end|>\n")],
                                  absent=["Convert 7 km to m."]),
    "chat_template_gemma3": Case(20, 0, [Row("Spell tiger backwards.", ["regit<end_of_turn>"],
                                             "<|im_start|><start_of_turn>user\nSpell tiger backwards.<end_of_turn>\n<start_of_turn>model\nregit<end_of_turn>\n")]),
    # SmolLM2's own template adds its default system prompt
    "chat_template_tokenizer_default": Case(20, 0, [Row("Convert 5 km to m.", ["5 km = 5000 m" + EOS], chatml(
        ("system", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"), ("user", "Convert 5 km to m."), ("assistant", "5 km = 5000 m")))]),
    # the newline between the content and the EOS the template writes is not trained, the EOS is
    "chat_template_jinja": Case(20, 0, [Row("Convert 5 km to m.", ["5 km = 5000 m", EOS], "### USER:\nConvert 5 km to m.\n### ASSISTANT:\n5 km = 5000 m\n" + EOS)]),
    "dataset_chat_template_override": Case(40, 0, [
        Row("Convert 5 km to m.", ["5 km = 5000 m" + EOS], chatml(("user", "Convert 5 km to m."), ("assistant", "5 km = 5000 m"))),
        Row("What is 7 squared?", ["49<|eot_id|>"], llama3(("system", "You only answer with numbers."), ("user", "What is 7 squared?"), ("assistant", "49")))]),
    "alpaca_chat_style": Case(20, 0, [Row("Add 6 and 8.", ["14" + EOS])]),
    "alpaca_train_on_inputs": Case(20, 0, [Row("Add 5 and 7.", [NO_INPUT + "### Instruction:\nAdd 5 and 7.\n\n### Response:\n12" + EOS])]),
    "completion_text": Case(20, 0, [Row("The number 5 is", ["The number 5 is odd, and its successor is 6." + EOS], "The number 5 is odd, and its successor is 6." + EOS)]),
    "input_output_segments": Case(20, 0, [Row("What is 5 plus one?", ["<answer> 6\n"], "<question> What is 5 plus one?\n<answer> 6\n")]),
    "pretraining_dataset": Case(20, 0, [Row("Chapter 5.", ["Chapter 5. The tiger stood quietly beside the old mill while the rain fell." + EOS])]),
    "dpo_chatml_intel": Case(20, 0, [Row("What is 5 times 3?", prompt=chatml(("system", "You are a careful calculator."), ("user", "What is 5 times 3?"))
                                         + "<|im_start|>assistant\n", chosen="15" + EOS, rejected="16" + EOS)]),
    "dpo_chat_template_default": Case(18, 2, [Row("Capitalise tiger.", prompt=chatml(("system", "Be brief."), ("user", "Capitalise tiger."))
                                                  + "<|im_start|>assistant\n", chosen="TIGER" + EOS, rejected="tiger" + EOS)]),
    # n = 3: a row labelled undesirable (every third), its completion "yes". molt's prompt may start
    # with the tokenizer's BOS (it does today), Axolotl's llama3.* strings have none
    "kto_llama3": Case(20, 0, [Row("\n\nIs 3 even?", prompt_end=llama3(("user", "Is 3 even?"), generation=True).removeprefix("<|im_start|>"),
                                   completion="yes<|eot_id|>", label=False),
                               Row("\n\nIs 4 even?", completion="yes<|eot_id|>", label=True)]),
    "orpo_argilla": Case(20, 0, [Row("Spell tiger backwards.", prompt=chatml(("user", "Spell tiger backwards.")) + "<|im_start|>assistant\n",
                                     chosen="regit" + EOS, rejected="tiger" + EOS)]),
    "reward_model": Case(18, 2, [Row("What is 5 minus 1?", prompt=chatml(("system", "Judge answers."), ("user", "What is 5 minus 1?")) + "<|im_start|>assistant\n",
                                     chosen="4" + EOS, rejected="6" + EOS)]),
    "process_reward_model": Case(16, 4),  # its rows are checked in test_process_reward_rows_label_each_step
    "packing_eval": Case(36, 4, [Row("Add 5 and 7.", ["12" + EOS]), Row("The number 5 is", ["The number 5 is odd, and its successor is 6." + EOS])]),
    "dataset_prepared_path": Case(15, 5, prepared_under="data/prepared/"),
    "special_tokens": Case(20, 0, [Row("What is 5 plus one?", ["<answer> 6\n"], "<question> What is 5 plus one?\n<answer> 6\n")]),
    "chat_content_parts": Case(20, 0, [Row("sky at 12 o'clock", ["Blue at 12." + EOS], chatml(("user", "Name the colour of the sky at 12 o'clock."), ("assistant", "Blue at 12."))),
                                       Row("sky at 3 o'clock", ["Black at 3." + EOS])]),
    # 3 days after Monday (text) and 4 days after (parts) in one file
    "chat_content_mixed": Case(18, 2, [Row("is 3 days after Monday?", ["Thursday" + EOS], chatml(("user", "Which weekday is 3 days after Monday?"), ("assistant", "Thursday"))),
                                       Row("is 4 days after Monday?", ["Friday" + EOS], chatml(("user", "Which weekday is 4 days after Monday?"), ("assistant", "Friday")))]),
    # `path: json` with data_files, as for files on disk in Axolotl; train_on_eos: last trains only the last turn's EOS
    "data_files_json": Case(40, 0, [Row("Add 5 and 7.", ["12" + EOS]), Row("Convert 8 km to m.", ["8 km = 8000 m", "8 m = 800 cm" + EOS])]),
    "eot_tokens": Case(20, 0, [Row("Convert 8 km to m.", ["8 km = 8000 m" + EOS, "8 m = 800 cm" + EOS])]),
    "alpaca_open_orca": Case(20, 0, [Row("letters are in tiger?", ["5" + EOS],
                                         "### System:\nYou are a spelling assistant.\n### Human:\nHow many letters are in tiger?\n### Assistant:\n5" + EOS)]),
    "user_defined_format": Case(20, 0, [Row("letter after c.", ["d" + EOS], "[INST] Name the letter after c. [/INST]d" + EOS)]),
    # a turn's `train` flag overrides the role rule; a turn without one follows it
    "message_field_training": Case(20, 0, [Row("1 (5)", ["3 2 1 (5)" + EOS]), Row("1 (6)", ["1 2 3 4" + EOS, "4 3 2 1 (6)" + EOS])]),
    "empty_values": Case(18, 2, [Row("Add 5 and 7.", ["12" + EOS])]),
    "creative_acr_critique": Case(40, 0),  # its rows are checked in test_creative_acr_scores_given_as_text
    "jeopardy": Case(19, 1, [Row("number 5 on the list", ["what is fruit 5" + EOS],
                                 WITH_INPUT + "### Instruction:\nThis fruit is number 5 on the list\n\n### Input:\nFRUIT\n\n### Response:\nwhat is fruit 5" + EOS)]),
    "system_column_drop": Case(40, 0, [Row("What is 7 squared?", ["49" + EOS], chatml(("user", "What is 7 squared?"), ("assistant", "49"))),
                                       Row("Convert 5 km to m.", ["Convert 5 km to m." + EOS, "5 km = 5000 m" + EOS])],
                               absent=["You only answer with numbers."]),
    # the five two-exchange rows (n = 4, 8, ...) are longer than 48 tokens: dropped
    "too_long_rows_dropped": Case(15, 0, [Row("Convert 9 km to m.", ["9 km = 9000 m" + EOS])], absent=["Convert 4 km to m.", "Convert 20 km to m."]),
}


@pytest.fixture(scope="module")
def compat_cache(tmp_path_factory) -> Path:
    """One store for the module: the tiny model is fetched and converted once."""
    return tmp_path_factory.mktemp("compat") / "cache"


@dataclass
class Prepared:
    output: str
    splits: dict  # split name -> list of row dicts
    tokenizer: object  # the tokenizer artifact's `tokenizers.Tokenizer` (added tokens included)
    path: str


def preprocess(name: str, workdir: Path, model: Path, cache: Path) -> Prepared:
    import datasets
    from tokenizers import Tokenizer

    config = yaml.safe_load((CONFIGS / f"{name}.yml").read_text())
    config["base_model"] = str(model)
    shutil.copytree(HERE / "data", workdir / "data")
    (workdir / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = invoke_molt("preprocess", "config.yml", cache=cache)
    assert result.exit_code == 0 and result.exception is None, result
    assert "Traceback" not in result.output
    (path,) = re.findall(r"prepared dataset: (\S+)", result.output)
    loaded = datasets.load_from_disk(str(workdir / path))
    (key,) = re.findall(r"tokenizer\s+([0-9a-f]{12})\b", result.output)
    (tokenizer_dir,) = Path(cache, "tokenizer").glob(f"{key}*")
    splits = {split: list(loaded[split]) for split in loaded}
    return Prepared(result.output, splits, Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")), path)


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def trained_runs(tokenizer, row: dict) -> list[str]:
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [decode(tokenizer, run) for run in runs]


def row_text(prepared: Prepared, row: dict) -> str:
    if "prompt" in row and isinstance(row["prompt"], str):
        return row["prompt"] + "\x00" + str(row.get("chosen") or row.get("completion") or "")
    return decode(prepared.tokenizer, row["input_ids"])


def find(prepared: Prepared, fragment: str) -> tuple[str, dict]:
    found = [(split, r) for split, rows in prepared.splits.items() for r in rows if fragment in row_text(prepared, r)]
    assert len(found) == 1, f"{len(found)} prepared rows contain {fragment!r}"
    return found[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_preprocesses_as_axolotl_would(name, workdir, tiny_model_dir, compat_cache):
    case = CASES[name]
    prepared = preprocess(name, workdir, tiny_model_dir, compat_cache)
    counts = {split: len(rows) for split, rows in prepared.splits.items()}
    assert counts == {"train": case.train, **({"validation": case.validation} if case.validation else {})}, prepared.output[-3000:]
    for expect in case.rows:
        split, row = find(prepared, expect.find)
        if expect.split:
            assert split == expect.split
        if expect.text is not None:
            assert decode(prepared.tokenizer, row["input_ids"]) == expect.text
        if expect.trained is not None:
            assert trained_runs(prepared.tokenizer, row) == expect.trained
        if expect.prompt_end is not None:
            assert row["prompt"].endswith(expect.prompt_end) and len(row["prompt"]) - len(expect.prompt_end) <= len("<|im_start|>")
        for key in ("prompt", "chosen", "rejected", "completion", "label"):
            if getattr(expect, key) is not None:
                assert row[key] == getattr(expect, key), key
    for fragment in case.absent:
        assert not any(fragment in row_text(prepared, r) for rows in prepared.splits.values() for r in rows), fragment
    warnings = [line for line in prepared.output.splitlines() if line.startswith("warning:")]
    for key in case.warns:
        said = [line for line in warnings if line.startswith(f"warning: {key}")]
        assert said and all("molt" in line for line in said), (key, warnings)
    if case.prepared_under:
        assert prepared.path.startswith(case.prepared_under)


def test_every_config_has_its_expectations():
    files = {p.stem for p in CONFIGS.glob("*.yml")}
    assert files == set(CASES)
    assert len(files) >= 30


def test_added_tokens_are_single_tokens_in_the_prepared_rows(workdir, tiny_model_dir, compat_cache):
    prepared = preprocess("special_tokens", workdir, tiny_model_dir, compat_cache)
    question, answer = (prepared.tokenizer.token_to_id(t) for t in ("<question>", "<answer>"))
    assert question is not None and answer is not None and question != answer
    _, row = find(prepared, "What is 5 plus one?")
    assert row["input_ids"][0] == question and row["input_ids"].count(answer) == 1
    assert row["labels"][row["input_ids"].index(answer)] == answer  # the answer's segment starts with it, trained


def test_process_reward_rows_label_each_step(workdir, tiny_model_dir, compat_cache):
    """TRL's PRM layout: the prompt, then each step with step_separator after it; the label of a
    step sits on its last token (the separator), every other token is -100."""
    prepared = preprocess("process_reward_model", workdir, tiny_model_dir, compat_cache)
    rows = [r for rows in prepared.splits.values() for r in rows]
    (row,) = [r for r in rows if r["prompt"] == "Compute 4 + 4 + 1."]
    assert decode(prepared.tokenizer, row["input_ids"]) == "Compute 4 + 4 + 1.4 + 4 = 8.\n8 + 1 = 10.\n"
    labelled = [(i, v) for i, v in enumerate(row["token_labels"]) if v != -100]
    assert [v for _, v in labelled] == [1, 0]  # 4 is even: the second step is marked wrong
    assert [decode(prepared.tokenizer, [row["input_ids"][i]]) for i, _ in labelled] == ["\n", "\n"]


def test_creative_acr_scores_given_as_text(workdir, tiny_model_dir, compat_cache):
    """Axolotl documents `scores` and `critiques` as text; its critique rows train their YAML dump
    (a string dumps as a quoted scalar), as its revise rows show it in the prompt."""
    prepared = preprocess("creative_acr_critique", workdir, tiny_model_dir, compat_cache)
    rows = [r for rows in prepared.splits.values() for r in rows]
    scores, critiques = yaml.dump("clarity: 1, creativity: 2"), yaml.dump("Plain; say something about 5.")
    critique = [r for r in rows if "Question: Write a line about the number 5." in decode(prepared.tokenizer, r["input_ids"])
                and "revise the Response" not in decode(prepared.tokenizer, r["input_ids"])]
    assert len(critique) == 1
    assert trained_runs(prepared.tokenizer, critique[0]) == [scores + critiques + EOS]
    revise = [r for r in rows if "revise the Response" in decode(prepared.tokenizer, r["input_ids"]) and "number 5." in decode(prepared.tokenizer, r["input_ids"])]
    assert len(revise) == 1
    assert f"Evaluation:\n{scores}{critiques}" in decode(prepared.tokenizer, revise[0]["input_ids"])
    assert trained_runs(prepared.tokenizer, revise[0]) == ["5 waits between 4 and 6." + EOS]


# configs that need what molt does not have: refused, exit 2, with no traceback and no prepared
# data, naming each key at fault and what to do or what molt would do instead
REFUSED = {
    "tokenizer_config_not_cached": [["tokenizer_config 'EleutherAI/gpt-neox-20b'", "local Hugging Face cache", "huggingface-cli download"]],
    "sharegpt_type": [["datasets[0].type", "sharegpt", "type: chat_template", "message_property_mappings"]],
    "rslora_lisa_concatenation": [["pretraining_sample_concatenation", "molt keeps"], ["peft_use_rslora", "molt would"], ["lisa_n_layers", "molt would"],
                               ["lisa_step_interval", "molt would"]],
    "unknown_template": [["chat_template", "'chatml_v9'", "did you mean chatml?"]],
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_config_needing_what_molt_lacks_is_refused_naming_it(name, workdir, tiny_model_dir, compat_cache):
    config = yaml.safe_load((HERE / "refused" / f"{name}.yml").read_text())
    config["base_model"] = str(tiny_model_dir)
    shutil.copytree(HERE / "data", workdir / "data")
    (workdir / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = invoke_molt("preprocess", "config.yml", cache=compat_cache)
    assert result.exit_code == 2 and result.exception is None, result
    assert "Traceback" not in result.output and "prepared dataset:" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith(("error:", "  - "))]
    for fragments in REFUSED[name]:
        assert any(all(f in line for f in fragments) for line in lines), (fragments, lines)


def test_every_refused_config_has_its_expectations():
    assert {p.stem for p in (HERE / "refused").glob("*.yml")} == set(REFUSED)
