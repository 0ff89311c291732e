"""Dense Pre-Norm decoder with every scale-vector strategy of the paper as configuration.

    x = embed(tokens)                                [· sqrt(d): Gemma]
    for each block:
        x̂ = Norm(x)                                 (computed once, no weight; OLMo 2: x̂ = x)
        q, k, v = Projection_qkv(x̂)                  (scales per the strategy; DNP on q,k = QK-norm)
        x += [post-norm] o(attention(RoPE(q), RoPE(k), v))   (causal; windowed and soft-capped: Gemma)
        x̂ = Norm(x)
        gate, up = Projection_gate_up(x̂)             (or a routed MoE FFN: moe.py)
        x += [post-norm] down(act(gate) ⊙ up)        (act: silu, SwiGLU; or tanh-GELU, GeGLU)
    logits = head(γ_final ⊙ Norm(x))                 [c·tanh(logits / c): Gemma 2]
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels
from .config import ModelConfig, MoEConfig
from .moe import MoEFeedForward
from .projection import ACTIVATIONS, Branch, Projection, normalize
from .rope import apply_rope, rope_tables
from .scales import Kind, ParamInfo, Role, make_scale, scale_param_info
from .strategy import Strategy


def is_windowed(m: ModelConfig, layer: int) -> bool:
    """Whether block `layer` attends through the sliding window (model.sliding_window, full_attention_every)."""
    return m.sliding_window > 0 and not (m.full_attention_every and (layer + 1) % m.full_attention_every == 0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, window: int,
              softcap: float) -> torch.Tensor:
    """Causal attention of the queries, the last positions of the keys (all of them when q and k are as long),
    with an optional sliding window and score soft-capping; q (B, H, T, hd), k and v (B, H_kv, S, hd)."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if not window and not softcap:  # SDPA's is_causal is only right for T == S; one cached query sees all
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=scale, enable_gqa=gqa)
    query_at = torch.arange(S - T, S, device=q.device)[:, None]
    key_at = torch.arange(S, device=q.device)[None, :]
    visible = (key_at <= query_at) & ((query_at - key_at < window) if window else True)
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=gqa)
    if gqa:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    scores = (softcap * torch.tanh(scores / softcap)).masked_fill(~visible, -math.inf)
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


class Attention(nn.Module):
    def __init__(self, m: ModelConfig, s: Strategy, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = m.n_heads, m.n_kv_heads, m.head_size
        self.windowed = is_windowed(m, layer)
        self.window = m.sliding_window if self.windowed else 0
        self.scale = m.query_pre_attn_scalar ** -0.5 if m.query_pre_attn_scalar else None
        self.softcap = m.attn_softcap
        hd, q_out, kv_out = m.head_size, m.n_heads * m.head_size, m.n_kv_heads * m.head_size
        branches = [Branch.attention(n, out, hd, s) for n, out in (("q", q_out), ("k", kv_out), ("v", kv_out))]
        self.qkv = Projection(d_in=m.d_model, branches=branches, strategy=s, reads_norm=m.pre_norm, norm=m.norm,
                              eps=m.norm_eps, bias=m.qkv_bias)
        self.o = Projection(d_in=q_out, branches=[Branch.whole("o", m.d_model)], strategy=s, reads_norm=False,
                            norm=m.norm, eps=m.norm_eps, residual_output=True)
        # DNP on q and k per head with RMSNorm and head-shaped scales, none on v: what kernels.qk_norm_rope computes
        self.fusable = (self.qkv.placements[:2] == ["dnp", "dnp"] and self.qkv.placements[2] != "dnp"
                        and m.norm == "rms" and all(b.norm_group == b.out_scale_size == hd for b in branches[:2]))
        self.fused = False  # Decoder.use_fused_kernels

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: list | None = None) -> torch.Tensor:
        """`kv`: this layer's cache [keys, values] (empty before the prompt), extended in place."""
        B, T, _ = x.shape
        y = self.qkv.linear(x)
        if self.fused and kernels.computes(y):
            q, k, v = kernels.qk_norm_rope(y, self.qkv.dnp_scale("q"), self.qkv.dnp_scale("k"), cos, sin,
                                           self.n_heads, self.n_kv_heads, self.qkv.eps)
        else:
            q, k, v = self.qkv.branch_outputs(y)
            q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            if kv:
                k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
            kv[:] = [k, v]
        y = attention(q, k, v, self.scale, self.window, self.softcap)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))[0]


