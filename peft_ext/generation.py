"""Batched text generation for inference scripts: padding, the KV cache (with a run's shared prompt prefix
read once), stop strings."""
import inspect

import torch
from peft import PeftType
from transformers import Cache, DynamicCache, GenerationConfig
from transformers.cache_utils import DynamicLayer


def decoding_config(model, tokenizer, max_new_tokens: int, num_beams: int = 1, temperature: float = 0.0,
                    stop: tuple[str, ...] = ()) -> GenerationConfig:
    """Greedy (temperature 0) or sampling, with or without beams, stopping at EOS and at `stop`.

    Built from scratch with only the model's token ids (its EOS ids above all), as the reference's
    evaluate.py did, so that a checkpoint's generation defaults (say sampling at temperature 0.6, or a
    repetition penalty) never leak in: greedy means the most likely token, nothing else.
    """
    sampling = temperature > 0
    model_config = model.generation_config
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=sampling,
        temperature=temperature if sampling else 1.0,
        top_p=1.0,
        top_k=0 if sampling else 50,  # neutral values: no warnings, and plain temperature sampling
        use_cache=True,
        bos_token_id=model_config.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=model_config.eos_token_id if model_config.eos_token_id is not None else tokenizer.eos_token_id,
        stop_strings=list(stop) or None,
    )


def pads_safely(model) -> bool:
    """False for adapters that insert virtual tokens before the input (prompt tuning, p-tuning): under
    peft 0.21 their generate() numbers positions as if left padding were text, so a padded row's result
    changes. Batches for such a model must hold prompts of one length."""
    config = getattr(model, "active_peft_config", None)
    return not (config and config.is_prompt_learning and config.peft_type != PeftType.PREFIX_TUNING)


def cut_at_stops(text: str, stop: tuple[str, ...]) -> str:
    for marker in stop:
        text = text.split(marker, 1)[0]
    return text


# Rows per forward call when reading prompts: a batch is read in chunks of like lengths, each padded only to
# its own longest prompt, since reading the prompts is most of a batch's arithmetic on a CPU.
PREFILL_ROWS = 8
# Positions a KV cache buffer gains when a decoding step finds it full.
CACHE_GROWTH = 64


class SharedPrefix:
    """The tokens that all of a run's prompts start with (the template's header), and their KV cache,
    computed once for the run and reused by every batch, so that no row reads them again.

    The prefix is the longest common prefix of the prompts' token ids, not of their text, whose tokenization
    could merge across the boundary; less one token where a prompt would be all prefix, since each row must
    read a token of its own to give the logits of its first new token.
    """

    def __init__(self, tokenizer, prompts: list[str]):
        rows = tokenizer(prompts)["input_ids"]
        shortest = min(len(row) for row in rows)
        common = next((i for i, column in enumerate(zip(*rows)) if len(set(column)) > 1), shortest)
        self.ids = rows[0][:min(common, shortest - 1)]
        self._model, self._kv = None, []

    def kv(self, model) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys and values of the prefix (a batch of one), computed by `model` on first use."""
        if self._model is not model:
            cache = DynamicCache()
            model(input_ids=torch.tensor([self.ids], device=model.device), past_key_values=cache, use_cache=True)
            self._model, self._kv = model, [(layer.keys, layer.values) for layer in cache.layers]
        return self._kv


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], config: GenerationConfig, prefix: SharedPrefix | None = None) -> list[str]:
    """The responses to `prompts` (new text only, cut at the stop strings, stripped), as one batch.

    Each row's result is the same as generating it alone. Greedy decoding runs our own loop (`greedy_tokens`),
    which reuses `prefix`'s KV cache where it can; beams and sampling run transformers' generate on the
    left-padded batch.
    """
    stop = tuple(config.stop_strings or ())
    if runs_greedy_loop(model, config):
        new_tokens = greedy_tokens(model, tokenizer, tokenizer(prompts)["input_ids"], config, prefix)
    else:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
        output = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                generation_config=config, tokenizer=tokenizer)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [cut_at_stops(text, stop).strip() for text in texts]


def runs_greedy_loop(model, config: GenerationConfig) -> bool:
    """Greedy decoding without prompt-learning adapters, whose virtual tokens only peft's generate places.
    The loop reads the budget, EOS and stop strings of `config`; `decoding_config` sets nothing else
    that changes a greedy choice."""
    peft_config = getattr(model, "active_peft_config", None)
    return config.num_beams == 1 and not config.do_sample and not (peft_config and peft_config.is_prompt_learning)


class GrowingLayer(DynamicLayer):
    """A layer of the KV cache kept in a buffer with room for more positions: a decoding step writes its
    keys and values in place, where DynamicLayer copies the whole cache (torch.cat) at every step."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.key_buffer, self.value_buffer, self.length = keys, values, length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:
            self.key_buffer, self.value_buffer = (
                torch.cat([buffer, buffer.new_empty(*buffer.shape[:2], CACHE_GROWTH, buffer.shape[3])], dim=2)
                for buffer in (self.key_buffer, self.value_buffer))
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # Only the rows that change place are copied (`survivors` moves few), into the buffer's first rows.
        moved = (indices != torch.arange(len(indices), device=indices.device)).nonzero().squeeze(1)
        for buffer in (self.key_buffer, self.value_buffer):
            buffer[moved] = buffer[indices[moved]]
        self.key_buffer, self.value_buffer = self.key_buffer[:len(indices)], self.value_buffer[:len(indices)]
        self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]


