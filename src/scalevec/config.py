"""Run configuration: one dataclass per section, TOML files, `--set section.field=value` overrides.

Every problem is reported as a `ConfigError` with a one-line message naming the key and the fix;
the CLI turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tomli_w

from .errors import BadInput
from .strategy import Strategy, UnknownPreset, preset_values

PROSE_SOURCES = ("austen", "kjv_bible", "milton", "moby_dick", "shakespeare", "sotu", "wiki_vital_summaries")
BUNDLED_SOURCES = (*PROSE_SOURCES, "python_docs")  # the bundled corpus (data/corpus/); python_docs is optional


LoggerName = Literal["tensorboard", "csv", "wandb"]  # train/loggers.py


class ConfigError(BadInput):
    """Bad configuration; the message is one line naming the key and the fix."""


MODEL_PRESETS: dict[str, dict] = {
    # CPU ladder: trains on 2 cores; vocab matches the bundled-corpus tokenizer
    "cpu-0.5m": dict(d_model=64, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=192),
    "cpu-1m": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384),
    "cpu-2m": dict(d_model=160, n_layers=5, n_heads=5, n_kv_heads=1, d_ff=448),
    "cpu-3m": dict(d_model=192, n_layers=6, n_heads=6, n_kv_heads=2, d_ff=512),
    "cpu-7m": dict(d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=704),
    # the study's size ladders around cpu-0.5m (same family: head_dim 24-44, d_ff about 3x d_model)
    "cpu-d48": dict(d_model=48, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=128),
    "cpu-d56": dict(d_model=56, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=160),
    "cpu-d72": dict(d_model=72, n_layers=4, n_heads=2, n_kv_heads=1, d_ff=224),
    "cpu-d80": dict(d_model=80, n_layers=4, n_heads=2, n_kv_heads=1, d_ff=256),
    "cpu-d84": dict(d_model=84, n_layers=4, n_heads=2, n_kv_heads=1, d_ff=272),
    "cpu-d88": dict(d_model=88, n_layers=4, n_heads=2, n_kv_heads=1, d_ff=288),
    "cpu-moe": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, moe_experts=4, moe_top_k=2,
                    moe_d_expert=192),
    # GPU ladder: Llama-style shapes near the paper's sizes (total parameters, untied head), the GPT-2 init
    "gpu-0.12b": dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4,
                      d_ff=2048, max_seq_len=2048, tie_embeddings=False, init="normal"),
    "gpu-0.25b": dict(vocab_size=32768, d_model=1024, n_layers=16, n_heads=16, n_kv_heads=4,
                      d_ff=2816, max_seq_len=2048, tie_embeddings=False, init="normal"),
    "gpu-0.5b": dict(vocab_size=32768, d_model=1280, n_layers=24, n_heads=20, n_kv_heads=4,
                     d_ff=3584, max_seq_len=2048, tie_embeddings=False, init="normal"),
    "gpu-1b": dict(vocab_size=32768, d_model=2048, n_layers=20, n_heads=32, n_kv_heads=8,
                   d_ff=5632, max_seq_len=2048, tie_embeddings=False, init="normal"),
    "gpu-moe-0.5b": dict(vocab_size=32768, d_model=1024, n_layers=16, n_heads=16, n_kv_heads=4, d_ff=2816,
                         moe_experts=16, moe_top_k=2, moe_d_expert=512, max_seq_len=2048, tie_embeddings=False,
                         init="normal"),
    "gpu-2b": dict(vocab_size=32768, d_model=2560, n_layers=26, n_heads=32, n_kv_heads=8,
                   d_ff=6912, max_seq_len=2048, tie_embeddings=False, init="normal"),
}


@dataclass
class ModelConfig:
    """Shape of the dense Pre-Norm decoder."""

    preset: str = "cpu-1m"
    """Size preset these fields started from (see MODEL_PRESETS; empty = custom); fields beside it override it."""
    vocab_size: int = 8192
    """Embedding rows; must cover the tokenizer's vocabulary."""
    d_model: int = 128
    """Residual stream width."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Query heads; d_model must be divisible by it."""
    n_kv_heads: int = 2
    """Key/value heads (GQA); n_heads must be divisible by it."""
    head_dim: int = 0
    """Width of each attention head (0 = d_model / n_heads); Qwen3 and Gemma set it apart from the width."""
    qkv_bias: bool = False
    """Biases on the q, k and v projections (Qwen2); never decayed."""
    d_ff: int = 384
    """SwiGLU hidden width."""
    max_seq_len: int = 256
    """Longest sequence (RoPE table size)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: Literal["none", "llama3", "linear"] = "none"
    """RoPE frequency scaling: `none`; `llama3` (Llama 3.1: wavelengths beyond rope_original_max_seq_len /
    rope_low_freq_factor are stretched by rope_factor, those below .../rope_high_freq_factor kept, a smooth band
    between); or `linear` (every frequency divided by rope_factor: Gemma 3's full-attention layers)."""
    rope_factor: float = 8.0
    """`llama3` and `linear` scaling: how much the (low) frequencies are stretched."""
    rope_low_freq_factor: float = 1.0
    """`llama3` scaling: low-frequency boundary (original context / wavelength)."""
    rope_high_freq_factor: float = 4.0
    """`llama3` scaling: high-frequency boundary (original context / wavelength)."""
    rope_original_max_seq_len: int = 8192
    """`llama3` scaling: the context length the frequencies were trained for."""
    sliding_window: int = 0
    """Windowed blocks attend to the last this-many positions, their own included (Mistral, Gemma); 0 = every
    block attends to the whole prefix."""
    full_attention_every: int = 0
    """With a sliding window, every this-many-th block attends to the whole prefix instead (Gemma 2: 2,
    Gemma 3: 6); 0 = every block is windowed."""
    rope_local_theta: float = 0.0
    """RoPE base of the windowed blocks, which then take no rope_scaling (Gemma 3's local base, 10000); 0 = the
    same RoPE as every other block."""
    query_pre_attn_scalar: int = 0
    """Attention scores are q·k / sqrt(this) (Gemma's query_pre_attn_scalar); 0 = the head size."""
    attn_softcap: float = 0.0
    """Attention scores become c·tanh(score / c) before the softmax (Gemma 2: 50); 0 = off. It takes an explicit
    attention instead of PyTorch's fused SDPA kernels: slower, more memory."""
    final_softcap: float = 0.0
    """Output logits become c·tanh(logit / c) (Gemma 2: 30); 0 = off."""
    embedding_scale: bool = False
    """Multiply the token embeddings by sqrt(d_model) on the way in (Gemma), not on the tied head's way out."""
    activation: Literal["silu", "gelu_tanh"] = "silu"
    """Gate nonlinearity of the gated FFN: `silu` (SwiGLU: Llama, Qwen, OLMo) or `gelu_tanh` (GeGLU: Gemma)."""
    pre_norm: bool = True
    """Normalize each block's input before its branches (Pre-Norm). OLMo 2 does not: it normalizes the branch
    outputs instead (strategy.post_norms), so no block norm feeds q, k, v or gate, up."""
    norm: Literal["rms", "layer"] = "rms"
    """Parameter-free normalization: `rms` (RMSNorm) or `layer` (LayerNorm without bias)."""
    norm_eps: float = 1e-6
    """Epsilon inside every norm."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    init: Literal["fan_in", "normal"] = "fan_in"
    """Matrix init: `fan_in` N(0, init_gain²/fan_in), width-aware (the cpu presets and custom shapes), or
    `normal` N(0, init_std²) at every width (GPT-2; the paper-sized gpu presets, where 0.02 is near
    1/sqrt(d)). o and down projections also get 1/sqrt(2·n_layers). docs/init.md: why, and the measurements."""
    init_std: float = 0.02
    """Std of the embedding, and of every matrix under `init = "normal"`."""
    init_gain: float = 0.35
    """Gain of the `fan_in` init (a matrix's std is init_gain/sqrt(fan_in)); 0.35 gives the cpu presets the
    branch-to-residual signal ratios of gpu-0.12b at init (benchmarks/init_statistics.py)."""
    moe_experts: int = 0
    """Experts per MoE FFN (0 = dense model)."""
    moe_top_k: int = 2
    """Experts each token is routed to."""
    moe_d_expert: int = 0
    """Hidden width of each expert (0 = d_ff)."""
    moe_shared_expert: bool = False
    """Add a dense expert every token goes through."""
    moe_every: int = 1
    """Every this-many-th block has an MoE FFN (1 = all; 2 = blocks 2, 4, ...), the others dense."""

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` has a routed MoE FFN (every moe_every-th block, when moe_experts > 0)."""
        return self.moe_experts > 0 and (layer + 1) % self.moe_every == 0

    @property
    def head_size(self) -> int:
        """Width of one attention head: head_dim, or d_model / n_heads when head_dim is 0."""
        return self.head_dim or self.d_model // self.n_heads

    def validate(self) -> None:
        check_choices(self, "model")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            _check(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be positive")
        _check(self.head_dim >= 0, f"model.head_dim={self.head_dim} must be >= 0 (0 = d_model / n_heads)")
        _check(self.head_dim > 0 or self.d_model % self.n_heads == 0,
               f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
               "choose d_model a multiple of n_heads, or set model.head_dim")
        _check(self.n_heads % self.n_kv_heads == 0,
               f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}; "
               "choose n_kv_heads dividing n_heads")
        _check(self.head_size % 2 == 0,
               f"model head size {self.head_size} (model.head_dim, or d_model/n_heads) is odd; RoPE needs an even "
               "head size: change model.head_dim, d_model or n_heads")
        _check(self.norm_eps > 0 and self.init_std > 0 and self.init_gain > 0 and self.rope_theta > 0,
               "model.norm_eps, model.init_std, model.init_gain and model.rope_theta must be positive")
        _check(self.rope_scaling != "llama3" or (self.rope_factor >= 1 and self.rope_original_max_seq_len > 0 and
                                                 0 < self.rope_low_freq_factor < self.rope_high_freq_factor),
               "model.rope_scaling=llama3 needs rope_factor >= 1, 0 < rope_low_freq_factor < rope_high_freq_factor "
               "and rope_original_max_seq_len > 0")
        _check(self.rope_scaling != "linear" or self.rope_factor > 0,
               f"model.rope_scaling=linear needs rope_factor > 0, got {self.rope_factor}")
        for name in ("sliding_window", "full_attention_every", "rope_local_theta", "query_pre_attn_scalar",
                     "attn_softcap", "final_softcap"):
            _check(getattr(self, name) >= 0, f"model.{name}={getattr(self, name)} must be >= 0 (0 = off)")
        _check(self.sliding_window or not (self.full_attention_every or self.rope_local_theta),
               "model.full_attention_every and model.rope_local_theta describe windowed blocks; set "
               "model.sliding_window too, or leave them 0")
        _check(self.moe_experts >= 0, f"model.moe_experts={self.moe_experts} must be >= 0 (0 = dense)")
        if self.moe_experts:
            _check(0 < self.moe_top_k <= self.moe_experts,
                   f"model.moe_top_k={self.moe_top_k} must be in 1..model.moe_experts={self.moe_experts}")
            _check(self.moe_every > 0 and self.moe_d_expert >= 0,
                   "model.moe_every must be positive and moe_d_expert >= 0")
            _check(self.moe_every <= self.n_layers, f"model.moe_every={self.moe_every} is above model.n_layers="
                                                    f"{self.n_layers}, so no block routes; lower it, or set "
                                                    "model.moe_experts=0 for a dense model")
            d_expert = self.moe_d_expert or self.d_ff
            _check(self.d_model % 8 == 0 and d_expert % 8 == 0,  # grouped GEMM rows 16-byte aligned in bf16
                   f"model.d_model={self.d_model} and the expert width {d_expert} must be multiples of 8 for MoE; "
                   "round them")
        rows = max(self.vocab_size, 2 * self.d_ff, 2 * (self.moe_d_expert or self.d_ff) * max(self.moe_experts, 1),
                   (self.n_heads + 2 * self.n_kv_heads) * self.head_size, self.max_seq_len)
        _check(rows * max(self.d_model, self.head_size) < 2**61,  # bytes of one fp32 tensor within 64 bits
               f"model: a weight of {rows:,} x {max(self.d_model, self.head_size):,} entries is beyond what a tensor "
               "can hold; lower model.vocab_size, model.max_seq_len or the widths")


@dataclass
class MoEConfig:
    """Routing and load balancing of MoE FFNs (model.moe_experts > 0)."""

    router: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: `softmax` over experts or per-expert `sigmoid`."""
    normalize_top_k: bool = True
    """Renormalize the top-k scores of a token to sum to 1."""
    balance: Literal["aux", "bias", "none"] = "aux"
    """`aux` (Switch auxiliary loss), `bias` (aux-loss-free expert bias) or `none`."""
    aux_loss: float = 0.01
    """Coefficient of the auxiliary loss E·Σ_e f_e·P_e."""
    bias_rate: float = 0.001
    """Step of the expert-bias update per optimizer step (balance = bias)."""
    router_z_loss: float = 0.0
    """Coefficient of the router z-loss mean(logsumexp(router logits)²)."""
    dispatch: Literal["auto", "grouped", "padded"] = "auto"
    """Expert matmuls: `grouped` (one grouped GEMM over rows sorted by expert; static shapes, so it
    compiles once; bf16 CUTLASS kernels on Hopper/Blackwell; torch compiles it for bf16 only),
    `padded` (batched matmuls over a buffer padded to the busiest expert; a host sync per layer), or
    `auto` (grouped on CUDA, padded elsewhere)."""

    def validate(self) -> None:
        check_choices(self, "moe")
        for name in ("aux_loss", "bias_rate", "router_z_loss"):
            _check(getattr(self, name) >= 0, f"moe.{name}={getattr(self, name)} must be >= 0")


@dataclass
class DataConfig:
    """Token shards a run reads, and how `scalevec data prepare` builds them."""

    dir: str = "data/bundled"
    """Directory of prepared shards; a run prepares it first if it is missing or stale."""
    sources: list[str] = field(default_factory=lambda: list(PROSE_SOURCES))
    """Bundled sources: the natural-prose ones by default; `python_docs` is optional."""
    inputs: list[str] = field(default_factory=list)
    """User files, directories or globs of .txt (one document each), .jsonl or .parquet."""
    jsonl_field: str = "text"
    """Text field of user .jsonl records."""
    parquet_column: str = "text"
    """Text column of user .parquet files."""
    tokenizer: str = ""
    """A tokenizer.json to use instead of training a byte-level BPE; a run checks its shards match it."""
    vocab_size: int = 8192
    """Vocabulary of the trained tokenizer (257 to 2**24)."""
    val_fraction: float = 0.02
    """Share of the text (whole documents) held out for validation."""
    split_seed: int = 0
    """Seed of the train/validation document split (fixed, independent of the run seed)."""
    shard_tokens: int = 1 << 26
    """Tokens per shard file."""
    val_tokens: int = 65536
    """Fixed validation set: windows adding up to this many tokens, evenly spaced over the validation split
    (every source in proportion); the whole split if it is smaller."""
    on_bad_record: Literal["error", "skip"] = "error"
    """A malformed .jsonl line, unreadable .parquet row group or non-UTF-8 .txt file: `error` stops naming it,
    `skip` leaves it out and counts it in meta.json (`skipped_records`)."""
    tokenizer_sample_bytes: int = 1_000_000_000
    """Text the tokenizer is trained on: the whole training split up to this size, else a seeded sample of its
    documents of about this size (the bundled corpus is used whole)."""

    def validate(self) -> None:
        _check(0 <= self.val_fraction < 1, f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        _check(self.tokenizer_sample_bytes > 0, f"data.tokenizer_sample_bytes={self.tokenizer_sample_bytes} must be "
               "positive")
        _check(self.shard_tokens > 0 and self.val_tokens >= 0 and self.vocab_size > 256,
               "data.shard_tokens must be positive, data.val_tokens non-negative, data.vocab_size above 256")
        _check(self.vocab_size <= 2**24, f"data.vocab_size={self.vocab_size} is above 2**24; the BPE trainer allocates "
               "memory for every entry up front: choose a smaller vocabulary")
        _check(self.split_seed >= 0, f"data.split_seed={self.split_seed} must be >= 0")
        _check(bool(self.dir.strip()), "data.dir is empty; give a directory for the prepared shards")
        check_choices(self, "data")


@dataclass
class OptimConfig:
    """Optimizers and the per-parameter table (which tensors decay, at what rate; see optim/policy.py)."""

    name: Literal["adamw", "muon"] = "adamw"
    """`adamw` for everything, or `muon`: matrices on Muon, everything else on AdamW."""
    lr: float = 3e-3
    """Peak AdamW learning rate (scales, embeddings, head, and matrices unless Muon)."""
    muon_lr: float = 0.02
    """Peak Muon learning rate (matrices, `muon` runs only)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.95
    """AdamW β2."""
    eps: float = 1e-8
    """AdamW ε."""
    weight_decay: float = 0.1
    """Decoupled weight decay of matrices (AdamW or Muon)."""
    scale_weight_decay: float = 0.1
    """Decay of the scale vectors that strategy.scale_decay decays (its own coefficient, AdamW)."""
    embedding_weight_decay: float = 0.0
    """Decay of the token embedding (tied head included)."""
    head_weight_decay: float = 0.1
    """Decay of an untied output head."""
    router_weight_decay: float = 0.1
    """Decay of MoE router matrices, as of the other matrices by default: the router's input γ decays under IWD,
    and the balance argument for that needs its matrix decayed too (0 before scalevec 0.2)."""
    scale_lr_mult: float = 1.0
    """Scale vectors' learning rate as a multiple of `lr`."""
    embedding_lr_mult: float = 1.0
    """Embedding learning rate as a multiple of `lr`."""
    head_lr_mult: float = 1.0
    """Untied head learning rate as a multiple of `lr`."""
    decay_or_direction: bool = False
    """Also decay OR's direction α (scale-invariant: decay only keeps its effective learning rate up)."""
    muon_momentum: float = 0.95
    """Muon momentum μ."""
    muon_nesterov: bool = True
    """Nesterov momentum in Muon."""
    muon_ns_steps: int = 5
    """Newton-Schulz iterations."""
    muon_ns_dtype: Literal["float32", "bfloat16"] = "float32"
    """Newton-Schulz dtype: `float32` (CPU) or `bfloat16` (GPU)."""
    muon_update_scale: Literal["original", "match_rms_adamw"] = "original"
    """Update scaling: `original` sqrt(max(1, rows/cols)) or `match_rms_adamw` 0.2·sqrt(max(rows, cols))."""
    fused: bool = True
    """Use torch's fused AdamW where the parameters allow it."""

    def validate(self) -> None:
        check_choices(self, "optim")
        _check(self.lr > 0 and self.muon_lr > 0, "optim.lr and optim.muon_lr must be positive")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and 0 <= self.muon_momentum < 1,
               "optim.beta1, optim.beta2 and optim.muon_momentum must be in [0, 1)")
        for name in ("weight_decay", "scale_weight_decay", "embedding_weight_decay", "head_weight_decay",
                     "router_weight_decay"):
            _check(getattr(self, name) >= 0, f"optim.{name}={getattr(self, name)} must be >= 0")
        for name in ("eps", "scale_lr_mult", "embedding_lr_mult", "head_lr_mult"):
            _check(getattr(self, name) > 0, f"optim.{name}={getattr(self, name)} must be positive")
        _check(self.muon_ns_steps >= 1, f"optim.muon_ns_steps={self.muon_ns_steps} must be at least 1")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then `cosine`, `wsd` or `constant`."""

    name: Literal["cosine", "wsd", "constant"] = "cosine"
    """`cosine` (to min_lr_ratio), `wsd` (warmup-stable-decay) or `constant`."""
    warmup_steps: int = 50
    """Linear warmup steps; the factor reaches 1 at the last warmup step."""
    min_lr_ratio: float = 0.1
    """Final factor of cosine and WSD."""
    decay_fraction: float = 0.2
    """WSD: final fraction of the steps spent decaying."""
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "linear"
    """WSD decay shape: `linear`, `cosine` or `1-sqrt`."""
    decay_start: int = 0
    """WSD: step at which the decay starts (0 = the last decay_fraction of the steps)."""
    floor_at_end: bool = True
    """WSD: the last step runs at min_lr_ratio (false: at min_lr_ratio + (1 − min_lr_ratio)/decay steps, as every
    WSD run of scalevec before 0.2 did)."""

    def validate(self) -> None:
        check_choices(self, "schedule")
        _check(self.warmup_steps >= 0 and 0 <= self.min_lr_ratio <= 1 and 0 <= self.decay_fraction <= 1,
               "schedule.warmup_steps must be >= 0, schedule.min_lr_ratio and schedule.decay_fraction in [0, 1]")


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 400
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per micro-batch (per data-parallel rank)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seq_len: int = 256
    """Tokens per sequence (at most model.max_seq_len)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping; the norm is logged either way)."""
    z_loss: float = 0.0
    """Coefficient of the z-loss mean(logsumexp(logits)²) added to the objective."""
    eval_every: int = 100
    """Evaluate on the fixed validation budget every this many steps (and at the start and end)."""
    eval_batch_size: int = 16
    """Sequences per validation batch."""
    log_every: int = 10
    """Write a metrics.jsonl record every this many steps."""
    checkpoint_every: int = 100
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """On a non-finite loss or gradient: `stop` with an error, or `skip` the update (counted in metrics)."""
    compile: bool = False
    """torch.compile the model and its loss as one graph."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (less memory, about one more forward of compute)."""
    fused_kernels: bool = True
    """On CPU (fp32), compute DNP's norms with fused kernels (kernels.py), equal to the torch ops within fp32
    rounding: each FFN that DNP normalizes before SwiGLU (gate and up both DNP, RMSNorm, silu) in one pass forward
    and one backward, and the backward of q's and k's per-head norms, scales and RoPE (q and k DNP, v not,
    RMSNorm, head-shaped scales) in one pass; false: the torch ops. Elsewhere, or where no C compiler builds the kernels
    (one warning), the torch ops run."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` (cuda when available), `cpu` or `cuda`; bf16 autocast on cuda, fp32 on cpu."""
    threads: int = 0
    """CPU threads for torch, at most 4096 (0 = torch's default)."""
    init_from: str = ""
    """Safetensors weights to start from instead of a random init (e.g. written by `scalevec import`)."""
    branch_from: str = ""
    """Another run's checkpoint directory to continue from in this new run (weights, optimizer state, data position,
    step; the optimizer's settings, such as its learning rate, are this config's): e.g. a WSD decay launched from a
    stable-phase checkpoint."""
    loggers: list[LoggerName] = field(default_factory=list)
    """Also log metrics to: `tensorboard`, `csv` (RUN_DIR/metrics.csv), `wandb` (extras `scalevec[tensorboard]`,
    `scalevec[wandb]`); metrics.jsonl is always written."""
    wandb_project: str = "scalevec"
    """W&B project of `wandb` logging."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode: `offline` (sync later with `wandb sync`), `online` or `disabled`."""
    stop_signals: list[Literal["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP"]] = field(
        default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    """Signals that stop the run gracefully: it finishes the optimizer step, checkpoints it on every rank and exits
    with code 75 (continue with --resume); a second signal stops at once. May change on --resume."""
    time_limit: str = ""
    """Wall-clock budget of the process, e.g. `3h50m`, `90m`, `45s` (empty: none): reached, the run stops as on a
    stop signal. Leave a margin below the job's limit for the checkpoint. May change on --resume."""

    @property
    def time_limit_s(self) -> float:
        """train.time_limit in seconds (0: none)."""
        import re

        match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", self.time_limit.replace(" ", ""))
        _check(match is not None, f"train.time_limit={self.time_limit!r} is not a duration; write e.g. 3h50m, 90m "
                                  "or 45s (empty for none)")
        hours, minutes, seconds = (int(g or 0) for g in match.groups())
        return 3600 * hours + 60 * minutes + seconds

    def validate(self) -> None:
        check_choices(self, "train")
        _check(self.time_limit_s > 0 or not self.time_limit, f"train.time_limit={self.time_limit!r} must be positive")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_batch_size", "log_every",
                     "checkpoint_every", "keep_checkpoints"):
            _check(getattr(self, name) > 0, f"train.{name}={getattr(self, name)} must be positive")
        _check(self.grad_clip >= 0 and self.z_loss >= 0, "train.grad_clip and train.z_loss must be >= 0")
        _check(0 <= self.threads <= 4096, f"train.threads={self.threads} must be in 0..4096 (0 = torch's default)")


