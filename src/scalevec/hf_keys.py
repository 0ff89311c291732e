"""The one map between scalevec's decoder and transformers checkpoints: which tensor each part of the
model is, where it lives in a Decoder (`GLOBAL_PARTS`, `LAYER_PARTS`: `read_part`/`write_part`), its shape,
and the strategy a checkpoint of each architecture is exactly. Export reads every part of a folded model
into these names (export/hf.py), import writes them back (hf_import.py): two mirrored loops over one map;
apply_strategy converts the transformers modules of each branch (`HF_BRANCHES`, apply.py). A part's name is
the same on all sides.

    llama   Llama and Mistral: pre-norms input_layernorm and post_attention_layernorm (before the FFN)
    qwen2   Llama's layout with q/k/v biases
    qwen3   Llama's layout with a per-head QK-norm (q_norm, k_norm)
    gemma2  sandwich norms: input_layernorm / post_attention_layernorm around attention,
            pre_feedforward_layernorm / post_feedforward_layernorm around the FFN; weights stored as γ - 1
    gemma3  Gemma 2's layout with a per-head QK-norm
    olmo2   no pre-norms: post_attention_layernorm and post_feedforward_layernorm on the branch outputs,
            a QK-norm over all heads at once

MoE families (MOE_FAMILIES; a routed layer's router `mlp.gate`, its experts one by one, the FFN's pre-norm
post_attention_layernorm as the MoE block's one γ; every router a softmax, then top-k):
    qwen3_moe  Qwen3's attention; dense layers between routed ones (decoder_sparse_step); norm_topk_prob
    olmoe      a QK-norm over all heads at once; every layer routed; norm_topk_prob
    mixtral    Llama's attention; every layer routed; top-k weights always renormalized (experts w1 w3 w2)
    qwen2_moe  Qwen2's attention; a shared expert behind a sigmoid gate: exported with a zero gate
               (sigmoid 0 = 1/2) and the shared expert's down projection doubled, exactly
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .config import ModelConfig
from .strategy import Strategy
from .strategy import strategy as make_strategy

MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
               "gemma3_text": "gemma3", "olmo2": "olmo2"}
"""transformers model_type -> the layout above."""

ARCHITECTURE_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                        "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
                        "olmo2": "Olmo2ForCausalLM"}
"""What export writes: a layout above, or `mistral` (Llama's, for a model whose every block is windowed)."""
EXPORT_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
                      "gemma3": "gemma3_text", "olmo2": "olmo2"}

NORM_OFFSET = {"gemma2": 1.0, "gemma3": 1.0}
"""What a stored norm weight adds to γ: Gemma's RMSNorm multiplies by 1 + weight."""

HF_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
"""transformers activation names -> model.activation."""


MOE_FAMILIES = {"qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM", "mixtral": "MixtralForCausalLM",
                "qwen2_moe": "Qwen2MoeForCausalLM"}
"""transformers model_type -> class of the MoE families (their model_type is their layout's name)."""
ARCHITECTURE_CLASSES |= MOE_FAMILIES
EXPORT_MODEL_TYPES |= {family: family for family in MOE_FAMILIES}


def source_strategy(architecture: str) -> Strategy:
    """The strategy whose plain scales are exactly an architecture's norm weights."""
    if architecture == "qwen3_moe":
        return make_strategy("qknorm")
    if architecture == "olmoe":
        return make_strategy("qknorm", qk_scale_shape="full", qk_norm_group="full")
    if architecture in ("gemma2", "gemma3"):
        return make_strategy("gemma" if architecture == "gemma3" else "standard", post_norms=True)
    if architecture == "olmo2":
        return make_strategy("qknorm", post_norms=True, qk_scale_shape="full", qk_norm_group="full")
    return make_strategy("qknorm" if architecture == "qwen3" else "standard")


def global_keys(m: ModelConfig) -> dict[str, str]:
    keys = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight"}
    return keys if m.tie_embeddings else keys | {"head": "lm_head.weight"}