def survivors(finished: torch.Tensor) -> torch.Tensor:
    """The rows that go on: those among the first ones stay where they are, the last ones fill the places of
    finished rows, so that the KV cache moves a row only for each one that finishes."""
    count = int((~finished).sum())
    keep = torch.arange(count, device=finished.device)
    keep[finished[:count].nonzero().squeeze(1)] = (~finished[count:]).nonzero().squeeze(1) + count
    return keep


def prefix_fits(model, prefix: SharedPrefix | None, rows: list[list[int]], max_new_tokens: int) -> bool:
    """Whether the rows can read their prompts after `prefix`'s cache: every row starts with it and goes on
    past it, and no attention window (counted in cache positions, which the padding placed after the prefix
    shifts for a row's own tokens but not for the prefix's) is shorter than a row can grow."""
    n = len(prefix.ids) if prefix else 0
    if not n or not all(len(row) > n and row[:n] == prefix.ids for row in rows):
        return False
    longest = max(len(row) for row in rows) + max_new_tokens
    windows = [getattr(model.config, name, None) for name in ("sliding_window", "window_size")]
    return all(window is None or longest <= window for window in windows)


def prefill(model, rows: list[list[int]], prefix: SharedPrefix | None, max_new_tokens: int, extra: dict,
            positional: bool):
    """Read the prompts `rows` in chunks of like lengths. Returns each row's first new token, the batch's KV
    cache, its attention mask with room for `max_new_tokens` more, and each row's next position.

    A row of the cache holds [shared prefix][padding][the rest of its prompt]; the attention mask is 0 on the
    padding and positions count tokens only, so each row sees exactly its unpadded prompt. Without a usable
    prefix, that is left padding.
    """
    shared = len(prefix.ids) if prefix_fits(model, prefix, rows, max_new_tokens) else 0
    kv = prefix.kv(model) if shared else []
    width, device = max(len(row) for row in rows), model.device
    mask = torch.tensor([[1] * shared + [0] * (width - len(row)) + [1] * (len(row) - shared + max_new_tokens)
                         for row in rows], device=device)
    first = torch.empty(len(rows), dtype=torch.long, device=device)
    buffers = []  # per layer, the batch's keys and values: (rows, heads, width + room, head size)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for start in range(0, len(rows), PREFILL_ROWS):
        chunk = order[start:start + PREFILL_ROWS]
        length = len(rows[chunk[0]])  # the chunk's longest prompt, which the others are padded to
        index = torch.tensor(chunk, device=device)
        ids = torch.tensor([[0] * (length - len(rows[i])) + rows[i][shared:] for i in chunk], device=device)
        chunk_mask = torch.cat([mask.new_ones(len(chunk), shared), mask[index, width - length + shared:width]], dim=1)
        if positional:
            extra = {**extra, "position_ids": (chunk_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]}
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(kv):
            cache.update(keys.expand(len(chunk), -1, -1, -1), values.expand(len(chunk), -1, -1, -1), layer)
        out = model(input_ids=ids, attention_mask=chunk_mask, past_key_values=cache, use_cache=True, **extra)
        first[index] = out.logits[:, -1].argmax(-1)
        for layer, cached in enumerate(cache.layers):
            if len(buffers) == layer:  # zeros: the padding's keys and values are masked, but must be finite
                buffers.append([t.new_zeros(len(rows), t.shape[1], width + CACHE_GROWTH, t.shape[3])
                                for t in (cached.keys, cached.values)])
            for buffer, t in zip(buffers[layer], (cached.keys, cached.values)):
                buffer[index, :, :shared] = t[:, :, :shared]
                buffer[index, :, width - length + shared:width] = t[:, :, shared:]
    cache = Cache(layers=[GrowingLayer(keys, values, width) for keys, values in buffers])
    positions = torch.tensor([[len(row)] for row in rows], device=device)
    return first, cache, mask, positions


