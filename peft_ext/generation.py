"""Batched text generation for inference scripts: padding, the KV cache (with a run's shared prompt prefix
read once), rows that make room for the next prompts as they finish, stop strings."""
import inspect
from collections import deque
from collections.abc import Iterator

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
# Columns of padding that all of a batch's rows have before the cache is shifted to drop them: attention reads
# every column, so this bounds the waste, and a shift costs about what a step's attention reads.
COMPACT_AT = 32


class SharedPrefix:
    """The tokens that all of a run's prompts start with (the template's header), and their KV cache,
    computed once for the run and reused by every batch, so that no row reads them again.

    The prefix is the longest common prefix of the prompts' token ids (`rows`), not of their text, whose
    tokenization could merge across the boundary; less one token where a prompt would be all prefix, since each
    row must read a token of its own to give the logits of its first new token.
    """

    def __init__(self, rows: list[list[int]]):
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


def generate(model, tokenizer, prompts: list[str], config: GenerationConfig, prefix: SharedPrefix | None = None) -> list[str]:
    """The responses to `prompts` (new text only, cut at the stop strings, stripped), in their order, from one
    batch of them all. Each row's result is the same as generating it alone."""
    responses = [""] * len(prompts)
    for finished in stream(model, tokenizer, tokenizer(prompts)["input_ids"], config, len(prompts), prefix):
        for i, response in finished:
            responses[i] = response
    return responses


@torch.inference_mode()
def stream(model, tokenizer, rows: list[list[int]], config: GenerationConfig, batch_size: int,
           prefix: SharedPrefix | None = None) -> Iterator[list[tuple[int, str]]]:
    """The responses to the prompts `rows` (token ids) as they are finished, in lists of (index in `rows`,
    response), at most `batch_size` prompts being decoded at a time, the longest first.

    Greedy decoding runs our own loop (`greedy_stream`): a finished row makes room for the next prompt at once,
    and `prefix`'s KV cache is reused where it can be. Beams and sampling run transformers' generate on
    left-padded batches of prompts of like lengths.
    """
    stop = tuple(config.stop_strings or ())
    if runs_greedy_loop(model, config):
        finished_rows = greedy_stream(model, tokenizer, rows, config, batch_size, prefix)
    else:
        finished_rows = generate_batches(model, tokenizer, rows, config, batch_size)
    for finished in finished_rows:
        texts = tokenizer.batch_decode([tokens for _, tokens in finished], skip_special_tokens=True)
        yield [(i, cut_at_stops(text, stop).strip()) for (i, _), text in zip(finished, texts)]


def batches(order: list[int], lengths: list[int], size: int, equal_lengths: bool = False):
    """Consecutive batches of at most `size` indices; with `equal_lengths`, a new batch also starts
    wherever the prompt length changes, so that no prompt is padded."""
    batch = []
    for i in order:
        if batch and (len(batch) == size or (equal_lengths and lengths[i] != lengths[batch[0]])):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def generate_batches(model, tokenizer, rows: list[list[int]], config: GenerationConfig, batch_size: int):
    """transformers' generate on left-padded batches of like lengths (of equal lengths for the adapters that
    cannot pad); yields each batch's (index, new token ids)."""
    lengths = [len(row) for row in rows]
    order = sorted(range(len(rows)), key=lambda i: -lengths[i])
    for batch in batches(order, lengths, batch_size, equal_lengths=not pads_safely(model)):
        inputs = tokenizer.pad({"input_ids": [rows[i] for i in batch]}, return_tensors="pt", padding_side="left").to(model.device)
        output = model.generate(**inputs, generation_config=config, tokenizer=tokenizer)
        yield list(zip(batch, output[:, inputs["input_ids"].shape[1]:].tolist()))


def runs_greedy_loop(model, config: GenerationConfig) -> bool:
    """Greedy decoding without prompt-learning adapters, whose virtual tokens only peft's generate places.
    The loop reads the budget, EOS and stop strings of `config`; `decoding_config` sets nothing else
    that changes a greedy choice."""
    peft_config = getattr(model, "active_peft_config", None)
    return config.num_beams == 1 and not config.do_sample and not (peft_config and peft_config.is_prompt_learning)