def layer_keys(i: int, architecture: str, m: ModelConfig | None = None) -> dict[str, str]:
    """Block i's parts: q k v o, gate up down; the norms attn_norm and ffn_norm (before a branch),
    attn_post_norm and ffn_post_norm (on its output); q_bias k_bias v_bias (Qwen2) or q_norm k_norm. A routed
    layer of an MoE family (`m` says which are) has moe_norm, router and experts.E.gate/up/down instead of the
    FFN's (and Qwen2-MoE's shared expert)."""
    p = f"model.layers.{i}"
    keys = {**{n: f"{p}.self_attn.{n}_proj.weight" for n in "qkvo"},
            **{n: f"{p}.mlp.{n}_proj.weight" for n in ("gate", "up", "down")}}
    if architecture in ("gemma2", "gemma3"):
        keys |= {"attn_norm": f"{p}.input_layernorm.weight", "attn_post_norm": f"{p}.post_attention_layernorm.weight",
                 "ffn_norm": f"{p}.pre_feedforward_layernorm.weight",
                 "ffn_post_norm": f"{p}.post_feedforward_layernorm.weight"}
    elif architecture == "olmo2":
        keys |= {"attn_post_norm": f"{p}.post_attention_layernorm.weight",
                 "ffn_post_norm": f"{p}.post_feedforward_layernorm.weight"}
    else:
        keys |= {"attn_norm": f"{p}.input_layernorm.weight", "ffn_norm": f"{p}.post_attention_layernorm.weight"}
    if architecture == "qwen2" or architecture == "qwen2_moe" and m is not None and m.qkv_bias:
        keys |= {f"{n}_bias": f"{p}.self_attn.{n}_proj.bias" for n in "qkv"}
    if architecture in ("qwen3", "gemma3", "olmo2", "qwen3_moe", "olmoe"):
        keys |= {f"{n}_norm": f"{p}.self_attn.{n}_norm.weight" for n in "qk"}
    if architecture not in MOE_FAMILIES or m is None or not m.is_moe_layer(i):
        return keys
    mlp, names = (f"{p}.block_sparse_moe", ("w1", "w3", "w2")) if architecture == "mixtral" else \
        (f"{p}.mlp", ("gate_proj", "up_proj", "down_proj"))
    keys = {k: v for k, v in keys.items() if k not in ("gate", "up", "down", "ffn_norm")}
    keys |= {"moe_norm": f"{p}.post_attention_layernorm.weight", "router": f"{mlp}.gate.weight"}
    keys |= {f"experts.{e}.{n}": f"{mlp}.experts.{e}.{name}.weight" for e in range(m.moe_experts)
             for n, name in zip(("gate", "up", "down"), names)}
    if architecture == "qwen2_moe":
        keys |= {"shared_gate": f"{mlp}.shared_expert.gate_proj.weight",
                 "shared_up": f"{mlp}.shared_expert.up_proj.weight",
                 "shared_down_doubled": f"{mlp}.shared_expert.down_proj.weight",
                 "shared_expert_gate": f"{mlp}.shared_expert_gate.weight"}
    return keys


def layer_part(key: str) -> Part:
    """The Part of a layer key (LAYER_PARTS, or one expert's slice: experts.E.gate/up/down)."""
    if key.startswith("experts."):
        _, expert, name = key.split(".")
        return Part("ffn", "down", expert=int(expert)) if name == "down" else \
            Part("ffn", "gate_up", name, expert=int(expert))
    return LAYER_PARTS[key]


