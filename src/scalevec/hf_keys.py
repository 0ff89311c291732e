"""The one key map between scalevec's decoder and transformers checkpoints of the Llama family
(Llama and Mistral; Qwen2, with q/k/v biases; Qwen3, with q_norm/k_norm): which tensor each part of
the model is, and its shape. Export writes these names (export/hf.py), import reads and checks them
(hf_import.py); a part's name is the same on both sides.
"""

from __future__ import annotations

from .config import ModelConfig


def global_keys(m: ModelConfig) -> dict[str, str]:
    keys = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight"}
    return keys if m.tie_embeddings else keys | {"head": "lm_head.weight"}


def layer_keys(i: int, architecture: str) -> dict[str, str]:
    """Block i's parts: attn_norm and ffn_norm (pre-norm weights), q k v o, gate up down, and q_bias k_bias
    v_bias (Qwen2) or q_norm k_norm (Qwen3)."""
    p = f"model.layers.{i}"
    keys = {"attn_norm": f"{p}.input_layernorm.weight", "ffn_norm": f"{p}.post_attention_layernorm.weight",
            **{n: f"{p}.self_attn.{n}_proj.weight" for n in "qkvo"},
            **{n: f"{p}.mlp.{n}_proj.weight" for n in ("gate", "up", "down")}}
    if architecture == "qwen2":
        keys |= {f"{n}_bias": f"{p}.self_attn.{n}_proj.bias" for n in "qkv"}
    if architecture == "qwen3":
        keys |= {f"{n}_norm": f"{p}.self_attn.{n}_norm.weight" for n in "qk"}
    return keys


def hf_shapes(m: ModelConfig, architecture: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint and its shape."""
    d, hd, q, kv = m.d_model, m.head_size, m.n_heads * m.head_size, m.n_kv_heads * m.head_size
    part = {"attn_norm": (d,), "ffn_norm": (d,), "q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q),
            "gate": (m.d_ff, d), "up": (m.d_ff, d), "down": (d, m.d_ff), "q_bias": (q,), "k_bias": (kv,),
            "v_bias": (kv,), "q_norm": (hd,), "k_norm": (hd,)}
    shapes = {name: {"embed": (m.vocab_size, d), "final_norm": (d,), "head": (m.vocab_size, d)}[key]
              for key, name in global_keys(m).items()}
    for i in range(m.n_layers):
        shapes |= {name: part[key] for key, name in layer_keys(i, architecture).items()}
    return shapes
