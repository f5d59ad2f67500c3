"""Preference and reward training through the CLI, on the tiny Llama: every method trains with
LoRA and with full weights and its artifact reloads to the same held-out loss; the reference
log-probs are TRL's own and are cached apart from training; reward models and PRMs score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_jsonl

UNITS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("h", "min", 60), ("L", "mL", 1000), ("min", "s", 60)]
PAIRS = [
    {"messages": [{"role": "user", "content": f"Convert {n} {a} to {b}."}], "chosen": f"{n} {a} = {n * k} {b}", "rejected": f"{n} {a} = {n + k} {b}"}
    for n in (2, 3, 5, 7) for a, b, k in UNITS
]
KTO_ROWS = [{"prompt": p["messages"][0]["content"], "completion": p[side], "label": side == "chosen"} for p in PAIRS for side in ("chosen", "rejected")]


def preference_config(workdir: Path, model_dir: Path, **changes) -> Path:
    write_jsonl(workdir / "data" / "pairs.jsonl", PAIRS)
    write_jsonl(workdir / "data" / "kto.jsonl", KTO_ROWS)
    config = {
        "base_model": str(model_dir), "chat_template": "chatml", "rl": "dpo",
        "datasets": [{"path": "data/pairs.jsonl", "type": "chat_template.default"}],
        "val_set_size": 0.25, "sequence_len": 64, "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True,
        "micro_batch_size": 2, "max_steps": 3, "learning_rate": 1e-3, "logging_steps": 1, "seed": 42, "output_dir": "out",
        "dataset_prepared_path": "prepared",
    }
    if changes.get("rl") == "kto":
        config["datasets"] = [{"path": "data/kto.jsonl", "type": "user_defined.default", "field_prompt": "prompt"}]
        config["datasets"][0]["type"] = {"field_prompt": "prompt", "field_completion": "completion", "field_label": "label"}
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    path = workdir / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def reloaded(out: Path, base: Path, adapter: bool):
    from transformers import AutoModelForCausalLM

    if not adapter:
        return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out)


def held_out_loss(model, config: dict, rows: Path, tokenizer_dir: Path) -> float:
    """The held-out loss of `model` by the method's TRL trainer, on the rows train read."""
    import datasets
    from transformers import AutoTokenizer

    from stages.config import config_from_dict, slice_params
    from stages import train_preference
    from stages.store import read_table

    params = slice_params(train_preference.Params, config_from_dict(config).model_dump(mode="json"))
    trainer_cls, config_cls = train_preference.trainer_class(params.rl)
    columns = train_preference.COLUMNS["dpo" if params.rl == "ipo" else params.rl]
    val = datasets.Dataset(read_table(rows / "val.arrow").select(list(columns)))
    args = config_cls(output_dir=str(rows.parent / "eval-tmp"), per_device_eval_batch_size=params.micro_batch_size, report_to=[],
                      remove_unused_columns=False, use_cpu=True, bf16=False, **train_preference.method_settings(params))
    trainer = trainer_cls(model=model, args=args, train_dataset=val, eval_dataset=val, processing_class=AutoTokenizer.from_pretrained(tokenizer_dir))
    return trainer.evaluate()["eval_loss"]


def artifact(cache: Path, stage: str) -> Path:
    found = [p.parent for p in (cache / stage).glob("*/manifest.json")]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("rl", ["dpo", "ipo", "kto", "orpo", "simpo"])
@pytest.mark.parametrize("adapter", ["lora", None])
def test_each_method_trains_and_its_artifact_reloads_to_the_same_held_out_loss(workdir, tiny_model_dir, molt, cache_dir, rl, adapter):
    changes = {"rl": rl, "adapter": adapter, "lora_r": 4 if adapter else None, "lora_alpha": 8 if adapter else None,
               "lora_target_linear": True if adapter else None}
    config = preference_config(workdir, tiny_model_dir, **changes)
    result = molt("train", config)
    assert result.exit_code == 0, result
    built = result.built()
    assert "train_preference" in built and ("ref_logprobs" in built) == (rl in ("dpo", "ipo", "kto")), built
    metrics = json.loads(Path("out/metrics.json").read_text())
    assert metrics["rl"] == rl and metrics["steps"] == 3 and [h["step"] for h in metrics["loss_history"]] == [1, 2, 3]
    assert Path("out/loss.png").stat().st_size > 0
    model = reloaded(Path("out"), tiny_model_dir, bool(adapter))
    rows = artifact(cache_dir, "ref_logprobs" if rl in ("dpo", "ipo", "kto") else "mix")
    loss = held_out_loss(model, yaml.safe_load(config.read_text()), rows, artifact(cache_dir, "tokenizer"))
    assert loss == pytest.approx(metrics["eval_loss_after"], rel=1e-5, abs=1e-4)
    assert metrics["eval_loss_after"] != metrics["eval_loss_before"]