@dataclass
class DistConfig:
    """Data parallelism under torchrun (a single process ignores it)."""

    mode: Literal["ddp", "fsdp2"] = "ddp"
    """`ddp` (replicated parameters) or `fsdp2` (parameters, gradients and optimizer state sharded). May change on
    --resume (the checkpoint is loaded into either layout)."""

    def validate(self) -> None:
        check_choices(self, "dist")


CONFIG_FORMAT = 2
"""The meaning of config values this release writes (Config.format)."""


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: Strategy = field(default_factory=Strategy)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    seed: int = 0
    """Seed of initialization (and, in a run, of data order): 0 to 2**32 - 1."""
    format: int = CONFIG_FORMAT
    """What the config's values mean: every resolved config (a run's config.toml, a study record) carries it. One
    without it was written before scalevec 0.2 and is read with that release's meaning (see `_migrate`)."""


def _preset_values(section: str, name: str) -> dict:
    """Field values a section's `preset` key stands for; an empty name is a custom section."""
    if not name:
        return {"preset": ""}
    if section == "model":
        if name not in MODEL_PRESETS:
            raise ConfigError(f"model.preset: unknown size preset {name!r}; choose from {', '.join(MODEL_PRESETS)}")
        return {"preset": name, **MODEL_PRESETS[name]}
    try:
        return preset_values(name)
    except UnknownPreset as err:
        raise ConfigError(f"strategy.preset: {err}") from None


