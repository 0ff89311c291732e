"""Pre-Norm scale vectors add no expressivity: W (γ ⊙ x̂) = (W diag γ) x̂, so folding them into the
next weight leaves the logits unchanged. Scales behind a norm (DNP outputs) are what stays."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..export.fold import fold_scales
from ..model import build_model
from ..scales import Scale
from ..strategy import strategy
from .common import figure, finish

STRATEGIES = ["standard", "hg", "dp", "or", "er", "hg+dp+er", "unified"]


@torch.no_grad()
def run(out: Path, fast: bool = False) -> dict:
    config = ModelConfig(vocab_size=256, d_model=64, n_layers=2 if fast else 4, n_heads=4, n_kv_heads=2, d_ff=128,
                         max_seq_len=64, tie_embeddings=False)
    tokens = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    results = {}
    for name in STRATEGIES:
        model = build_model(config, strategy(name), seed=1)
        gen = torch.Generator().manual_seed(2)
        for info_name, info in model.param_info().items():
            if info.kind.is_scale:
                p = model.get_parameter(info_name)
                p.copy_(p + 0.5 * torch.randn(p.shape, generator=gen))
        before = model(tokens)
        fold_scales(model)
        after = model(tokens)
        remaining = sum(scale().numel() for scale in model.modules()
                        if isinstance(scale, Scale) and not torch.allclose(scale(), torch.ones(())))
        results[name] = {"max_abs_logit_change": (after - before).abs().max().item(),
                         "logit_scale": before.abs().max().item(), "unfolded_scale_entries": remaining}
    holds = all(r["max_abs_logit_change"] < 1e-4 for r in results.values())
    fig, (ax,) = figure(width=6)
    ax.bar(list(results), [max(r["max_abs_logit_change"], 1e-12) for r in results.values()])
    ax.set(yscale="log", ylabel="max |Δ logit| after folding", title="folding input-side scales (fp32)")
    ax.tick_params(axis="x", rotation=30)
    return finish(fig, out, "fold", {"claim": "folding Pre-Norm input-side and DP scales leaves logits unchanged",
                                     "holds": holds, "tolerance": 1e-4, "strategies": results})
