"""A scalevec model as a transformers causal LM (remote code: written beside the weights by `scalevec export`,
loaded with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`; imports only torch and
transformers; every value lives in config.json, so this file is the same for every export).

    x = embed(tokens)                                  [· sqrt(d) when embedding_scale]
    for each layer:
        h = Norm(x)                                    (no weight: its scales are folded into the matrices; x when
                                                        pre_norm is false)
        q, k, v = W_q h, W_k h, W_v h                  [DNP: γ ⊙ Norm per head or over all heads: q_norm, k_norm]
        x += [post_attention_norm] W_o attention(RoPE(q), RoPE(k), v)      [o_norm]
        x += [post_feedforward_norm] FFN(Norm(x))      dense: W_down(act([gate_norm] W_gate h) ⊙ [up_norm] W_up h)
                                                       MoE: router softmax/sigmoid, top-k (+ expert bias when
                                                       choosing), Σ weight · expert(h) [+ shared expert]
    logits = lm_head(γ ⊙ Norm(x))                      [c·tanh(logits / c)]
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_scalevec import ScalevecConfig

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def normalize(x, group, kind, eps, weight=None):
    """Parameter-free RMSNorm/LayerNorm over trailing groups of `group` features, times a group-sized `weight`."""
    shape = x.shape
    if group != shape[-1]:
        x = x.unflatten(-1, (-1, group))
    weight = None if weight is None else weight.to(x.dtype)
    x = F.rms_norm(x, (group,), weight, eps) if kind == "rms" else F.layer_norm(x, (group,), weight, None, eps)
    return x.reshape(shape)


class ScalevecNorm(nn.Module):
    """γ ⊙ Norm(x) over groups of `group` features; γ has `size` entries: the group's, or the whole width's."""

    def __init__(self, size, group, config):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group, self.kind, self.eps = group, config.norm_type, config.norm_eps

    def forward(self, x, weight=None):
        weight = self.weight if weight is None else weight
        if weight.shape[-1] == self.group:
            return normalize(x, self.group, self.kind, self.eps, weight)
        return normalize(x, self.group, self.kind, self.eps) * weight.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_frequencies(config, local):
    """Inverse wavelengths of the rotary pairs (local: windowed layers under rope_local_theta), in float64."""
    head = config.head_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / theta ** (torch.arange(0, head, 2, dtype=torch.float64) / head)
    if config.rope_scaling_type == "none" or local:
        return inv_freq
    if config.rope_scaling_type == "linear":
        return inv_freq / config.rope_factor
    wavelength = 2 * math.pi / inv_freq  # llama3
    ratio = config.rope_original_max_position_embeddings / wavelength
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    smooth = ((ratio - low) / (high - low)).clamp(0, 1)
    return (1 - smooth) * inv_freq / config.rope_factor + smooth * inv_freq


def rope(config, position_ids, local):
    """cos and sin (batch, 1, positions, head_dim) of the given positions, computed in float64 then rounded."""
    frequencies = rope_frequencies(config, local).to(position_ids.device)
    angles = position_ids.to(torch.float64)[..., None] * frequencies
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos().float(), angles.sin().float()


class ScalevecAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.layer_idx, self.head_dim = layer_idx, hd
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.windowed = config.windowed_layers[layer_idx]
        self.scale = config.query_pre_attn_scalar ** -0.5 if config.query_pre_attn_scalar else None
        self.softcap = config.attn_logit_softcapping
        sizes = {"q": self.n_heads * hd, "k": self.n_kv_heads * hd, "v": self.n_kv_heads * hd}
        for name, out in sizes.items():
            setattr(self, f"{name}_proj", nn.Linear(d, out, bias=config.attention_bias))
            if name in config.dnp:
                group = hd if config.qk_norm_group == "head" else out
                setattr(self, f"{name}_norm", ScalevecNorm(hd if config.qk_scale_shape == "head" else out, group,
                                                           config))
        self.o_proj = nn.Linear(sizes["q"], d, bias=False)
        if "o" in config.dnp:
            self.o_norm = ScalevecNorm(d, d, config)

    def _normed(self, name, y):
        norm = getattr(self, f"{name}_norm", None)
        return y if norm is None else norm(y)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q, k, v = (self._normed(n, getattr(self, f"{n}_proj")(x)) for n in "qkv")
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        gqa = self.n_heads != self.n_kv_heads
        if not self.softcap:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               scale=self.scale, enable_gqa=gqa)
        else:
            if gqa:
                k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (k, v))
            scores = (q @ k.transpose(-1, -2)) * (self.scale or self.head_dim ** -0.5)
            scores = self.softcap * torch.tanh(scores / self.softcap)
            if mask is not None:
                scores = scores.masked_fill(~mask, -math.inf)
            y = scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
        return self._normed("o", self.o_proj(y.transpose(1, 2).reshape(B, T, -1)))


class ScalevecMLP(nn.Module):
    """down(act(gate) ⊙ up), each of gate, up, down optionally followed by a norm (DNP)."""

    def __init__(self, config, intermediate_size):
        super().__init__()
        d = config.hidden_size
        self.gate_proj = nn.Linear(d, intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, d, bias=False)
        for name, size in (("gate", intermediate_size), ("up", intermediate_size), ("down", d)):
            if name in config.dnp:
                setattr(self, f"{name}_norm", ScalevecNorm(size, size, config))
        self.activation = ACTIVATIONS[config.hidden_act]

    def _normed(self, name, y):
        norm = getattr(self, f"{name}_norm", None)
        return y if norm is None else norm(y)

    def forward(self, x):
        gate, up = self._normed("gate", self.gate_proj(x)), self._normed("up", self.up_proj(x))
        return self._normed("down", self.down_proj(self.activation(gate) * up))


class ScalevecExperts(nn.Module):
    """Stacked expert matrices: gate and up rows in gate_up_proj (experts, 2·d_expert, d), down_proj
    (experts, d, d_expert); DNP norms on gate and up with one γ per expert or one for all."""

    def __init__(self, config):
        super().__init__()
        E, d, de = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.d_expert = de
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * de, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, de))
        for name in ("gate", "up"):
            if name in config.dnp:
                setattr(self, f"{name}_norm", ScalevecNorm((E, de) if config.expert_scales == "per_expert" else de,
                                                           de, config))
        self.activation = ACTIVATIONS[config.hidden_act]

    def forward(self, rows, expert):
        gate, up = F.linear(rows, self.gate_up_proj[expert]).split(self.d_expert, dim=-1)
        acts = []
        for name, h in (("gate", gate), ("up", up)):
            norm = getattr(self, f"{name}_norm", None)
            if norm is not None:
                h = norm(h, norm.weight[expert] if norm.weight.ndim == 2 else None)
            acts.append(h)
        return F.linear(self.activation(acts[0]) * acts[1], self.down_proj[expert])


class ScalevecMoE(nn.Module):
    """Routed experts: scores softmax or sigmoid of the router's logits; the top k chosen by the scores (plus the
    expert bias of aux-loss-free balancing); weights the chosen scores, renormalized to sum 1 when
    normalize_top_k; every token also through the shared expert when there is one."""

    def __init__(self, config):
        super().__init__()
        E = config.num_experts
        self.top_k, self.router_kind = config.num_experts_per_tok, config.router
        self.normalize_top_k, self.expert_bias_routing = config.normalize_top_k, config.expert_bias_routing
        self.router = nn.Linear(config.hidden_size, E, bias=False)
        self.register_buffer("expert_bias", torch.zeros(E))
        self.experts = ScalevecExperts(config)
        self.shared_expert = ScalevecMLP(config, config.intermediate_size) if config.shared_expert else None

    def forward(self, x):
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits = self.router(tokens)
        scores = logits.softmax(-1) if self.router_kind == "softmax" else logits.sigmoid()
        chooser = scores + self.expert_bias if self.expert_bias_routing else scores
        indices = chooser.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.normalize_top_k:
            weights = weights / weights.sum(-1, keepdim=True)
        combined = torch.zeros_like(tokens)
        for expert in range(self.expert_bias.shape[0]):
            token, slot = (indices == expert).nonzero(as_tuple=True)
            if len(token):
                out = self.experts(tokens[token], expert)
                combined = combined.index_add(0, token, out.to(tokens.dtype) * weights[token, slot, None])
        if self.shared_expert is not None:
            combined = combined + self.shared_expert(tokens)
        return combined.reshape(shape)


class ScalevecDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        d = config.hidden_size
        self.kind, self.eps, self.pre_norm = config.norm_type, config.norm_eps, config.pre_norm
        self.self_attn = ScalevecAttention(config, layer_idx)
        self.mlp = ScalevecMoE(config) if config.moe_layers[layer_idx] else \
            ScalevecMLP(config, config.intermediate_size)
        if config.post_norms:
            self.post_attention_norm = ScalevecNorm(d, d, config)
            self.post_feedforward_norm = ScalevecNorm(d, d, config)

    def _pre(self, x):
        return normalize(x, x.shape[-1], self.kind, self.eps) if self.pre_norm else x

    def _post(self, name, y):
        norm = getattr(self, name, None)
        return y if norm is None else norm(y)

    def forward(self, hidden_states, cos, sin, mask=None, cache=None):
        x = hidden_states
        x = x + self._post("post_attention_norm", self.self_attn(self._pre(x), cos, sin, mask, cache))
        return x + self._post("post_feedforward_norm", self.mlp(self._pre(x)))


class ScalevecPreTrainedModel(PreTrainedModel):
    config_class = ScalevecConfig
    config: ScalevecConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ScalevecDecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ScalevecNorm):
            init.ones_(module.weight)
        elif isinstance(module, ScalevecExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, ScalevecMoE):
            init.zeros_(module.expert_bias)


def attention_masks(config, attention_mask, batch, past, length, device):
    """Boolean (batch, 1, length, past + length) masks for full and windowed layers: causal, within the window,
    padding keys hidden (a padding query sees itself, so its row is never empty); None where plain causal
    attention is exact (no padding, no window, no softcap, all keys or one query)."""
    total = past + length
    query_at = torch.arange(past, total, device=device)[:, None]
    key_at = torch.arange(total, device=device)[None, :]
    padded = attention_mask is not None and not bool(attention_mask.all())

    def mask(window):
        visible = key_at <= query_at
        if window:
            visible = visible & (query_at - key_at < window)
        visible = visible[None, None].expand(batch, 1, length, total)
        if padded:
            keys = attention_mask[:, None, None, -total:].bool()
            visible = visible & (keys | (key_at == query_at)[None, None])
        return visible

    causal_only = not padded and not config.attn_logit_softcapping and (past == 0 or length == 1)
    full = None if causal_only else mask(0)
    return {False: full, True: mask(config.attention_window) if config.attention_window else full}


class ScalevecModel(ScalevecPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ScalevecDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = ScalevecNorm(config.hidden_size, config.hidden_size, config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, **kwargs):
        config = self.config
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        cache = cache if cache is not None else kwargs.get("past_key_values")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if config.embedding_scale:  # the factor rounded to x's dtype first, as Gemma does
            x = x * torch.tensor(math.sqrt(config.hidden_size), dtype=x.dtype)
        use_cache = config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not (self.gradient_checkpointing and self.training):
            cache = DynamicCache()
        B, T = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count the real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=x.device)[None]
        position_ids = position_ids.expand(B, T)
        masks = attention_masks(config, attention_mask, B, past, T, x.device)
        tables = {False: rope(config, position_ids, False)}
        if config.rope_local_theta:
            tables[True] = rope(config, position_ids, True)
        hidden = () if output_hidden_states else None  # each layer's input, then the final norm's output
        for layer in self.layers:
            windowed = layer.self_attn.windowed
            cos, sin = tables[windowed and bool(config.rope_local_theta)]
            hidden = None if hidden is None else (*hidden, x)
            x = layer(x, cos, sin, mask=masks[windowed], cache=cache)
        x = self.norm(x)
        return BaseModelOutputWithPast(last_hidden_state=x, cache=cache,
                                       hidden_states=None if hidden is None else (*hidden, x))


class ScalevecForCausalLM(ScalevecPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = ScalevecModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, output_hidden_states=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache if cache is not None else kwargs.pop("past_key_values", None),
                             inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_hidden_states=output_hidden_states)
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        if self.config.final_logit_softcapping:
            cap = self.config.final_logit_softcapping
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states)
