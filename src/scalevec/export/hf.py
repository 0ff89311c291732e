"""Hugging Face checkpoints out and in: folded Llama/Qwen3 safetensors that `transformers` loads
offline, and HF Llama/Qwen3 checkpoints converted to a scalevec strategy.

Mapping. A block norm's one shared scale is the HF norm weight; per-branch (HG) and DP scales are
folded into the projections; the final norm's scale is `model.norm.weight`; DNP on q, k with a
`head`-shaped output scale is Qwen3's q_norm/k_norm. Anything else (DNP on other projections,
post-branch norms, LayerNorm, a `full` QK scale) has no Llama/Qwen3 form, and export refuses it
rather than write a checkpoint that computes different logits.
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
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import Config, ModelConfig, load_config, to_toml
from ..model import Decoder
from ..outputs import (DirectoryLock, check_output_path, claim_directory, contains, remove_tree, replace_directory,
                       write_text_atomic, writing)
from ..scales import Scale
from ..strategy import Strategy
from ..strategy import strategy as make_strategy
from .fold import fold_scales


EXPORT_MANIFEST = "scalevec_export.json"  # the files an export wrote, so a later export may replace exactly them


class ExportError(ValueError):
    """A checkpoint cannot be written or read as asked; one line naming the problem and the options."""


def hf_architecture(config: Config) -> str:
    s, m = config.strategy, config.model
    options = "use `scalevec generate` on the run directory, or train with strategy.dnp limited to q,k (head shape)"
    if m.moe_experts:
        raise ExportError(f"MoE models have no Llama/Qwen3 form; {options}")
    if m.norm != "rms":
        raise ExportError(f"model.norm={m.norm!r} has no Llama/Qwen3 form (RMSNorm only); {options}")
    if s.post_norms:
        raise ExportError(f"post-branch norms (strategy.post_norms) have no Llama/Qwen3 form; {options}")
    dnp = set(s.dnp)
    if not dnp:
        return "llama"
    if dnp == {"q", "k"} and s.qk_scale_shape == "head":
        return "qwen3"
    raise ExportError(f"DNP on {', '.join(sorted(dnp))}{' with a full-width scale' if dnp == {'q', 'k'} else ''} "
                      f"has no Llama/Qwen3 form, and export refuses to write different logits; {options}")


def _gamma(scale: Scale | None, size: int) -> torch.Tensor:
    return torch.ones(size) if scale is None else scale().detach().clone()


def hf_state(model: Decoder, architecture: str) -> dict[str, torch.Tensor]:
    m = model.config
    folded = fold_scales(copy.deepcopy(model), keep_norm_weights=True)
    q_out, kv_out = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    state = {"model.embed_tokens.weight": folded.tok_emb.weight,
             "model.norm.weight": _gamma(folded.final_scale, m.d_model)}
    if folded.head is not None:
        state["lm_head.weight"] = folded.head.weight
    for i, block in enumerate(folded.blocks):
        p = f"model.layers.{i}"
        qkv, gate_up = block.attn.qkv, block.ffn.gate_up
        q, k, v = qkv.weight.split([q_out, kv_out, kv_out])
        gate, up = gate_up.weight.split([m.d_ff, m.d_ff])
        state |= {f"{p}.input_layernorm.weight": _gamma(qkv.shared_scale, m.d_model),
                  f"{p}.post_attention_layernorm.weight": _gamma(gate_up.shared_scale, m.d_model),
                  f"{p}.self_attn.q_proj.weight": q, f"{p}.self_attn.k_proj.weight": k,
                  f"{p}.self_attn.v_proj.weight": v, f"{p}.self_attn.o_proj.weight": block.attn.o.weight,
                  f"{p}.mlp.gate_proj.weight": gate, f"{p}.mlp.up_proj.weight": up,
                  f"{p}.mlp.down_proj.weight": block.ffn.down.weight}
        if architecture == "qwen3":
            state[f"{p}.self_attn.q_norm.weight"] = _gamma(qkv.out_scales["q"] if "q" in qkv.out_scales else None, m.head_dim)
            state[f"{p}.self_attn.k_norm.weight"] = _gamma(qkv.out_scales["k"] if "k" in qkv.out_scales else None, m.head_dim)
    return {k: v.detach().float().contiguous().clone() for k, v in state.items()}


def hf_config(m: ModelConfig, architecture: str, eos_id: int | None) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM" if architecture == "llama" else "Qwen3ForCausalLM"],
        "model_type": architecture, "vocab_size": m.vocab_size, "hidden_size": m.d_model,
        "intermediate_size": m.d_ff, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim, "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}, "rope_scaling": None,
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": m.init_std, "bos_token_id": None, "eos_token_id": eos_id, "torch_dtype": "float32",
        "use_cache": True,
    }
    if architecture == "llama":
        config["mlp_bias"] = False
    else:
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": m.n_layers,
                   "layer_types": ["full_attention"] * m.n_layers}
    return config


def run_weights(run_dir: Path, config: Config) -> dict[str, torch.Tensor]:
    """The newest valid checkpoint's weights; an FSDP2 checkpoint's shards are gathered into full tensors."""
    from ..train.checkpoint import CheckpointError, load_file_checked, newest_usable

    def read(path: Path, state: dict) -> dict[str, torch.Tensor]:
        if not (path / "dcp").is_dir():
            return load_file_checked(path / "model.safetensors", _read_safetensors)
        from torch.distributed.checkpoint import load

        full = {"model": Decoder(config.model, config.strategy, config.moe).state_dict()}
        load(full, checkpoint_id=path / "dcp")
        return full["model"]

    try:
        found = newest_usable(run_dir / "checkpoints", read)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    if found is not None:
        return found[1]
    if config.train.init_from:
        return _read_safetensors(Path(config.train.init_from))
    raise ExportError(f"{run_dir} has no usable checkpoint; train it first (scalevec train --resume --out {run_dir})")


def run_tokenizer(config: Config) -> Path | None:
    path = Path(config.data.tokenizer) if config.data.tokenizer else Path(config.data.dir) / "tokenizer.json"
    return path if path.is_file() else None


def load_run_model(run_dir: Path) -> tuple[Config, Decoder]:
    if not (run_dir / "config.toml").is_file():
        raise ExportError(f"{run_dir} is not a run directory (no config.toml); give the --out of a scalevec run")
    config = load_config(run_dir / "config.toml")
    model = Decoder(config.model, config.strategy, config.moe)
    model.load_state_dict(run_weights(run_dir, config))
    return config, model


def exported_files(out: Path) -> list[str] | None:
    """The files an earlier export wrote in `out`, from its manifest; None if it has none."""
    try:
        return [EXPORT_MANIFEST, *json.loads((out / EXPORT_MANIFEST).read_text())["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export_run(run_dir: Path, out: Path, overwrite: bool = False, log=print) -> str:
    """Write the run's newest valid checkpoint as a transformers checkpoint in `out`, replacing only an earlier
    export (recognized by its manifest) unless `overwrite`."""
    if contains(run_dir, out) or contains(out, run_dir):
        raise ExportError(f"--to {out} overlaps the run directory {run_dir} it exports; choose a path outside the run")
    claim_directory(out, exported_files(out), overwrite, "--to")
    with contextlib.ExitStack() as stack:
        if (run_dir / "config.toml").is_file() and os.access(run_dir, os.W_OK):  # no trainer writes it meanwhile
            stack.enter_context(DirectoryLock(run_dir, "run directory"))
        config, model = load_run_model(run_dir)
        architecture = hf_architecture(config)
        tokenizer = run_tokenizer(config)
        files = _export_files(config, model, architecture, tokenizer)
    if tokenizer is None:
        log(f"warning: no tokenizer found for {run_dir}; exported the model without tokenizer files")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with writing(f"the export {out}", "nothing was changed; free space and export again"):
            tmp.mkdir(parents=True)
            for name, write in files.items():
                write(tmp / name)
            manifest = {"files": sorted(files), "source": str(run_dir.resolve()), "architecture": architecture}
            (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            replace_directory(tmp, out)
    finally:
        remove_tree(tmp)
    log(f"exported {run_dir} as {architecture} to {out}")
    return architecture


def _export_files(config: Config, model: Decoder, architecture: str, tokenizer: Path | None) -> dict:
    """File name -> a function writing it to the path it is given."""
    eos_id = None
    if tokenizer is not None:
        from tokenizers import Tokenizer

        eos_id = Tokenizer.from_file(str(tokenizer)).token_to_id("<|endoftext|>")

    def text(payload: dict):
        return lambda path: path.write_text(json.dumps(payload, indent=1) + "\n")

    state = hf_state(model, architecture)
    files = {"model.safetensors": lambda path: save_file(state, path, metadata={"format": "pt"}),
             "config.json": text(hf_config(config.model, architecture, eos_id)),
             "generation_config.json": text({"eos_token_id": eos_id, "pad_token_id": eos_id})}
    if tokenizer is not None:
        files["tokenizer.json"] = lambda path: shutil.copyfile(tokenizer, path)
        files["tokenizer_config.json"] = text({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
            "model_max_length": config.model.max_seq_len, "clean_up_tokenization_spaces": False})
    return files


# -- import ----------------------------------------------------------------------------------------------------

def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as err:
        raise ExportError(f"cannot read {path} as safetensors ({str(err).splitlines()[0]}); give a safetensors file") from None


def read_hf_dir(hf_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{hf_dir} has no config.json; give a Hugging Face model directory")
    try:
        hf = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{config_path} is not valid JSON ({err}); give the checkpoint's own config.json") from None
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ExportError(f"{hf_dir} has no model.safetensors (pickled .bin checkpoints are not read); convert it to "
                          "safetensors first")
    state = {}
    for name in files:
        state |= _read_safetensors(hf_dir / name)
    return hf, state


def model_config_from_hf(hf: dict) -> tuple[ModelConfig, str]:
    architecture = hf.get("model_type")
    if architecture not in ("llama", "qwen3"):
        raise ExportError(f"model_type {architecture!r} is not supported; import Llama or Qwen3 checkpoints")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    checks = [(hf.get("hidden_act", "silu") == "silu", "hidden_act must be silu"),
              (not hf.get("attention_bias", False), "attention_bias must be false"),
              (not hf.get("mlp_bias", False), "mlp_bias must be false"),
              (rope.get("rope_type", rope.get("type", "default")) == "default", "only default RoPE is supported")]
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    checks.append((head_dim * heads == hf["hidden_size"], "head_dim must equal hidden_size / num_attention_heads"))
    for ok, message in checks:
        if not ok:
            raise ExportError(f"unsupported checkpoint: {message}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return ModelConfig(preset="", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                       n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads, d_ff=hf["intermediate_size"],
                       max_seq_len=hf["max_position_embeddings"], rope_theta=float(theta),
                       norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False)
                       ), architecture


def expected_hf_shapes(m: ModelConfig, architecture: str) -> dict[str, tuple[int, ...]]:
    d, hd = m.d_model, m.head_dim
    shapes = {"model.embed_tokens.weight": (m.vocab_size, d), "model.norm.weight": (d,)}
    if not m.tie_embeddings:
        shapes["lm_head.weight"] = (m.vocab_size, d)
    for i in range(m.n_layers):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (d,), f"{p}.post_attention_layernorm.weight": (d,),
                   f"{p}.self_attn.q_proj.weight": (m.n_heads * hd, d), f"{p}.self_attn.k_proj.weight": (m.n_kv_heads * hd, d),
                   f"{p}.self_attn.v_proj.weight": (m.n_kv_heads * hd, d), f"{p}.self_attn.o_proj.weight": (d, m.n_heads * hd),
                   f"{p}.mlp.gate_proj.weight": (m.d_ff, d), f"{p}.mlp.up_proj.weight": (m.d_ff, d),
                   f"{p}.mlp.down_proj.weight": (d, m.d_ff)}
        if architecture == "qwen3":
            shapes |= {f"{p}.self_attn.q_norm.weight": (hd,), f"{p}.self_attn.k_norm.weight": (hd,)}
    return shapes


def check_hf_state(state: dict, shapes: dict) -> None:
    for name, shape in shapes.items():
        if name not in state:
            raise ExportError(f"checkpoint lacks tensor {name} (expected shape {shape})")
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            raise ExportError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {shape}")
        if not tensor.is_floating_point():
            raise ExportError(f"tensor {name} has dtype {tensor.dtype}; a model checkpoint holds floating-point weights")
        if not torch.isfinite(tensor).all():
            raise ExportError(f"tensor {name} holds NaN or infinite values; import a finite checkpoint")
    extra = sorted(set(state) - set(shapes))
    if extra:
        raise ExportError(f"checkpoint has unexpected tensor {extra[0]}; is config.json the checkpoint's own?")


@torch.no_grad()
def set_gamma(scale: Scale | None, gamma: torch.Tensor, where: str) -> None:
    """Give `scale` the effective value `gamma` (exactly, or up to the overall factor a following norm removes)."""
    if scale is None:
        return
    gamma = gamma.float()
    if scale.parameterization == "plain":
        scale.weight.copy_(gamma)
    elif scale.parameterization == "or":
        rms = gamma.pow(2).mean().sqrt()
        scale.direction.copy_(gamma)
        if scale.magnitude is not None:
            scale.magnitude.fill_(rms.item())
    else:
        if (gamma <= 0).any():
            raise ExportError(f"ER needs every γ > 0, but {where} has min γ = {gamma.min().item():.4g}; choose "
                              "strategy or, or plain")
        log_gamma = gamma.log()
        scale.direction.copy_(log_gamma)
        if scale.magnitude is not None:
            scale.magnitude.fill_(log_gamma.mean().item())


def convert_from_hf(hf: dict, state: dict, strategy_name: str | Strategy, warm_start: bool
                    ) -> tuple[Config, Decoder, float]:
    """Our model of a strategy from HF weights; returns (config, model, max |Δlogit| introduced)."""
    model_config, architecture = model_config_from_hf(hf)
    check_hf_state(state, expected_hf_shapes(model_config, architecture))
    source_dnp = {"q", "k"} if architecture == "qwen3" else set()
    target = make_strategy(strategy_name) if isinstance(strategy_name, str) else strategy_name
    strategy_name = target.preset
    if source_dnp - set(target.dnp):  # keep the source's QK-norm (which replaces DP on q, k)
        target = replace(target, dnp=sorted(set(target.dnp) | source_dnp), dp=[p for p in target.dp if p not in source_dnp],
                         preset=f"{strategy_name}+qknorm")
    gammas = [state[n] for n in state if n.endswith("norm.weight")]
    changes = []
    if set(target.dnp) != source_dnp:
        changes.append(f"DNP on {', '.join(sorted(set(target.dnp) - source_dnp))} adds norms")
    if target.post_norms:
        changes.append("post-branch norms add norms")
    if target.qk_scale_shape != "head" and source_dnp:
        changes.append("a full-width QK scale")
    if target.scale == "fixed" and any(not torch.all(g == 1) for g in gammas):
        changes.append("strategy none drops the checkpoint's non-unit norm weights")
    if changes and not warm_start:
        raise ExportError(f"strategy {strategy_name!r} changes the model's function ({'; '.join(changes)}); pass "
                          "--warm-start to convert anyway and see the logit difference, or choose an exact strategy "
                          "(standard, hg, dp, or, er and their compositions)")
    reference = _build(model_config, make_strategy("qknorm" if source_dnp else "standard"), state)
    model = _build(model_config, target, state)
    probe = torch.randint(0, model_config.vocab_size, (2, min(32, model_config.max_seq_len)),
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (model(probe) - reference(probe)).abs().max().item()
    config = Config(model=model_config, strategy=target)
    config.train.seq_len = min(config.train.seq_len, model_config.max_seq_len)
    return config, model, difference


def _build(model_config: ModelConfig, target, state: dict) -> Decoder:
    m = model_config
    model = Decoder(m, target)
    model.init_weights(0)
    with torch.no_grad():
        model.tok_emb.weight.copy_(state["model.embed_tokens.weight"])
        if model.head is not None:
            model.head.weight.copy_(state["lm_head.weight"])
        set_gamma(model.final_scale, state["model.norm.weight"], "model.norm")
        for i, block in enumerate(model.blocks):
            p = f"model.layers.{i}"
            qkv, gate_up = block.attn.qkv, block.ffn.gate_up
            qkv.weight.copy_(torch.cat([state[f"{p}.self_attn.{n}_proj.weight"] for n in "qkv"]))
            gate_up.weight.copy_(torch.cat([state[f"{p}.mlp.{n}_proj.weight"] for n in ("gate", "up")]))
            block.attn.o.weight.copy_(state[f"{p}.self_attn.o_proj.weight"])
            block.ffn.down.weight.copy_(state[f"{p}.mlp.down_proj.weight"])
            for proj, norm, names in ((qkv, "input_layernorm", "qkv"), (gate_up, "post_attention_layernorm", ("gate", "up"))):
                gamma = state[f"{p}.{norm}.weight"]
                set_gamma(proj.shared_scale, gamma, f"{p}.{norm}")
                for name in names:
                    set_gamma(proj.in_scales[name] if name in proj.in_scales else None, gamma, f"{p}.{norm}")
            for name in ("q", "k"):
                if f"{p}.self_attn.{name}_norm.weight" in state and name in qkv.out_scales:
                    set_gamma(qkv.out_scales[name], state[f"{p}.self_attn.{name}_norm.weight"], f"{p}.{name}_norm")
    return model


def import_hf(hf_dir: Path, strategy_name: str, out: Path, warm_start: bool, log=print) -> float:
    check_output_path(out, "--out")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"output directory {out} exists; choose a new --out")
    hf, state = read_hf_dir(hf_dir)
    config, model, difference = convert_from_hf(hf, state, strategy_name, warm_start)
    created = not out.exists()
    try:
        with writing(f"the import {out}", "nothing was kept; free space and import again"):
            out.mkdir(parents=True, exist_ok=True)
            (out / "init").mkdir()
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "init" / "model.safetensors")
            config.train.init_from = str(out / "init" / "model.safetensors")
            if (hf_dir / "tokenizer.json").is_file():
                shutil.copyfile(hf_dir / "tokenizer.json", out / "tokenizer.json")
                config.data.tokenizer = str(out / "tokenizer.json")
                config.data.dir = str(out / "data")
            write_text_atomic(out / "config.toml", to_toml(config))
    except BaseException:
        for name in ("init", "tokenizer.json", "config.toml"):
            remove_tree(out / name) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
        if created:
            remove_tree(out)
        raise
    log(f"imported {hf_dir} as strategy {config.strategy.preset} into {out}; max |Δ logit| on a probe batch: "
        f"{difference:.3g}")
    return difference
