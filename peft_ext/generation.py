"""Batched text generation for inference scripts: left padding, the KV cache, stop strings."""
import copy

import torch
from peft import PeftType
from transformers import GenerationConfig


def decoding_config(model, tokenizer, max_new_tokens: int, num_beams: int = 1, temperature: float = 0.0,
                    stop: tuple[str, ...] = ()) -> GenerationConfig:
    """Greedy (temperature 0) or sampling, with or without beams, stopping at EOS and at `stop`.

    Starts from the model's own generation config (its EOS ids) and sets every sampling knob
    explicitly, so that a checkpoint's defaults (say do_sample with temperature 0.6) never leak in.
    """
    sampling = temperature > 0
    config = copy.deepcopy(model.generation_config)
    config.update(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=sampling,
        temperature=temperature if sampling else 1.0,
        top_p=1.0,
        top_k=0 if sampling else 50,  # neutral values: no warnings, and plain temperature sampling
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id,
        stop_strings=list(stop) or None,
    )
    return config


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
    """
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    batch.pop("token_type_ids", None)
    batch = batch.to(model.device)
    output = model.generate(**batch, generation_config=config, tokenizer=tokenizer)
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [cut_at_stops(text, tuple(config.stop_strings or ())).strip() for text in texts]
