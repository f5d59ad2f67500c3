"""`molt inference CONFIG`: talk to the model a config trains (Axolotl's `axolotl inference`).

Which model: by default the trained model of CONFIG (trained first when it is not cached, as
Axolotl users run inference after train); `--lora-model-dir DIR` puts that adapter on the config's
base model instead, `--base-model DIR` loads that model directory alone (neither trains).

Prompts: piped stdin is read line by line, each non-empty line one user prompt, rendered with the
tokenizer's chat template (Alpaca's prompt when it has none, or `--prompter alpaca`), and answered
on one stdout line: newlines inside an answer are written `\\n` (a backslash `\\\\`), so answer i
is line i. With `--prompter none` the whole of stdin is one raw text, continued without a
template and printed as generated. On a terminal it is interactive: `>>> ` (on stderr, like
Python's REPL), the answer streamed token by token, until an empty line or Ctrl-D. `--chat` keeps
the conversation: each turn sees the earlier ones. Only answers go to stdout; notes, stage
progress and `--show-prompt`'s rendered prompts (`prompt: "<JSON string>"`) go to stderr.

`--gradio` serves a chat page instead (at --server-name:--server-port): each reply is generated
from the whole conversation shown, rendered and sampled as above, and streamed into the page. It
runs offline: gradio serves its frontend and fonts from the installed package, analytics are off
and nothing is shared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

ALPACA = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class _Params:
    """The config as load_base reads it; --load-in-8bit / --load-in-4bit replace its quantization
    (as they override the config's keys in Axolotl), without them the config's own applies."""

    def __init__(self, config, load_in_8bit: bool, load_in_4bit: bool):
        self._config = config
        self._over = {"load_in_8bit": load_in_8bit, "load_in_4bit": load_in_4bit} if load_in_8bit or load_in_4bit else {}

    def __getattr__(self, name):
        return self._over[name] if name in self._over else getattr(self._config, name, None)


def load_model(params, model_dir: Path, tokenizer_dir: Path, adapter_dir: Path | None = None):
    """(model, tokenizer) in eval mode: `model_dir` loaded as train loads its base (fp32, or 8/4-bit
    through bitsandbytes), with the adapter of `adapter_dir` on it when given."""
    import torch
    from transformers import AutoTokenizer

    from stages.store import DataError
    from stages.training.model import is_causal_lm, load_base, quantization_config, with_trained_adapter

    if not is_causal_lm(getattr(params, "model_type", None)):
        raise DataError(f"model_type {params.model_type}: inference generates text, which needs a causal language model")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=bool(params.trust_remote_code))
    info = Path(tokenizer_dir) / "molt_tokenizer.json"
    vocab = json.loads(info.read_text())["vocab_size"] if info.exists() else len(tokenizer)
    model = load_base(params, model_dir, vocab)
    if adapter_dir is not None:
        model = with_trained_adapter(params, model, adapter_dir)
    if quantization_config(params) is None and torch.cuda.is_available():
        model = model.to("cuda")
    model.config.use_cache = True  # load_base turns it off for packed training; generation wants it
    return model.eval(), tokenizer


def render(tokenizer, messages: list[dict], prompter: str) -> str:
    """The text the model continues for a conversation ending in a user message."""
    if prompter == "chat_template":
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if prompter == "none":
        return "\n".join(m["content"] for m in messages)
    turns = [f"### Instruction:\n{m['content']}\n\n### Response:\n" if m["role"] == "user" else f"{m['content']}\n\n" for m in messages if m["role"] != "system"]
    return ALPACA + "".join(turns)


def answer(model, tokenizer, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
           templated: bool = True, streamer=None) -> str:
    """The model's continuation of `prompt` (greedy unless temperature > 0), special tokens dropped."""
    import torch

    # a chat template writes its own BOS; a raw or Alpaca prompt gets the tokenizer's
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not templated).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=pad, streamer=streamer, **sampling)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _show(prompt: str, show_prompt: bool) -> None:
    if show_prompt:
        sys.stderr.write(f"prompt: {json.dumps(prompt)}\n")
        sys.stderr.flush()


