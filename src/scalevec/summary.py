"""What a model is made of: parameter counts by role and kind, scale-vector fraction, FLOPs."""

from __future__ import annotations

from collections import Counter

from .model import Decoder
from .scales import Kind


def flops_per_token(model: Decoder, seq_len: int | None = None) -> int:
    """Training FLOPs per token: 6 per matrix weight a token uses (head included, embedding lookup
    not; routed experts only) plus attention's 12·layers·d_model·seq_len (PaLM's accounting;
    seq_len defaults to model.max_seq_len)."""
    c, infos = model.config, model.param_info()
    matrices = [p for name, p in model.named_parameters() if infos[name].kind in (Kind.MATRIX, Kind.HEAD, Kind.ROUTER)]
    matmul = sum(p.numel() for p in matrices) - _unrouted(model, {id(p) for p in matrices})
    if model.head is None:
        matmul += model.tok_emb.weight.numel()
    return 6 * matmul + 12 * c.n_layers * c.d_model * (seq_len or c.max_seq_len)


def active_parameters(model: Decoder) -> int:
    """Parameters one token uses: all, less those of the experts it is not routed to (their matrices and, with
    per-expert scales, their scale vectors)."""
    return sum(p.numel() for p in model.parameters()) - _unrouted(model)


def _unrouted(model: Decoder, among: set[int] | None = None) -> int:
    """Parameters of the routed experts one token is not sent to (only those whose id is in `among`, if given)."""
    return sum((moe.experts - moe.top_k) * (p.numel() // moe.experts) for moe in model.moe_layers()
               for p in moe.expert_parameters() if among is None or id(p) in among)


def summarize(model: Decoder) -> dict:
    infos = model.param_info()
    params = dict(model.named_parameters())
    by_role, by_kind = Counter(), Counter()
    for name, info in infos.items():
        by_role[info.role.value] += params[name].numel()
        by_kind[info.kind.value] += params[name].numel()
    total = sum(p.numel() for p in params.values())
    scale_total = sum(params[n].numel() for n, i in infos.items() if i.kind.is_scale)
    scales = [
        {"name": name, "role": info.role.value, "kind": info.kind.value, "shape": list(params[name].shape),
         "invariant": info.invariant}
        for name, info in infos.items() if info.kind.is_scale
    ]
    return {
        "parameters": total,
        "active_parameters": active_parameters(model),
        "non_embedding_parameters": total - by_kind.get(Kind.EMBEDDING.value, 0),
        "by_role": dict(by_role),
        "by_kind": dict(by_kind),
        "scale_fraction": scale_total / total,
        "flops_per_token": flops_per_token(model),
        "scales": scales,
    }
