"""generate.py: plain answers, the streamed response, and the Gradio page driven in headless Chromium."""
import importlib.util
import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import gradio as gr
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoints import make_checkpoint, save_wide_llama
from conftest import ROOT, ctrl_c_reaches_it
from peft_ext.checkpoint import load_for_inference, resolve_checkpoint
from peft_ext.demo import decoding, stream_response
from peft_ext.errors import UsageError
from peft_ext.generation import generate as generate_batch
from tiny import without_eos

spec = importlib.util.spec_from_file_location("generate_script", os.path.join(ROOT, "generate.py"))
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)

QUESTION = "What is 12*7?"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")  # wherever it is installed
# Headless Chromium on a machine with no network: no sandbox (root), nothing that phones home.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = os.path.join(ROOT, "test-artifacts")


@pytest.fixture(scope="module")
def lora_model(llama_lora):
    checkpoint = resolve_checkpoint(adapter_dir=llama_lora)
    model, tokenizer = load_for_inference(checkpoint)
    return model, tokenizer, checkpoint.prompter


def greedy(model, tokenizer, max_new_tokens=24, num_beams=1):
    return decoding(model, tokenizer, (), temperature=0, top_p=0.75, top_k=40, num_beams=num_beams,
                    max_new_tokens=max_new_tokens)


# plain mode

@pytest.mark.parametrize("method, options", [
    (None, {}), ("lora", {}), ("dora", {}), ("ia3", {}), ("bottleneck", {}), ("prefix-tuning", {}),
    ("prompt-tuning", {}), ("lora", {"embedding_lambda": 0.3, "target_modules": ["q_proj", "up_proj"]}),
])
def test_prompt_prints_one_answer_with_any_adapter(llama, tmp_path, capsys, method, options):
    flags = dict(base_model=llama)
    if method:
        flags = dict(weights_path=make_checkpoint(llama, str(tmp_path / "ckpt"), method, **options))
    generate.main(prompt=QUESTION, max_new_tokens=8, **flags)
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("num_beams", [1, 2])
def test_a_model_without_an_eos_token_answers_up_to_its_budget(llama, tmp_path, capsys, num_beams):
    """With no EOS, nor an UNK to pad with (beams pad with BOS then), it stops at a stop string or the budget."""
    model = without_eos(llama, str(tmp_path / "no-eos"))
    generate.main(prompt=QUESTION, base_model=model, max_new_tokens=8, num_beams=num_beams)
    assert capsys.readouterr().out.strip()


def test_prompts_file_prints_a_json_line_per_instruction(llama_lora, lora_model, tmp_path, capsys):
    questions = [QUESTION, "Tell me about alpacas.", "Which answer is correct? (A) 1 (B) 2"]
    (tmp_path / "questions.txt").write_text("\n".join(questions[:2]) + "\n\n" + questions[2] + "\n")
    generate.main(lora_weights=llama_lora, prompts_file=str(tmp_path / "questions.txt"), batch_size=2,
                  max_new_tokens=10)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["instruction"] for row in rows] == questions
    model, tokenizer, prompter = lora_model
    alone = [generate_batch(model, tokenizer, [prompter.prompt(q)], greedy(model, tokenizer, 10))[0] for q in questions]
    assert [row["response"] for row in rows] == alone  # batching changes no answer


def test_a_prompts_file_with_a_byte_order_mark_starts_with_its_first_instruction(tmp_path):
    (tmp_path / "questions.txt").write_bytes("\ufeff".encode() + QUESTION.encode() + b"\n")
    assert generate._read_instructions(str(tmp_path / "questions.txt")) == [QUESTION]


def test_bad_input_gives_one_clear_error(llama, llama_lora, tmp_path):
    (tmp_path / "empty").mkdir()
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9?\n".encode("latin-1"))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    wide = save_wide_llama(llama, str(tmp_path / "wide"))
    cases = [
        (dict(lora_weights=str(tmp_path / "missing"), prompt=QUESTION), "does not exist"),
        (dict(lora_weights=str(tmp_path / "empty"), prompt=QUESTION), "holds no adapter_config.json"),
        (dict(lora_weights=llama_lora, base_model=wide, prompt=QUESTION), "does not fit this base model"),
        (dict(lora_weights=llama_lora, prompt=QUESTION, prompts_file="q.txt"), "exclude each other"),
        (dict(lora_weights=llama_lora, prompts_file=str(tmp_path / "none.txt")), "cannot read --prompts_file"),
        (dict(lora_weights=llama_lora, prompts_file=str(latin1)), "is not UTF-8 text"),
        (dict(lora_weights=llama_lora, auth="nocolon"), "--auth takes user:password"),
        (dict(lora_weights=llama_lora, weights_path=llama, prompt=QUESTION), "name the same thing"),
        (dict(lora_weights=llama_lora, server_port=99999), "port number from 1 to 65535"),
        (dict(lora_weights=llama_lora, prompt=QUESTION, temperature=0.5, top_p=2.0), "--top_p must be in"),
        (dict(lora_weights=llama_lora, prompt=QUESTION, temperature=0.5, top_k=-1), "--top_k at least 0"),
        (dict(lora_weights=llama_lora, server_port=busy.getsockname()[1]), "pass a free --server_port"),
        (dict(lora_weights=llama_lora, server_name="no.such.host.invalid"), "check --server_name"),
        (dict(lora_weights=llama_lora, prompt="  "), "--prompt is empty: give an instruction"),
        (dict(base_model=str(tmp_path / "empty"), prompt=QUESTION), "holds no config.json: it is not a model folder"),
    ]
    for flags, message in cases:
        with pytest.raises(UsageError, match=message):
            generate.main(**flags)
    busy.close()


