"""`molt inference`: piped prompts answered one per line and reproducibly, the model each option
names (trained, --lora-model-dir, --base-model), raw continuation, an interactive --chat under a
pseudo-terminal whose second prompt holds the first turn, and bad directories refused."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO
from stages.inference import inference

QUESTIONS = "Convert 3 km to m.\nSay hi.\n"
SHORT = ["--max-new-tokens", "8"]


def molt_command() -> list[str]:
    """The `molt` executable once stages/cli.py registers the command; until then the module's own entry."""
    from stages.cli import main

    if "inference" in main.commands:
        return [str(REPO / ".venv" / "bin" / "molt")]
    return [sys.executable, "-m", "stages.inference"]


def run_inference(*args, input: str = "") -> tuple[int, str, str]:
    """In-process `molt inference ARGS` with `input` piped: (exit code, stdout, stderr)."""
    from stages.ui import console

    old_width = console._width
    console.width = 240  # no wrapping inside the messages the tests look for
    try:
        result = CliRunner().invoke(inference, [str(a) for a in args], input=input)
    finally:
        console._width = old_width
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def greedy(model_dir: Path, prompt: str, templated: bool, tokens: int = 8) -> str:
    """What transformers alone answers: the reference for --base-model."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if templated:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not templated)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_piped_prompts_get_one_answer_line_each_reproducibly(make_config, molt, workdir):
    config = make_config()
    assert molt("train", config).exit_code == 0
    command = [*molt_command(), "inference", str(config), "--cache-dir", str(workdir / "cache"), *SHORT]
    runs = [subprocess.run(command, input=QUESTIONS, capture_output=True, text=True, cwd=workdir, timeout=300) for _ in range(2)]
    for done in runs:
        assert done.returncode == 0, done.stderr
        answers = done.stdout.split("\n")
        assert len(answers) == 3 and answers[2] == "" and all(a.strip() for a in answers[:2]), done.stdout
        assert "built" not in done.stdout and "loading" in done.stderr  # only answers on stdout
    assert runs[0].stdout == runs[1].stdout


def test_each_option_uses_exactly_the_model_it_names(make_config, molt, tiny_model_dir):
    config_a = make_config("a.yml", learning_rate=0.05, output_dir="out_a")
    config_b = make_config("b.yml", learning_rate=0.05, seed=7, output_dir="out_b")
    for config in (config_a, config_b):
        assert molt("train", config).exit_code == 0
    code, trained_a, _ = run_inference(config_a, *SHORT, input=QUESTIONS)
    assert code == 0 and len(trained_a.splitlines()) == 2
    # a config never trained: --lora-model-dir trains nothing and answers as the adapter's own run did
    untrained = make_config("c.yml", learning_rate=0.3, output_dir="out_c")
    code, adapter_a, err = run_inference(untrained, "--lora-model-dir", "out_a", *SHORT, input=QUESTIONS)
    assert code == 0 and adapter_a == trained_a and "▶ train" not in err, err
    code, adapter_b, _ = run_inference(config_a, "--lora-model-dir", "out_b", *SHORT, input=QUESTIONS)
    assert code == 0 and adapter_b != adapter_a
    code, base, err = run_inference(untrained, "--base-model", tiny_model_dir, *SHORT, input=QUESTIONS)
    assert code == 0 and base != adapter_a and "built" not in err
    assert base.splitlines() == [greedy(tiny_model_dir, q, templated=True).strip() for q in QUESTIONS.splitlines()]
    # --prompter none: all of stdin is one text, continued as it is
    code, raw, err = run_inference(untrained, "--base-model", tiny_model_dir, "--prompter", "none", "--show-prompt", *SHORT, input=QUESTIONS)
    assert code == 0 and raw == greedy(tiny_model_dir, QUESTIONS.strip(), templated=False) + "\n"
    assert [json.loads(line.split(": ", 1)[1]) for line in err.splitlines() if line.startswith("prompt: ")] == [QUESTIONS.strip()]


def _through_pty(command: list[str], cwd: Path, typed: str, timeout: float = 300) -> tuple[int, str, str]:
    """Run `command` with stdin and stdout on a pseudo-terminal (echo off, so the terminal shows only
    what the command writes) and stderr to a file; type `typed`. (exit code, terminal text, stderr)."""
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    err = cwd / "stderr.txt"
    with err.open("w") as err_file:
        proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=err_file, cwd=cwd, close_fds=True)
    os.close(slave)
    os.write(master, typed.encode())
    seen, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the command exited: the terminal's other side is closed
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, seen.decode(errors="replace").replace("\r\n", "\n"), err.read_text()


def test_chat_on_a_terminal_streams_answers_and_keeps_the_conversation(make_config, workdir):
    config = make_config()
    command = [*molt_command(), "inference", str(config), "--cache-dir", str(workdir / "cache"), "--chat", "--show-prompt", *SHORT]
    # not trained yet: inference trains first, as Axolotl users run it after train
    code, terminal, err = _through_pty(command, workdir, "Convert 3 km to m.\nSay hi.\n\n")
    assert code == 0, err
    assert "built" in err and err.count(">>> ") == 3, err
    prompts = [json.loads(line.split(": ", 1)[1]) for line in err.replace(">>> ", "\n").splitlines() if line.startswith("prompt: ")]
    assert len(prompts) == 2, err
    first_answer = terminal.split("\n")[0].strip()
    assert first_answer and len(terminal.strip().split("\n")) == 2, terminal
    assert "Convert 3 km to m." in prompts[0] and first_answer not in prompts[0]
    second = prompts[1]
    assert second.index("Convert 3 km to m.") < second.index(first_answer) < second.index("Say hi."), second
    # without --chat each prompt stands alone
    code, _, err = _through_pty([a for a in command if a != "--chat"], workdir, "Convert 3 km to m.\nSay hi.\n\n")
    prompts = [json.loads(line.split(": ", 1)[1]) for line in err.replace(">>> ", "\n").splitlines() if line.startswith("prompt: ")]
    assert code == 0 and len(prompts) == 2 and "Convert 3 km" not in prompts[1], err


def test_bad_directories_are_refused_naming_them(make_config, workdir, tiny_model_dir):
    config = make_config()
    code, _, err = run_inference(config, "--lora-model-dir", tiny_model_dir, input="Hi.\n")
    assert code == 2 and f"--lora-model-dir {tiny_model_dir}: not a LoRA adapter directory (no adapter_config.json" in err, err
    (workdir / "empty").mkdir()
    code, _, err = run_inference(config, "--base-model", "empty", input="Hi.\n")
    assert code == 2 and f"--base-model {workdir / 'empty'}: not a model directory" in err, err
    code, _, err = run_inference(config, "--base-model", tiny_model_dir, "--lora-model-dir", "empty", input="Hi.\n")
    assert code == 2 and "give one" in err, err


def test_load_in_8bit_and_4bit_answer_through_bitsandbytes(make_config, tiny_model_dir):
    config = make_config()
    for flag in ("--load-in-8bit", "--load-in-4bit"):
        code, out, err = run_inference(config, "--base-model", tiny_model_dir, flag, *SHORT, input="Say hi.\n")
        assert code == 0 and len(out.splitlines()) == 1 and out.strip(), err
