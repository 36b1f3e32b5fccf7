"""generate.py's pieces: decoding settings from the UI's knobs, a response streamed token by token, and the
Gradio page around them."""
import threading
from typing import Iterator

import gradio as gr
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from peft_ext.checkpoint import Checkpoint
from peft_ext.generation import cut_at_stops, decoding_config
from peft_ext.modeling import read_adapter_config

POLL_S = 0.2  # how often a beam search (which cannot stream) lets a Stop through
EXAMPLES = [
    ["Tom has 3 apples and buys 5 more. How many apples does he have?", ""],
    ["Answer the question with true or false.", "The sun rises in the west."],
    ["Write a Python function that returns the n-th Fibonacci number.", ""],
]


def decoding(model, tokenizer, stop: tuple[str, ...], temperature: float, top_p: float, top_k: int,
             num_beams: int, max_new_tokens: int):
    """A GenerationConfig from the knobs a user turns: temperature 0 is greedy, top-p/top-k shape sampling only."""
    config = decoding_config(model, tokenizer, int(max_new_tokens), int(num_beams), float(temperature), stop)
    if config.do_sample:
        config.update(top_p=float(top_p), top_k=int(top_k))
    return config


class _StopFlag(StoppingCriteria):
    """Ends a running `generate()` at its next step once `event` is set."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), device=input_ids.device)


def stream_response(model, tokenizer, prompt: str, config) -> Iterator[str]:
    """The response to `prompt` as it grows, cut at the template's stop strings.

    `generate()` runs in a thread and hands text over token by token (beam search cannot stream: its answer
    comes whole). Closing this iterator, as Gradio does on Stop, ends the generation at its next step.
    """
    stop = tuple(config.stop_strings or ())
    batch = tokenizer(prompt, return_tensors="pt")
    batch.pop("token_type_ids", None)
    batch = batch.to(model.device)
    streaming = config.num_beams == 1
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if streaming else None
    flag, outcome = _StopFlag(), {}

    def work():
        try:
            outcome["ids"] = model.generate(
                **batch, generation_config=config, tokenizer=tokenizer,
                stopping_criteria=StoppingCriteriaList([flag]), streamer=streamer,
            )
        except BaseException as e:  # handed to the caller below
            outcome["error"] = e
            if streamer:
                streamer.end()  # unblock the reader

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    text = ""
    try:
        if streaming:
            for piece in streamer:
                text += piece
                yield cut_at_stops(text, stop).strip()
        else:
            while thread.is_alive():
                thread.join(POLL_S)
                yield text
    finally:
        flag.event.set()
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    if not streaming:
        new_tokens = outcome["ids"][0, batch["input_ids"].shape[1]:]
        yield cut_at_stops(tokenizer.decode(new_tokens, skip_special_tokens=True), stop).strip()


def describe(checkpoint: Checkpoint) -> str:
    """One Markdown line: which base model, adapter and template the page answers with."""
    adapter = "none (the base model alone)"
    if checkpoint.adapter_dir:
        config = read_adapter_config(checkpoint.adapter_dir)
        method = checkpoint.run_args.get("adapter_name") or config.get("peft_type", "?").lower()
        if config.get("use_dora"):
            method = "dora"
        if config.get("embedding_lambda"):
            method += f" + SIBO (λ = {config['embedding_lambda']})"
        adapter = f"`{method}` from `{checkpoint.adapter_dir}`"
    template = checkpoint.prompter.name
    return f"**Base model** `{checkpoint.base_model}` · **Adapter** {adapter} · **Template** `{template}`"


def build_app(model, tokenizer, checkpoint: Checkpoint, defaults: dict) -> gr.Blocks:
    """The page: instruction and input with the decoding knobs on the left, the streamed response on the right.

    `defaults` holds the knobs' starting values: temperature, top_p, top_k, num_beams, max_new_tokens.
    """
    prompter = checkpoint.prompter
    stop = tuple(prompter.template.get("stop", ()))

    def respond(instruction, input_text, temperature, top_p, top_k, num_beams, max_new_tokens):
        if not instruction.strip():
            raise gr.Error("Type an instruction first.")
        config = decoding(model, tokenizer, stop, temperature, top_p, top_k, num_beams, max_new_tokens)
        yield from stream_response(model, tokenizer, prompter.prompt(instruction, input_text), config)

    with gr.Blocks(title="LLM-Adapters", analytics_enabled=False) as app:
        gr.Markdown(f"# LLM-Adapters\n{describe(checkpoint)}")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                instruction = gr.Textbox(label="Instruction", lines=4, placeholder="Tell me about alpacas.",
                                         elem_id="instruction")
                input_text = gr.Textbox(label="Input", lines=2, info="Optional context the instruction refers to.",
                                        elem_id="input")
                with gr.Row():
                    submit = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear = gr.Button("Clear")
                with gr.Accordion("Decoding", open=True):
                    # each slider reaches at least the value its flag gave (gradio refuses one beyond its end)
                    temperature = gr.Slider(0, max(2, defaults["temperature"]), value=defaults["temperature"], step=0.05,
                                            label="Temperature", info="0: greedy, the same answer every time")
                    with gr.Row():
                        top_p = gr.Slider(0.05, 1, value=defaults["top_p"], step=0.05, label="Top p",
                                          info="when sampling")
                        top_k = gr.Slider(0, max(100, defaults["top_k"]), value=defaults["top_k"], step=1,
                                          label="Top k", info="when sampling; 0: off")
                    with gr.Row():
                        num_beams = gr.Slider(1, max(4, defaults["num_beams"]), value=defaults["num_beams"], step=1,
                                              label="Beams", info="above 1: beam search, shown when complete")
                        max_new_tokens = gr.Slider(1, max(2000, defaults["max_new_tokens"]), value=defaults["max_new_tokens"],
                                                   step=1, label="Max new tokens", elem_id="max_new_tokens")
            with gr.Column(scale=1):
                response = gr.Textbox(label="Response", lines=18, max_lines=40, interactive=False,
                                      buttons=["copy"], elem_id="response")
        gr.Examples(EXAMPLES, inputs=[instruction, input_text], label="Examples")

        knobs = [instruction, input_text, temperature, top_p, top_k, num_beams, max_new_tokens]
        run = submit.click(respond, knobs, response, api_name="generate", show_progress="minimal")
        stop_button.click(None, cancels=[run])
        clear.click(lambda: ("", "", ""), None, [instruction, input_text, response], api_visibility="private")
    return app
