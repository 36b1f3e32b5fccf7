"""Batched text generation for inference scripts: left padding, the KV cache, stop strings."""
import inspect

import torch
from peft import PeftType
from transformers import GenerationConfig


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


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], config: GenerationConfig) -> list[str]:
    """The responses to `prompts` (new text only, cut at the stop strings, stripped), as one batch.

    Left padding plus the attention mask make each row's result the same as generating it alone.
    Greedy decoding runs our own loop (`greedy_tokens`); beams and sampling run transformers' generate.
    """
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    stop = tuple(config.stop_strings or ())
    if runs_greedy_loop(model, config):
        new_tokens = greedy_tokens(model, tokenizer, batch["input_ids"], batch["attention_mask"], config)
    else:
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


def greedy_tokens(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  config: GenerationConfig) -> list[list[int]]:
    """Each left-padded row's greedy continuation, up to and including EOS or a stop string, or to the budget.

    The tokens are those of transformers' greedy generate (same positions, mask and cache), but a row
    that finishes leaves the batch and its KV cache at once: the others go on at the cost of a smaller
    batch instead of carrying it to the end of the longest answer.
    """
    accepts = inspect.signature((model.get_base_model() if hasattr(model, "get_base_model") else model).forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
    eos = torch.tensor(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id],
                       device=input_ids.device)
    stop = config.stop_strings or []
    # Enough trailing tokens to hold a whole stop string (every token is at least one character), plus one so
    # that a stop string starting with a space is not cut at the start of the decoded tail.
    tail = max((len(s) for s in stop), default=0) + 1

    tokens = [[] for _ in range(len(input_ids))]
    rows = torch.arange(len(input_ids))  # the prompt index of each row still in the batch
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding takes no position
    step_ids, cache = input_ids, None
    for _ in range(config.max_new_tokens):
        if "position_ids" in accepts:
            extra["position_ids"] = positions
        out = model(input_ids=step_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True, **extra)
        cache, next_ids = out.past_key_values, out.logits[:, -1].argmax(-1)
        for row, token in zip(rows.tolist(), next_ids.tolist()):
            tokens[row].append(token)
        finished = torch.isin(next_ids, eos)
        if stop:
            texts = tokenizer.batch_decode([tokens[row][-tail:] for row in rows.tolist()])
            finished |= torch.tensor([any(s in text for s in stop) for text in texts], device=finished.device)
        if finished.all():
            break
        if finished.any():
            keep = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, next_ids, attention_mask, positions = rows[keep.cpu()], next_ids[keep], attention_mask[keep], positions[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        positions = positions[:, -1:] + 1
        step_ids = next_ids[:, None]
    return tokens