def test_page_is_local_only_unless_asked(llama_lora, monkeypatch):
    launched, probed = [], []
    monkeypatch.setattr(generate, "serve", lambda app, **kwargs: launched.append(kwargs))
    monkeypatch.setattr(generate, "_check_port", lambda host, port: probed.append((host, port)))
    generate.main(lora_weights=llama_lora)
    generate.main(lora_weights=llama_lora, server_name="0.0.0.0", server_port=9000, share_gradio=True,
                  auth="ann:secret")
    assert [(k["server_name"], k["server_port"], k["share"], k["auth"]) for k in launched] == [
        ("127.0.0.1", 7860, False, None), ("0.0.0.0", 9000, True, ("ann", "secret")),
    ]
    assert probed == [("127.0.0.1", 7860), ("0.0.0.0", 9000)]  # checked before the model loads


def test_each_slider_reaches_the_value_its_flag_gave(lora_model):
    """gradio refuses a value beyond a slider's end: `--num_beams 8` would fail every Generate on the page."""
    model, tokenizer, _ = lora_model
    knobs = dict(temperature=3.0, top_p=0.9, top_k=200, num_beams=8, max_new_tokens=4096)
    app = generate.build_app(model, tokenizer, resolve_checkpoint(), knobs)
    sliders = {block.label: block for block in app.blocks.values() if isinstance(block, gr.Slider)}
    assert {label: (s.value, s.maximum) for label, s in sliders.items() if label != "Top p"} == {
        "Temperature": (3.0, 3.0), "Top k": (200, 200), "Beams": (8, 8), "Max new tokens": (4096, 4096)}


# the streamed response

def test_knobs_shape_sampling_only(lora_model):
    model, tokenizer, _ = lora_model
    greedy_config = decoding(model, tokenizer, ("###",), 0.0, 0.5, 10, 1, 16)
    sampling = decoding(model, tokenizer, ("###",), 0.7, 0.5, 10, 1, 16)
    assert not greedy_config.do_sample and greedy_config.stop_strings == ["###"]
    assert (sampling.do_sample, sampling.temperature, sampling.top_p, sampling.top_k) == (True, 0.7, 0.5, 10)


def test_stream_grows_to_the_plain_answer(lora_model):
    model, tokenizer, prompter = lora_model
    config = greedy(model, tokenizer)
    steps = list(stream_response(model, tokenizer, prompter.prompt(QUESTION), config))
    assert len(steps) > 5 and steps[-1]
    assert all(later.startswith(earlier) for earlier, later in zip(steps, steps[1:]) if earlier)
    assert steps[-1] == generate_batch(model, tokenizer, [prompter.prompt(QUESTION)], config)[0]


def test_beam_search_answer_comes_whole(lora_model):
    model, tokenizer, prompter = lora_model
    config = greedy(model, tokenizer, max_new_tokens=12, num_beams=2)
    steps = list(stream_response(model, tokenizer, prompter.prompt(QUESTION), config))
    assert set(steps[:-1]) <= {""}
    assert steps[-1] == generate_batch(model, tokenizer, [prompter.prompt(QUESTION)], config)[0]


def test_closing_the_stream_stops_generation(lora_model):
    """What Gradio does on Stop: the generation thread must end too, not run on to max_new_tokens."""
    model, tokenizer, prompter = lora_model
    steps = []
    hook = model.get_input_embeddings().register_forward_hook(lambda *args: steps.append(1))
    try:
        stream = stream_response(model, tokenizer, prompter.prompt(QUESTION), greedy(model, tokenizer, 2000))
        for _ in range(3):
            next(stream)
        stream.close()  # returns once the generation thread has ended
        after_close = len(steps)
        time.sleep(0.5)
    finally:
        hook.remove()
    assert after_close < 100 and len(steps) == after_close


# the page, as a person uses it

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endless_lora(llama, tmp_path_factory):
    """A LoRA checkpoint on a tiny LLaMA that never ends an answer by itself (its EOS logit is always 0, below
    the best of the others), so that Stop has a long generation to stop."""
    base = str(tmp_path_factory.mktemp("endless") / "llama")
    model = AutoModelForCausalLM.from_pretrained(llama)
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] = 0
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(llama).save_pretrained(base)
    return make_checkpoint(base, str(tmp_path_factory.mktemp("ckpt") / "llama-lora"))