def survivors(finished: torch.Tensor) -> torch.Tensor:
    """The rows that go on: those among the first ones stay where they are, the last ones fill the places of
    finished rows, so that the KV cache moves a row only for each one that finishes."""
    count = int((~finished).sum())
    keep = torch.arange(count, device=finished.device)
    keep[finished[:count].nonzero().squeeze(1)] = (~finished[count:]).nonzero().squeeze(1) + count
    return keep


def prefix_fits(model, prefix: SharedPrefix | None, rows: list[list[int]], max_new_tokens: int) -> bool:
    """Whether the rows can read their prompts after `prefix`'s cache: every row starts with it and goes on
    past it, and no attention window (counted in cache columns, where the padding placed after the prefix
    separates a row's own tokens from the prefix's by up to COMPACT_AT more than its own) is shorter than a
    row can grow."""
    n = len(prefix.ids) if prefix else 0
    if not n or not all(len(row) > n and row[:n] == prefix.ids for row in rows):
        return False
    longest = max(len(row) for row in rows) + max_new_tokens + COMPACT_AT
    windows = [getattr(model.config, name, None) for name in ("sliding_window", "window_size")]
    return all(window is None or longest <= window for window in windows)


class SlotLayer(DynamicLayer):
    """One layer's KV cache for rows that come and go: buffers of (row slots, heads, columns, head size), of
    which the first `rows` slots and `length` columns are in use. A decoding step writes its keys and values
    in place, where DynamicLayer copies the whole cache (torch.cat) at every step; `LiveBatch` makes room."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.buffers, self.rows, self.length = [keys, values], 0, length
        self.show()

    def show(self) -> None:
        """Point `keys` and `values`, what attention reads, at the part in use."""
        self.keys, self.values = (buffer[:self.rows, :, :self.length] for buffer in self.buffers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        for buffer, states in zip(self.buffers, (key_states, value_states)):
            buffer[:self.rows, :, self.length:end] = states
        self.length = end
        self.show()
        return self.keys, self.values


class LiveBatch:
    """The rows being decoded together, and their KV cache.

    A row's cache holds [shared prefix][padding][the rest of its prompt, then its new tokens]; every row ends at
    column `end`, where the next step writes. The attention mask is 0 on the padding and positions count tokens
    only, so each row sees exactly its own unpadded prompt. A new row joins at `end`, after the rows there
    already (so prompts must come longest first, to fit); padding that all rows share is cut out of the cache
    once it reaches COMPACT_AT columns, since attention reads every column.
    """

    def __init__(self, model, slots: int, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]], extra: dict, positional: bool):
        self.model, self.slots, self.prefix_kv, self.extra, self.positional = model, slots, prefix_kv, extra, positional
        self.shared = prefix_kv[0][0].shape[2] if prefix_kv else 0
        self.end = self.shared
        self.layers: list[SlotLayer] = []  # made by the first prompts read, which show the cache's shapes
        self.mask = torch.empty(slots, 0, dtype=torch.long, device=model.device)
        self.index: list[int] = []  # per row: its prompt's index
        self.starts: list[int] = []  # per row: the column of its first token after the padding
        self.next_ids = torch.empty(0, dtype=torch.long, device=model.device)  # per row: its newest token
        self.positions = torch.empty(0, 1, dtype=torch.long, device=model.device)  # per row: that token's position

    def admit(self, prompts: list[list[int]], indices: list[int]) -> None:
        """Read `prompts` (token ids, longest first) as new rows, in chunks of like lengths, each padded only to
        its own longest; a prompt's first new token becomes its row's newest token."""
        if not self.index:  # an empty batch starts over, right after the prefix
            self.end = len(prompts[0])
        assert self.end >= len(prompts[0]), "prompts must come longest first"
        self.reserve(self.end)
        device = self.model.device
        for start in range(0, len(prompts), PREFILL_ROWS):
            chunk = prompts[start:start + PREFILL_ROWS]
            length = len(chunk[0])
            ids = torch.tensor([[0] * (length - len(p)) + p[self.shared:] for p in chunk], device=device)
            chunk_mask = torch.tensor([[1] * self.shared + [0] * (length - len(p)) + [1] * (len(p) - self.shared)
                                       for p in chunk], device=device)
            extra = self.extra
            if self.positional:
                extra = {**extra, "position_ids": (chunk_mask.cumsum(-1) - 1).clamp(min=0)[:, self.shared:]}
            cache = DynamicCache()
            for layer, (keys, values) in enumerate(self.prefix_kv):
                cache.update(keys.expand(len(chunk), -1, -1, -1), values.expand(len(chunk), -1, -1, -1), layer)
            out = self.model(input_ids=ids, attention_mask=chunk_mask, past_key_values=cache, use_cache=True, **extra)
            if not self.layers:
                self.make_layers(cache)
            rows, left = slice(len(self.index), len(self.index) + len(chunk)), self.end - (length - self.shared)
            for layer, cached in zip(self.layers, cache.layers):
                for buffer, t in zip(layer.buffers, (cached.keys, cached.values)):
                    buffer[rows, :, self.shared:left] = 0  # padding: masked, but must be finite
                    buffer[rows, :, left:self.end] = t[:, :, self.shared:]
                layer.rows, layer.length = layer.rows + len(chunk), self.end
                layer.show()
            starts = [self.end - (len(p) - self.shared) for p in chunk]
            self.mask[rows] = 1
            for row, column in zip(range(rows.start, rows.stop), starts):
                self.mask[row, self.shared:column] = 0
            self.index += indices[start:start + len(chunk)]
            self.starts += starts
            self.next_ids = torch.cat([self.next_ids, out.logits[:, -1].argmax(-1)])
            self.positions = torch.cat([self.positions, torch.tensor([[len(p)] for p in chunk], device=device)])

    def make_layers(self, cache: DynamicCache) -> None:
        """Buffers for all slots, shaped like `cache`'s layers, holding the shared prefix in every slot."""
        for number, cached in enumerate(cache.layers):
            buffers = [t.new_empty(self.slots, t.shape[1], self.mask.shape[1], t.shape[3]) for t in (cached.keys, cached.values)]
            for buffer, shared in zip(buffers, self.prefix_kv[number] if self.prefix_kv else ()):
                buffer[:, :, :self.shared] = shared
            self.layers.append(SlotLayer(*buffers, self.end))

    def reserve(self, column: int) -> None:
        """Room in the cache and the mask up to `column`, grown CACHE_GROWTH columns beyond it when short."""
        if column < self.mask.shape[1]:
            return
        more = column + CACHE_GROWTH - self.mask.shape[1]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.slots, more)], dim=1)
        for layer in self.layers:
            layer.buffers = [torch.cat([b, b.new_empty(*b.shape[:2], more, b.shape[3])], dim=2) for b in layer.buffers]
            layer.show()

    def step(self) -> None:
        """One decoding step for every row: each row's next token becomes its newest."""
        self.reserve(self.end)
        extra = {**self.extra, "position_ids": self.positions} if self.positional else self.extra
        out = self.model(input_ids=self.next_ids[:, None], attention_mask=self.mask[:len(self.index), :self.end + 1],
                         past_key_values=Cache(layers=self.layers), use_cache=True, **extra)
        self.next_ids, self.positions, self.end = out.logits[:, -1].argmax(-1), self.positions + 1, self.end + 1

    def drop(self, finished: torch.Tensor) -> None:
        """Remove the finished rows: the last rows move into their slots (`survivors`)."""
        keep = survivors(finished)
        moved = (keep != torch.arange(len(keep), device=keep.device)).nonzero().squeeze(1)
        for tensor in [self.mask] + [buffer for layer in self.layers for buffer in layer.buffers]:
            # a model spread over several GPUs keeps each layer's cache on that layer's device
            tensor[moved.to(tensor.device)] = tensor[keep[moved].to(tensor.device)]
        rows = keep.tolist()
        self.index, self.starts = [self.index[k] for k in rows], [self.starts[k] for k in rows]
        self.next_ids, self.positions = self.next_ids[keep], self.positions[keep]
        for layer in self.layers:
            layer.rows = len(rows)
            layer.show()
        shared_padding = min(self.starts, default=self.end) - self.shared
        if self.index and shared_padding >= COMPACT_AT:
            self.shift_left(shared_padding)

    def shift_left(self, columns: int) -> None:
        """Cut `columns` columns of padding that every row has right after the prefix out of the cache."""
        rows, kept = len(self.index), slice(self.shared + columns, self.end)
        for layer in self.layers:
            for buffer in layer.buffers:
                buffer[:rows, :, self.shared:self.end - columns] = buffer[:rows, :, kept].clone()
            layer.length = self.end - columns
            layer.show()
        self.mask[:rows, self.shared:self.end - columns] = self.mask[:rows, kept].clone()
        self.mask[:rows, self.end - columns:] = 1  # columns past the new end are for new tokens
        self.end -= columns
        self.starts = [start - columns for start in self.starts]