class FeedForward(nn.Module):
    """Gated FFN: down(act(gate) ⊙ up), SwiGLU or GeGLU. `reader_scaled`: the caller owns the norm's shared γ and
    passes it to `forward` (an MoE block's shared expert)."""

    def __init__(self, m: ModelConfig, s: Strategy, reader_scaled: bool = False):
        super().__init__()
        ff = m.d_ff
        self.gate_up = Projection(d_in=m.d_model, branches=[Branch.whole("gate", ff), Branch.whole("up", ff)],
                                  strategy=s, reads_norm=m.pre_norm, norm=m.norm, eps=m.norm_eps,
                                  reader_scaled=reader_scaled)
        self.down = Projection(d_in=ff, branches=[Branch.whole("down", m.d_model)], strategy=s, reads_norm=False,
                               norm=m.norm, eps=m.norm_eps, residual_output=True)
        self.activation = ACTIVATIONS[m.activation]
        # DNP on gate and up before SwiGLU, with RMSNorm: what kernels.dnp_swiglu computes in one pass
        self.fusable = self.gate_up.placements == ["dnp", "dnp"] and m.norm == "rms" and m.activation == "silu"
        self.fused = False  # Decoder.use_fused_kernels

    def forward(self, x: torch.Tensor, reader_scale: torch.Tensor | None = None) -> torch.Tensor:
        y = self.gate_up.linear(x, reader_scale)
        if self.fused and kernels.computes(y):
            hidden = kernels.dnp_swiglu(y, self.gate_up.dnp_scale("gate"), self.gate_up.dnp_scale("up"),
                                        self.gate_up.eps)
        else:
            gate, up = self.gate_up.branch_outputs(y)
            hidden = self.activation(gate) * up
        return self.down(hidden)[0]


class Block(nn.Module):
    def __init__(self, m: ModelConfig, s: Strategy, moe: MoEConfig | None = None, layer: int = 0):
        super().__init__()
        self.norm, self.eps, self.pre_norm = m.norm, m.norm_eps, m.pre_norm
        self.attn = Attention(m, s, layer)
        if moe is None:
            self.ffn = FeedForward(m, s)
        else:
            shared_expert = FeedForward(m, s, reader_scaled=True) if m.moe_shared_expert else None
            self.ffn = MoEFeedForward(m, s, moe, shared_expert)
        # Gemma-style sandwich norms: Output-Norms on each branch's output
        self.post_norms = s.post_norms
        param = s.scale if s.post_norms else "fixed"
        self.attn_post_scale = make_scale(m.d_model, param, Role.OUTPUT)
        self.ffn_post_scale = make_scale(m.d_model, param, Role.OUTPUT)

    def _post(self, y: torch.Tensor, scale) -> torch.Tensor:
        if not self.post_norms:
            return y
        return normalize(y, y.shape[-1], self.norm, self.eps, None if scale is None else scale())

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, x.shape[-1], self.norm, self.eps) if self.pre_norm else x

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: list | None = None) -> torch.Tensor:
        x = x + self._post(self.attn(self._pre(x), cos, sin, kv), self.attn_post_scale)
        return x + self._post(self.ffn(self._pre(x)), self.ffn_post_scale)

    def param_info(self, prefix: str) -> dict[str, ParamInfo]:
        infos = self.attn.qkv.param_info(f"{prefix}.attn.qkv") | self.attn.o.param_info(f"{prefix}.attn.o")
        if isinstance(self.ffn, FeedForward):
            infos |= self.ffn.gate_up.param_info(f"{prefix}.ffn.gate_up")
            infos |= self.ffn.down.param_info(f"{prefix}.ffn.down")
        else:
            infos |= self.ffn.param_info(f"{prefix}.ffn")
        for name in ("attn_post_scale", "ffn_post_scale"):
            if getattr(self, name) is not None:
                infos |= scale_param_info(f"{prefix}.{name}", getattr(self, name))
        return infos