def repl(model, tokenizer, prompter: str, chat: bool, generate: dict, show_prompt: bool = False, stdin=None, stdout=None) -> None:
    """Interactive: `>>> ` on stderr, a line read, its answer streamed to stdout; until an empty
    line or EOF. With `chat` each turn's prompt holds the earlier turns."""
    from transformers import TextStreamer

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    messages: list[dict] = []
    while True:
        sys.stderr.write(">>> ")
        sys.stderr.flush()
        line = stdin.readline()
        if not line.strip():
            sys.stderr.write("\n" if not line else "")
            return
        turn = messages + [{"role": "user", "content": line.strip()}]
        prompt = render(tokenizer, turn, prompter)
        _show(prompt, show_prompt)
        reply = answer(model, tokenizer, prompt, templated=prompter == "chat_template", streamer=streamer, **generate)
        stdout.flush()
        if chat:
            messages = turn + [{"role": "assistant", "content": reply.strip()}]


def piped(model, tokenizer, prompter: str, chat: bool, generate: dict, show_prompt: bool = False, stdin=None) -> None:
    """Non-interactive: one answer per non-empty input line, one line each (newlines escaped);
    with `none` the whole input is one raw text, its continuation printed as it is."""
    stdin = stdin or sys.stdin
    if prompter == "none" and not chat:
        text = stdin.read().strip()
        _show(text, show_prompt)
        click.echo(answer(model, tokenizer, text, templated=False, **generate))
        return
    messages: list[dict] = []
    for line in stdin:
        if not line.strip():
            continue
        turn = messages + [{"role": "user", "content": line.strip()}]
        prompt = render(tokenizer, turn, prompter)
        _show(prompt, show_prompt)
        reply = answer(model, tokenizer, prompt, templated=prompter == "chat_template", **generate).strip()
        click.echo(reply.replace("\\", "\\\\").replace("\n", "\\n"))
        sys.stdout.flush()
        if chat:
            messages = turn + [{"role": "assistant", "content": reply}]