def greedy_stream(model, tokenizer, rows: list[list[int]], config: GenerationConfig, batch_size: int,
                  prefix: SharedPrefix | None = None) -> Iterator[list[tuple[int, list[int]]]]:
    """Each prompt's greedy continuation (of the token ids `rows`), up to and including EOS or a stop string,
    or to the budget, as (index, new token ids) once it is finished.

    The tokens are those of transformers' greedy generate on each prompt alone. At most `batch_size` rows
    decode together; a row that finishes leaves the batch and its KV cache at once, and new prompts join as
    soon as a few slots are free, so that steps run on full batches until the prompts run out.
    """
    accepts = inspect.signature((model.get_base_model() if hasattr(model, "get_base_model") else model).forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}  # only the last position's logits count
    positional = "position_ids" in accepts  # BLOOM takes none: its ALiBi counts positions in the attention mask
    eos_ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    # a model without an EOS token stops at a stop string or the budget only
    eos = torch.tensor([i for i in eos_ids if i is not None], dtype=torch.long, device=model.device)
    stop = config.stop_strings or []
    # Enough trailing tokens to hold a whole stop string (every token is at least one character), plus one so
    # that a stop string starting with a space is not cut at the start of the decoded tail.
    tail = max((len(s) for s in stop), default=0) + 1

    prefix_kv = prefix.kv(model) if prefix_fits(model, prefix, rows, config.max_new_tokens) else []
    batch = LiveBatch(model, batch_size, prefix_kv, extra, positional)
    pending = deque(sorted(range(len(rows)), key=lambda i: -len(rows[i])))  # longest first: each fits
    admit_at = max(1, min(PREFILL_ROWS, batch_size // 4))  # free slots worth a prompt-reading call
    tokens: dict[int, list[int]] = {}
    while pending or batch.index:
        free = batch_size - len(batch.index)
        if pending and free >= min(admit_at, len(pending)):
            new = [pending.popleft() for _ in range(min(free, len(pending)))]
            batch.admit([rows[i] for i in new], new)
            tokens.update((i, []) for i in new)
        for row, token in zip(batch.index, batch.next_ids.tolist()):
            tokens[row].append(token)
        finished = torch.isin(batch.next_ids, eos)
        finished |= torch.tensor([len(tokens[row]) >= config.max_new_tokens for row in batch.index], device=finished.device)
        if stop:
            texts = tokenizer.batch_decode([tokens[row][-tail:] for row in batch.index])
            finished |= torch.tensor([any(s in text for s in stop) for text in texts], device=finished.device)
        if finished.any():
            yield [(row, tokens.pop(row)) for row, done in zip(batch.index, finished.tolist()) if done]
            batch.drop(finished)
        if batch.index:
            batch.step()
