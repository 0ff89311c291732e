"""The strategy on other people's models.

`apply_strategy(model, strategy)` converts a `transformers` Llama/Mistral/Qwen2/Qwen3 model, or a
scalevec Decoder of any strategy, in place: block norms become parameter-free, their γ moves into the
projections that read them (shared, or one per branch under HG), DP/DNP wrap the projections, the final
norm keeps its scale.
`param_info(model)` gives every parameter its role and kind (a converted model also answers
`model.param_info()`, as a Decoder does), and `param_groups(model, policy)` the role-aware optimizer
groups, so the strategy trains from any loop (HF Trainer, torchtitan, yours).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import replace

import torch
from torch import nn

from .export import ExportError
from .export.fold import fold_scales
from .hf_import import LLAMA_LAYOUT, set_gamma
from .model import Decoder
from .projection import Branch, Projection, normalize
from .scales import Kind, ParamInfo, Role, Scale, make_scale
from .strategy import Strategy
from .strategy import strategy as make_strategy


class ParameterFreeNorm(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, x.shape[-1], "rms", self.eps)


class ScaledNorm(nn.Module):
    """RMSNorm whose gain is a scalevec Scale (the final norm, an Input-Norm feeding the head)."""

    def __init__(self, scale: Scale | None, eps: float):
        super().__init__()
        self.scale, self.eps = scale, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, x.shape[-1], "rms", self.eps, None if self.scale is None else self.scale())


class SingleProjection(nn.Module):
    """A one-branch Projection in place of an nn.Linear (returns a tensor, not a list)."""

    def __init__(self, projection: Projection):
        super().__init__()
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)[0]


def _projection(linear: nn.Linear, branch: Branch, s: Strategy, reads_norm: bool, eps: float) -> Projection:
    # each wrapper owns its input scale (HG form); a shared scale is then installed in all of them
    proj = Projection(d_in=linear.in_features, branches=[branch], strategy=replace(s, heterogeneous=True),
                      reads_norm=reads_norm, norm="rms", eps=eps, bias=linear.bias is not None)
    proj.weight = linear.weight
    if linear.bias is not None:
        proj.bias = linear.bias
    return proj


@torch.no_grad()
def _apply_to_hf(model: nn.Module, s: Strategy) -> nn.Module:
    c = model.config
    if LLAMA_LAYOUT.get(c.model_type, c.model_type) not in ("llama", "qwen2", "qwen3"):
        raise ExportError(f"apply_strategy supports Llama, Mistral, Qwen2 and Qwen3 models, not {c.model_type!r}")
    if getattr(c, "sliding_window", None) is not None and c.sliding_window < c.max_position_embeddings:
        raise ExportError(f"sliding-window attention (sliding_window={c.sliding_window}) is not supported")
    if c.model_type == "qwen3":  # keep its QK-norm, as import does
        s = replace(s, dnp=sorted(set(s.dnp) | {"q", "k"}),
                    dual_placement=[p for p in s.dual_placement if p not in ("q", "k")])
    eps, hd = c.rms_norm_eps, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    model.scalevec_norm_class = type(model.model.norm)  # what unapply() rebuilds
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm_name, owner, names in (("input_layernorm", attn, ("q", "k", "v")), ("post_attention_layernorm", mlp,
                                                                                    ("gate", "up"))):
            gamma = getattr(layer, norm_name).weight.detach()
            shared = None if s.heterogeneous else make_scale(gamma.numel(), s.scale, Role.INPUT,
                                                             s.input_magnitude([s.placement(n) for n in names]))
            set_gamma(shared, gamma, norm_name)
            for n in names:
                linear = getattr(owner, f"{n}_proj")
                group = hd if n in ("q", "k", "v") else linear.out_features
                size = hd if n in ("q", "k", "v") and s.qk_scale_shape == "head" else linear.out_features
                branch = Branch(name=n, out_features=linear.out_features, norm_group=group, out_scale_size=size)
                proj = _projection(linear, branch, s, True, eps)
                if n in proj.in_scales:
                    if shared is None:
                        set_gamma(proj.in_scales[n], gamma, norm_name)
                    else:
                        proj.in_scales[n] = shared
                if n in ("q", "k") and c.model_type == "qwen3" and n in proj.out_scales:
                    set_gamma(proj.out_scales[n], getattr(attn, f"{n}_norm").weight.detach(), f"{n}_norm")
                setattr(owner, f"{n}_proj", SingleProjection(proj))
            setattr(layer, norm_name, ParameterFreeNorm(eps))
        if c.model_type == "qwen3":
            attn.q_norm, attn.k_norm = nn.Identity(), nn.Identity()
        for owner, n in ((attn, "o"), (mlp, "down")):
            if s.placement(n) != "standard":
                linear = getattr(owner, f"{n}_proj")
                branch = Branch.whole(n, linear.out_features)
                setattr(owner, f"{n}_proj", SingleProjection(_projection(linear, branch, s, False, eps)))
    final = make_scale(c.hidden_size, s.scale, Role.INPUT)
    set_gamma(final, model.model.norm.weight.detach(), "model.norm")
    model.model.norm = ScaledNorm(final, eps)
    model.scalevec_strategy = s
    model.param_info = functools.partial(param_info, model)  # what the optimizer table reads, as on a Decoder
    return model


def keeping_source_norms(source: Strategy, target: Strategy) -> Strategy:
    """`target` with every norm `source` has (its DNP branches, post-branch norms) and, for a full-width QK
    scale, its shape: dropping a norm would change the function and discard the scale behind it."""
    full_qkv_scale = source.qk_scale_shape == "full" and set(source.dnp) & {"q", "k", "v"}
    return replace(target, dnp=sorted(set(target.dnp) | set(source.dnp)),
                   dual_placement=[p for p in target.dual_placement if p not in source.dnp],
                   post_norms=target.post_norms or source.post_norms,
                   qk_scale_shape="full" if full_qkv_scale else target.qk_scale_shape)


def _take_gamma(scale: Scale | None, gamma: torch.Tensor, where: str) -> bool:
    """Give `scale` the effective value `gamma`; False when there is no scale to hold it."""
    if scale is None:
        return False
    set_gamma(scale, gamma, where)
    return True


@torch.no_grad()
def _convert_projection(source: Projection, target: Projection, where: str) -> None:
    """Weights and scales of a folded source projection (only block-norm γ and DNP output scales left) into
    `target`; a norm γ the target has no scale for goes into the weight's columns."""
    gamma = None if source.shared_scale is None else source.shared_scale().detach()
    weight = source.weight.detach().clone()
    start = 0
    for branch, placement, source_placement in zip(target.branches, target.placements, source.placements):
        rows = slice(start, start + branch.out_features)
        start += branch.out_features
        if gamma is not None and not _take_gamma(target.in_scale(branch.name), gamma, f"{where} input scale"):
            weight[rows] *= gamma
        if source_placement == placement == "dnp" and branch.name in source.out_scales and \
                branch.name in target.out_scales:
            out, into = source.out_scales[branch.name]().detach(), target.out_scales[branch.name]
            # a head-shaped scale becomes a full-width one by repeating it over the heads
            _take_gamma(into, out.repeat(into().shape[-1] // out.shape[-1]), f"{where}.out_scales.{branch.name}")
    target.weight.copy_(weight)
    if source.bias is not None:
        target.bias.copy_(source.bias)


@torch.no_grad()
def _apply_to_decoder(model: Decoder, target: Strategy) -> Decoder:
    """Build `model`'s network under `target` directly, then swap it in: the source folded to its norm weights,
    those weights into the target's scales (or columns), the source's norms kept (`keeping_source_norms`)."""
    if model.moe_layers():
        raise ExportError("apply_strategy does not convert MoE Decoders; build the model under the strategy "
                          "(scalevec.build_model) instead")
    target = keeping_source_norms(model.strategy, target)
    source = fold_scales(copy.deepcopy(model), keep_norm_weights=True)  # HG and DP scales are in the weights now
    weight = model.tok_emb.weight
    new = Decoder(model.config, target).to(device=weight.device, dtype=weight.dtype)  # every scale at γ = 1
    new.tok_emb.weight.copy_(source.tok_emb.weight)
    if new.head is not None:
        new.head.weight.copy_(source.head.weight)
    if source.final_scale is not None:
        final = source.final_scale().detach()
        if not _take_gamma(new.final_scale, final, "final_scale") and new.head is not None:
            new.head.weight *= final  # a tied head cannot take it: `none` drops it, as it asks
    for i, (a, b) in enumerate(zip(source.blocks, new.blocks)):
        for name in ("attn.qkv", "attn.o", "ffn.gate_up", "ffn.down"):
            _convert_projection(a.get_submodule(name), b.get_submodule(name), f"blocks.{i}.{name}")
        for name in ("attn_post_scale", "ffn_post_scale"):
            if getattr(a, name) is not None:
                _take_gamma(getattr(b, name), getattr(a, name)().detach(), f"blocks.{i}.{name}")
    model.strategy = target
    for name in ("tok_emb", "blocks", "final_scale", "head"):
        setattr(model, name, getattr(new, name))
    return model


def apply_strategy(model: nn.Module, strategy: str | Strategy) -> nn.Module:
    """Convert `model` to `strategy` in place and return it. Exact strategies (standard, hg, dp, or, er and
    compositions) keep its logits; ones that add norms (DNP, unified) change them. The norms the model
    already has stay (a Qwen3's QK-norm, a scalevec Decoder's DNP and post-branch norms), with their scales."""
    s = make_strategy(strategy) if isinstance(strategy, str) else strategy
    if isinstance(model, Decoder):
        return _apply_to_decoder(model, s)
    return _apply_to_hf(model, s)


def _plain_form_problem(model: nn.Module) -> str | None:
    """Why a converted model has no plain Llama/Qwen3 form (None if it has one)."""
    s, c = getattr(model, "scalevec_strategy", None), getattr(model, "config", None)
    if s is None or c is None:
        return "it is not a transformers model converted by apply_strategy"
    plain_dnp = {"q", "k"} if c.model_type == "qwen3" and s.qk_scale_shape == "head" else set()
    if set(s.dnp) - plain_dnp:
        return (f"DNP on {', '.join(sorted(set(s.dnp) - plain_dnp))} adds norms a {c.model_type} model does not have "
                "(only Qwen3's q_norm/k_norm are DNP on q, k)")
    return None


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


def _norm(cls: type, gamma: torch.Tensor, eps: float) -> nn.Module:
    norm = cls(gamma.numel(), eps=eps).to(device=gamma.device, dtype=gamma.dtype)
    norm.weight.copy_(gamma)
    return norm


@torch.no_grad()
def unapply(model: nn.Module) -> nn.Module:
    """Undo `apply_strategy` on a transformers model, in place: the plain Llama/Qwen3 with the same logits,
    whose `save_pretrained` output reloads as that architecture. A scale shared by a norm's branches goes
    back into the norm's weight; per-branch (HG) and DP scales are folded into the projections' weights;
    OR/ER scales become their effective γ. Refused, before anything changes, for strategies whose norms
    the architecture lacks (DNP on gate/up, unified)."""
    problem = _plain_form_problem(model)
    if problem:
        raise ExportError(f"unapply: {problem}; train on, or export from a strategy without them")
    c, norm_cls = model.config, model.scalevec_norm_class
    eps = c.rms_norm_eps
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm_name, owner, names in (("input_layernorm", attn, ("q", "k", "v")),
                                        ("post_attention_layernorm", mlp, ("gate", "up"))):
            projections = {n: getattr(owner, f"{n}_proj").projection for n in names}
            scales = {n: p.in_scales[n] if n in p.in_scales else None for n, p in projections.items()}
            first = scales[names[0]]
            shared = first is not None and all(scale is first for scale in scales.values())
            gamma = first() if shared else torch.ones(c.hidden_size, device=layer.mlp.down_proj.weight.device)
            for n, proj in projections.items():
                weight = proj.weight
                if scales[n] is not None and not shared:
                    weight = weight * scales[n]()
                if proj.placements[0] == "dp" and n in proj.out_scales:
                    weight = weight * proj.out_scales[n]().unsqueeze(1)
                setattr(owner, f"{n}_proj", _linear(weight, proj.effective_bias()))
                if proj.placements[0] == "dnp":  # Qwen3's q_norm / k_norm
                    setattr(attn, f"{n}_norm", _norm(norm_cls, proj.out_scales[n](), eps))
            setattr(layer, norm_name, _norm(norm_cls, gamma.to(weight.dtype), eps))
        for owner, n in ((attn, "o"), (mlp, "down")):
            wrapped = getattr(owner, f"{n}_proj")
            if isinstance(wrapped, SingleProjection):
                setattr(owner, f"{n}_proj", _linear(wrapped.projection.effective_weight(),
                                                    wrapped.projection.effective_bias()))
    final = model.model.norm.scale
    model.model.norm = _norm(norm_cls, final() if final is not None else torch.ones(c.hidden_size), eps)
    for name in ("scalevec_strategy", "scalevec_norm_class", "param_info"):
        delattr(model, name)
    return model


def param_info(model: nn.Module) -> dict[str, ParamInfo]:
    """Role and kind of every parameter of a scalevec Decoder or of a model converted by `apply_strategy`."""
    if isinstance(model, Decoder):
        return model.param_info()
    named = dict(model.named_parameters())
    canonical = {id(p): n for n, p in named.items()}  # a shared scale is listed once, under its first name
    infos: dict[str, ParamInfo] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, Projection):
            for name, info in module.param_info(prefix).items():
                key = canonical[id(model.get_parameter(name))]
                if key in infos:
                    info = replace(infos[key], feeds=infos[key].feeds + info.feeds)
                infos[key] = info
        elif isinstance(module, nn.Linear) and module is not model.get_output_embeddings():
            infos[canonical[id(module.weight)]] = ParamInfo(Role.NONE, Kind.MATRIX)  # o/down in standard placement
        elif isinstance(module, ScaledNorm) and module.scale is not None:
            head = canonical[id(model.get_output_embeddings().weight)]
            for local, kind in module.scale.kinds().items():
                infos[f"{prefix}.scale.{local}"] = ParamInfo(Role.INPUT, kind, ((head, 0, model.config.vocab_size),))
    embedding = canonical[id(model.get_input_embeddings().weight)]
    infos[embedding] = ParamInfo(Role.NONE, Kind.EMBEDDING)
    head = canonical[id(model.get_output_embeddings().weight)]
    if head != embedding:
        infos[head] = ParamInfo(Role.NONE, Kind.HEAD)
    return infos
