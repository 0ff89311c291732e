"""A scalevec Decoder under another strategy, built directly: the source folded down to its norm weights
(HG and DP scales go into the matrices), those weights into the target's scales, or into the columns of
the matrix a norm feeds where the target has no scale for them; every norm the source has is kept
(`keeping_source_norms`). Exact strategies keep the logits. Used by `apply_strategy` and by import, which
first reads a checkpoint into its architecture's own strategy (hf_keys.source_strategy).
"""

from __future__ import annotations

import copy

import torch

from .errors import BadInput
from .export.fold import fold_scales
from .model import Decoder, FeedForward
from .moe import MoEFeedForward
from .projection import Projection
from .scales import Scale
from .strategy import Strategy, keeping_source_norms


class ConvertError(BadInput):
    """A model cannot be rebuilt under the asked strategy: a scale value or shape that strategy cannot hold."""


def set_gamma(scale: Scale | None, gamma: torch.Tensor, where: str) -> None:
    """`scale.set_gamma(gamma)` for an optional scale; an ER refusal names the tensor."""
    if scale is None:
        return
    try:
        scale.set_gamma(gamma)
    except ValueError as err:
        raise ConvertError(f"{where}: {err}; choose strategy or, or plain") from None


def _take_gamma(scale: Scale | None, gamma: torch.Tensor, where: str) -> bool:
    """Give `scale` the effective value `gamma`; False when there is no scale to hold it."""
    if scale is None:
        return False
    set_gamma(scale, gamma, where)
    return True


@torch.no_grad()
def _convert_projection(source: Projection, target: Projection, where: str) -> None:
    """Weights and scales of a folded source projection (only block-norm γ and DNP output scales left) into
    `target`; a norm γ the target has no scale for stays folded into the weight's columns."""
    shared = source.shared_scale
    kept, folded = source.effective_weight(without=shared), source.effective_weight()
    weight, start = [], 0
    for branch, placement, source_placement in zip(target.branches, target.placements, source.placements):
        rows = slice(start, start + branch.out_features)
        start += branch.out_features
        taken = shared is not None and _take_gamma(target.in_scale(branch.name), shared().detach(),
                                                   f"{where} input scale")
        weight.append(kept[rows] if shared is None or taken else folded[rows])
        if source_placement == placement == "dnp" and branch.name in source.out_scales and \
                branch.name in target.out_scales:
            out, into = source.out_scales[branch.name]().detach(), target.out_scales[branch.name]
            # a head-shaped scale becomes a full-width one by repeating it over the heads
            _take_gamma(into, out.repeat(into().shape[-1] // out.shape[-1]), f"{where}.out_scales.{branch.name}")
    target.weight.copy_(torch.cat(weight))
    if source.bias is not None:
        target.bias.copy_(source.bias)


def _expanded(gamma: torch.Tensor, scale: Scale) -> torch.Tensor:
    """A block's γ (d) in the shape of `scale` (d, or one row per expert)."""
    return gamma.expand_as(scale()) if scale().ndim == 2 else gamma


@torch.no_grad()
def convert_moe(source: MoEFeedForward, target: MoEFeedForward, where: str) -> None:
    """A folded source MoE FFN (only the block norm's γ and DNP output scales left) into `target`: γ into the
    target's router and expert input scales (its one shared scale, or one each under HG, per expert or shared),
    or into the columns of a matrix that has none; the shared expert likewise."""
    gamma = None if source.shared_scale is None else source.shared_scale().detach()

    def take(scale: Scale | None, weight: torch.Tensor, name: str) -> torch.Tensor:
        """`weight` as the target stores it: γ in `scale` when there is one, else in the weight's columns."""
        if gamma is None or target.shared_scale is not None:
            return weight
        if scale is not None:
            set_gamma(scale, _expanded(gamma, scale), f"{where}.{name}")
            return weight
        return weight * gamma

    set_gamma(target.shared_scale, gamma if gamma is not None else torch.ones(target.router.shape[1]),
              f"{where}.shared_scale")
    target.router.copy_(take(target.router_scale, source.router, "router_scale"))
    de = source.d_expert
    target.gate_up.copy_(torch.cat([take(target.in_scales[n] if n in target.in_scales else None,
                                         w, f"in_scales.{n}") for n, w in zip(("gate", "up"),
                                                                               source.gate_up.split(de, dim=1))], 1))
    target.down.copy_(source.down)
    target.expert_bias.copy_(source.expert_bias)
    for name, scale in target.out_scales.items():
        if target.placements[name] == "dnp" and name in source.out_scales:
            out = source.out_scales[name]().detach()
            if out.ndim > scale().ndim:
                raise ConvertError(f"{where}.out_scales.{name}: per-expert DNP scales have no shared form; choose "
                                   "strategy.expert_scales=per_expert")
            set_gamma(scale, out.expand_as(scale()), f"{where}.out_scales.{name}")
    if source.shared_expert is not None:
        a, b = source.shared_expert, target.shared_expert
        weight = torch.cat([take(b.gate_up.in_scales[n] if n in b.gate_up.in_scales else None, w,
                                 f"shared_expert.gate_up.in_scales.{n}")
                            for n, w in zip(("gate", "up"), a.gate_up.weight.split(a.gate_up.sizes))])
        a.gate_up.weight.copy_(weight)  # the source is a folded copy: γ is now where the target holds it
        _convert_projection(a.gate_up, b.gate_up, f"{where}.shared_expert.gate_up")
        _convert_projection(a.down, b.down, f"{where}.shared_expert.down")


@torch.no_grad()
def convert_decoder(model: Decoder, target: Strategy) -> Decoder:
    """Build `model`'s network under `target` directly, then swap it in: the source folded to its norm weights,
    those weights into the target's scales (or columns), the source's norms kept (`keeping_source_norms`)."""
    target = keeping_source_norms(model.strategy, target)
    source = fold_scales(copy.deepcopy(model), keep_norm_weights=True)  # HG and DP scales are in the weights now
    weight = model.tok_emb.weight
    moe = model.moe_layers()[0].moe if model.moe_layers() else None
    new = Decoder(model.config, target, moe).to(device=weight.device, dtype=weight.dtype)  # every scale at γ = 1
    new.tok_emb.weight.copy_(source.tok_emb.weight)
    if new.head is not None:
        new.head.weight.copy_(source.head.weight)
    if source.final_scale is not None:
        final = source.final_scale().detach()
        if not _take_gamma(new.final_scale, final, "final_scale") and new.head is not None:
            new.head.weight *= final  # a tied head cannot take it: `none` drops it, as it asks
    for i, (a, b) in enumerate(zip(source.blocks, new.blocks)):
        for name in ("attn.qkv", "attn.o", "ffn.gate_up", "ffn.down") if isinstance(a.ffn, FeedForward) else \
                ("attn.qkv", "attn.o"):
            _convert_projection(a.get_submodule(name), b.get_submodule(name), f"blocks.{i}.{name}")
        if not isinstance(a.ffn, FeedForward):
            convert_moe(a.ffn, b.ffn, f"blocks.{i}.ffn")
        for name in ("attn_post_scale", "ffn_post_scale"):
            if getattr(a, name) is not None:
                _take_gamma(getattr(b, name), getattr(a, name)().detach(), f"blocks.{i}.{name}")
    model.strategy = target
    for name in ("tok_emb", "blocks", "final_scale", "head"):
        setattr(model, name, getattr(new, name))
    return model
