"""Fold every foldable scale vector into the adjacent weights (docs/paper-notes.md section 2).

`W (γ ⊙ x̂) = (W diag γ) x̂`: an input-side scale is a column scaling of the next weight, and DP's
output-side scale a row scaling. After folding, those scales are exactly 1 and the logits are
unchanged. Scales behind a norm (DNP outputs, QK-norm, post-branch norms) stay: no weight absorbs
them. Written independently of `Projection.effective_weight`, so a bug in one shows against the other.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import Decoder
from ..moe import MoEFeedForward
from ..projection import Projection


@torch.no_grad()
def _fold_projection(proj: Projection, keep_shared: bool) -> None:
    start = 0
    for branch, placement in zip(proj.branches, proj.placements):
        rows = slice(start, start + branch.out_features)
        start += branch.out_features
        column_scale = None if keep_shared else proj.shared_scale
        if branch.name in proj.in_scales:
            column_scale = proj.in_scales[branch.name]
        if column_scale is not None:
            proj.weight[rows] *= column_scale()[None, :]
        if placement == "dp" and branch.name in proj.out_scales:
            gamma = proj.out_scales[branch.name]()
            proj.weight[rows] *= gamma[:, None]
            if proj.bias is not None:
                proj.bias[rows] *= gamma
            proj.out_scales[branch.name].reset_to_identity()
    if proj.shared_scale is not None and not keep_shared:
        proj.shared_scale.reset_to_identity()
    for scale in proj.in_scales.values():
        scale.reset_to_identity()


@torch.no_grad()
def _fold_moe(moe: MoEFeedForward, keep_shared: bool) -> None:
    """Router and per-expert gate/up scales into each expert's columns (rows for DP)."""
    de = moe.d_expert
    router_scale = moe.shared_scale if not keep_shared and moe.shared_scale is not None else moe.router_scale
    if router_scale is not None:
        moe.router *= router_scale()[None, :]
    for name, rows in (("gate", slice(0, de)), ("up", slice(de, 2 * de))):
        column = moe.in_scales[name] if name in moe.in_scales else None if keep_shared else moe.shared_scale
        if column is not None:
            gamma = column()
            moe.gate_up[:, rows] *= gamma[:, None, :] if gamma.ndim == 2 else gamma[None, None, :]
        if moe.placements[name] == "dp" and name in moe.out_scales:
            gamma = moe.out_scales[name]()
            moe.gate_up[:, rows] *= gamma[:, :, None] if gamma.ndim == 2 else gamma[None, :, None]
            moe.out_scales[name].reset_to_identity()
    for scale in (moe.router_scale, *moe.in_scales.values(), None if keep_shared else moe.shared_scale):
        if scale is not None:
            scale.reset_to_identity()


@torch.no_grad()
def fold_scales(model: Decoder, untie: bool = False, keep_norm_weights: bool = False) -> Decoder:
    """Fold input-side and DP output-side scales into the weights, in place; returns `model`.

    With a tied head the final norm's γ stays as the norm's weight (folding it would rescale the
    input embedding too), unless `untie=True`, which gives the model its own folded head.
    `keep_norm_weights=True` leaves the scales a standard checkpoint stores as norm weights (one
    shared scale per block norm, the final norm's) and folds only the rest (HG, DP).
    A transformers model converted by `apply_strategy` is refused before anything changes: `scalevec.unapply`
    folds it back into its own architecture.
    """
    if not isinstance(model, Decoder):
        raise TypeError(f"fold_scales takes a scalevec Decoder, not {type(model).__name__}; for a transformers model "
                        "converted by apply_strategy use scalevec.unapply(model)")
    for module in model.modules():
        if isinstance(module, Projection):
            _fold_projection(module, keep_norm_weights)
        elif isinstance(module, MoEFeedForward):
            _fold_moe(module, keep_norm_weights)
    if model.final_scale is None or keep_norm_weights:
        return model
    gamma = model.final_scale()
    if model.head is None:
        if not untie:
            return model
        model.head = nn.Linear(model.config.d_model, model.config.vocab_size, bias=False)
        model.head.to(model.tok_emb.weight.device, model.tok_emb.weight.dtype)
        model.head.weight.copy_(model.tok_emb.weight)
        model.config.tie_embeddings = False
    model.head.weight *= gamma[None, :]
    model.final_scale.reset_to_identity()
    return model
