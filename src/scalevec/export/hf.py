"""Hugging Face checkpoints out: folded safetensors that `transformers` loads offline, as the
architecture whose norms the model has (hf_keys.py; the way in is `hf_import.py`).

Mapping. A block norm's one shared scale is the HF norm weight (Gemma: weight = γ - 1); per-branch (HG)
and DP scales are folded into the projections; the final norm's scale is `model.norm.weight`; DNP on
q, k is the QK-norm (head-shaped: Qwen3, Gemma 3; over all heads: OLMo 2); post-branch norms are
Gemma's and OLMo 2's. Anything else (DNP on other projections, LayerNorm, MoE...) has no family that
computes the same function: it leaves as scalevec's remote-code form (export/remote), never as a family
checkpoint that computes other logits.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import load_run_model, run_tokenizer
from ..config import Config, ModelConfig, MoEConfig
from ..hf_keys import (
    ARCHITECTURE_CLASSES,
    EXPORT_MODEL_TYPES,
    GLOBAL_PARTS,
    HF_ACTIVATIONS,
    MOE_FAMILIES,
    NORM_OFFSET,
    global_keys,
    hf_shapes,
    layer_keys,
    layer_part,
    read_part,
    source_strategy,
)
from ..model import Decoder, is_windowed
from ..outputs import DirectoryLock, claim_directory, contains, new_directory
from ..strategy import Strategy
from . import ExportError
from .fold import fold_scales
from .remote import remote_files

EXPORT_MANIFEST = "scalevec_export.json"  # the files an export wrote, so a later export may replace exactly them
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OTHERWISE = "use `scalevec generate` on the run directory, or train a model an architecture has (hf_keys.py)"


FAMILIES = ("Llama and Mistral: pre-norms only; Qwen2: with q/k/v biases; Qwen3: a head-shaped QK-norm; Gemma 2: "
            "post-branch norms too; Gemma 3: both; OLMo 2: no pre-norms, post-branch norms, a QK-norm over all heads")


def _norms(m: ModelConfig, s: Strategy) -> tuple:
    """What export cannot change about a model: where its norms are (and q/k/v biases, which only Qwen2 has)."""
    qkv_dnp = bool(set(s.dnp) & {"q", "k", "v"})
    return (m.pre_norm, s.post_norms, frozenset(s.dnp), (s.qk_scale_shape, s.qk_norm_group) if qkv_dnp else None,
            m.qkv_bias)


def _architecture_of_norms(config: Config) -> str:
    """The architecture whose norms the model has: the one whose own strategy (hf_keys.source_strategy) puts
    its norms where the model's are."""
    s, m = config.strategy, config.model
    if m.norm != "rms":
        raise ExportError(f"model.norm={m.norm!r} has no transformers form here (RMSNorm only); {OTHERWISE}")
    if m.moe_experts:
        return _moe_family(config)
    for architecture in ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "olmo2"):
        shape = replace(m, pre_norm=architecture != "olmo2", qkv_bias=architecture == "qwen2")
        if _norms(shape, source_strategy(architecture)) == _norms(m, s):
            return architecture
    raise ExportError(f"{_describe_norms(m, s)} has no transformers form ({FAMILIES}), and export refuses to write "
                      f"different logits; {OTHERWISE}")


MOE_FAMILY_NAMES = ("Qwen3-MoE: a head-shaped QK-norm, dense layers between routed ones; OLMoE: a QK-norm over all "
                    "heads, every layer routed; Mixtral: no QK-norm, every layer routed, top-k renormalized; "
                    "Qwen2-MoE: no QK-norm, a shared expert; all route by softmax, without an expert bias")