class Decoder(nn.Module):
    def __init__(self, model: ModelConfig, strategy: Strategy, moe: MoEConfig | None = None):
        super().__init__()
        self.config, self.strategy = model, strategy
        self.tok_emb = nn.Embedding(model.vocab_size, model.d_model)
        moe = moe or MoEConfig()
        self.blocks = nn.ModuleList(Block(model, strategy, moe if model.is_moe_layer(i) else None, i)
                                    for i in range(model.n_layers))
        # the final norm feeds the head, a linear map: an Input-Norm (docs/paper-notes.md section 3)
        self.final_scale = make_scale(model.d_model, strategy.scale, Role.INPUT)
        self.head = None if model.tie_embeddings else nn.Linear(model.d_model, model.vocab_size, bias=False)
        self.checkpoint_blocks = False  # activation checkpointing: recompute each block in backward
        cos, sin = rope_tables(model)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if model.rope_local_theta:  # windowed blocks rotate with their own base (Gemma 3)
            cos, sin = rope_tables(model, local=True)
            self.register_buffer("rope_local_cos", cos, persistent=False)
            self.register_buffer("rope_local_sin", sin, persistent=False)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.head is None else self.head.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Matrices and embeddings from a generator seeded by (seed, parameter name), so every
        strategy gets bit-identical matrices from the same seed; scales start at effective γ = 1."""
        m = self.config
        for name, info in self.param_info().items():
            if info.kind.is_scale:  # they start at effective γ = 1, below
                continue
            param = self.get_parameter(name)
            if info.kind == Kind.BIAS:
                param.zero_()
                continue
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            fan_in = param.shape[-1]  # matrices are stored (..., out, in)
            sigma = m.init_gain / math.sqrt(fan_in) if m.init == "fan_in" and info.kind != Kind.EMBEDDING \
                else m.init_std
            if info.residual_output:  # GPT-2's depth scaling
                sigma /= math.sqrt(2 * m.n_layers)
            param.copy_(torch.randn(param.shape, generator=gen) * sigma)
        for module in self.modules():
            if hasattr(module, "reset_to_identity"):
                module.reset_to_identity()

    def forward(self, tokens: torch.Tensor, cache: list[list] | None = None) -> torch.Tensor:
        """Logits. `cache` (one list per layer, from `new_cache()`) enables incremental decoding:
        the prompt first, then one token per call."""
        T = tokens.shape[1]
        start = cache[0][0].shape[2] if cache and cache[0] else 0
        if cache is not None and start and T > 1:
            raise ValueError("with a filled cache, feed one token at a time")
        rope = {False: (self.rope_cos[start:start + T], self.rope_sin[start:start + T])}
        if self.config.rope_local_theta:
            rope[True] = (self.rope_local_cos[start:start + T], self.rope_local_sin[start:start + T])
        x = self.tok_emb(tokens)
        if self.config.embedding_scale:  # the factor rounded to x's dtype first, as Gemma does
            x = x * torch.tensor(math.sqrt(self.config.d_model), dtype=x.dtype)
        for i, block in enumerate(self.blocks):
            cos, sin = rope[block.attn.windowed and self.config.rope_local_theta > 0]
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, None if cache is None else cache[i])
        gamma = None if self.final_scale is None else self.final_scale()
        x = normalize(x, x.shape[-1], self.config.norm, self.config.norm_eps, gamma)
        logits = F.linear(x, self.head_weight)
        if self.config.final_softcap:
            cap = self.config.final_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def use_fused_kernels(self, on: bool = True) -> int:
        """Compute DNP's norms with the fused CPU kernels (kernels.py): in each FFN that DNP normalizes before
        SwiGLU, and in each attention whose q and k DNP normalizes per head; or with torch ops (`on=False`, the
        reference). Returns how many modules use them: 0 off CPU or where they cannot be built."""
        fusable = [m for m in self.modules() if isinstance(m, FeedForward | Attention) and m.fusable]
        on_cpu = self.tok_emb.weight.device.type == "cpu"
        usable = on and bool(fusable) and on_cpu and kernels.library() is not None
        for module in fusable:
            module.fused = usable
        return len(fusable) if usable else 0

    def moe_layers(self) -> list[MoEFeedForward]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoEFeedForward)]

    def new_cache(self) -> list[list]:
        return [[] for _ in self.blocks]

    def param_info(self) -> dict[str, ParamInfo]:
        """Role and kind of every parameter, by name (the optimizer table's keys)."""
        infos = {"tok_emb.weight": ParamInfo(Role.NONE, Kind.EMBEDDING)}
        head = "tok_emb.weight" if self.head is None else "head.weight"
        if self.head is not None:
            infos["head.weight"] = ParamInfo(Role.NONE, Kind.HEAD)
        if self.final_scale is not None:
            infos |= scale_param_info("final_scale", self.final_scale, ((head, 0, self.config.vocab_size),))
        for i, block in enumerate(self.blocks):
            infos |= block.param_info(f"blocks.{i}")
        return infos


def build_model(model: ModelConfig, strategy: Strategy, seed: int = 0, moe: MoEConfig | None = None) -> Decoder:
    decoder = Decoder(model, strategy, moe)
    decoder.init_weights(seed)
    return decoder
