"""Make `models/tiny-math`: the small LLaMA-architecture base model the project uses by default.

It is a real pretrained language model, made from nothing but our own code:
1. a corpus of generated raw text: arithmetic word problems each followed by its worked solution (from
   `data/synth_math.py`, excluding every question of the bundled train and test sets) in a few raw
   layouts (plain, "Q: ... A: ...", numbered worksheets), lines of arithmetic facts, and short generated
   stories. No instruction template appears in it, so a model fine-tuned on the bundled train set has
   a prompt format to learn;
2. a sentencepiece BPE tokenizer trained on that corpus with LLaMA's settings (byte fallback, digits
   split, no normalization), saved so that `AutoTokenizer.from_pretrained` loads it offline;
3. a `LlamaForCausalLM` trained from scratch on the corpus for a fixed number of steps, packed into
   blocks of `--seq_len` tokens, each document between BOS and EOS.

The defaults remake the committed model in about 20 minutes on 2 CPU cores (less than 30):

    python scripts/make_tiny_model.py                        # writes models/tiny-math
    python scripts/make_tiny_model.py --device cuda --hidden_size 512 --num_layers 8 \\
        --steps 20000 --output_dir models/tiny-math-large     # a bigger one on a GPU

The output directory holds the model (`model.safetensors`, `config.json`, `generation_config.json`),
the tokenizer (`tokenizer.model`, `tokenizer.json`, `tokenizer_config.json`) and `pretraining.json`,
the record of the run: its arguments, parameter count, tokens seen, wall time and losses.
"""
import argparse
import io
import json
import math
import os
import random
import sys
import time

import sentencepiece as spm
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import synth_math  # noqa: E402

CORPUS_SEED = 1  # differs from the dataset's seed; the dataset's questions are excluded anyway
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
PROBLEM_SHARE, DRILL_SHARE = 0.75, 0.15  # of documents; the rest are stories

PLACES = ["park", "school", "market", "library", "beach", "farm", "zoo", "garden", "store", "museum", "lake"]
ACTIVITIES = ["played a game", "read a book", "drew a picture", "sang a song", "rode a bike", "ate lunch",
              "fed the ducks", "built a tower", "painted a fence", "flew a kite"]


LABELS = [("Question", "Answer"), ("Q", "A"), ("Problem", "Solution")]


def problem_text(record: dict) -> str:
    """A problem as plain text: the question, a line break, the worked solution."""
    return f"{record['instruction']}\n{record['output']}"


def problem_document(rng: random.Random, problems) -> str:
    """One or more problems from `problems` (an iterator of records), laid out in one of a few raw
    formats: plain, labelled ("Q: ... A: ...") or a numbered worksheet under a heading. Variety keeps the
    model from tying the skill to a single layout; the instruction template is never one of them."""
    layout = rng.random()
    if layout < 0.4:
        return problem_text(next(problems))
    if layout < 0.8:
        question_label, answer_label = rng.choice(LABELS)
        record = next(problems)
        return f"{question_label}: {record['instruction']}\n{answer_label}: {record['output']}"
    items = [f"{i}. {problem_text(next(problems))}" for i in range(1, rng.randint(2, 4) + 1)]
    return f"## Worksheet {rng.randint(1, 99)}\n\n" + "\n\n".join(items)


def drill_document(rng: random.Random) -> str:
    """A line of arithmetic facts over the number ranges the problems use."""
    facts = []
    for _ in range(rng.randint(4, 10)):
        op = rng.choice("+-*/")
        if op == "+":
            a, b = rng.randint(0, 60), rng.randint(0, 60)
            facts.append(f"{a} + {b} = {a + b}.")
        elif op == "-":
            a = rng.randint(1, 99)
            b = rng.randint(0, a)
            facts.append(f"{a} - {b} = {a - b}.")
        else:
            a, b = rng.randint(1, 12), rng.randint(1, 12)
            facts.append(f"{a} * {b} = {a * b}." if op == "*" else f"{a * b} / {a} = {b}.")
    return " ".join(facts)


def story_document(rng: random.Random) -> str:
    """A few plain sentences about people, places and things, for some language beyond the problems."""
    he = rng.choice(["he", "she"])
    name = rng.choice(synth_math.NAMES[he])
    friend = rng.choice([n for n in synth_math.NAMES["he"] + synth_math.NAMES["she"] if n != name])
    place, things = rng.choice(PLACES), rng.choice(synth_math.THINGS + synth_math.FOODS)
    day = rng.choice(synth_math.DAYS)
    container = rng.choice(synth_math.CONTAINERS)[0]
    sentences = [
        f"On {day} {name} went to the {place} with {friend}.",
        f"They {rng.choice(ACTIVITIES)} and then {rng.choice(ACTIVITIES)}.",
        f"{he.capitalize()} saw {rng.randint(2, 30)} {things} there.",
        f"{name} keeps {synth_math.HIS[he]} {things} in a {container}.",
        f"{friend} likes {things} more than anything.",
        f"It was sunny, so they walked home from the {place}.",
        f"The {place} opens at {rng.randint(6, 11)} o'clock.",
    ]
    first = sentences.pop(0)
    return " ".join([first] + rng.sample(sentences, rng.randint(2, 4)))


