"""Scale-vector strategies: where the scale vectors sit and how they are parameterized.

A strategy is data. Each named preset is a small, documented difference from `standard`
(a Llama-style model with one shared plain γ per norm), and presets compose left to right:
`hg+dnp+or+iwd` applies HG, then DNP, then OR, then IWD.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from .errors import BadInput

Parameterization = Literal["fixed", "plain", "or", "er"]
ProjectionName = Literal["q", "k", "v", "o", "gate", "up", "down"]
ScaleDecay = Literal["iwd", "iwd-balanced", "all", "none"]


@dataclass
class Strategy:
    """Scale-vector design of a model (docs/paper-notes.md sections 3-4)."""

    preset: str = "standard"
    """Preset name these fields started from (`a+b` composes); fields set beside it override it."""
    scale: Parameterization = "plain"
    """Parameterization of every scale vector: `fixed` (none), `plain` γ, `or` β·α/RMS(α), `er` exp(β)·exp(α-mean α)."""
    heterogeneous: bool = False
    """HG: one input-side scale per branch (q, k, v; gate, up) instead of one shared per norm."""
    dual_placement: list[ProjectionName] = field(default_factory=list)
    """Projections with dual placement γa ⊙ (W (γb ⊙ x)); any of q k v o gate up down."""
    dnp: list[ProjectionName] = field(default_factory=list)
    """Projections with dual normalized placement γa ⊙ Norm(W (γb ⊙ x)); DNP on q,k is QK-norm."""
    post_norms: bool = False
    """Gemma-style sandwich norms: x += γ ⊙ Norm(branch output), an Output-Norm per branch."""
    qk_scale_shape: Literal["head", "full"] = "head"
    """Output-side scale of DNP on q/k/v: `head` (head_dim, shared by heads: Qwen3/Gemma3) or `full`."""
    qk_norm_group: Literal["head", "full"] = "head"
    """What DNP on q/k/v normalizes over: each `head` (Qwen3, Gemma 3) or the `full` projection output at once
    (OLMo 2; needs qk_scale_shape = full)."""
    magnitude_on_dnp_inputs: bool = False
    """Give OR/ER magnitude β to input-side scales that only feed DNP branches (its gradient is ~0)."""
    dual_placement_role: Literal["input", "output"] = "input"
    """Role of DP's output-side scale: `input` (it folds into the weight's rows) or `output`."""
    scale_decay: ScaleDecay = "none"
    """Weight decay of scale vectors: `iwd` (every Input-Norm scale, the paper's rule), `iwd-balanced` (only the
    Input-Norm scales whose matrices decay too), `all`, `none` (optim/policy.py)."""
    expert_scales: Literal["per_expert", "shared"] = "per_expert"
    """MoE under HG: gate/up scales `per_expert` or `shared` by all experts of a layer."""

    def placement(self, projection: str) -> str:
        if projection in self.dual_placement:
            return "dp"
        if projection in self.dnp:
            return "dnp"
        return "standard"

    def input_magnitude(self, placements) -> bool:
        """Whether an input-side scale read by branches of these placements gets a magnitude β: not when all
        of them are DNP (their norm removes any overall factor, so β would get no gradient), unless
        magnitude_on_dnp_inputs asks for it."""
        return self.magnitude_on_dnp_inputs or any(p != "dnp" for p in placements)


PRESETS: dict[str, tuple[str, dict]] = {
    "standard": ("Llama-style: one shared plain γ per norm, no QK-norm, scales not decayed.", {}),
    "none": ("No scale vectors: parameter-free norms only (the removal experiment).", {"scale": "fixed"}),
    "qknorm": ("QK-norm: DNP on q and k with the shared input γ (control for DNP).", {"dnp": ["q", "k"]}),
    "gemma": (
        "Gemma-style: QK-norm of head shape and post-branch sandwich norms, plain γ (no 1+γ).",
        {"dnp": ["q", "k"], "post_norms": True},
    ),
    "hg": ("Branch-specific input scales for q, k, v and gate, up.", {"heterogeneous": True}),
    "dp": ("Dual placement on q, k, gate, up.", {"dual_placement": ["q", "k", "gate", "up"]}),
    "dnp": ("Dual normalized placement on q, k, gate, up.", {"dnp": ["q", "k", "gate", "up"]}),
    "dnp-ffn": ("DNP on gate and up only: normalizes the FFN's hidden pre-activations (DNP without QK-norm).",
                {"dnp": ["gate", "up"]}),
    "or": ("Every scale as β·α/RMS(α).", {"scale": "or"}),
    "er": ("Every scale as exp(β)·exp(α - mean α).", {"scale": "er"}),
    "iwd": ("Decay every Input-Norm scale, never an Output-Norm scale (the paper's rule).", {"scale_decay": "iwd"}),
    "iwd-balanced": ("IWD only where the balance argument holds: an Input-Norm scale feeding an undecayed matrix "
                     "(a tied head, an undecayed router) is not decayed.", {"scale_decay": "iwd-balanced"}),
    "wd-all": ("Decay every scale vector.", {"scale_decay": "all"}),
    "unified": (
        "The paper's strategy: HG + DNP on q, k, gate, up + OR + IWD.",
        {"heterogeneous": True, "dnp": ["q", "k", "gate", "up"], "scale": "or", "scale_decay": "iwd"},
    ),
}


class UnknownPreset(BadInput):
    pass


def preset_values(name: str) -> dict:
    """Field values of a (possibly composed) preset name, e.g. `dnp+or`."""
    values: dict = {"preset": name}
    for part in name.split("+"):
        if part not in PRESETS:
            raise UnknownPreset(f"unknown strategy preset {part!r}; choose from {', '.join(PRESETS)}")
        values.update(PRESETS[part][1])
    return values


def strategy(name: str, **overrides) -> Strategy:
    """The Strategy of preset `name` with fields overridden."""
    return replace(Strategy(**preset_values(name)), **overrides)




def keeping_source_norms(source: Strategy, target: Strategy) -> Strategy:
    """`target` with every norm `source` has (its DNP branches, post-branch norms) and, for DNP on q/k/v, the
    source's full-width QK scale and norm group: a conversion that dropped a norm would change the model's
    function and discard the scale behind it."""
    qkv_dnp = bool(set(source.dnp) & {"q", "k", "v"})
    return replace(target, dnp=[*target.dnp, *(p for p in source.dnp if p not in target.dnp)],
                   dual_placement=[p for p in target.dual_placement if p not in source.dnp],
                   post_norms=target.post_norms or source.post_norms,
                   qk_scale_shape="full" if qkv_dnp and source.qk_scale_shape == "full" else target.qk_scale_shape,
                   qk_norm_group="full" if qkv_dnp and source.qk_norm_group == "full" else target.qk_norm_group)
