"""Hugging Face Llama/Qwen3 checkpoints in: converted to a scalevec strategy, as a run directory that
`scalevec train --resume` continues. Exact strategies keep the logits; ones that add norms need
`--warm-start` and report the logit difference they introduce.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import Config, ConfigError, ModelConfig, load_config, to_dict, to_toml
from .export import ExportError
from .hf_keys import global_keys, hf_shapes, layer_keys
from .model import Decoder
from .outputs import check_output_path, remove_tree, write_text_atomic, writing
from .scales import Scale
from .strategy import Strategy
from .strategy import strategy as make_strategy


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as err:
        raise ExportError(f"cannot read {path} as safetensors ({str(err).splitlines()[0]}); "
                          "give a safetensors file") from None


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


LLAMA_LAYOUT = {"mistral": "llama"}  # model types whose tensors and math are Llama's (Mistral: without a window)


def model_config_from_hf(hf: dict) -> tuple[ModelConfig, str]:
    architecture = LLAMA_LAYOUT.get(hf.get("model_type"), hf.get("model_type"))
    if architecture not in ("llama", "qwen2", "qwen3"):
        raise ExportError(f"model_type {hf.get('model_type')!r} is not supported; import Llama, Mistral, Qwen2 or "
                          "Qwen3 checkpoints")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    checks = [(hf.get("hidden_act", "silu") == "silu", "hidden_act must be silu"),
              (not hf.get("attention_bias", False), "attention_bias must be false"),
              (not hf.get("mlp_bias", False), "mlp_bias must be false"),
              (window is None or window >= hf["max_position_embeddings"],
               f"sliding-window attention (sliding_window={window}) is not supported"),
              (rope.get("rope_type", rope.get("type", "default")) in ("default", "llama3"),
               "only default and llama3 RoPE are supported")]
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    for ok, message in checks:
        if not ok:
            raise ExportError(f"unsupported checkpoint: {message}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {}
    if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = dict(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                       rope_low_freq_factor=float(rope["low_freq_factor"]),
                       rope_high_freq_factor=float(rope["high_freq_factor"]),
                       rope_original_max_seq_len=int(rope["original_max_position_embeddings"]))
    return ModelConfig(preset="", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                       n_layers=hf["num_hidden_layers"],
                       n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads, d_ff=hf["intermediate_size"],
                       head_dim=0 if head_dim * heads == hf["hidden_size"] else head_dim,
                       max_seq_len=hf["max_position_embeddings"], rope_theta=float(theta),
                       norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
                       qkv_bias=architecture == "qwen2", **scaling), architecture


def check_hf_state(state: dict, shapes: dict) -> None:
    for name, shape in shapes.items():
        if name not in state:
            raise ExportError(f"checkpoint lacks tensor {name} (expected shape {shape})")
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            raise ExportError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {shape}")
        if not tensor.is_floating_point():
            raise ExportError(f"tensor {name} has dtype {tensor.dtype}; a model checkpoint holds floating-point "
                              "weights")
        if not torch.isfinite(tensor).all():
            raise ExportError(f"tensor {name} holds NaN or infinite values; import a finite checkpoint")
    extra = sorted(set(state) - set(shapes))
    if extra:
        raise ExportError(f"checkpoint has unexpected tensor {extra[0]}; is config.json the checkpoint's own?")


def set_gamma(scale: Scale | None, gamma: torch.Tensor, where: str) -> None:
    """`scale.set_gamma(gamma)` for an optional scale; an ER refusal names the checkpoint tensor."""
    if scale is None:
        return
    try:
        scale.set_gamma(gamma)
    except ValueError as err:
        raise ExportError(f"{where}: {err}; choose strategy or, or plain") from None


def convert_from_hf(hf: dict, state: dict, strategy_name: str | Strategy, warm_start: bool
                    ) -> tuple[Config, Decoder, float]:
    """Our model of a strategy from HF weights; returns (config, model, max |Δlogit| introduced)."""
    model_config, architecture = model_config_from_hf(hf)
    check_hf_state(state, hf_shapes(model_config, architecture))
    source_dnp = {"q", "k"} if architecture == "qwen3" else set()
    target = make_strategy(strategy_name) if isinstance(strategy_name, str) else strategy_name
    strategy_name = target.preset
    if source_dnp - set(target.dnp):  # keep the source's QK-norm (which replaces DP on q, k)
        target = replace(target, dnp=sorted(set(target.dnp) | source_dnp),
                         dual_placement=[p for p in target.dual_placement if p not in source_dnp],
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
    reference = _model_from_hf(model_config, architecture, make_strategy("qknorm" if source_dnp else "standard"),
                               state)
    model = _model_from_hf(model_config, architecture, target, state)
    probe = torch.randint(0, model_config.vocab_size, (2, min(32, model_config.max_seq_len)),
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (model(probe) - reference(probe)).abs().max().item()
    config = Config(model=model_config, strategy=target)
    config.train.seq_len = min(config.train.seq_len, model_config.max_seq_len)
    return config, model, difference


def _model_from_hf(model_config: ModelConfig, architecture: str, target, state: dict) -> Decoder:
    m = model_config
    model = Decoder(m, target)
    model.init_weights(0)
    top = {key: state[name] for key, name in global_keys(m).items()}
    with torch.no_grad():
        model.tok_emb.weight.copy_(top["embed"])
        if model.head is not None:
            model.head.weight.copy_(top["head"])
        set_gamma(model.final_scale, top["final_norm"], "model.norm")
        for i, block in enumerate(model.blocks):
            names = layer_keys(i, architecture)
            part = {key: state[name] for key, name in names.items()}
            qkv, gate_up = block.attn.qkv, block.ffn.gate_up
            qkv.weight.copy_(torch.cat([part[n] for n in "qkv"]))
            if qkv.bias is not None:
                qkv.bias.copy_(torch.cat([part[f"{n}_bias"] for n in "qkv"]))
            gate_up.weight.copy_(torch.cat([part["gate"], part["up"]]))
            block.attn.o.weight.copy_(part["o"])
            block.ffn.down.weight.copy_(part["down"])
            for proj, norm, branches in ((qkv, "attn_norm", "qkv"), (gate_up, "ffn_norm", ("gate", "up"))):
                set_gamma(proj.shared_scale, part[norm], names[norm])
                for name in branches:
                    set_gamma(proj.in_scales[name] if name in proj.in_scales else None, part[norm], names[norm])
            for name in ("q", "k"):
                if f"{name}_norm" in part and name in qkv.out_scales:
                    set_gamma(qkv.out_scales[name], part[f"{name}_norm"], names[f"{name}_norm"])
    return model


def import_hf(hf_dir: Path, strategy_name: str, out: Path, warm_start: bool, log=print,
              overrides: list[str] = (), tokenizer: Path | None = None) -> float:
    """Convert a transformers checkpoint into a new run directory `out` that `scalevec train --resume --out`
    continues: init weights, the checkpoint's tokenizer (`tokenizer`, else the folder's tokenizer.json) and a
    config with the run's `overrides` (data, train, optim...); every path in it absolute, so the run resumes
    from any directory. Everything is checked before `out` is written."""
    check_output_path(out, "--out")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"output directory {out} exists; choose a new --out")
    hf, state = read_hf_dir(hf_dir)
    config, model, difference = convert_from_hf(hf, state, strategy_name, warm_start)
    tokenizer = tokenizer if tokenizer is not None else hf_dir / "tokenizer.json"
    if tokenizer is not None and not tokenizer.is_file():
        if tokenizer != hf_dir / "tokenizer.json":
            raise ExportError(f"--tokenizer {tokenizer} not found; give the tokenizer.json the checkpoint was "
                              "trained with")
        tokenizer = None
    out = out.resolve()
    base = to_dict(config)
    base["train"]["init_from"] = str(out / "init" / "model.safetensors")
    base["data"] |= {"tokenizer": str(out / "tokenizer.json") if tokenizer else "", "dir": str(out / "data")}
    try:
        config = load_config(base, overrides)
    except ConfigError as err:
        raise ExportError(f"--set: {err}") from None
    if Path(config.data.dir) != out / "data":
        config.data.dir = str(Path(config.data.dir).resolve())
    config.data.inputs = [str(Path(p).resolve()) for p in config.data.inputs]
    if tuple((k, tuple(v.shape)) for k, v in Decoder(config.model, config.strategy).state_dict().items()) != tuple(
            (k, tuple(v.shape)) for k, v in model.state_dict().items()):
        raise ExportError("--set changes the shape of the imported weights (model or strategy); set only "
                          "data, train, optim, schedule and seed, or import with another --strategy")
    if tokenizer is not None:
        vocab = load_tokenizer_vocab(tokenizer)
        if vocab > config.model.vocab_size:
            raise ExportError(f"tokenizer {tokenizer} has {vocab} tokens, more than the checkpoint's vocab_size "
                              f"{config.model.vocab_size}; give the checkpoint's own tokenizer")
    created = not out.exists()
    try:
        with writing(f"the import {out}", "nothing was kept; free space and import again"):
            out.mkdir(parents=True, exist_ok=True)
            (out / "init").mkdir()
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "init" / "model.safetensors")
            if tokenizer is not None:
                shutil.copyfile(tokenizer, out / "tokenizer.json")
            write_text_atomic(out / "config.toml", to_toml(config))
    except BaseException:
        for name in ("init", "tokenizer.json", "config.toml"):
            remove_tree(out / name) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
        if created:
            remove_tree(out)
        raise
    log(f"imported {hf_dir} as strategy {config.strategy.preset} into {out}; max |Δ logit| on a probe batch: "
        f"{difference:.3g}")
    if tokenizer is None:
        log(f"warning: {hf_dir} has no tokenizer.json: training this run needs the checkpoint's tokenizer "
            f"(--set data.tokenizer=FILE); export and generate work without one")
    return difference


def load_tokenizer_vocab(path: Path) -> int:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)).get_vocab_size()
    except Exception as err:  # tokenizers raises a bare Exception for malformed files
        raise ExportError(f"cannot load tokenizer {path}: {str(err).splitlines()[0]}") from None
