"""A naive decoder written separately from the package: separate Q/K/V and gate/up matrices,
explicit per-branch scaling, explicit OR/ER/DP/DNP formulas, explicit attention. It reads the
package's parameters by name and shares none of its code."""

from __future__ import annotations

import math

import torch


def gamma_of(params: dict, prefix: str, scale: str) -> torch.Tensor | None:
    if scale == "fixed":
        return None
    if scale == "plain":
        return params[f"{prefix}.weight"]
    a = params[f"{prefix}.direction"]
    b = params.get(f"{prefix}.magnitude")
    if scale == "or":
        g = a / torch.sqrt((a * a).sum() / a.numel())
        return g if b is None else b * g
    g = torch.exp(a - a.sum() / a.numel())
    return g if b is None else torch.exp(b) * g


def norm(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    if kind == "rms":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def grouped_norm(y: torch.Tensor, group: int, kind: str, eps: float) -> torch.Tensor:
    shape = y.shape
    return norm(y.reshape(*shape[:-1], shape[-1] // group, group), kind, eps).reshape(shape)


def branch(params, cfg, s, prefix, name, x, W, reads_norm, group, out_scale_head):
    """One logical projection with its scales, computed explicitly."""
    place = "dp" if name in s.dual_placement else "dnp" if name in s.dnp else "standard"
    if reads_norm and not s.heterogeneous:
        g_in = gamma_of(params, f"{prefix}.shared_scale", s.scale)
    elif reads_norm or place != "standard":
        g_in = gamma_of(params, f"{prefix}.in_scales.{name}", s.scale)
    else:
        g_in = None
    if g_in is not None:
        x = x * g_in
    y = x @ W.t()
    if place == "dp":
        g_out = gamma_of(params, f"{prefix}.out_scales.{name}", s.scale)
        if g_out is not None:
            y = y * g_out
    if place == "dnp":
        y = grouped_norm(y, group, cfg.norm, cfg.norm_eps)
        g_out = gamma_of(params, f"{prefix}.out_scales.{name}", s.scale)
        if g_out is not None:
            if out_scale_head:
                y = (y.reshape(*y.shape[:-1], -1, group) * g_out).reshape(y.shape)
            else:
                y = y * g_out
    return y


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x: (B, H, T, hd); HF Llama's rotate-half RoPE from its definition."""
    T, hd = x.shape[-2], x.shape[-1]
    half = hd // 2
    out = torch.empty_like(x)
    for i in range(half):
        freq = 1.0 / theta ** (2 * i / hd)
        ang = torch.arange(T, dtype=torch.float64) * freq
        c, s_ = ang.cos().float(), ang.sin().float()
        out[..., i] = x[..., i] * c - x[..., i + half] * s_
        out[..., i + half] = x[..., i + half] * c + x[..., i] * s_
    return out


def reference_logits(params: dict, cfg, s, tokens: torch.Tensor) -> torch.Tensor:
    B, T = tokens.shape
    H, Hkv, hd, d, ff = cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads, cfg.d_model, cfg.d_ff
    x = params["tok_emb.weight"][tokens]
    head_shape = s.qk_scale_shape == "head"
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}"
        h = norm(x, cfg.norm, cfg.norm_eps)
        Wqkv = params[f"{p}.attn.qkv.weight"]
        Wq, Wk, Wv = Wqkv[: H * hd], Wqkv[H * hd: (H + Hkv) * hd], Wqkv[(H + Hkv) * hd:]
        q = branch(params, cfg, s, f"{p}.attn.qkv", "q", h, Wq, True, hd, head_shape)
        k = branch(params, cfg, s, f"{p}.attn.qkv", "k", h, Wk, True, hd, head_shape)
        v = branch(params, cfg, s, f"{p}.attn.qkv", "v", h, Wv, True, hd, head_shape)
        q = rope(q.reshape(B, T, H, hd).transpose(1, 2), cfg.rope_theta)
        k = rope(k.reshape(B, T, Hkv, hd).transpose(1, 2), cfg.rope_theta)
        v = v.reshape(B, T, Hkv, hd).transpose(1, 2)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        att = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v
        att = att.transpose(1, 2).reshape(B, T, H * hd)
        y = branch(params, cfg, s, f"{p}.attn.o", "o", att, params[f"{p}.attn.o.weight"], False, d, False)
        if s.post_norms:
            y = norm(y, cfg.norm, cfg.norm_eps)
            g = gamma_of(params, f"{p}.attn_post_scale", s.scale)
            y = y if g is None else y * g
        x = x + y
        h = norm(x, cfg.norm, cfg.norm_eps)
        Wgu = params[f"{p}.ffn.gate_up.weight"]
        gate = branch(params, cfg, s, f"{p}.ffn.gate_up", "gate", h, Wgu[:ff], True, ff, False)
        up = branch(params, cfg, s, f"{p}.ffn.gate_up", "up", h, Wgu[ff:], True, ff, False)
        act = gate * torch.sigmoid(gate) * up
        y = branch(params, cfg, s, f"{p}.ffn.down", "down", act, params[f"{p}.ffn.down.weight"], False, d, False)
        if s.post_norms:
            y = norm(y, cfg.norm, cfg.norm_eps)
            g = gamma_of(params, f"{p}.ffn_post_scale", s.scale)
            y = y if g is None else y * g
        x = x + y
    x = norm(x, cfg.norm, cfg.norm_eps)
    g = gamma_of(params, "final_scale", s.scale)
    if g is not None:
        x = x * g
    head = params["tok_emb.weight"] if cfg.tie_embeddings else params["head.weight"]
    return x @ head.t()
