"""The strategy on other people's models.

`apply_strategy(model, strategy)` converts a `transformers` Llama, Mistral, Qwen2, Qwen3, Gemma 2,
Gemma 3 (text) or OLMo 2 model, or a scalevec Decoder of any strategy, in place: block norms become
parameter-free, their γ moves into the projections that read them (shared, or one per branch under
HG), DP/DNP wrap the projections, post-branch and final norms keep their scales. The norms a model
has stay (`keeping_source_norms`). `param_info(model)` gives every parameter its role and kind (a
converted model also answers `model.param_info()`, as a Decoder does), and `param_groups(model,
policy)` the role-aware optimizer groups, so the strategy trains from any loop (HF Trainer,
torchtitan, yours).
"""

from __future__ import annotations

import copy
import functools
import re
import types
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig, MoEConfig
from .convert import ConvertError, convert_decoder, convert_moe, set_gamma
from .errors import BadInput
from .hf_keys import HF_BRANCHES, MODEL_TYPES, NORM_OFFSET, layer_keys, source_strategy
from .model import Decoder
from .moe import MoEFeedForward
from .projection import Branch, Projection, normalize
from .scales import Kind, ParamInfo, Role, Scale, er_gamma_problem, make_scale
from .strategy import Strategy, keeping_source_norms
from .strategy import strategy as make_strategy


class ApplyError(BadInput):
    """`apply_strategy` or `unapply` cannot convert this model as asked; it is left as it was."""


class ParameterFreeNorm(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, x.shape[-1], "rms", self.eps)


class ScaledNorm(nn.Module):
    """RMSNorm whose gain is a scalevec Scale: the final norm (an Input-Norm feeding the head), or a
    post-branch norm (an Output-Norm: Gemma, OLMo 2)."""

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