def _moe_family(config: Config) -> str:
    """The MoE family (hf_keys.MOE_FAMILIES) computing the model's function, or an ExportError naming what none
    has: its router and balancing, then its norms and layout."""
    s, m, moe = config.strategy, config.model, config.moe
    problems = ["a sigmoid router"] * (moe.router != "softmax")
    problems += ["expert-bias routing (moe.balance=bias)"] * (moe.balance == "bias")
    norms = _norms(m, s)
    candidates = [family for family in ("qwen3_moe", "olmoe", "qwen2_moe", "mixtral")
                  if _norms(replace(m, pre_norm=True, qkv_bias=m.qkv_bias and family == "qwen2_moe"),
                            source_strategy(family)) == norms]
    if not candidates:
        problems.append(f"{_describe_norms(m, s) or 'its norms'} (with MoE)")
    dense_between = "dense layers between routed ones (model.moe_every > 1)"
    rules = {"qwen3_moe": [(not m.moe_shared_expert, "a shared expert (Qwen3-MoE has none)")],
             "olmoe": [(not m.moe_shared_expert, "a shared expert (OLMoE has none)"),
                       (m.moe_every == 1, f"{dense_between}: OLMoE routes every layer"),
                       (m.head_size * m.n_heads == m.d_model, "head_dim other than d_model / n_heads (OLMoE's)")],
             "qwen2_moe": [(m.moe_shared_expert, "no shared expert (Qwen2-MoE has one)")],
             "mixtral": [(not m.moe_shared_expert, "a shared expert (Mixtral has none)"),
                         (m.moe_every == 1, f"{dense_between}: Mixtral routes every layer"),
                         (moe.normalize_top_k, "top-k weights not renormalized (Mixtral renormalizes them)")]}
    failures = {family: [reason for ok, reason in rules[family] if not ok] for family in candidates}
    matching = [family for family in candidates if not failures[family]]
    if matching and not problems:
        return matching[0]
    problems += [reason for family in candidates for reason in failures[family]]
    raise ExportError(f"an MoE model with {'; '.join(problems)} has no MoE family that computes the same function "
                      f"({MOE_FAMILY_NAMES}); {OTHERWISE}")


def _describe_norms(m: ModelConfig, s: Strategy) -> str:
    """The norms of a model no family has, in words (DNP, post-branch norms, no pre-norms, biases)."""
    parts = [f"DNP on {', '.join(sorted(s.dnp))}" + (" with a full-width scale" if s.qk_scale_shape == "full" else "")
             + (" over all heads" if s.qk_norm_group == "full" else "")] if s.dnp else []
    parts += ["post-branch norms"] * s.post_norms + ["no pre-norms"] * (not m.pre_norm) + ["q/k/v biases"] * m.qkv_bias
    return " with ".join(parts)


def hf_architecture(config: Config) -> str:
    """The transformers architecture the model exports as (hf_keys.py), or an ExportError naming what no
    architecture with its norms has."""
    architecture = _architecture_of_norms(config)
    m = config.model
    if architecture == "llama" and m.sliding_window and not m.full_attention_every:
        architecture = "mistral"
    gemma = architecture in ("gemma2", "gemma3")
    features = {"model.embedding_scale": m.embedding_scale,
                "model.attn_softcap": m.attn_softcap > 0, "model.final_softcap": m.final_softcap > 0,
                "model.query_pre_attn_scalar": m.query_pre_attn_scalar not in (0, m.head_size),
                "model.sliding_window": m.sliding_window > 0, "model.rope_local_theta": m.rope_local_theta > 0,
                "model.qkv_bias": m.qkv_bias}
    allowed = {"gemma2": {"model.embedding_scale", "model.attn_softcap", "model.final_softcap",
                          "model.query_pre_attn_scalar", "model.sliding_window"},
               # Gemma 3 keeps attn_logit_softcapping in its config but never applies it (transformers 5.24)
               "gemma3": {"model.embedding_scale", "model.final_softcap", "model.query_pre_attn_scalar",
                          "model.sliding_window", "model.rope_local_theta"},
               "qwen2": {"model.qkv_bias"}, "qwen2_moe": {"model.qkv_bias"},
               "mistral": {"model.sliding_window"}}.get(architecture, set())
    for feature, used in features.items():
        if used and feature not in allowed:
            raise ExportError(f"{feature} has no {ARCHITECTURE_CLASSES[architecture]} form (the architecture of "
                              f"this model's norms); {OTHERWISE}")
    if gemma and not m.embedding_scale:
        raise ExportError(f"{ARCHITECTURE_CLASSES[architecture]} (the architecture of this model's norms) scales its "
                          f"embeddings by sqrt(d_model), so it needs model.embedding_scale = true; {OTHERWISE}")
    if gemma and m.rope_scaling == "llama3":
        raise ExportError(f"Gemma has no llama3 RoPE scaling; {OTHERWISE}")
    return architecture