def test_cached_reference_log_probs_are_the_ones_trl_computes(workdir, tiny_model_dir, molt, cache_dir):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from stages.store import read_table

    assert molt("run", preference_config(workdir, tiny_model_dir), "--until", "ref_logprobs").exit_code == 0
    ours = read_table(artifact(cache_dir, "ref_logprobs") / "train.arrow")

    class Tokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *args):
            return dataset

    rows = datasets.Dataset(ours.select(["prompt_ids", "chosen_ids", "rejected_ids"]))
    from stages.ref_logprobs import ROWS_PER_PASS

    # batches of the stage's size, laid out alike: the same float sums to the last bit
    args = DPOConfig(output_dir=str(workdir / "trl"), precompute_ref_log_probs=True, per_device_train_batch_size=ROWS_PER_PASS, report_to=[], use_cpu=True,
                     bf16=False)  # TRL's default autocasts to bf16; molt computes in the weights' fp32 on CPU
    trainer = Tokenized(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), args=args, train_dataset=rows,
                        processing_class=AutoTokenizer.from_pretrained(artifact(cache_dir, "tokenizer")))
    theirs = trainer.train_dataset
    for side in ("chosen", "rejected"):
        assert torch.tensor(ours.column(f"ref_{side}_logps").to_pylist()) == pytest.approx(torch.tensor(theirs[f"ref_{side}_logps"]), rel=1e-6, abs=1e-5)


def test_a_new_beta_retrains_without_the_reference_and_a_new_base_model_reruns_it(workdir, tiny_model_dir, molt, tmp_path):
    config = preference_config(workdir, tiny_model_dir)
    first = molt("train", config)
    assert first.exit_code == 0, first
    assert {"format_preference[0]", "tokenize_preference[0]", "mix", "ref_logprobs", "train_preference"} <= first.built()
    again = molt("train", config, "--rl-beta", "0.3")
    assert again.exit_code == 0, again
    assert again.built() == {"train_preference"}, again.output
    assert {"format_preference[0]", "tokenize_preference[0]", "mix", "ref_logprobs"} <= again.cached()

    from transformers import AutoModelForCausalLM

    other = tmp_path / "other-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(other)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (other / f.name).write_bytes(f.read_bytes())
    moved = molt("train", config, "--base-model", str(other), "--output-dir", "out2")
    assert moved.exit_code == 0, moved
    assert {"fetch_model", "ref_logprobs", "train_preference"} <= moved.built(), moved.output
    assert "format_preference[0]" in moved.cached() and "tokenize_preference[0]" in moved.cached()


def test_preprocess_leaves_the_rendered_pairs_and_debug_shows_their_masks(workdir, tiny_model_dir, molt):
    import datasets

    result = molt("preprocess", preference_config(workdir, tiny_model_dir), "--debug")
    assert result.exit_code == 0, result
    assert "prompt:" in result.output and "chosen:" in result.output and "rejected:" in result.output
    prepared = next(Path("prepared").iterdir())
    loaded = datasets.load_from_disk(str(prepared))
    first = loaded["train"][0]
    assert first["prompt"].startswith("<|im_start|>user\nConvert ") and first["prompt"].endswith("<|im_start|>assistant\n")
    assert first["chosen"].endswith("<|im_end|>") and first["chosen"] != first["rejected"]
    assert len(loaded["train"]) + len(loaded["validation"]) == len(PAIRS)