def documents(seed: int, exclude: set):
    """An endless, seeded stream of corpus documents; problems whose question is in `exclude` are left out."""
    rng = random.Random(seed)
    problems = (r for r in iter(lambda: synth_math.make_problem(rng), None) if r["instruction"] not in exclude)
    while True:
        kind = rng.random()
        if kind < PROBLEM_SHARE:
            yield problem_document(rng, problems)
        elif kind < PROBLEM_SHARE + DRILL_SHARE:
            yield drill_document(rng)
        else:
            yield story_document(rng)


def train_tokenizer(texts: list, vocab_size: int, output_dir: str):
    """Train a sentencepiece BPE like LLaMA's and save it as a transformers LlamaTokenizer."""
    model_proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model_proto,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,  # any text encodes, e.g. the instruction template's '#' and ':'
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,  # keep line breaks: prompts and documents use them
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        max_sentence_length=8192,
        num_threads=1,
        minloglevel=2,
    )
    with open(os.path.join(output_dir, "tokenizer.model"), "wb") as f:
        f.write(model_proto.getvalue())
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}, f)
    # transformers converts tokenizer.model to its own format; save_pretrained writes tokenizer.json.
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    processor = spm.SentencePieceProcessor(model_proto=model_proto.getvalue())
    for text in texts[:2000]:  # the conversion must not change how any text is tokenized
        if tokenizer(text)["input_ids"] != [BOS_ID] + processor.encode(text):
            raise RuntimeError(f"transformers tokenizes {text!r} differently from sentencepiece")
    return tokenizer


def packed_blocks(tokenizer, stream, count: int, seq_len: int) -> torch.Tensor:
    """`count` blocks of `seq_len` tokens: documents, each as BOS ... EOS, laid end to end."""
    needed = count * seq_len
    ids: list[int] = []
    while len(ids) < needed:
        batch = [next(stream) for _ in range(1000)]
        for doc_ids in tokenizer(batch)["input_ids"]:
            ids.extend(doc_ids + [EOS_ID])
    return torch.tensor(ids[:needed]).view(count, seq_len)


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to a tenth of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_loss(model, tokenizer, texts: list, device: str) -> float:
    """Mean next-token loss per token over `texts`, each scored alone (BOS ... EOS)."""
    model.eval()
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"] + [EOS_ID]], device=device)
        loss = model(input_ids=ids, labels=ids).loss
        total += loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    model.train()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "models", "tiny-math"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--intermediate_size", type=int, default=384)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--num_kv_heads", type=int, default=2)
    parser.add_argument("--max_position_embeddings", type=int, default=512)
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per training block")
    parser.add_argument("--batch_size", type=int, default=16, help="blocks per step")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--tokenizer_documents", type=int, default=20000, help="corpus documents the tokenizer learns from")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights; the corpus has its own fixed seed")
    parser.add_argument("--log_every", type=int, default=50)
    args = parser.parse_args()

    started = time.time()
    torch.manual_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    train, test = synth_math.make_splits()
    exclude = {r["instruction"] for r in train + test}
    stream = documents(CORPUS_SEED, exclude)

    tokenizer_texts = [next(stream) for _ in range(args.tokenizer_documents)]
    tokenizer = train_tokenizer(tokenizer_texts, args.vocab_size, args.output_dir)
    tokenizer.model_max_length = args.max_position_embeddings
    tokenizer.save_pretrained(args.output_dir)
    blocks = packed_blocks(tokenizer, stream, args.steps * args.batch_size, args.seq_len)
    print(f"tokenizer: {len(tokenizer)} pieces; corpus: {blocks.numel():,} tokens "
          f"({time.time() - started:.0f}s)", flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,  # the embedding is a large share of so small a model
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    model = LlamaForCausalLM(config).to(args.device)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {parameters:,} parameters", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=0.1)

    model.train()
    train_started, window = time.time(), []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.learning_rate)
        batch = blocks[step * args.batch_size : (step + 1) * args.batch_size].to(args.device)
        with torch.autocast(device_type=args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.time() - train_started
            rate = (step + 1) * blocks.shape[1] * args.batch_size / elapsed
            print(f"step {step + 1}/{args.steps} loss {sum(window) / len(window):.4f} "
                  f"{rate:,.0f} tokens/s {elapsed / 60:.1f} min", flush=True)
            final_loss, window = sum(window) / len(window), []

    test_loss = heldout_loss(model, tokenizer, [problem_text(r) for r in test], args.device)
    model.save_pretrained(args.output_dir)
    record = {
        "arguments": {k: v for k, v in vars(args).items() if k != "output_dir"},  # how it was made, not where
        "parameters": parameters,
        "vocab_size": len(tokenizer),
        "tokens_seen": blocks.numel(),
        "final_train_loss": round(final_loss, 4),
        "heldout_loss": round(test_loss, 4),
        "uniform_loss": round(math.log(len(tokenizer)), 4),
        "wall_time_s": round(time.time() - started),
        "torch_threads": torch.get_num_threads(),
    }
    with open(os.path.join(args.output_dir, "pretraining.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