def _choices(options: tuple) -> str:
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


def _check_choice(key: str, value, hint) -> None:
    """A Literal field's value, or every item of a list of Literals, is one of its choices."""
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        if typing.get_origin(item) is Literal:
            bad = [v for v in value if v not in typing.get_args(item)]
            _check(not bad, f"{key} has unknown {bad[0] if bad else ''!r}; "
                            f"choose from {', '.join(typing.get_args(item))}")
    elif typing.get_origin(hint) is Literal:
        _check(value in typing.get_args(hint), f"{key}={value!r}; choose {_choices(typing.get_args(hint))}")


def _coerce(key: str, value, hint):
    """Check `value` against the field's type hint; accept the obvious conversions."""
    origin = typing.get_origin(hint)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings like \"q,k\" or [\"q\", \"k\"], got {value!r}")
        repeated = [v for i, v in enumerate(value) if v in value[:i]]  # two csv loggers, a source read twice
        _check(not repeated, f"{key} names {repeated[0] if repeated else ''!r} twice; give each once")
        _check_choice(key, value, hint)
        return value
    if origin is Literal:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected one of {', '.join(typing.get_args(hint))}, got {value!r}")
        _check_choice(key, value, hint)
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -2**63 <= value < 2**63:  # torch and numpy take 64-bit integers
                raise ConfigError(f"{key}={value} does not fit in 64 bits; give a smaller integer")
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):  # `--set data.dir=2024` reads as TOML's integer
            return str(value)
    else:
        raise TypeError(f"unsupported config field type {hint} for {key}")
    raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")


