"""The remote-code form: any model scalevec trains as a transformers checkpoint. `configuration_scalevec.py` and
`modeling_scalevec.py` (this folder; they import only torch and transformers) are copied beside the weights
and named by `auto_map` in config.json, so `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`
loads it. Every scale a matrix absorbs is folded into it; the scales behind a norm (DNP, QK-norm, post-branch
norms, a tied head's final norm) are the norms' weights (hf_keys.remote_layer_keys); the values of the run
live in config.json, never in the code.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
from pathlib import Path

import torch

from ...hf_keys import GLOBAL_PARTS, global_keys, layer_part, read_part, remote_layer_keys, remote_shapes
from ...model import Decoder, is_windowed
from ..fold import fold_scales

CODE_FILES = ("configuration_scalevec.py", "modeling_scalevec.py")
AUTO_MAP = {"AutoConfig": "configuration_scalevec.ScalevecConfig",
            "AutoModel": "modeling_scalevec.ScalevecModel",
            "AutoModelForCausalLM": "modeling_scalevec.ScalevecForCausalLM"}


def remote_config(model: Decoder, eos_id: int | None = None, dtype: str = "float32") -> dict:
    """config.json of the remote-code form: the model's shape and features, and the code that reads them."""
    m, s = model.config, model.strategy
    moe = model.moe_layers()[0].moe if model.moe_layers() else None
    return {
        "architectures": ["ScalevecForCausalLM"], "model_type": "scalevec", "auto_map": AUTO_MAP,
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_size, "hidden_act": m.activation, "max_position_embeddings": m.max_seq_len,
        "norm_type": m.norm, "norm_eps": m.norm_eps, "pre_norm": m.pre_norm, "post_norms": s.post_norms,
        "dnp": sorted(s.dnp), "qk_norm_group": s.qk_norm_group, "qk_scale_shape": s.qk_scale_shape,
        "attention_bias": m.qkv_bias, "rope_theta": m.rope_theta, "rope_scaling_type": m.rope_scaling,
        "rope_factor": m.rope_factor, "rope_low_freq_factor": m.rope_low_freq_factor,
        "rope_high_freq_factor": m.rope_high_freq_factor,
        "rope_original_max_position_embeddings": m.rope_original_max_seq_len, "rope_local_theta": m.rope_local_theta,
        "attention_window": m.sliding_window, "windowed_layers": [is_windowed(m, i) for i in range(m.n_layers)],
        "query_pre_attn_scalar": m.query_pre_attn_scalar, "attn_logit_softcapping": m.attn_softcap,
        "final_logit_softcapping": m.final_softcap, "embedding_scale": m.embedding_scale,
        "moe_layers": [block.ffn in model.moe_layers() for block in model.blocks],
        "num_experts": m.moe_experts, "num_experts_per_tok": m.moe_top_k,
        "moe_intermediate_size": m.moe_d_expert or m.d_ff, "shared_expert": m.moe_shared_expert,
        "router": moe.router if moe else "softmax", "normalize_top_k": moe.normalize_top_k if moe else True,
        "expert_bias_routing": bool(moe and moe.balance == "bias"), "expert_scales": s.expert_scales,
        "initializer_range": m.init_std, "tie_word_embeddings": m.tie_embeddings, "use_cache": True,
        "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": eos_id, "dtype": dtype,
    }


def remote_state(model: Decoder) -> dict[str, torch.Tensor]:
    """Every tensor of the remote-code checkpoint: the model folded (fold_scales), read part by part."""
    m, s = model.config, model.strategy
    folded, shapes = fold_scales(copy.deepcopy(model)), remote_shapes(m, s)
    state = {name: read_part(folded, GLOBAL_PARTS[key], shapes[name]) for key, name in global_keys(m).items()}
    for i, block in enumerate(folded.blocks):
        state |= {name: read_part(block, layer_part(key), shapes[name])
                  for key, name in remote_layer_keys(i, m, s).items()}
    return {k: v.detach().float().contiguous().clone() for k, v in state.items()}


def code_files() -> dict[str, Path]:
    """The two files of the remote code, by name."""
    return {name: Path(__file__).with_name(name) for name in CODE_FILES}


def remote_files(model: Decoder, eos_id: int | None = None, dtype: str = "float32") -> dict:
    """File name -> a function writing it to the path it is given: the weights, config.json and the code."""
    from safetensors.torch import save_file

    state = {name: tensor.to(getattr(torch, dtype)) for name, tensor in remote_state(model).items()}
    config = json.dumps(remote_config(model, eos_id, dtype), indent=1) + "\n"
    files = {"model.safetensors": lambda path: save_file(state, path, metadata={"format": "pt"}),
             "config.json": lambda path: path.write_text(config)}
    return files | {name: functools.partial(shutil.copyfile, source) for name, source in code_files().items()}


def save_remote(model: Decoder, directory, eos_id: int | None = None, dtype: str = "float32", **_) -> None:
    """Write the remote-code form of `model` into `directory` (created if needed). Keyword arguments of
    transformers' save_pretrained are accepted and ignored."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, write in remote_files(model, eos_id, dtype).items():
        write(directory / name)