def greedy_tokens(model, tokenizer, rows: list[list[int]], config: GenerationConfig,
                  prefix: SharedPrefix | None = None) -> list[list[int]]:
    """Each prompt's greedy continuation (of the token ids `rows`), up to and including EOS or a stop string,
    or to the budget.

    The tokens are those of transformers' greedy generate on each prompt alone, but a row that finishes
    leaves the batch and its KV cache at once: the others go on at the cost of a smaller batch instead of
    carrying it to the end of the longest answer.
    """
    accepts = inspect.signature((model.get_base_model() if hasattr(model, "get_base_model") else model).forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}  # only the last position's logits count
    positional = "position_ids" in accepts  # BLOOM takes none: its ALiBi counts positions in the attention mask
    eos = torch.tensor(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id],
                       device=model.device)
    stop = config.stop_strings or []
    # Enough trailing tokens to hold a whole stop string (every token is at least one character), plus one so
    # that a stop string starting with a space is not cut at the start of the decoded tail.
    tail = max((len(s) for s in stop), default=0) + 1

    next_ids, cache, mask, positions = prefill(model, rows, prefix, config.max_new_tokens, extra, positional)
    width = cache.get_seq_length()
    tokens = [[] for _ in rows]
    alive = torch.arange(len(rows))  # the prompt index of each row still in the batch
    for step in range(config.max_new_tokens):
        alive_rows = alive.tolist()
        for row, token in zip(alive_rows, next_ids.tolist()):
            tokens[row].append(token)
        finished = torch.isin(next_ids, eos)
        if stop:
            texts = tokenizer.batch_decode([tokens[row][-tail:] for row in alive_rows])
            finished |= torch.tensor([any(s in text for s in stop) for text in texts], device=finished.device)
        if finished.all() or step == config.max_new_tokens - 1:
            break
        if finished.any():
            keep = survivors(finished)
            cache.batch_select_indices(keep)
            alive, next_ids, mask, positions = alive[keep.cpu()], next_ids[keep], mask[keep], positions[keep]
        if positional:
            extra = {**extra, "position_ids": positions}
        out = model(input_ids=next_ids[:, None], attention_mask=mask[:, :width + step + 1], past_key_values=cache,
                    use_cache=True, **extra)
        next_ids, positions = out.logits[:, -1].argmax(-1), positions + 1
    return tokens