def _from_raw(cls, raw: dict, path: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"unknown key {key}; valid keys{' of ' + path if path else ''}: {', '.join(names)}")
    values = {}
    section = path.split(".")[-1]
    if "preset" in raw and section in ("model", "strategy"):
        values.update(_preset_values(section, _coerce(f"{path}.preset", raw["preset"], str)))
    for name, value in raw.items():
        key = f"{path}.{name}" if path else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (table), got {value!r}")
            values[name] = _from_raw(hint, value, key)
        else:
            values[name] = _coerce(key, value, hint)
    return cls(**values)


def parse_override(text: str) -> tuple[list[str], object]:
    """`section.field=value` -> (path, value); the value is read as TOML if it parses, else as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.field=value, e.g. --set model.d_model=256")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"--set {text!r}: empty key part; write section.field=value")
    try:
        parsed = tomllib.loads(f"v = {raw}")
        value = parsed["v"] if len(parsed) == 1 else raw  # a newline in the value would set other keys too
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def _merge(raw: dict, path: list[str], value) -> None:
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part} is a value, not a section")
    node[path[-1]] = value


RENAMED = {("strategy", "dp"): "dual_placement", ("strategy", "dp_output_role"): "dual_placement_role"}
"""Keys of earlier versions and their names now (`dp` read like data parallelism beside DDP)."""


def _migrate(raw: dict, resolved: bool = False) -> dict:
    """Keys of earlier versions, so their configs, run directories and `--set`s still load: the RENAMED
    keys, and scalevec 0.1's `train.tensorboard = true`, which is `train.loggers = ["tensorboard"]`.

    A `resolved` config (written by a run) without `format` is format 1, whose values meant something else: its
    `iwd` left an Input scale feeding an undecayed matrix undecayed (now `iwd-balanced`), MoE routers did not
    decay, WSD's last step ran above the floor, and model.query_pre_attn_scalar was written as a float.
    A hand-written config without `format` means the current one."""
    for (section, old), new in RENAMED.items():
        values = raw.get(section)
        if isinstance(values, dict) and old in values:
            values[new] = values.pop(old)
    train = raw.get("train")
    if isinstance(train, dict) and "tensorboard" in train:
        if _coerce("train.tensorboard", train.pop("tensorboard"), bool):
            train["loggers"] = [*train.get("loggers", []), "tensorboard"]
    if raw.get("format", 1 if resolved else CONFIG_FORMAT) == 1:
        strategy, optim, model = (raw.get(name) if isinstance(raw.get(name), dict) else {}
                                  for name in ("strategy", "optim", "model"))
        preset = str(strategy.get("preset", "standard"))
        if strategy.get("scale_decay", _preset_values("strategy", preset).get("scale_decay")) == "iwd":
            strategy["scale_decay"] = "iwd-balanced"
        if model.get("moe_experts"):
            raw["optim"] = {"router_weight_decay": 0.0, **optim}
        raw["schedule"] = {"floor_at_end": False, **(raw.get("schedule") if isinstance(raw.get("schedule"), dict)
                                                      else {})}
        scalar = model.get("query_pre_attn_scalar")
        if isinstance(scalar, float) and scalar.is_integer():
            model["query_pre_attn_scalar"] = int(scalar)
        raw["format"] = CONFIG_FORMAT
    return raw


def load_config(source: str | Path | dict | None = None, overrides: typing.Iterable[str] = (),
                resolved: bool = False) -> Config:
    """A validated Config from a TOML file (or a dict, or defaults) plus `--set` overrides. `resolved`: the source
    was written by scalevec (a run's config.toml, a study record), so a missing `format` means format 1."""
    if source is None:
        raw: dict = {}
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; pass a .toml file (a run's is RUN/config.toml) or "
                              "a model preset name")
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass an existing .toml file or a model preset name")
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid TOML ({err}); fix the file's syntax") from None
    raw = _migrate({k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}, resolved)
    for text in overrides:
        path, value = parse_override(text)
        if path[1:] == ["preset"] and path[0] in ("model", "strategy"):
            raw[path[0]] = {}  # a new preset replaces the section; later overrides apply on top of it
        _merge(raw, path, value)
        _migrate(raw)  # an old key set here overrides the file's value under the new name
    config = _from_raw(Config, raw, "")
    validate(config)
    return config


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_section(section, prefix: str) -> None:
    """A section built in code from values read elsewhere (a transformers config.json): every field of its type,
    then the section's own rules."""
    for name, hint in typing.get_type_hints(type(section)).items():
        _coerce(f"{prefix}.{name}", getattr(section, name), hint)
    section.validate()


def check_choices(section, prefix: str) -> None:
    """Every Literal field of a section (a dataclass built in code, not parsed) holds one of its choices."""
    for name, hint in typing.get_type_hints(type(section)).items():
        _check_choice(f"{prefix}.{name}", getattr(section, name), hint)


def validate(config: Config) -> None:
    """Each section's own rules, then the ones between sections."""
    for name in ("model", "moe", "data", "optim", "schedule", "train", "dist"):
        getattr(config, name).validate()
    _validate_strategy(config.strategy)
    m, s, t, sch = config.model, config.strategy, config.train, config.schedule
    if m.moe_experts:
        _check("down" not in s.dual_placement + s.dnp,
               "strategy: DP/DNP on down is not supported in MoE experts; drop down")
        _check(m.pre_norm, "model.pre_norm=false is not supported with MoE FFNs (the router reads the block norm); "
               "keep pre_norm")
    _check(m.pre_norm or s.post_norms,
           "model.pre_norm=false leaves the blocks without any norm; set strategy.post_norms=true (OLMo 2) or keep "
           "pre_norm")
    _check(t.seq_len <= m.max_seq_len,
           f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower seq_len or raise max_seq_len")
    _check(0 <= sch.decay_start < t.steps,
           f"schedule.decay_start={sch.decay_start} must be in [0, train.steps={t.steps})")
    _check(0 <= config.seed < 2**32, f"seed={config.seed} must be in 0..{2**32 - 1}")
    _check_decay_rates(config)
    _check(config.format == CONFIG_FORMAT, f"format={config.format} is not a config format this scalevec reads; "
           f"omit it (format {CONFIG_FORMAT}) or give 1 for a config written before scalevec 0.2")


def _check_decay_rates(config: Config) -> None:
    """Decoupled decay multiplies a tensor by 1 - lr·decay every step: at 1 or more the weights it applies to
    vanish or flip sign."""
    o, m = config.optim, config.model
    rates = {"weight_decay": o.muon_lr if o.name == "muon" else o.lr,
             "embedding_weight_decay": o.lr * o.embedding_lr_mult}
    if not m.tie_embeddings:
        rates["head_weight_decay"] = o.lr * o.head_lr_mult
    if m.moe_experts:
        rates["router_weight_decay"] = o.lr
    if config.strategy.scale_decay != "none":
        rates["scale_weight_decay"] = o.lr * o.scale_lr_mult
    for name, lr in rates.items():
        decay = getattr(o, name)
        _check(lr * decay < 1, f"optim.{name}={decay} at learning rate {lr:g} multiplies the weights by "
               f"1 - lr·decay = {1 - lr * decay:g} every step, so they vanish or flip sign; lower the decay or the "
               "learning rate")


def _validate_strategy(s: Strategy) -> None:
    check_choices(s, "strategy")
    both = sorted(set(s.dual_placement) & set(s.dnp))
    _check(not both,
           f"strategy: projection {both[0] if both else ''!r} is in both dual_placement and dnp; keep it in one")
    _check(s.qk_norm_group == "head" or s.qk_scale_shape == "full",
           "strategy.qk_norm_group=full normalizes over all heads at once, so its scale cannot be head-shaped; "
           "set strategy.qk_scale_shape=full")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def to_toml(config: Config) -> str:
    """The resolved config; `load_config` of this text gives back an equal Config."""
    return tomli_w.dumps(to_dict(config))