def _architecture(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in APPLIED_MOE_FAMILIES:
        return model_type
    if model_type == "qwen2_moe":
        raise ApplyError("apply_strategy: Qwen2-MoE's shared expert sits behind a sigmoid gate, which scalevec's "
                         "MoE has not; import the checkpoint (scalevec import: exact when the gate is zero)")
    if model_type not in MODEL_TYPES:
        raise ApplyError("apply_strategy converts scalevec Decoders and transformers Llama, Mistral, Qwen2, Qwen3, "
                         "Gemma 2, Gemma 3 (text), OLMo 2, Qwen3-MoE, OLMoE and Mixtral models, not "
                         f"{model_type or type(model).__name__!r}")
    return MODEL_TYPES[model_type]


def _routed(layer: nn.Module) -> bool:
    """Whether a transformers decoder layer's FFN is a routed MoE block (or its scalevec replacement)."""
    return hasattr(layer.mlp, "experts")


def _norm_name(architecture: str, part: str) -> str | None:
    """Where a part's norm sits inside a decoder layer (`input_layernorm`, `self_attn.q_norm`), from the key
    map; None if the architecture has no such norm."""
    key = layer_keys(0, architecture).get(part)
    return None if key is None else key.removeprefix("model.layers.0.").removesuffix(".weight")


@torch.no_grad()
def _apply_to_hf(model: nn.Module, s: Strategy) -> nn.Module:
    architecture = _architecture(model)
    c = model.config
    s = keeping_source_norms(source_strategy(architecture), s)  # e.g. a Qwen3's QK-norm stays
    if s.post_norms and _norm_name(architecture, "attn_post_norm") is None:
        raise ApplyError(f"apply_strategy: strategy {s.preset!r} has post-branch norms (strategy.post_norms), which "
                         f"a {c.model_type} layer has no place for (Gemma 2, Gemma 3 and OLMo 2 have them); drop "
                         "post_norms, or import the checkpoint (scalevec import --warm-start) to add them")
    problem = _strategy_form_problem(architecture, s, c.model_type)
    if problem or architecture in APPLIED_MOE_FAMILIES:  # both read the model as scalevec's: checked up front
        from .hf_import import model_config_from_hf

        try:
            model_config_from_hf(c.to_dict())
        except BadInput as err:
            if not problem:
                raise ApplyError(f"apply_strategy: the routed blocks of this {c.model_type} model have no scalevec "
                                 f"MoE form ({err})") from None
            raise ApplyError(f"apply_strategy: strategy {s.preset!r} saves as scalevec's remote-code form, since "
                             f"{problem}, and that form cannot hold this model ({err}); choose a strategy its "
                             "own architecture saves (standard, hg, dp, or, er and their compositions)") from None
    offset = NORM_OFFSET.get(architecture, 0.0)  # Gemma stores γ - 1
    if s.scale == "er":  # every norm's γ becomes an ER scale, exp of a log: refused before anything changes
        norms = ((name, m) for name, m in model.model.named_modules() if isinstance(m, type(model.model.norm)))
        for name, norm in norms:
            if problem := er_gamma_problem(norm.weight.detach() + offset):
                raise ConvertError(f"model.{name}: {problem}; choose strategy or, or plain")
    eps, hd = c.rms_norm_eps, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    model.scalevec_norm_class = type(model.model.norm)  # what unapply() rebuilds

    def gamma_of(norm: nn.Module) -> torch.Tensor:
        return norm.weight.detach().float() + offset

    for i, layer in enumerate(model.model.layers):
        for owner_name, names, pre, post in HF_BRANCHES:
            owner, pre, post = getattr(layer, owner_name), _norm_name(architecture, pre), _norm_name(architecture, post)
            gamma = None if pre is None else gamma_of(getattr(layer, pre))
            if owner_name == "mlp" and _routed(layer):
                model.scalevec_moe_class = type(owner)  # what unapply() rebuilds
                layer.mlp = _routed_ffn(model, architecture, owner, gamma, s, f"model.layers.{i}.mlp")
                setattr(layer, pre, ParameterFreeNorm(eps))
                continue
            shared = None if s.heterogeneous or gamma is None else make_scale(
                gamma.numel(), s.scale, Role.INPUT, s.input_magnitude([s.placement(n) for n in names]))
            set_gamma(shared, gamma, pre)
            for n in names:
                linear = getattr(owner, f"{n}_proj")
                branch = Branch.attention(n, linear.out_features, hd, s) if owner_name == "self_attn" else \
                    Branch.whole(n, linear.out_features)
                proj = _projection(linear, branch, s, gamma is not None, eps)
                if gamma is not None and n in proj.in_scales:
                    if shared is None:
                        set_gamma(proj.in_scales[n], gamma, pre)
                    else:
                        proj.in_scales[n] = shared
                qk_norm = _norm_name(architecture, f"{n}_norm")
                if qk_norm and n in proj.out_scales:
                    set_gamma(proj.out_scales[n], gamma_of(layer.get_submodule(qk_norm)), qk_norm)
                setattr(owner, f"{n}_proj", SingleProjection(proj).to(linear.weight.device))
            if pre:
                setattr(layer, pre, ParameterFreeNorm(eps))
            if post:
                norm, scale = getattr(layer, post), make_scale(c.hidden_size, s.scale, Role.OUTPUT)
                set_gamma(scale, gamma_of(norm), post)
                setattr(layer, post, ScaledNorm(scale, eps).to(norm.weight.device))
        attn, mlp = layer.self_attn, layer.mlp
        for n in ("q", "k"):
            if hasattr(attn, f"{n}_norm"):  # the projection's DNP does it now
                setattr(attn, f"{n}_norm", nn.Identity())
        for owner, n in ((attn, "o"), (mlp, "down")):
            if s.placement(n) != "standard" and hasattr(owner, f"{n}_proj"):  # (a routed FFN has its own)
                linear = getattr(owner, f"{n}_proj")
                branch = Branch.whole(n, linear.out_features)
                setattr(owner, f"{n}_proj",
                        SingleProjection(_projection(linear, branch, s, False, eps)).to(linear.weight.device))
    final = make_scale(c.hidden_size, s.scale, Role.INPUT)
    set_gamma(final, gamma_of(model.model.norm), "model.norm")
    model.model.norm = ScaledNorm(final, eps).to(model.model.embed_tokens.weight.device)
    model.scalevec_strategy = s
    model.param_info = functools.partial(param_info, model)  # what the optimizer table reads, as on a Decoder
    model.save_pretrained = types.MethodType(_save_what_it_computes, model)  # what HF Trainer calls at its end
    return model


APPLIED_MOE_FAMILIES = ("qwen3_moe", "olmoe", "mixtral")
"""transformers MoE families apply_strategy converts: each routed block becomes scalevec's MoEFeedForward."""


def _family_moe(model: nn.Module) -> tuple[ModelConfig, MoEConfig]:
    from .hf_import import model_config_from_hf, moe_config_from_hf

    hf = model.config.to_dict()
    return model_config_from_hf(hf)[0], moe_config_from_hf(hf)


@torch.no_grad()
def _routed_ffn(model: nn.Module, architecture: str, block: nn.Module, gamma: torch.Tensor, s: Strategy,
                where: str) -> MoEFeedForward:
    """A family's routed block (router `gate`, stacked `experts`) read with its pre-norm's γ into a MoEFeedForward
    under the family's own strategy, then converted to `s` (convert_moe): γ into the router and expert scales."""
    m, moe = _family_moe(model)
    source = MoEFeedForward(m, source_strategy(architecture), moe)
    source.shared_scale.set_gamma(gamma)
    for name, weight in (("router", block.gate.weight), ("gate_up", block.experts.gate_up_proj),
                         ("down", block.experts.down_proj)):
        getattr(source, name).copy_(weight)
    target = MoEFeedForward(m, s, moe)
    convert_moe(source, target, where)
    weight = block.experts.gate_up_proj
    target.to(weight.device)
    for param in (target.router, target.gate_up, target.down):
        param.data = param.data.to(weight.dtype)  # the matrices keep the model's dtype, as the dense ones do
    return target


CONVERTED_ATTRIBUTES = ("scalevec_strategy", "scalevec_norm_class", "scalevec_moe_class", "param_info",
                        "save_pretrained")
"""What apply_strategy adds to a transformers model; unapply removes them."""


TRAINER_CHECKPOINT = re.compile(r"checkpoint-\d+")
"""The folders HF Trainer writes every save_steps, which its resume_from_checkpoint loads back."""


def _save_what_it_computes(model: nn.Module, save_directory, *args, **kwargs) -> None:
    """`save_pretrained` of a converted model: a checkpoint that reloads as what the model computes, the model
    itself untouched. The plain checkpoint of its architecture (`unapply` on a copy) where the strategy has one,
    else scalevec's remote-code form (export/remote). A `state_dict` given by the caller (HF Trainer passes the
    converted model's own, or None) names scalevec's parameters, so it is replaced by the folded one, except in
    the Trainer's own checkpoint-N folders: `resume_from_checkpoint` loads those into the converted model, so they
    keep its parameters as they are (the final `trainer.save_model()` writes what the model computes)."""
    from_trainer = "state_dict" in kwargs  # (HF Trainer passes one, None for a PreTrainedModel)
    state_dict = kwargs.pop("state_dict", None)
    if from_trainer and TRAINER_CHECKPOINT.fullmatch(Path(save_directory).name):
        type(model).save_pretrained(model, save_directory, *args, state_dict=state_dict, **kwargs)
        return
    if _plain_form_problem(model) is None:
        unapply(copy.deepcopy(model)).save_pretrained(save_directory, *args, **kwargs)
        return
    from .export.remote import save_remote

    save_remote(as_decoder(model), save_directory, *args, **kwargs)


def apply_strategy(model: nn.Module, strategy: str | Strategy) -> nn.Module:
    """Convert `model` to `strategy` in place and return it. Exact strategies (standard, hg, dp, or, er and
    compositions) keep its logits; ones that add norms (DNP, unified) change them. The norms the model
    already has stay (a Qwen3's QK-norm, a scalevec Decoder's DNP and post-branch norms), with their scales."""
    s = make_strategy(strategy) if isinstance(strategy, str) else strategy
    if isinstance(model, Decoder):
        return convert_decoder(model, s)
    return _apply_to_hf(model, s)


def _plain_form_problem(model: nn.Module) -> str | None:
    """Why a converted model has no plain form of its architecture (None if it has one)."""
    s, c = getattr(model, "scalevec_strategy", None), getattr(model, "config", None)
    if s is None or c is None:
        return "it is not a transformers model converted by apply_strategy"
    return _strategy_form_problem(_architecture(model), s, c.model_type)


def _strategy_form_problem(architecture: str, s: Strategy, model_type: str) -> str | None:
    """Why strategy `s` on a model of `architecture` has no plain form of it (None if it has one)."""
    source = source_strategy(architecture)
    if set(s.dnp) != set(source.dnp):
        return (f"DNP on {', '.join(sorted(set(s.dnp) - set(source.dnp)))} adds norms a {model_type} model does "
                "not have")
    if source.dnp and (s.qk_scale_shape, s.qk_norm_group) != (source.qk_scale_shape, source.qk_norm_group):
        return f"its QK-norm scale is shaped unlike a {model_type} model's (strategy.qk_scale_shape)"
    return None


def _family_block(model: nn.Module, ffn: MoEFeedForward) -> tuple[nn.Module, torch.Tensor]:
    """The family's routed block holding `ffn` folded down to its pre-norm's γ, and that γ."""
    kept = ffn.shared_scale
    block = model.scalevec_moe_class(model.config).to(device=ffn.router.device, dtype=ffn.router.dtype)
    block.gate.weight.copy_(ffn.effective_router(without=kept))
    block.experts.gate_up_proj.copy_(ffn.effective_gate_up(without=kept))
    block.experts.down_proj.copy_(ffn.down)
    return block, kept().detach() if kept is not None else torch.ones(ffn.router.shape[1], device=ffn.router.device)


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
    """Undo `apply_strategy` on a transformers model, in place: the plain model of its architecture with the
    same logits, whose `save_pretrained` output reloads as that architecture. A scale shared by a norm's
    branches goes back into the norm's weight; per-branch (HG) and DP scales are folded into the projections'
    weights; OR/ER scales become their effective γ. Refused, before anything changes, for strategies whose
    norms the architecture lacks (e.g. DNP on gate/up, unified)."""
    problem = _plain_form_problem(model)
    if problem:
        raise ApplyError(f"unapply: {problem}; train on, or export from a strategy without them")
    architecture, c, norm_cls = _architecture(model), model.config, model.scalevec_norm_class
    offset, eps = NORM_OFFSET.get(architecture, 0.0), c.rms_norm_eps

    def ones(like: torch.Tensor) -> torch.Tensor:
        return torch.ones(c.hidden_size, device=like.device)

    def norm(gamma: torch.Tensor, like: torch.Tensor) -> nn.Module:
        """The architecture's own norm class holding γ (stored as γ − 1 by Gemma), in `like`'s dtype."""
        return _norm(norm_cls, (gamma - offset).to(like.dtype), eps)

    for layer in model.model.layers:
        attn = layer.self_attn
        for owner_name, names, pre, post in HF_BRANCHES:
            owner, pre, post = getattr(layer, owner_name), _norm_name(architecture, pre), _norm_name(architecture, post)
            if isinstance(owner, MoEFeedForward):  # the family's routed block, its γ in the pre-norm
                layer.mlp, gamma = _family_block(model, owner)
                setattr(layer, pre, norm(gamma, owner.router))
                continue
            projections = {n: getattr(owner, f"{n}_proj").projection for n in names}
            scales = {n: p.in_scales[n] if n in p.in_scales else None for n, p in projections.items()}
            first = scales[names[0]]
            shared = pre is not None and first is not None and all(scale is first for scale in scales.values())
            for n, proj in projections.items():
                weight = proj.effective_weight(without=first if shared else None)  # a shared γ goes to the norm
                setattr(owner, f"{n}_proj", _linear(weight, proj.effective_bias()))
                if proj.placements[0] == "dnp":  # the architecture's QK-norm (γ = 1 where scales are fixed)
                    gamma = proj.out_scales[n]() if n in proj.out_scales else \
                        torch.ones(proj.branches[0].out_scale_size, device=weight.device)
                    setattr(attn, f"{n}_norm", norm(gamma, weight))
            if pre:
                setattr(layer, pre, norm(first() if shared else ones(weight), weight))
            if post:
                scale = getattr(layer, post).scale
                setattr(layer, post, norm(scale() if scale is not None else ones(weight), weight))
        for owner, n in ((attn, "o"), (layer.mlp, "down")):
            wrapped = getattr(owner, f"{n}_proj", None)  # (a routed block has none)
            if isinstance(wrapped, SingleProjection):
                setattr(owner, f"{n}_proj", _linear(wrapped.projection.effective_weight(),
                                                    wrapped.projection.effective_bias()))
    final, embedding = model.model.norm.scale, model.model.embed_tokens.weight
    model.model.norm = norm(final() if final is not None else ones(embedding), embedding)
    for name in CONVERTED_ATTRIBUTES:
        model.__dict__.pop(name, None)
    return model


@torch.no_grad()
def as_decoder(model: nn.Module) -> Decoder:
    """A transformers model converted by `apply_strategy` as the scalevec Decoder that computes the same function:
    every input-side and DP scale folded into its matrix, the scales behind a norm (DNP, post-branch, final) kept
    as plain γ. What export writes for a strategy the architecture has no form for (export/remote)."""
    from .hf_import import model_config_from_hf

    s = model.scalevec_strategy
    m, moe = _family_moe(model) if hasattr(model, "scalevec_moe_class") else \
        (model_config_from_hf(model.config.to_dict())[0], None)
    decoder = Decoder(m, replace(s, scale="plain", heterogeneous=False, dual_placement=[]), moe)
    decoder.to(model.model.embed_tokens.weight.device)

    def gamma(scale: Scale | None, like: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(like) if scale is None else scale().detach()

    def copy_projections(sources: dict[str, nn.Module], target: Projection) -> None:
        projections = {n: p.projection if isinstance(p, SingleProjection) else None for n, p in sources.items()}
        target.weight.copy_(torch.cat([p.weight if projections[n] is None else projections[n].effective_weight()
                                       for n, p in sources.items()]))
        if target.bias is not None:
            target.bias.copy_(torch.cat([projections[n].effective_bias() for n in sources]))
        for n, scale in target.out_scales.items():
            scale.set_gamma(gamma(projections[n].out_scales[n] if n in projections[n].out_scales else None, scale()))

    for layer, block in zip(model.model.layers, decoder.blocks):
        attn, mlp = layer.self_attn, layer.mlp
        copy_projections({n: getattr(attn, f"{n}_proj") for n in "qkv"}, block.attn.qkv)
        copy_projections({"o": attn.o_proj}, block.attn.o)
        if isinstance(mlp, MoEFeedForward):
            folded = copy.deepcopy(mlp)
            folded.fold()
            convert_moe(folded, block.ffn, "mlp")
        else:
            copy_projections({n: getattr(mlp, f"{n}_proj") for n in ("gate", "up")}, block.ffn.gate_up)
            copy_projections({"down": mlp.down_proj}, block.ffn.down)
        for (_, _, _, post), target in zip(HF_BRANCHES, (block.attn_post_scale, block.ffn_post_scale)):
            name = _norm_name(_architecture(model), post)
            if name is not None and target is not None:
                target.set_gamma(gamma(getattr(layer, name).scale, target()))
    decoder.tok_emb.weight.copy_(model.model.embed_tokens.weight)
    if decoder.head is not None:
        decoder.head.weight.copy_(model.get_output_embeddings().weight)
    decoder.final_scale.set_gamma(gamma(model.model.norm.scale, decoder.final_scale()))
    return decoder


def param_info(model: nn.Module) -> dict[str, ParamInfo]:
    """Role and kind of every parameter of a scalevec Decoder or of a model converted by `apply_strategy`."""
    if isinstance(model, Decoder):
        return model.param_info()
    named = dict(model.named_parameters())
    canonical = {id(p): n for n, p in named.items()}  # a shared scale is listed once, under its first name
    infos: dict[str, ParamInfo] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, Projection | MoEFeedForward):
            for name, info in module.param_info(prefix).items():
                key = canonical[id(model.get_parameter(name))]
                if key in infos:
                    info = replace(infos[key], feeds=infos[key].feeds + info.feeds)
                infos[key] = info
        elif isinstance(module, nn.Linear) and module is not model.get_output_embeddings():
            infos[canonical[id(module.weight)]] = ParamInfo(Role.NONE, Kind.MATRIX)  # o/down in standard placement
        elif isinstance(module, ScaledNorm) and module.scale is not None:  # the final norm, or a post-branch one
            head = canonical[id(model.get_output_embeddings().weight)]
            feeds = ((head, 0, model.config.vocab_size),) if module.scale.role is Role.INPUT else ()
            for local, kind in module.scale.kinds().items():
                infos[f"{prefix}.scale.{local}"] = ParamInfo(module.scale.role, kind, feeds)
    embedding = canonical[id(model.get_input_embeddings().weight)]
    infos[embedding] = ParamInfo(Role.NONE, Kind.EMBEDDING)
    head = canonical[id(model.get_output_embeddings().weight)]
    if head != embedding:
        infos[head] = ParamInfo(Role.NONE, Kind.HEAD)
    return infos
