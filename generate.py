"""Talk to a base model plus an adapter checkpoint: a Gradio page, or plain answers for scripts.

    python generate.py                     # after a bare `python finetune.py`: its adapter, on 127.0.0.1:7860
    python generate.py --lora_weights ./trained_models/llama-lora                    # web page on 127.0.0.1:7860
    python generate.py --lora_weights ./trained_models/llama-lora --prompt "What is 12*7?"
    python generate.py --lora_weights ./trained_models/llama-lora --prompts_file questions.txt

The checkpoint (finetune.py's output_dir) names its base model, prompt template and tokenizer, and carries
its adapter's settings (SIBO's included); --base_model alone serves a plain or merged model. The page
streams the response token by token and listens on 127.0.0.1 only, unless --server_name says otherwise;
--share_gradio opens a public gradio.live link, --auth user:pass asks for a login. --prompt prints the
answer; --prompts_file (one instruction per line) prints a JSON line {"instruction", "response"} per line.
The decoding flags set the page's starting values and plain mode's decoding.
"""
if __name__ == "__main__":  # first, and only when run: Ctrl-C while the libraries load ends in one line
    import peft_ext.quiet_start  # noqa: F401

import json
import os
import socket
import time

import transformers  # not `from transformers import set_seed`: that loads bitsandbytes before peft_ext quiets it

from peft_ext import bundled
from peft_ext.checkpoint import adapter_dir_flag, load_for_inference, resolve_checkpoint
from peft_ext.demo import build_app, decoding
from peft_ext.errors import UsageError, run_cli
from peft_ext.generation import generate
from peft_ext.modeling import ADAPTER_CONFIG


def main(
    base_model: str = "",
    lora_weights: str = "",
    weights_path: str = "",
    prompt_template_name: str = "",
    load_8bit: bool = False,
    load_4bit: bool = False,
    prompt: str = None,
    prompts_file: str = "",
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 0.75,
    top_k: int = 40,
    num_beams: int = 1,
    max_new_tokens: int = 128,
    seed: int = 42,
    server_name: str = "127.0.0.1",
    server_port: int = 7860,
    share_gradio: bool = False,
    auth: str = "",
    trust_remote_code: bool = False,
):
    """Serve a model plus an adapter checkpoint on a local web page, or print its answers to --prompt or
    --prompts_file.

    Args:
        base_model: base or merged model directory or hub id (default: the checkpoint's run.json / adapter_config.json).
        lora_weights: the adapter checkpoint directory (default: ./trained_models/lora if it is there, else none).
        weights_path: the seed's other name for --lora_weights.
        prompt_template_name: template in templates/ or a JSON path (default: the checkpoint's prompt_template.json, else alpaca).
        load_8bit: load the base model in 8-bit (bitsandbytes).
        load_4bit: load the base model in 4-bit NF4 (bitsandbytes).
        prompt: plain mode: answer this instruction, print the answer and exit.
        prompts_file: plain mode: a text file of one instruction per line; prints a JSON line per instruction.
        batch_size: plain mode: instructions decoded together.
        temperature: 0: greedy; above 0: sampling at this temperature, with top_p and top_k.
        top_p: sampling: keep the smallest set of tokens whose probabilities reach this sum.
        top_k: sampling: keep the K most likely tokens.
        num_beams: above 1: beam search (the page then shows the answer once it is complete).
        max_new_tokens: answer budget in tokens.
        seed: random seed for sampling.
        server_name: address the page listens on; 0.0.0.0 for every interface (anyone who can reach the machine).
        server_port: port of the page.
        share_gradio: also open a public gradio.live link: anyone with it can use the model.
        auth: "user:password" to ask for a login on the page.
        trust_remote_code: allow model code from the hub (off by default: it runs foreign code).
    """
    # parse
    if prompt is not None and prompts_file:
        raise UsageError("--prompt and --prompts_file exclude each other; give one")
    if prompt is not None and not prompt.strip():
        raise UsageError("--prompt is empty: give an instruction, or leave --prompt out to serve the page")
    if temperature < 0 or num_beams < 1 or max_new_tokens < 1 or batch_size < 1:
        raise UsageError("--temperature must be at least 0, --num_beams, --max_new_tokens and --batch_size at least 1")
    if not 0 < top_p <= 1 or top_k < 0:
        raise UsageError(f"--top_p must be in (0, 1] and --top_k at least 0 (0: no top-k cut); got {top_p} and {top_k}")
    login = None
    if auth:
        user, colon, password = str(auth).partition(":")
        if not (user and colon and password):
            raise UsageError("--auth takes user:password")
        login = (user, password)
    instructions = [prompt] if prompt is not None else _read_instructions(prompts_file) if prompts_file else []
    if not instructions:
        _check_port(server_name, server_port)  # now, not after minutes of loading the model
    adapter_dir = adapter_dir_flag(lora_weights, weights_path)
    if not (base_model or adapter_dir) and os.path.isfile(os.path.join(bundled.OUTPUT_DIR, ADAPTER_CONFIG)):
        adapter_dir = bundled.OUTPUT_DIR  # what a bare `python finetune.py` trained
        print(f"no --lora_weights: serving {adapter_dir}, finetune.py's default output")
    checkpoint = resolve_checkpoint(base_model, adapter_dir, prompt_template_name)

    # load
    model, tokenizer = load_for_inference(checkpoint, load_8bit, load_4bit, trust_remote_code)
    transformers.set_seed(seed)
    knobs = dict(temperature=temperature, top_p=top_p, top_k=top_k, num_beams=num_beams, max_new_tokens=max_new_tokens)

    # run: plain answers, or the page
    if instructions:
        stop = tuple(checkpoint.prompter.template.get("stop", ()))
        config = decoding(model, tokenizer, stop, **knobs)
        for start in range(0, len(instructions), batch_size):
            chunk = instructions[start:start + batch_size]
            responses = generate(model, tokenizer, [checkpoint.prompter.prompt(i) for i in chunk], config)
            for instruction, response in zip(chunk, responses):
                line = response if prompt is not None else json.dumps({"instruction": instruction, "response": response})
                print(line, flush=True)
        return
    if (server_name != "127.0.0.1" or share_gradio) and not login:
        print("warning: no --auth, and other machines can reach the page: anyone who does can use the model")
    serve(build_app(model, tokenizer, checkpoint, knobs).queue(),
          server_name=server_name, server_port=server_port, share=share_gradio, auth=login)


def serve(app, **launch) -> None:
    """Serve the page until Ctrl-C, which run_cli ends with one line and the shell's status 130 (gradio's own
    wait would print its message and exit 0)."""
    app.launch(prevent_thread_lock=True, quiet=True, **launch)
    public = f" and at {app.share_url}" if app.share_url else ""
    print(f"serving the demo at {app.local_url}{public}; Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        app.close(verbose=False)  # quietly: the Ctrl-C line says it


def _check_port(host: str, port: int) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise UsageError(f"--server_port must be a port number from 1 to 65535, got {port!r}")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: a port in TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}); pass a free --server_port, "
                             "or check --server_name") from None


def _read_instructions(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first instruction
            instructions = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise UsageError(f"cannot read --prompts_file {path!r}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompts_file {path!r} is not UTF-8 text ({e}); save it as UTF-8") from None
    if not instructions:
        raise UsageError(f"--prompts_file {path!r} holds no instruction")
    return instructions


if __name__ == "__main__":
    run_cli(main, interrupted="the demo is stopped; every response printed is complete")
