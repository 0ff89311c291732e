"""Configuration of a scalevec model exported as transformers remote code (written beside the weights by
`scalevec export`; imports only transformers). Every value of the run lives here, none in the modeling code."""

from transformers import PretrainedConfig


class ScalevecConfig(PretrainedConfig):
    """A Pre-Norm (or norm-free-input) decoder with optional norms after projections (DNP, QK-norm) and after
    branches (sandwich norms), dense or mixture-of-experts FFNs. Scales that a matrix absorbs are folded into it;
    the ones behind a norm are the norms' weights."""

    model_type = "scalevec"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(self, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu",
                 max_position_embeddings=256, norm_type="rms", norm_eps=1e-6, pre_norm=True, post_norms=False,
                 dnp=(), qk_norm_group="head", qk_scale_shape="head", attention_bias=False,
                 rope_theta=10000.0, rope_scaling_type="none", rope_factor=8.0, rope_low_freq_factor=1.0,
                 rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192, rope_local_theta=0.0,
                 attention_window=0, windowed_layers=None, query_pre_attn_scalar=0, attn_logit_softcapping=0.0,
                 final_logit_softcapping=0.0, embedding_scale=False, moe_layers=None, num_experts=0,
                 num_experts_per_tok=2, moe_intermediate_size=0, shared_expert=False, router="softmax",
                 normalize_top_k=True, expert_bias_routing=False, expert_scales="per_expert",
                 initializer_range=0.02, tie_word_embeddings=True, use_cache=True, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.head_dim, self.hidden_act = num_key_value_heads, head_dim, hidden_act
        self.max_position_embeddings, self.norm_type, self.norm_eps = max_position_embeddings, norm_type, norm_eps
        self.pre_norm, self.post_norms, self.dnp = pre_norm, post_norms, list(dnp)
        self.qk_norm_group, self.qk_scale_shape, self.attention_bias = qk_norm_group, qk_scale_shape, attention_bias
        self.rope_theta, self.rope_scaling_type, self.rope_factor = rope_theta, rope_scaling_type, rope_factor
        self.rope_low_freq_factor, self.rope_high_freq_factor = rope_low_freq_factor, rope_high_freq_factor
        self.rope_original_max_position_embeddings = rope_original_max_position_embeddings
        self.rope_local_theta, self.attention_window = rope_local_theta, attention_window
        self.windowed_layers = list(windowed_layers or [False] * num_hidden_layers)
        self.query_pre_attn_scalar, self.attn_logit_softcapping = query_pre_attn_scalar, attn_logit_softcapping
        self.final_logit_softcapping, self.embedding_scale = final_logit_softcapping, embedding_scale
        self.moe_layers = list(moe_layers or [False] * num_hidden_layers)
        self.num_experts, self.num_experts_per_tok = num_experts, num_experts_per_tok
        self.moe_intermediate_size, self.shared_expert, self.router = moe_intermediate_size, shared_expert, router
        self.normalize_top_k, self.expert_bias_routing = normalize_top_k, expert_bias_routing
        self.expert_scales, self.initializer_range, self.use_cache = expert_scales, initializer_range, use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