@pytest.fixture(scope="module")
def server(endless_lora, tmp_path_factory):
    """generate.py serving the tiny LLaMA + LoRA on a free local port; yields its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "generate.py", "--lora_weights", endless_lora, "--server_port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    pytest.fail(f"generate.py did not serve {url}:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_ctrl_c_stops_the_server_with_one_line(endless_lora):
    port = free_port()
    process = subprocess.Popen([sys.executable, "generate.py", "--lora_weights", endless_lora, "--server_port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}, preexec_fn=ctrl_c_reaches_it)
    try:
        ready = process.stdout.readline()
        while ready and not ready.startswith("serving the demo"):
            ready = process.stdout.readline()
        assert ready == f"serving the demo at http://127.0.0.1:{port}/; Ctrl-C stops it\n"
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and "share=True" not in out + err
    assert err.rstrip("\n").splitlines()[-1] == "interrupted: the demo is stopped; every response printed is complete"


@pytest.fixture
def page(server):
    """A headless Chromium page on the app (Playwright driving Debian's /usr/bin/chromium)."""
    if not CHROMIUM:
        pytest.skip("no chromium on PATH: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.outside_requests = []
        page.on("request", lambda r: r.url.startswith((server, "data:")) or page.outside_requests.append(r.url))
        page.goto(server)
        page.wait_for_selector("#instruction textarea", timeout=60_000)  # Gradio renders in the browser
        yield page
        browser.close()


# Records every value the response box shows, as the browser paints it.
WATCH_RESPONSE = """() => {
    window.responseValues = [];
    const box = document.querySelector('#response textarea');
    const watch = () => {
        const values = window.responseValues;
        if (values[values.length - 1] !== box.value) values.push(box.value);
        requestAnimationFrame(watch);
    };
    watch();
}"""


def settled_response(page, timeout_s: float = 60) -> str:
    """The response box's text once it is non-empty and has not changed for a second."""
    box, last, deadline = page.locator("#response textarea"), None, time.time() + timeout_s
    while time.time() < deadline:
        value = box.input_value()
        if value and value == last:
            return value
        last = value
        page.wait_for_timeout(1000)
    raise AssertionError(f"the response did not settle within {timeout_s} s; last seen: {last!r}")


STOP_WHEN_LONGER = """n => new Promise(resolve => {
    const check = () => {
        if (document.querySelector('#response textarea').value.length > n) {
            document.querySelector('#stop').click();
            resolve();
        } else requestAnimationFrame(check);
    };
    check();
})"""


def test_page_streams_an_answer_and_stops(page):
    assert "llama-lora" in page.locator("body").inner_text()  # says which checkpoint answers
    page.locator("#instruction textarea").fill(QUESTION)
    page.evaluate(WATCH_RESPONSE)
    page.locator("#generate").click()
    answer = settled_response(page)
    seen = [v for v in page.evaluate("window.responseValues") if v]
    assert answer.strip() and len(seen) > 1 and seen[-1] == answer  # it grew on screen, token by token
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "generate.png"), full_page=True)

    # 2000 tokens, stopped once past the 128 of the first answer (greedy: the same answer, continued)
    max_new_tokens = page.locator("#max_new_tokens input[type=number]")
    max_new_tokens.fill("2000")
    max_new_tokens.blur()
    page.locator("#generate").click()
    # Stop from inside the page the moment the answer passes the first one: a click sent from here could
    # arrive after all 2000 tokens of so small a model on a busy machine.
    page.evaluate(STOP_WHEN_LONGER, len(answer) + 20)
    stopped = settled_response(page)
    assert stopped.startswith(answer) and len(stopped) < 8 * len(answer)  # well short of 2000 tokens

    # and the page answers again
    max_new_tokens.fill("8")
    max_new_tokens.blur()
    page.locator("#generate").click()
    page.wait_for_function("v => document.querySelector('#response textarea').value !== v", arg=stopped)
    assert answer.startswith(settled_response(page))
    assert page.outside_requests == []  # the page fetched nothing from outside this machine


def test_gradio_client_gets_the_streamed_answer(server):
    client_module = pytest.importorskip("gradio_client")
    client = client_module.Client(server, verbose=False)
    job = client.submit(QUESTION, "", 0.0, 0.75, 40, 1, 24, api_name="/generate")
    answer = job.result(timeout=120)
    assert answer.strip()
    streamed = [out for out in job.outputs() if out]
    assert len(streamed) > 1 and streamed[-1] == answer
    assert client.predict(QUESTION, "", 0.0, 0.75, 40, 2, 24, api_name="/generate").strip()  # beam search
    with pytest.raises(Exception, match="Type an instruction first"):
        client.predict(" ", "", 0.0, 0.75, 40, 1, 24, api_name="/generate")
