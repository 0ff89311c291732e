"""Hugging Face checkpoints out: folded Llama/Qwen3 safetensors that `transformers` loads offline
(the way in is `hf_import.py`).

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
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import load_run_model, run_tokenizer
from ..config import Config, ModelConfig
from ..hf_keys import global_keys, layer_keys
from ..model import Decoder
from ..outputs import DirectoryLock, claim_directory, contains, new_directory
from ..scales import Scale
from . import ExportError
from .fold import fold_scales

EXPORT_MANIFEST = "scalevec_export.json"  # the files an export wrote, so a later export may replace exactly them
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARCHITECTURE_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


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
    if m.qkv_bias:
        if dnp:
            raise ExportError(f"q/k/v biases with DNP have no Qwen2 form (Qwen2 has no QK-norm); {options}")
        return "qwen2"
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
    sizes = [m.n_heads * m.head_size, m.n_kv_heads * m.head_size, m.n_kv_heads * m.head_size]
    parts = {"embed": folded.tok_emb.weight, "final_norm": _gamma(folded.final_scale, m.d_model),
             "head": None if folded.head is None else folded.head.weight}
    state = {name: parts[key] for key, name in global_keys(m).items()}
    for i, block in enumerate(folded.blocks):
        qkv, gate_up = block.attn.qkv, block.ffn.gate_up
        parts = {"attn_norm": _gamma(qkv.shared_scale, m.d_model), "ffn_norm": _gamma(gate_up.shared_scale, m.d_model),
                 **dict(zip("qkv", qkv.weight.split(sizes))), "o": block.attn.o.weight,
                 **dict(zip(("gate", "up"), gate_up.weight.split([m.d_ff, m.d_ff]))), "down": block.ffn.down.weight}
        if qkv.bias is not None:
            parts |= dict(zip(("q_bias", "k_bias", "v_bias"), qkv.bias.split(sizes)))
        for name in ("q", "k"):
            parts[f"{name}_norm"] = _gamma(qkv.out_scales[name] if name in qkv.out_scales else None, m.head_size)
        state |= {hf_name: parts[key] for key, hf_name in layer_keys(i, architecture).items()}
    return {k: v.detach().float().contiguous().clone() for k, v in state.items()}


def hf_config(m: ModelConfig, architecture: str, eos_id: int | None, dtype: str = "float32") -> dict:
    config = {
        "architectures": [ARCHITECTURE_CLASSES[architecture]],
        "model_type": architecture, "vocab_size": m.vocab_size, "hidden_size": m.d_model,
        "intermediate_size": m.d_ff, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_size, "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}, "rope_scaling": None,
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": m.init_std, "bos_token_id": None, "eos_token_id": eos_id, "torch_dtype": dtype,
        "use_cache": True,
    }
    if m.rope_scaling == "llama3":  # transformers 5 reads rope_parameters, 4.x rope_scaling
        scaling = {"rope_type": "llama3", "factor": m.rope_factor, "low_freq_factor": m.rope_low_freq_factor,
                   "high_freq_factor": m.rope_high_freq_factor,
                   "original_max_position_embeddings": m.rope_original_max_seq_len}
        config["rope_parameters"] = {**scaling, "rope_theta": m.rope_theta}
        config["rope_scaling"] = scaling
    if architecture == "llama":
        config["mlp_bias"] = False
    else:  # Qwen2 and Qwen3
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": m.n_layers,
                   "layer_types": ["full_attention"] * m.n_layers}
    return config


def exported_files(out: Path) -> list[str] | None:
    """The files an earlier export wrote in `out`, from its manifest; None if it has none."""
    try:
        return [EXPORT_MANIFEST, *json.loads((out / EXPORT_MANIFEST).read_text())["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export_run(run_dir: Path, out: Path, overwrite: bool = False, log=print, dtype: str = "float32") -> str:
    """Write the run's newest valid checkpoint as a transformers checkpoint in `out`, replacing only an earlier
    export (recognized by its manifest) unless `overwrite`. The scales are folded in float32 and the folded
    weights then stored in `dtype` (float32, bfloat16 or float16)."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if contains(run_dir, out) or contains(out, run_dir):
        raise ExportError(f"--to {out} overlaps the run directory {run_dir} it exports; choose a path outside the run")
    claim_directory(out, exported_files(out), overwrite, "--to")
    with contextlib.ExitStack() as stack:
        if (run_dir / "config.toml").is_file() and os.access(run_dir, os.W_OK):  # no trainer writes it meanwhile
            stack.enter_context(DirectoryLock(run_dir, "run directory"))
        config, model = load_run_model(run_dir)
        architecture = hf_architecture(config)
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
    log(f"exported {run_dir} as {architecture} to {out}")
    return architecture


def _export_files(config: Config, model: Decoder, architecture: str, tokenizer: Path | None, dtype: str) -> dict:
    """File name -> a function writing it to the path it is given."""
    eos_id = None
    if tokenizer is not None:
        from tokenizers import Tokenizer

        eos_id = Tokenizer.from_file(str(tokenizer)).token_to_id("<|endoftext|>")

    def text(payload: dict):
        return lambda path: path.write_text(json.dumps(payload, indent=1) + "\n")

    state = {name: tensor.to(DTYPES[dtype]) for name, tensor in hf_state(model, architecture).items()}
    files = {"model.safetensors": lambda path: save_file(state, path, metadata={"format": "pt"}),
             "config.json": text(hf_config(config.model, architecture, eos_id, dtype)),
             "generation_config.json": text({"eos_token_id": eos_id, "pad_token_id": eos_id})}
    if tokenizer is not None:
        files["tokenizer.json"] = lambda path: shutil.copyfile(tokenizer, path)
        files["tokenizer_config.json"] = text({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
            "model_max_length": config.model.max_seq_len, "clean_up_tokenization_spaces": False})
    return files
