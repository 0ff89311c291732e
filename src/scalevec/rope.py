"""Rotary position embeddings (RoPE) in HF Llama's rotate-half layout: the tables and their application.

A head's features j and j + head/2 form one rotary pair, turned by the angle of its frequency times the position.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_frequencies(m: ModelConfig, local: bool = False) -> torch.Tensor:
    """Inverse wavelengths of the rotary pairs: of windowed blocks under rope_local_theta (`local`), else with
    rope_scaling (llama3: Llama 3.1's; linear: all divided by rope_factor)."""
    head = m.head_size
    theta = m.rope_local_theta if local else m.rope_theta
    inv_freq = 1.0 / theta ** (torch.arange(0, head, 2, dtype=torch.float64) / head)
    if m.rope_scaling == "none" or local:
        return inv_freq
    if m.rope_scaling == "linear":
        return inv_freq / m.rope_factor
    wavelength = 2 * math.pi / inv_freq
    ratio = m.rope_original_max_seq_len / wavelength  # context over wavelength: low for low frequencies
    smooth = ((ratio - m.rope_low_freq_factor) / (m.rope_high_freq_factor - m.rope_low_freq_factor)).clamp(0, 1)
    return (1 - smooth) * inv_freq / m.rope_factor + smooth * inv_freq


def rope_tables(m: ModelConfig, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head size), HF Llama's rotate-half layout."""
    angles = torch.outer(torch.arange(m.max_seq_len, dtype=torch.float64), rope_frequencies(m, local))
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin
