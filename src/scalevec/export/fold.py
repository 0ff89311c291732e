"""Fold every foldable scale vector into the adjacent weights (docs/paper-notes.md section 2).

`W (γ ⊙ x̂) = (W diag γ) x̂`: an input-side scale is a column scaling of the next weight, and DP's
output-side scale a row scaling. After folding, those scales are exactly 1 and the logits are
unchanged. Scales behind a norm (DNP outputs, QK-norm, post-branch norms) stay: no weight absorbs
them. Each module folds through its own effective weight (`Projection.fold`, `MoEFeedForward.fold`), the
product its forward computes; tests/reference.py checks the result against a decoder written apart.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import Decoder, FeedForward


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
    for block in model.blocks:
        block.attn.qkv.fold(keep_norm_weights)
        block.attn.o.fold(keep_norm_weights)
        if isinstance(block.ffn, FeedForward):
            block.ffn.gate_up.fold(keep_norm_weights)
            block.ffn.down.fold(keep_norm_weights)
        else:
            block.ffn.fold(keep_norm_weights)
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
