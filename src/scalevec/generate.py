"""Sampling from a model: greedy, temperature, top-k and top-p, with or without a KV cache."""

from __future__ import annotations

import torch

from .model import Decoder


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)


@torch.no_grad()
def generate(model: Decoder, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, use_cache: bool = True, seed: int = 0, eos_id: int | None = None) -> torch.Tensor:
    """prompt (B, T) -> (B, T + new tokens); stops early when every row produced `eos_id`."""
    model.eval()
    gen = torch.Generator(device=prompt.device).manual_seed(seed)
    limit = model.config.max_seq_len
    if prompt.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt of {prompt.shape[1]} tokens + {max_new_tokens} new exceeds max_seq_len {limit}")
    tokens, cache = prompt, model.new_cache() if use_cache else None
    logits = model(prompt, cache)[:, -1]
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        next_token = _sample(logits.float(), temperature, top_k, top_p, gen)
        tokens = torch.cat([tokens, next_token], dim=1)
        if eos_id is not None:
            finished |= next_token[:, 0] == eos_id
            if finished.all():
                break
        logits = (model(next_token, cache) if use_cache else model(tokens))[:, -1]
    return tokens