def hf_state(model: Decoder, architecture: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: the model folded down to its norm weights, read part by part (hf_keys)."""
    m = model.config
    folded = fold_scales(copy.deepcopy(model), keep_norm_weights=True)
    offset, shapes = NORM_OFFSET.get(architecture, 0.0), hf_shapes(m, architecture)  # Gemma stores γ - 1
    state = {name: read_part(folded, GLOBAL_PARTS[key], shapes[name], offset) for key, name in global_keys(m).items()}
    for i, block in enumerate(folded.blocks):
        state |= {name: read_part(block, layer_part(key), shapes[name], offset)
                  for key, name in layer_keys(i, architecture, m).items()}
    return {k: v.detach().float().contiguous().clone() for k, v in state.items()}


def _rope_parameters(m: ModelConfig, local: bool = False) -> dict:
    if local:
        return {"rope_type": "default", "rope_theta": m.rope_local_theta}
    rope = {"rope_type": "default" if m.rope_scaling == "none" else m.rope_scaling, "rope_theta": m.rope_theta}
    if m.rope_scaling == "linear":
        rope["factor"] = m.rope_factor
    elif m.rope_scaling == "llama3":
        rope |= {"factor": m.rope_factor, "low_freq_factor": m.rope_low_freq_factor,
                 "high_freq_factor": m.rope_high_freq_factor,
                 "original_max_position_embeddings": m.rope_original_max_seq_len}
    return rope


def hf_config(m: ModelConfig, architecture: str, eos_id: int | None, dtype: str = "float32",
              moe: MoEConfig | None = None) -> dict:
    activation = {ours: theirs for theirs, ours in HF_ACTIVATIONS.items()}[m.activation]
    rope = _rope_parameters(m)
    config = {
        "architectures": [ARCHITECTURE_CLASSES[architecture]],
        "model_type": EXPORT_MODEL_TYPES[architecture], "vocab_size": m.vocab_size, "hidden_size": m.d_model,
        "intermediate_size": m.d_ff, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_size, "hidden_act": activation,
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
        "rope_parameters": rope, "rope_scaling": None if m.rope_scaling == "none" else rope,
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": m.init_std, "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": eos_id,
        "torch_dtype": dtype, "use_cache": True,
    }
    layer_types = ["sliding_attention" if is_windowed(m, i) else "full_attention" for i in range(m.n_layers)]
    if architecture in ("gemma2", "gemma3"):
        config |= {"hidden_activation": activation, "query_pre_attn_scalar": m.query_pre_attn_scalar or m.head_size,
                   "attn_logit_softcapping": m.attn_softcap or None, "final_logit_softcapping": m.final_softcap or None,
                   "sliding_window": m.sliding_window or m.max_seq_len, "layer_types": layer_types,
                   "use_bidirectional_attention": False}
    if architecture == "gemma3":  # RoPE per layer type; windowed blocks without rope_local_theta share the global one
        config["rope_parameters"] = {"full_attention": rope, "sliding_attention":
                                     _rope_parameters(m, local=True) if m.rope_local_theta else dict(rope)}
        config["rope_local_base_freq"] = m.rope_local_theta or m.rope_theta
    if architecture == "llama":
        config["mlp_bias"] = False
    elif architecture == "mistral":
        config["sliding_window"] = m.sliding_window
    elif architecture in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe"):
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": m.n_layers,
                   "layer_types": layer_types}
    if architecture in MOE_FAMILIES:
        config |= _moe_config(m, architecture, moe or MoEConfig())
    return config


def _moe_config(m: ModelConfig, family: str, moe: MoEConfig) -> dict:
    """config.json's routing fields of an MoE family (hf_keys.MOE_FAMILIES)."""
    de = m.moe_d_expert or m.d_ff
    config = {"num_experts_per_tok": m.moe_top_k, "norm_topk_prob": moe.normalize_top_k,
              "output_router_logits": False, "router_aux_loss_coef": moe.aux_loss}
    if family in ("qwen3_moe", "qwen2_moe"):
        config |= {"num_experts": m.moe_experts, "moe_intermediate_size": de, "decoder_sparse_step": m.moe_every,
                   "mlp_only_layers": []}
    else:  # every layer routed: the experts' width is intermediate_size
        config |= {"num_local_experts" if family == "mixtral" else "num_experts": m.moe_experts,
                   "intermediate_size": de}
    if family == "qwen2_moe":
        config |= {"shared_expert_intermediate_size": m.d_ff, "qkv_bias": m.qkv_bias}
    elif family == "olmoe":
        config["clip_qkv"] = None
    elif family == "mixtral":
        config |= {"sliding_window": None, "router_jitter_noise": 0.0}
    return config


def exported_files(out: Path) -> list[str] | None:
    """The files an earlier export wrote in `out`, from its manifest; None if it has none."""
    try:
        return [EXPORT_MANIFEST, *json.loads((out / EXPORT_MANIFEST).read_text())["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


REMOTE = "remote"
"""The remote-code form's name for --family (export/remote)."""


def export_form(config: Config, family: str | None = None) -> tuple[str, str]:
    """The form a model exports as, and why: the transformers family that computes the same function
    (hf_architecture), else the remote-code form. `family` forces one, or an ExportError gives the reason."""
    if family not in (None, REMOTE, *ARCHITECTURE_CLASSES):
        raise ExportError(f"--family {family!r}; choose one of {', '.join([*ARCHITECTURE_CLASSES, REMOTE])}")
    try:
        architecture = hf_architecture(config)
    except ExportError as err:
        if family not in (None, REMOTE):
            raise ExportError(f"--family {family}: {err}".replace(f"; {OTHERWISE}", "; leave --family out to "
                                                                                    "write the remote-code form")
                              ) from None
        return REMOTE, str(err).replace(f"; {OTHERWISE}", "")
    if family in (None, architecture):
        return architecture, f"the model is exactly {ARCHITECTURE_CLASSES[architecture]}"
    if family == REMOTE:
        return REMOTE, "--family remote"
    raise ExportError(f"--family {family}: this model is exactly {ARCHITECTURE_CLASSES[architecture]} "
                      f"(--family {architecture}), not {family} ({FAMILIES}); or --family remote")


def export_run(run_dir: Path, out: Path, overwrite: bool = False, log=print, dtype: str = "float32",
               family: str | None = None) -> str:
    """Write the run's newest valid checkpoint as a transformers checkpoint in `out`, replacing only an earlier
    export (recognized by its manifest) unless `overwrite`: the family that computes the same function, else the
    remote-code form (`export_form`; `family` forces one). The scales are folded in float32 and the folded
    weights then stored in `dtype` (float32, bfloat16 or float16). Returns the family, or "remote"."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if contains(run_dir, out) or contains(out, run_dir):
        raise ExportError(f"--to {out} overlaps the run directory {run_dir} it exports; choose a path outside the run")
    claim_directory(out, exported_files(out), overwrite, "--to")
    with contextlib.ExitStack() as stack:
        if (run_dir / "config.toml").is_file() and os.access(run_dir, os.W_OK):  # no trainer writes it meanwhile
            stack.enter_context(DirectoryLock(run_dir, "run directory"))
        config, model = load_run_model(run_dir)
        architecture, why = export_form(config, family)
        tokenizer = run_tokenizer(config)
        files = _export_files(config, model, architecture, tokenizer, dtype)
    if tokenizer is None:
        log(f"warning: no tokenizer found for {run_dir}; exported the model without tokenizer files")
    with new_directory(out, f"the export {out}") as tmp:
        for name, write in files.items():
            write(tmp / name)
        manifest = {"files": sorted(files), "source": str(run_dir.resolve()), "architecture": architecture,
                    "dtype": dtype}
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if architecture == REMOTE:
        log(f"exported {run_dir} to {out} as remote code (ScalevecForCausalLM: load with trust_remote_code=True), "
            f"since {why}")
    else:
        log(f"exported {run_dir} as {architecture} to {out} ({why})")
    return architecture


def _export_files(config: Config, model: Decoder, architecture: str, tokenizer: Path | None, dtype: str) -> dict:
    """File name -> a function writing it to the path it is given."""
    eos_id = None
    if tokenizer is not None:
        from ..data.prepare import load_tokenizer  # a malformed tokenizer.json is one line

        eos_id = load_tokenizer(tokenizer).token_to_id("<|endoftext|>")

    def text(payload: dict):
        return lambda path: path.write_text(json.dumps(payload, indent=1) + "\n")

    if architecture == REMOTE:
        files = remote_files(model, eos_id, dtype)
    else:
        state = {name: tensor.to(DTYPES[dtype]) for name, tensor in hf_state(model, architecture).items()}
        files = {"model.safetensors": lambda path: save_file(state, path, metadata={"format": "pt"}),
                 "config.json": text(hf_config(config.model, architecture, eos_id, dtype, config.moe))}
    files["generation_config.json"] = text({"eos_token_id": eos_id, "pad_token_id": eos_id})
    if tokenizer is not None:
        files["tokenizer.json"] = lambda path: shutil.copyfile(tokenizer, path)
        files["tokenizer_config.json"] = text({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
            "model_max_length": config.model.max_seq_len, "clean_up_tokenization_spaces": False})
    return files