def hf_shapes(m: ModelConfig, architecture: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint and its shape."""
    d, hd, q, kv = m.d_model, m.head_size, m.n_heads * m.head_size, m.n_kv_heads * m.head_size
    full_qk_norm = architecture in ("olmo2", "olmoe")
    de, E = m.moe_d_expert or m.d_ff, m.moe_experts
    part = {"attn_norm": (d,), "ffn_norm": (d,), "attn_post_norm": (d,), "ffn_post_norm": (d,), "q": (q, d),
            "k": (kv, d), "v": (kv, d), "o": (d, q), "gate": (m.d_ff, d), "up": (m.d_ff, d), "down": (d, m.d_ff),
            "q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,),
            "q_norm": (q,) if full_qk_norm else (hd,), "k_norm": (kv,) if full_qk_norm else (hd,),
            "moe_norm": (d,), "router": (E, d), "shared_gate": (m.d_ff, d), "shared_up": (m.d_ff, d),
            "shared_down_doubled": (d, m.d_ff), "shared_expert_gate": (1, d),
            **{f"experts.{e}.{n}": (d, de) if n == "down" else (de, d) for e in range(E)
               for n in ("gate", "up", "down")}}
    shapes = {name: {"embed": (m.vocab_size, d), "final_norm": (d,), "head": (m.vocab_size, d)}[key]
              for key, name in global_keys(m).items()}
    for i in range(m.n_layers):
        shapes |= {name: part[key] for key, name in layer_keys(i, architecture, m).items()}
    return shapes


@dataclass(frozen=True)
class Part:
    """Where a checkpoint tensor lives in a scalevec Decoder: the `module` at a path (from the model for global
    parts, from the block for layer parts) and its `weight` (the rows of `branch` in a fused projection), its
    `bias`, or, for a `scale`, its effective γ (a missing scale, under `fixed`, reads as ones)."""

    module: str
    field: Literal["weight", "bias", "scale", "router", "gate_up", "down", "expert_bias", "zero"]
    branch: str = ""
    expert: int = -1  # one expert's slice of a stacked MoE matrix
    factor: float = 1.0  # the checkpoint stores the tensor times this (exactly: a power of two)


GLOBAL_PARTS = {"embed": Part("tok_emb", "weight"), "final_norm": Part("final_scale", "scale"),
                "head": Part("head", "weight")}
LAYER_PARTS = {**{n: Part("attn.qkv", "weight", n) for n in "qkv"}, "o": Part("attn.o", "weight"),
               "gate": Part("ffn.gate_up", "weight", "gate"), "up": Part("ffn.gate_up", "weight", "up"),
               "down": Part("ffn.down", "weight"), **{f"{n}_bias": Part("attn.qkv", "bias", n) for n in "qkv"},
               "attn_norm": Part("attn.qkv.shared_scale", "scale"),
               "ffn_norm": Part("ffn.gate_up.shared_scale", "scale"),
               "attn_post_norm": Part("attn_post_scale", "scale"), "ffn_post_norm": Part("ffn_post_scale", "scale"),
               **{f"{n}_norm": Part(f"attn.qkv.out_scales.{n}", "scale") for n in "qk"}}
"""The parts of `global_keys` and `layer_keys`, in a Decoder (a model folded down to its norm weights)."""
LAYER_PARTS |= {"v_norm": Part("attn.qkv.out_scales.v", "scale"), "o_norm": Part("attn.o.out_scales.o", "scale"),
                **{f"{n}_norm": Part(f"ffn.gate_up.out_scales.{n}", "scale") for n in ("gate", "up")},
                "down_norm": Part("ffn.down.out_scales.down", "scale"),
                **{n: Part("ffn", n) for n in ("router", "expert_bias")},
                "experts_gate_up": Part("ffn", "gate_up"), "experts_down": Part("ffn", "down"),
                **{f"experts_{n}_norm": Part(f"ffn.out_scales.{n}", "scale") for n in ("gate", "up")},
                **{f"shared_{n}": Part("ffn.shared_expert.gate_up", "weight", n) for n in ("gate", "up")},
                "shared_down": Part("ffn.shared_expert.down", "weight"),
                **{f"shared_{n}_norm": Part(f"ffn.shared_expert.gate_up.out_scales.{n}", "scale")
                   for n in ("gate", "up")},
                "shared_down_norm": Part("ffn.shared_expert.down.out_scales.down", "scale"),
                "moe_norm": Part("ffn.shared_scale", "scale"),
                "shared_down_doubled": Part("ffn.shared_expert.down", "weight", factor=2.0),
                "shared_expert_gate": Part("ffn.shared_expert_gate", "zero")}
"""The remote-code form's parts beyond those (remote_layer_keys): DNP on v, o and the FFN, MoE routers, stacked
experts and shared experts."""

def remote_strategy(s: Strategy) -> Strategy:
    """The strategy a remote-code checkpoint is exactly: the norms of `s` (DNP, post-branch norms, QK shapes), one
    plain γ per scale behind a norm, every other scale folded into the matrices (read back as γ = 1)."""
    return make_strategy("standard", dnp=list(s.dnp), post_norms=s.post_norms, qk_scale_shape=s.qk_scale_shape,
                         qk_norm_group=s.qk_norm_group, expert_scales=s.expert_scales)


def remote_layer_keys(i: int, m: ModelConfig, s: Strategy) -> dict[str, str]:
    """Block i's parts in the remote-code form (export/remote/modeling_scalevec.py) -> its tensor names."""
    p = f"model.layers.{i}"
    keys = {n: f"{p}.self_attn.{n}_proj.weight" for n in "qkvo"}
    keys |= {f"{n}_bias": f"{p}.self_attn.{n}_proj.bias" for n in "qkv" if m.qkv_bias}
    keys |= {f"{n}_norm": f"{p}.self_attn.{n}_norm.weight" for n in "qkvo" if n in s.dnp}
    if s.post_norms:
        keys |= {"attn_post_norm": f"{p}.post_attention_norm.weight",
                 "ffn_post_norm": f"{p}.post_feedforward_norm.weight"}
    ffn = ("gate", "up", "down")
    if not m.is_moe_layer(i):
        return keys | {n: f"{p}.mlp.{n}_proj.weight" for n in ffn} | \
            {f"{n}_norm": f"{p}.mlp.{n}_norm.weight" for n in ffn if n in s.dnp}
    keys |= {"router": f"{p}.mlp.router.weight", "expert_bias": f"{p}.mlp.expert_bias",
             "experts_gate_up": f"{p}.mlp.experts.gate_up_proj", "experts_down": f"{p}.mlp.experts.down_proj"}
    keys |= {f"experts_{n}_norm": f"{p}.mlp.experts.{n}_norm.weight" for n in ("gate", "up") if n in s.dnp}
    if m.moe_shared_expert:
        keys |= {f"shared_{n}": f"{p}.mlp.shared_expert.{n}_proj.weight" for n in ffn}
        keys |= {f"shared_{n}_norm": f"{p}.mlp.shared_expert.{n}_norm.weight" for n in ffn if n in s.dnp}
    return keys


def remote_shapes(m: ModelConfig, s: Strategy) -> dict[str, tuple[int, ...]]:
    """Every tensor of a remote-code checkpoint and its shape."""
    d, hd, ff, E = m.d_model, m.head_size, m.d_ff, m.moe_experts
    de, q, kv = m.moe_d_expert or m.d_ff, m.n_heads * m.head_size, m.n_kv_heads * m.head_size
    out = {"q": q, "k": kv, "v": kv}
    part = {"q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q), "o_norm": (d,), "attn_post_norm": (d,),
            "ffn_post_norm": (d,), "router": (E, d), "expert_bias": (E,), "experts_gate_up": (E, 2 * de, d),
            "experts_down": (E, d, de), **{f"{n}_bias": (out[n],) for n in "qkv"},
            **{f"{n}_norm": (hd,) if s.qk_scale_shape == "head" else (out[n],) for n in "qkv"}}
    for prefix in ("", "shared_"):
        part |= {f"{prefix}gate": (ff, d), f"{prefix}up": (ff, d), f"{prefix}down": (d, ff),
                 f"{prefix}gate_norm": (ff,), f"{prefix}up_norm": (ff,), f"{prefix}down_norm": (d,)}
    part |= {f"experts_{n}_norm": (E, de) if s.expert_scales == "per_expert" else (de,) for n in ("gate", "up")}
    shapes = {name: {"embed": (m.vocab_size, d), "final_norm": (d,), "head": (m.vocab_size, d)}[key]
              for key, name in global_keys(m).items()}
    for i in range(m.n_layers):
        shapes |= {name: part[key] for key, name in remote_layer_keys(i, m, s).items()}
    return shapes


HF_BRANCHES = (("self_attn", ("q", "k", "v"), "attn_norm", "attn_post_norm"),
               ("mlp", ("gate", "up"), "ffn_norm", "ffn_post_norm"))
"""Each branch of a transformers decoder layer: its module, its projections, the parts of its pre- and post-norm."""


def _module(root: nn.Module, path: str) -> nn.Module | None:
    """The module at a dotted path (ModuleDict entries by key), or None where an optional one is absent."""
    module = root
    for name in path.split("."):
        module = module[name] if isinstance(module, nn.ModuleDict) and name in module else getattr(module, name, None)
        if module is None:
            return None
    return module


def _rows(module: nn.Module, part: Part) -> torch.Tensor:
    """The view of the module's tensor that `part` names: one expert's slice, one branch's rows."""
    tensor = getattr(module, part.field)
    if part.expert >= 0:
        tensor = tensor[part.expert]
    if not part.branch:
        return tensor
    if not hasattr(module, "branches"):  # an MoE expert's gate_up: gate rows, then up rows
        return tensor.split(module.d_expert)[("gate", "up").index(part.branch)]
    names = [branch.name for branch in module.branches]
    return tensor.split(module.sizes)[names.index(part.branch)]


def read_part(root: nn.Module, part: Part, shape: tuple[int, ...], offset: float = 0.0) -> torch.Tensor:
    """The tensor of `part` (a view of the weight, or γ − `offset` for a scale: Gemma stores γ − 1)."""
    module = _module(root, part.module)
    if part.field == "zero":
        return torch.zeros(shape)
    if part.field == "scale":
        return (torch.ones(shape) if module is None else module().detach()) - offset
    return _rows(module, part) * part.factor if part.factor != 1.0 else _rows(module, part)


@torch.no_grad()
def write_part(root: nn.Module, part: Part, tensor: torch.Tensor, offset: float = 0.0) -> None:
    """The mirror of `read_part`: `tensor` into the weight's rows, or γ = tensor + `offset` into the scale; a
    `zero` part must be zero (ValueError otherwise)."""
    module = _module(root, part.module)
    if part.field == "zero":
        if tensor.any():
            raise ValueError(f"{part.module} is not zero in this checkpoint, and scalevec's model has no such "
                              "tensor (e.g. Qwen2-MoE's shared-expert gate); it cannot be imported exactly")
    elif part.field == "scale":
        module.set_gamma(tensor.float() + offset)
    else:
        _rows(module, part).copy_(tensor / part.factor if part.factor != 1.0 else tensor)