def scores(model, tokenizer, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        return model(**batch).logits


def test_a_reward_model_learns_to_score_the_chosen_answer_higher(workdir, tiny_model_dir, molt, cache_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = preference_config(workdir, tiny_model_dir, rl=None, reward_model=True, adapter=None, lora_r=None, lora_alpha=None,
                               lora_target_linear=None, max_steps=40, learning_rate=3e-3,
                               datasets=[{"path": "data/pairs.jsonl", "type": "bradley_terry.chat_template"}])
    write_jsonl(workdir / "data" / "pairs.jsonl", [{"input": p["messages"][0]["content"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in PAIRS])
    result = molt("train", config)
    assert result.exit_code == 0, result
    metrics = json.loads(Path("out/metrics.json").read_text())
    assert metrics["eval_after"]["eval_accuracy"] > metrics["eval_before"]["eval_accuracy"], metrics
    model = AutoModelForSequenceClassification.from_pretrained("out").eval()
    tokenizer = AutoTokenizer.from_pretrained("out")
    assert model.config.num_labels == 1
    right, wrong = scores(model, tokenizer, ["<|im_start|>user\nConvert 9 km to m.<|im_end|>\n<|im_start|>assistant\n9 km = 9000 m<|im_end|>",
                                             "<|im_start|>user\nConvert 9 km to m.<|im_end|>\n<|im_start|>assistant\n9 km = 1009 m<|im_end|>"])
    assert right.shape == (1,) and torch.isfinite(right).all() and torch.isfinite(wrong).all()


def test_a_process_reward_model_labels_each_step(workdir, tiny_model_dir, molt):
    from transformers import AutoModelForTokenClassification

    steps = [{"prompt": f"What is {a} + {b}?", "completions": [f"{a} + {b} = {a + b + (i % 2)}", f"So the answer is {a + b + (i % 2)}."],
              "labels": [i % 2 == 0, i % 2 == 0]} for i, (a, b) in enumerate((x, y) for x in range(2, 8) for y in range(3, 7))]
    write_jsonl(workdir / "data" / "steps.jsonl", steps)
    config = preference_config(workdir, tiny_model_dir, rl=None, process_reward_model=True, adapter=None, lora_r=None, lora_alpha=None,
                               lora_target_linear=None, max_steps=30, learning_rate=3e-3,
                               datasets=[{"path": "data/steps.jsonl", "type": "stepwise_supervised"}])
    result = molt("train", config)
    assert result.exit_code == 0, result
    metrics = json.loads(Path("out/metrics.json").read_text())
    assert "eval_accuracy" in metrics["eval_after"] and metrics["eval_loss_after"] < metrics["eval_loss_before"], metrics
    model = AutoModelForTokenClassification.from_pretrained("out").eval()
    assert model.config.num_labels == 2
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 2)


def test_merge_lora_folds_the_preference_adapter(workdir, tiny_model_dir, molt):
    from transformers import AutoModelForCausalLM

    config = preference_config(workdir, tiny_model_dir)
    assert molt("train", config).exit_code == 0
    merged = molt("merge-lora", config)
    assert merged.exit_code == 0, merged
    assert merged.built() == {"merge"}, merged.output
    sample = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        folded = AutoModelForCausalLM.from_pretrained("out/merged").eval()(sample).logits
        adapted = reloaded(Path("out"), tiny_model_dir, True).eval()(sample).logits
    assert (folded - adapted).abs().max() < 1e-4


def test_qlora_dpo_trains_against_the_quantized_base_as_reference(workdir, tiny_model_dir, molt, cache_dir):
    from stages.store import read_table

    config = preference_config(workdir, tiny_model_dir, adapter="qlora", load_in_4bit=True)
    result = molt("train", config)
    assert result.exit_code == 0, result
    metrics = json.loads(Path("out/metrics.json").read_text())
    # before training the adapter is zero: policy and cached reference are the same quantized model
    assert metrics["eval_before"]["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["eval_before"]["eval_loss"] == pytest.approx(0.693147, abs=1e-5)
    quantized = read_table(artifact(cache_dir, "ref_logprobs") / "train.arrow").column("ref_chosen_logps").to_pylist()
    plain = molt("run", preference_config(workdir, tiny_model_dir), "--until", "ref_logprobs", cache=workdir / "plain-cache")
    assert plain.exit_code == 0, plain
    full = read_table(artifact(workdir / "plain-cache", "ref_logprobs") / "train.arrow").column("ref_chosen_logps").to_pylist()
    assert quantized != full  # the 4-bit base is its own reference


def test_rl_adapter_ref_model_takes_the_continued_adapter_as_the_reference(workdir, tiny_model_dir, molt, cache_dir):
    from stages.store import read_table

    config = preference_config(workdir, tiny_model_dir, max_steps=6, learning_rate=1e-2)
    assert molt("train", config).exit_code == 0
    base_ref = read_table(artifact(cache_dir, "ref_logprobs") / "train.arrow").column("ref_chosen_logps").to_pylist()
    continued = molt("run", preference_config(workdir, tiny_model_dir, lora_model_dir="out", rl_adapter_ref_model=True, output_dir="out2"),
                     "--until", "ref_logprobs", cache=workdir / "second")
    assert continued.exit_code == 0, continued
    adapter_ref = read_table(artifact(workdir / "second", "ref_logprobs") / "train.arrow").column("ref_chosen_logps").to_pylist()
    assert adapter_ref != pytest.approx(base_ref, abs=1e-6)
    plain = molt("run", preference_config(workdir, tiny_model_dir, lora_model_dir="out", output_dir="out3"), "--until", "ref_logprobs",
                 cache=workdir / "third")
    assert plain.exit_code == 0, plain
    assert read_table(artifact(workdir / "third", "ref_logprobs") / "train.arrow").column("ref_chosen_logps").to_pylist() == pytest.approx(base_ref, abs=1e-6)


def test_stepwise_rows_label_only_the_last_token_of_each_step(fast_tokenizer):
    from types import SimpleNamespace

    from stages.tokenize_preference import IGNORE, _steps

    def encode(text):
        return fast_tokenizer.encode(text, add_special_tokens=False).ids

    # the row of TRL's stepwise_supervised example, shortened
    prompt, completions, labels = "Which number is larger, 9.8 or 9.11?", ["11 is larger than 8.", "So 9.11 is larger."], [False, False]
    spec = SimpleNamespace(step_separator="\n", max_completion_length=None, train_on_last_step_only=False)
    params = SimpleNamespace(dataset=spec, max_prompt_len=512, sequence_len=512)
    ids, token_labels = _steps(encode, None, prompt, completions, labels, params)
    p, s1, s2, sep = encode(prompt), encode(completions[0]), encode(completions[1]), encode("\n")
    assert ids == p + s1 + sep + s2 + sep
    assert token_labels == [IGNORE] * (len(p) + len(s1) + len(sep) - 1) + [0] + [IGNORE] * (len(s2) + len(sep) - 1) + [0]
    last_only = SimpleNamespace(dataset=SimpleNamespace(step_separator="\n", max_completion_length=None, train_on_last_step_only=True),
                                max_prompt_len=512, sequence_len=512)
    ids, token_labels = _steps(encode, None, prompt, completions, [True, True], last_only)
    assert [t for t in token_labels if t != IGNORE] == [1] and token_labels[-1] == 1


def test_center_rewards_coefficient_pulls_the_rewards_toward_zero(workdir, tiny_model_dir, molt):
    """TRL's center_rewards_coefficient (Axolotl's key) reaches the reward trainer: with a large one
    the scores of the training pairs sit closer to zero than without."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [f"<|im_start|>user\n{p['messages'][0]['content']}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>" for p in PAIRS[:6] for answer in (p["chosen"], p["rejected"])]
    spread = {}
    for coefficient in (None, 10.0):
        config = preference_config(workdir, tiny_model_dir, rl=None, reward_model=True, adapter=None, lora_r=None, lora_alpha=None,
                                   lora_target_linear=None, max_steps=20, learning_rate=3e-3, center_rewards_coefficient=coefficient,
                                   output_dir=f"out-{coefficient}", datasets=[{"path": "data/pairs.jsonl", "type": "bradley_terry.chat_template"}])
        write_jsonl(workdir / "data" / "pairs.jsonl", [{"input": p["messages"][0]["content"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in PAIRS])
        result = molt("train", config)
        assert result.exit_code == 0, result
        model = AutoModelForSequenceClassification.from_pretrained(f"out-{coefficient}").eval()
        tokenizer = AutoTokenizer.from_pretrained(f"out-{coefficient}")
        spread[coefficient] = float(torch.cat([scores(model, tokenizer, [t])[0] for t in texts]).pow(2).mean())
    assert spread[10.0] < spread[None] / 2, spread
