"""Which optimizer, learning-rate multiplier and weight decay each parameter gets: one table.

The table is keyed on (role, kind) of `ParamInfo`, never on module names. What "decay a scale"
means per parameterization (decoupled decay pulls the *parameter* toward 0):

| parameterization | decayed parameters under a decaying policy | effect on effective γ |
|---|---|---|
| plain γ | γ | toward 0 |
| OR β·α/RMS(α) | β (α only with optim.decay_or_direction) | magnitude toward 0 (decaying α only keeps its
  norm, and so its effective learning rate, in check) |
| ER exp(β)·exp(α − mean α) | β and α | toward 1 (not 0) |

Scale decay policies (strategy.scale_decay), docs/paper-notes.md section 3:
- `iwd`, the paper's rule: every Input-Norm scale the loss depends on decays (pre-attention, pre-FFN, an MoE
  block's FFN norm, the router's own γ, the final norm, a tied head's included), no Output-Norm scale does. The
  balance argument for decaying γ (γ² − ||w||² driven to 0) needs the matrices it feeds decayed too; where one is
  not (a tied head with an undecayed embedding), the scale still decays and one warning at start names it.
- `iwd-balanced`: `iwd` only where that argument holds; an Input scale feeding an undecayed matrix keeps its γ
  undecayed (scalevec's rule before 0.2; runs written then resume and report under this name).
- `all` decays every scale (with the same warning), `none` no scale.
DP's output-side scale is an Input scale by default (strategy.dual_placement_role). A parameter the loss does not
depend on (`ParamInfo.invariant`) is never decayed.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, replace

from torch import nn

from ..config import OptimConfig
from ..errors import BadInput
from ..scales import Kind, ParamInfo, Role
from ..strategy import Strategy

DECAYED_ROLES = {"iwd": {Role.INPUT}, "iwd-balanced": {Role.INPUT}, "all": {Role.INPUT, Role.OUTPUT}, "none": set()}


@dataclass(frozen=True)
class Rule:
    optimizer: str  # adamw or muon
    lr_mult: float
    weight_decay: float


def policy_table(optim: OptimConfig, scale_decay: str) -> dict[tuple[Role, Kind], Rule]:
    matrix_optimizer = "muon" if optim.name == "muon" else "adamw"
    table = {
        (Role.NONE, Kind.MATRIX): Rule(matrix_optimizer, 1.0, optim.weight_decay),
        (Role.NONE, Kind.EMBEDDING): Rule("adamw", optim.embedding_lr_mult, optim.embedding_weight_decay),
        (Role.NONE, Kind.HEAD): Rule("adamw", optim.head_lr_mult, optim.head_weight_decay),
        (Role.NONE, Kind.ROUTER): Rule("adamw", 1.0, optim.router_weight_decay),
        (Role.NONE, Kind.BIAS): Rule("adamw", 1.0, 0.0),
    }
    for role in (Role.INPUT, Role.OUTPUT):
        decays = role in DECAYED_ROLES[scale_decay]
        for kind, decayed in ((Kind.GAIN, decays), (Kind.OR_MAGNITUDE, decays),
                              (Kind.OR_DIRECTION, decays and optim.decay_or_direction),
                              (Kind.ER_MAGNITUDE, decays), (Kind.ER_DIRECTION, decays)):
            table[(role, kind)] = Rule("adamw", optim.scale_lr_mult, optim.scale_weight_decay if decayed else 0.0)
    return table


class PolicyError(BadInput):
    """A parameter matched no rule or more than one."""


def assign(infos: dict[str, ParamInfo], model: nn.Module, optim: OptimConfig, scale_decay: str) -> dict[str, Rule]:
    """The rule of every parameter of `model`; an unmatched or doubly matched parameter is an error."""
    table = policy_table(optim, scale_decay)
    every_name = dict(model.named_parameters(remove_duplicate=False))  # a shared tensor under each of its names
    extra = sorted(set(infos) - set(every_name))
    if extra:
        raise PolicyError(f"param_info names {extra[0]}, which is not a parameter of the model")
    seen: dict[int, str] = {}
    for name in infos:
        tensor = id(every_name[name])
        if tensor in seen:
            raise PolicyError(f"parameter {name} is the same tensor as {seen[tensor]}; it would be assigned twice")
        seen[tensor] = name
    unmatched = [name for name, p in model.named_parameters() if id(p) not in seen]
    if unmatched:
        raise PolicyError(f"parameter {unmatched[0]} has no role and kind; declare it in its module's param_info")
    rules = {}
    for name, info in infos.items():
        if (info.role, info.kind) not in table:
            raise PolicyError(f"parameter {name} ({info.role.value}, {info.kind.value}) matches no rule of the table")
        rule = table[(info.role, info.kind)]
        rules[name] = replace(rule, weight_decay=0.0) if info.invariant else rule
    if scale_decay == "iwd-balanced":
        for name in _unbalanced(infos, rules):
            rules[name] = replace(rules[name], weight_decay=0.0)
    _warn_unbalanced(infos, rules)
    return rules


def _unbalanced(infos: dict[str, ParamInfo], rules: dict[str, Rule]) -> list[str]:
    """Decayed Input scales that feed an undecayed matrix."""
    return [name for name, info in infos.items() if info.role is Role.INPUT and rules[name].weight_decay > 0
            and any(rules[matrix].weight_decay == 0 for matrix, _, _ in info.feeds)]


MATRIX_DECAY_OPTION = {Kind.EMBEDDING: "optim.embedding_weight_decay", Kind.HEAD: "optim.head_weight_decay",
                       Kind.ROUTER: "optim.router_weight_decay", Kind.MATRIX: "optim.weight_decay"}
"""The option that decays a matrix of each kind, for the warning below."""


def _warn_unbalanced(infos: dict[str, ParamInfo], rules: dict[str, Rule]) -> None:
    """One warning naming every decayed Input scale whose matrix is not decayed, and how to decay that matrix:
    the paper's balance argument (γ² vs ||w||²) needs both sides decayed. Blocks are folded into `blocks.*`."""
    pairs: dict[tuple[str, str], str] = {}
    for name in _unbalanced(infos, rules):
        for matrix, _, _ in infos[name].feeds:
            if rules[matrix].weight_decay == 0:
                key = tuple(re.sub(r"^blocks\.\d+\.", "blocks.*.", n) for n in (name.rsplit(".", 1)[0], matrix))
                pairs[key] = MATRIX_DECAY_OPTION[infos[matrix].kind]
    if pairs:
        named = "; ".join(f"{scale} feeds {matrix} (set {option} > 0)" for (scale, matrix), option in pairs.items())
        warnings.warn(f"decayed Input scales feed undecayed matrices, so the paper's balance argument for decaying "
                      f"them does not hold: {named}; or use strategy.scale_decay=iwd-balanced to leave such scales "
                      "undecayed", stacklevel=3)