def _text(content) -> str:
    """A chat message's text: gradio gives a string or a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(p if isinstance(p, str) else p.get("text") or "" for p in parts if isinstance(p, (str, dict)))


def _import_gradio():
    """gradio, imported with its analytics off (the env var is read at import); exit 2 when missing."""
    import os

    from stages.cli import fail

    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError:
        fail("--gradio needs gradio: pip install gradio")
    return gradio


def web(model, tokenizer, prompter: str, generate: dict, show_prompt: bool, server_name: str, server_port: int) -> None:
    """Serve a gradio chat page until interrupted; each turn sees the conversation shown in it."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    gr = _import_gradio()

    def reply(message: str, history: list[dict]):
        turn = [{"role": m["role"], "content": _text(m["content"]).strip()} for m in history if m.get("role") in ("user", "assistant")]
        prompt = render(tokenizer, turn + [{"role": "user", "content": message.strip()}], prompter)
        _show(prompt, show_prompt)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: list = []

        def generate_into_streamer():
            try:
                result.append(answer(model, tokenizer, prompt, templated=prompter == "chat_template", streamer=streamer, **generate))
            except Exception as error:  # noqa: BLE001  (raised again below, where gradio shows it)
                result.append(error)
                streamer.end()  # else the loop below waits for tokens forever

        worker = Thread(target=generate_into_streamer, daemon=True)
        worker.start()
        text = ""
        for chunk in streamer:
            text += chunk
            yield text
        worker.join()
        if isinstance(result[0], Exception):
            raise result[0]
        # the whole decode, exactly as piped prints it: streamed pieces can differ at word joins
        yield result[0].strip()

    demo = gr.ChatInterface(reply, title="molt inference", analytics_enabled=False)
    sys.stderr.write(f"serving http://{server_name}:{server_port} (Ctrl-C stops)\n")
    sys.stderr.flush()
    # no Node server for server-side rendering: the page is the package's prebuilt frontend
    demo.launch(server_name=server_name, server_port=server_port, share=False, ssr_mode=False, mcp_server=False, quiet=True)


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("config")
@click.option("--lora-model-dir", type=click.Path(file_okay=False), help="Use this LoRA adapter on the config's base model (no training).")
@click.option("--base-model", type=click.Path(file_okay=False), help="Use this model directory alone (no training, no adapter).")
@click.option("--chat", is_flag=True, help="Keep the conversation: each turn sees the earlier ones.")
@click.option("--prompter", type=click.Choice(["chat_template", "alpaca", "none"]), help="How a prompt is rendered: the tokenizer's chat template (default when it has one), Alpaca's prompt (default otherwise), or none: the raw text continued.")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0: greedy decoding; above: sampling (seeded by the config's seed).")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--load-in-8bit", is_flag=True, help="Load the model 8-bit through bitsandbytes (default: as the config says).")
@click.option("--load-in-4bit", is_flag=True, help="Load the model 4-bit (nf4, bnb_config_kwargs) through bitsandbytes.")
@click.option("--show-prompt", is_flag=True, help='Write each rendered prompt to stderr as `prompt: "<JSON string>"`.')
@click.option("--gradio", is_flag=True, help="Serve a chat page (gradio) instead of reading stdin; each reply sees the conversation.")
@click.option("--server-port", default=7860, show_default=True, type=click.IntRange(1, 65535), help="The --gradio page's port.")
@click.option("--server-name", default="127.0.0.1", show_default=True, help="The --gradio page's address (0.0.0.0: every interface).")
@click.option("--cache-dir", envvar="MOLT_CACHE_DIR", default="cache", show_default=True, type=click.Path(file_okay=False), help="Artifact store (or MOLT_CACHE_DIR).")
@click.pass_context
def inference(ctx, config, lora_model_dir, base_model, chat, prompter, max_new_tokens, temperature, top_p, load_in_8bit, load_in_4bit, show_prompt, gradio, server_port, server_name, cache_dir):
    """Answer prompts with the trained model of CONFIG (trained first if not cached).

    Piped stdin: each non-empty line is one prompt, answered on one stdout line (newlines in an
    answer written as \\n, backslashes as \\\\); `--prompter none`: all of stdin is one raw text,
    continued. On a terminal: `>>> `, answers streamed, until an empty line or Ctrl-D. Only the
    answers go to stdout. --gradio: a chat page at --server-name:--server-port instead."""
    from stages import dag
    from stages.cli import Session, _CACHE_DIR, fail
    from stages.store import DataError
    from stages.ui import console

    _CACHE_DIR[:] = [Path(cache_dir).resolve()]
    if gradio:
        _import_gradio()  # a missing gradio is said before any training or loading
    if lora_model_dir and base_model:
        fail("--lora-model-dir and --base-model: give one (an adapter on the config's base model, or a model directory alone)")
    if load_in_8bit and load_in_4bit:
        fail("--load-in-8bit and --load-in-4bit: give one")
    for option, path, marker, what in (("--lora-model-dir", lora_model_dir, "adapter_config.json", "a LoRA adapter directory"),
                                       ("--base-model", base_model, "config.json", "a model directory")):
        if path and not (Path(path) / marker).is_file():
            fail(f"{option} {Path(path).absolute()}: not {what} (no {marker} in it)")
    session = Session(config, ctx.args, cache_dir)
    params = _Params(session.config, load_in_8bit, load_in_4bit)
    adapter = None
    if base_model:
        model_dir = tokenizer_dir = Path(base_model)
    elif lora_model_dir:
        done = session.resolve(session.plan("tokenizer"))
        model_dir, adapter = done["fetch_model"].artifact.path, Path(lora_model_dir)
        has_tokenizer = any((adapter / name).exists() for name in TOKENIZER_FILES)
        tokenizer_dir = adapter if has_tokenizer else done["tokenizer"].artifact.path
    else:
        trained = dag.target(session.values, "train")
        done = session.resolve(session.plan(trained))
        tokenizer_dir = session.intact(trained).path / "model"
        if (tokenizer_dir / "adapter_config.json").exists():
            model_dir, adapter = done["fetch_model"].artifact.path, tokenizer_dir
        else:
            model_dir = tokenizer_dir
    console.print(f"loading {adapter or model_dir}" + (f" on {model_dir}" if adapter else ""))
    try:
        model, tokenizer = load_model(params, model_dir, tokenizer_dir, adapter)
    except DataError as error:
        fail(str(error))
    except (OSError, ValueError) as error:  # a directory transformers or peft cannot read
        fail(f"loading {adapter or model_dir}: {error}")
    if prompter is None:
        prompter = "chat_template" if tokenizer.chat_template else "alpaca"
    elif prompter == "chat_template" and not tokenizer.chat_template:
        fail(f"--prompter chat_template: the tokenizer of {tokenizer_dir} has no chat template (use --prompter alpaca or none)")
    from transformers import set_seed

    set_seed(session.config.seed if session.config.seed is not None else 42)
    generate = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    if gradio:
        web(model, tokenizer, prompter, generate, show_prompt, server_name, server_port)
    elif sys.stdin.isatty():
        repl(model, tokenizer, prompter, chat, generate, show_prompt)
    else:
        piped(model, tokenizer, prompter, chat, generate, show_prompt)


if __name__ == "__main__":  # `python -m stages.inference ...` before stages/cli.py registers the command
    from stages.cli import main

    main.add_command(inference)
    main()