def param_groups(model: nn.Module, policy: str | None = None, optim: OptimConfig | None = None,
                 infos: dict[str, ParamInfo] | None = None) -> list[dict]:
    """Optimizer parameter groups of `model` under scale-decay `policy`, one per distinct rule, each with
    `names`, `optimizer`, `lr_mult`, `weight_decay` and, for Muon, each matrix's logical `blocks`.

    `policy` defaults to the model's own strategy's `scale_decay` (a Decoder's `strategy`, or the one
    `apply_strategy` recorded), so there is one default: the strategy's.

    `infos` (every parameter's role and kind) defaults to `model.param_info()`, which a scalevec Decoder
    has and `apply_strategy` gives the models it converts.
    """
    optim = OptimConfig() if optim is None else optim
    if policy is None:
        strategy = getattr(model, "strategy", None) or getattr(model, "scalevec_strategy", None)
        policy = (strategy if isinstance(strategy, Strategy) else Strategy()).scale_decay
    if infos is None:
        if not callable(getattr(model, "param_info", None)):
            raise PolicyError(f"{type(model).__name__} has no param_info(); convert it with scalevec.apply_strategy "
                              "or pass infos")
        infos = model.param_info()
    rules = assign(infos, model, optim, policy)
    named = dict(model.named_parameters(remove_duplicate=False))
    groups: dict[Rule, dict] = {}
    for name, rule in rules.items():
        group = groups.setdefault(rule, {"params": [], "names": [], "blocks": [], "optimizer": rule.optimizer,
                                         "lr_mult": rule.lr_mult, "weight_decay": rule.weight_decay})
        group["params"].append(named[name])
        group["names"].append(name)
        group["blocks"].append(infos[name].blocks)
    return list(groups.values())


def decay_counts(model: nn.Module, policy: str, optim: OptimConfig) -> dict[str, dict[str, int]]:
    """Scale entries per `role/kind` of `model`: how many decay under `policy`, of how many (warnings silenced:
    this only counts)."""
    infos = model.param_info()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rules = assign(infos, model, optim, policy)
    counts: dict[str, dict[str, int]] = {}
    for name, info in infos.items():
        if info.kind.is_scale:
            row = counts.setdefault(f"{info.role.value}/{info.kind.value}", {"decayed": 0, "entries": 0})
            entries = model.get_parameter(name).numel()
            row["entries"] += entries
            row["decayed"] += entries if rules[name].weight_decay > 0 else 0
    return counts
