"""Hugging Face checkpoints in (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, OLMo 2: hf_keys.py),
converted to a scalevec strategy, as a run directory that `scalevec train --resume` continues. Exact
strategies keep the logits; ones that add norms need `--warm-start` and report the logit difference
they introduce.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import (
    Config,
    ConfigError,
    ModelConfig,
    MoEConfig,
    check_section,
    load_config,
    parse_override,
    to_dict,
    to_toml,
)
from .convert import convert_decoder
from .errors import BadInput
from .hf_keys import (
    GLOBAL_PARTS,
    HF_ACTIVATIONS,
    MODEL_TYPES,
    MOE_FAMILIES,
    NORM_OFFSET,
    global_keys,
    hf_shapes,
    layer_keys,
    layer_part,
    remote_layer_keys,
    remote_shapes,
    remote_strategy,
    source_strategy,
    write_part,
)
from .model import Decoder
from .outputs import check_output_path, first_line, remove_tree, write_text_atomic, writing
from .strategy import Strategy, keeping_source_norms
from .strategy import strategy as make_strategy
from .train.preflight import check_data


class HFImportError(BadInput):
    """A transformers checkpoint cannot be imported as asked (unreadable, unsupported, or not what its config.json
    describes); nothing was written."""


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as err:
        raise HFImportError(f"cannot read {path} as safetensors ({str(err).splitlines()[0]}); "
                            "give a safetensors file") from None


def read_hf_dir(hf_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise HFImportError(f"{hf_dir} has no config.json; give a Hugging Face model directory")
    try:
        hf = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFImportError(f"{config_path} is not valid JSON ({err}); give the checkpoint's own config.json") from None
    if not isinstance(hf, dict):
        raise HFImportError(f"{config_path} is not a JSON object; give the checkpoint's own config.json")
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # ValueError: not JSON, or not UTF-8
            raise HFImportError(f"{index} is not a safetensors index (a weight_map of tensor names to files: "
                                f"{type(err).__name__}); give the checkpoint's own index") from None
        if not all(isinstance(name, str) for name in files):
            raise HFImportError(f"{index}: its weight_map names a file that is not a string; give the checkpoint's "
                                "own index")
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise HFImportError(f"{hf_dir} has no model.safetensors (pickled .bin checkpoints are not read); convert it to "
                            "safetensors first")
    state = {}
    for name in files:
        state |= _read_safetensors(hf_dir / name)
    return hf, state


def _rope_fields(rope: dict, where: str) -> dict:
    """ModelConfig RoPE fields of one transformers rope_parameters dict."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3", "linear"):
        raise HFImportError(f"unsupported checkpoint: {where} RoPE type {kind!r} (default, llama3 and linear are "
                            "supported)")
    fields = {"rope_theta": float(rope.get("rope_theta", 10000.0))}
    if kind == "linear":
        fields |= dict(rope_scaling="linear", rope_factor=float(rope["factor"]))
    elif kind == "llama3":
        fields |= dict(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                       rope_low_freq_factor=float(rope["low_freq_factor"]),
                       rope_high_freq_factor=float(rope["high_freq_factor"]),
                       rope_original_max_seq_len=int(rope["original_max_position_embeddings"]))
    return fields


def _windowed_layers(hf: dict, architecture: str, own_rope: bool = False) -> list[bool]:
    """Which blocks attend through the sliding window, from layer_types or each architecture's older rule;
    `own_rope`: those blocks rotate with a RoPE of their own (Gemma 3), so they differ even where the window
    spans the whole context."""
    n, types = hf["num_hidden_layers"], hf.get("layer_types")
    if types is None:
        if architecture == "gemma2":
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
        elif architecture == "gemma3":
            every = hf.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
        elif hf.get("model_type") in ("mistral", "mixtral"):
            types = ["sliding_attention"] * n
        elif hf.get("use_sliding_window"):  # Qwen's rule: the blocks from max_window_layers on
            types = ["sliding_attention" if i >= hf.get("max_window_layers", 0) else "full_attention"
                     for i in range(n)]
        else:
            types = ["full_attention"] * n
    window = hf.get("sliding_window")
    if not window or window >= hf["max_position_embeddings"] and not own_rope:  # as long as the context: no window
        return [False] * n
    return [t == "sliding_attention" for t in types]


def _window_fields(windowed: list[bool], window: int | None) -> dict:
    """sliding_window and full_attention_every expressing `windowed`, or an HFImportError for another pattern."""
    if not any(windowed):
        return {}
    every = 0 if all(windowed) else windowed.index(False) + 1
    if windowed != [not (every and (i + 1) % every == 0) for i in range(len(windowed))]:
        raise HFImportError("unsupported checkpoint: its sliding-window layers follow no pattern scalevec has (every "
                            "block windowed, or every n-th block full: model.full_attention_every)")
    return {"sliding_window": int(window), "full_attention_every": every}


def model_config_from_hf(hf: dict) -> tuple[ModelConfig, str]:
    """The ModelConfig of a transformers config.json, and its layout (hf_keys.MODEL_TYPES)."""
    model_type = hf.get("model_type")
    if model_type == "gemma3":
        raise HFImportError("a multimodal Gemma 3 checkpoint (model_type gemma3); import a text-only one "
                            "(Gemma3ForCausalLM, model_type gemma3_text)")
    if model_type not in MODEL_TYPES and model_type not in MOE_FAMILIES:
        raise HFImportError(f"model_type {model_type!r} is not supported; import Llama, Mistral, Qwen2, Qwen3, "
                            "Gemma 2, Gemma 3 (text), OLMo 2, Qwen3-MoE, OLMoE, Mixtral or Qwen2-MoE checkpoints")
    architecture = MODEL_TYPES.get(model_type, model_type)
    gemma = architecture in ("gemma2", "gemma3")
    activation = hf.get("hidden_activation", "gelu_pytorch_tanh") if gemma else hf.get("hidden_act", "silu")
    checks = [(activation in HF_ACTIVATIONS, f"hidden activation {activation!r} (silu and gelu_pytorch_tanh are "
                                             "supported)"),
              (not hf.get("attention_bias", False), "attention_bias must be false"),
              (not hf.get("mlp_bias", False), "mlp_bias must be false"),
              (not hf.get("use_bidirectional_attention"), "bidirectional attention is not supported")]
    for ok, message in checks:
        if not ok:
            raise HFImportError(f"unsupported checkpoint: {message}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    local = None
    if architecture == "gemma3" and "full_attention" in rope:
        rope, local = rope["full_attention"], rope.get("sliding_attention")
    elif architecture == "gemma3":  # the older form: rope_theta, rope_scaling and rope_local_base_freq
        local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    rope = {"rope_theta": hf.get("rope_theta", 1_000_000.0 if architecture == "gemma3" else 10000.0), **rope}
    fields = _rope_fields(rope, "")
    local_fields = None if local is None else _rope_fields(local, "sliding-window layers' ")
    own_rope = local_fields is not None and local_fields != fields
    windowed = _windowed_layers(hf, architecture, own_rope)
    fields |= _window_fields(windowed, hf.get("sliding_window"))
    if own_rope and any(windowed):
        if set(local_fields) != {"rope_theta"}:
            raise HFImportError("unsupported checkpoint: RoPE scaling on sliding-window layers")
        fields["rope_local_theta"] = local_fields["rope_theta"]
    if gemma:
        scalar = hf.get("query_pre_attn_scalar", 256)
        fields |= dict(embedding_scale=True, query_pre_attn_scalar=0 if scalar == head_dim else int(scalar),
                       # Gemma 3's attention ignores its config's attn_logit_softcapping (transformers 5.24)
                       attn_softcap=float(hf.get("attn_logit_softcapping", 50.0) or 0.0) if architecture == "gemma2"
                       else 0.0,
                       final_softcap=float(hf.get("final_logit_softcapping",
                                                  30.0 if architecture == "gemma2" else None) or 0.0))
    return ModelConfig(preset="", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                       n_layers=hf["num_hidden_layers"],
                       n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads, d_ff=hf["intermediate_size"],
                       head_dim=0 if head_dim * heads == hf["hidden_size"] else head_dim,
                       max_seq_len=hf["max_position_embeddings"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                       tie_embeddings=hf.get("tie_word_embeddings", gemma),
                       qkv_bias=architecture == "qwen2" or architecture == "qwen2_moe" and hf.get("qkv_bias", True),
                       activation=HF_ACTIVATIONS[activation], pre_norm=architecture != "olmo2",
                       **fields, **_moe_fields(hf, architecture)), architecture


def _moe_fields(hf: dict, architecture: str) -> dict:
    """ModelConfig's MoE fields of an MoE family's config.json (hf_keys.MOE_FAMILIES); {} for a dense one."""
    if architecture not in MOE_FAMILIES:
        return {}
    n, qwen = hf["num_hidden_layers"], architecture in ("qwen3_moe", "qwen2_moe")
    experts = hf.get("num_local_experts") or hf["num_experts"]  # the name differs by family and version
    skipped, step = hf.get("mlp_only_layers") or [], hf.get("decoder_sparse_step", 1) if qwen else 1
    routed = [experts > 0 and i not in skipped and (i + 1) % step == 0 for i in range(n)]
    d_expert = hf["moe_intermediate_size"] if qwen else hf["intermediate_size"]
    if architecture == "qwen2_moe" and hf.get("shared_expert_intermediate_size") != hf["intermediate_size"]:
        raise HFImportError("unsupported checkpoint: a shared expert of another width than the dense FFN "
                            "(shared_expert_intermediate_size != intermediate_size): scalevec's has d_ff")
    if architecture == "olmoe" and hf.get("clip_qkv") is not None:
        raise HFImportError("unsupported checkpoint: clip_qkv (OLMoE's q/k/v clamping) is not supported")
    return dict(moe_experts=experts, moe_top_k=hf["num_experts_per_tok"], moe_every=_every(routed, "routed layers"),
                moe_d_expert=0 if d_expert == hf["intermediate_size"] else d_expert,
                moe_shared_expert=architecture == "qwen2_moe")


def moe_config_from_hf(hf: dict) -> MoEConfig:
    """The routing of an MoE family: softmax, then top-k, renormalized as the family says (Mixtral always)."""
    return MoEConfig(router="softmax", normalize_top_k=hf.get("model_type") == "mixtral" or
                     bool(hf.get("norm_topk_prob", False)))


def check_hf_state(state: dict, shapes: dict) -> None:
    for name, shape in shapes.items():
        if name not in state:
            raise HFImportError(f"checkpoint lacks tensor {name} (expected shape {shape})")
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            raise HFImportError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {shape}")
        if not tensor.is_floating_point():
            raise HFImportError(f"tensor {name} has dtype {tensor.dtype}; a model checkpoint holds floating-point "
                                "weights")
        if not torch.isfinite(tensor).all():
            raise HFImportError(f"tensor {name} holds NaN or infinite values; import a finite checkpoint")
    extra = sorted(set(state) - set(shapes))
    if extra:
        raise HFImportError(f"checkpoint has unexpected tensor {extra[0]}; is config.json the checkpoint's own?")


def _every(flags: list[bool], what: str) -> int:
    """n such that flags[i] is true exactly for every n-th layer (i + 1 divisible by n); 0 if none is."""
    if not any(flags):
        return 0
    every = flags.index(True) + 1
    if flags != [(i + 1) % every == 0 for i in range(len(flags))]:
        raise HFImportError(f"unsupported checkpoint: its {what} follow no pattern scalevec has (every n-th layer)")
    return every


def remote_model_config(hf: dict) -> tuple[ModelConfig, Strategy, MoEConfig]:
    """ModelConfig, strategy and MoE settings of a remote-code export's config.json (export/remote): exactly its
    function, every folded scale read back as γ = 1 (hf_keys.remote_strategy)."""
    n, heads, experts = hf["num_hidden_layers"], hf["num_attention_heads"], hf.get("num_experts", 0)
    moe_every = _every(hf["moe_layers"], "MoE layers") if experts else 1
    de = hf.get("moe_intermediate_size", 0)
    m = ModelConfig(preset="", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=n, n_heads=heads,
                    n_kv_heads=hf["num_key_value_heads"], d_ff=hf["intermediate_size"],
                    head_dim=0 if hf["head_dim"] * heads == hf["hidden_size"] else hf["head_dim"],
                    qkv_bias=hf["attention_bias"], max_seq_len=hf["max_position_embeddings"],
                    rope_theta=hf["rope_theta"], rope_scaling=hf["rope_scaling_type"], rope_factor=hf["rope_factor"],
                    rope_low_freq_factor=hf["rope_low_freq_factor"], rope_high_freq_factor=hf["rope_high_freq_factor"],
                    rope_original_max_seq_len=hf["rope_original_max_position_embeddings"],
                    rope_local_theta=hf["rope_local_theta"], query_pre_attn_scalar=hf["query_pre_attn_scalar"],
                    attn_softcap=hf["attn_logit_softcapping"], final_softcap=hf["final_logit_softcapping"],
                    embedding_scale=hf["embedding_scale"], activation=hf["hidden_act"], pre_norm=hf["pre_norm"],
                    norm=hf["norm_type"], norm_eps=hf["norm_eps"], tie_embeddings=hf["tie_word_embeddings"],
                    init_std=hf.get("initializer_range", 0.02), moe_experts=experts,
                    moe_top_k=hf.get("num_experts_per_tok", 2), moe_d_expert=0 if de == hf["intermediate_size"] else de,
                    moe_shared_expert=hf.get("shared_expert", False), moe_every=moe_every,
                    **_window_fields(hf["windowed_layers"], hf["attention_window"]))
    s = remote_strategy(make_strategy("standard", dnp=hf["dnp"], post_norms=hf["post_norms"],
                                      qk_scale_shape=hf["qk_scale_shape"], qk_norm_group=hf["qk_norm_group"],
                                      expert_scales=hf.get("expert_scales", "per_expert")))
    moe = MoEConfig(router=hf.get("router", "softmax"), normalize_top_k=hf.get("normalize_top_k", True),
                    balance="bias" if hf.get("expert_bias_routing") else "aux")
    return m, s, moe


def hf_model(hf: dict, state: dict) -> tuple[Decoder, str]:
    """The checkpoint exactly, as a Decoder under its architecture's own strategy, and that architecture
    ("remote" for scalevec's remote-code form)."""
    if hf.get("model_type") == "scalevec":
        try:
            m, source, moe = remote_model_config(hf)
        except (KeyError, TypeError, ValueError) as err:
            raise HFImportError(f"config.json of a remote-code export is not scalevec's ({type(err).__name__}: "
                                f"{err}); export it again with this version of scalevec") from None
        check_hf_state(state, remote_shapes(m, source))
        return _source_model(m, source, state, lambda i: remote_layer_keys(i, m, source), 0.0, moe), "remote"
    try:
        model_config, architecture = model_config_from_hf(hf)
        moe = moe_config_from_hf(hf) if architecture in MOE_FAMILIES else None
        check_section(model_config, "model")
    except ConfigError as err:
        raise HFImportError(f"config.json describes a model scalevec cannot build ({err}); give the checkpoint's "
                            "own config.json") from None
    except HFImportError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as err:  # a field missing or mistyped
        raise HFImportError(f"config.json is not a transformers config scalevec reads ({type(err).__name__}: "
                            f"{first_line(err)}); give the checkpoint's own config.json") from None
    check_hf_state(state, hf_shapes(model_config, architecture))
    keys = functools.partial(layer_keys, architecture=architecture, m=model_config)
    return _source_model(model_config, source_strategy(architecture), state, keys,
                         NORM_OFFSET.get(architecture, 0.0), moe), architecture


def convert_from_hf(hf: dict, state: dict, strategy_name: str | Strategy, warm_start: bool
                    ) -> tuple[Config, Decoder, float]:
    """Our model of a strategy from HF weights; returns (config, model, max |Δlogit| introduced). The checkpoint
    is read exactly into its architecture's own strategy, then converted (convert.py), keeping its norms."""
    reference, _ = hf_model(hf, state)
    model_config, source = reference.config, reference.strategy
    requested = make_strategy(strategy_name) if isinstance(strategy_name, str) else strategy_name
    target = keeping_source_norms(source, requested)
    if target != requested and set(target.dnp) != set(requested.dnp):
        target = replace(target, preset=f"{requested.preset}+qknorm")  # the name says QK-norm was kept
    model = convert_decoder(copy.deepcopy(reference), target)
    probe = torch.randint(0, model_config.vocab_size, (2, min(32, model_config.max_seq_len)),
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(probe)
        difference = (model(probe) - expected).abs().max().item()
    changes = []
    if set(target.dnp) != set(source.dnp):
        changes.append(f"DNP on {', '.join(sorted(set(target.dnp) - set(source.dnp)))} adds norms")
    if target.post_norms != source.post_norms:
        changes.append("post-branch norms add norms")
    if target.qk_norm_group != source.qk_norm_group and set(target.dnp) & {"q", "k", "v"}:
        changes.append("a QK-norm over all heads at once")
    if not changes and difference > 1e-4 * max(1.0, expected.abs().max().item()):
        changes.append(f"strategy {target.scale!r} drops norm weights no matrix can absorb "
                       "(a tied head's final norm, QK or post-branch norms)")
    if changes and not warm_start:
        raise HFImportError(f"strategy {requested.preset!r} changes the model's function ({'; '.join(changes)}); pass "
                            "--warm-start to convert anyway and see the logit difference, or choose an exact strategy "
                            "(standard, hg, dp, or, er and their compositions)")
    config = Config(model=model_config, strategy=target,
                    moe=reference.moe_layers()[0].moe if reference.moe_layers() else MoEConfig())
    config.train.seq_len = min(config.train.seq_len, model_config.max_seq_len)
    return config, model, difference


@torch.no_grad()
def _source_model(m: ModelConfig, source: Strategy, state: dict, keys, offset: float, moe: MoEConfig | None = None
                  ) -> Decoder:
    """The checkpoint exactly, under its architecture's own strategy: every part written where export reads it
    (hf_keys; `keys(i)`: block i's parts -> tensor names), every norm weight a plain scale (γ = weight + offset)."""
    model = Decoder(m, source, moe)  # scales start at γ = 1; every matrix is written below
    for key, name in global_keys(m).items():
        write_part(model, GLOBAL_PARTS[key], state[name], offset)
    for i, block in enumerate(model.blocks):
        for key, name in keys(i).items():
            try:
                write_part(block, layer_part(key), state[name], offset)
            except ValueError as err:  # a tensor scalevec's model has no place for
                raise HFImportError(f"{name}: {err}") from None
    return model


def import_hf(hf_dir: Path, strategy_name: str, out: Path, warm_start: bool, log=print,
              overrides: list[str] = (), tokenizer: Path | None = None) -> float:
    """Convert a transformers checkpoint into a new run directory `out` that `scalevec train --resume --out`
    continues: init weights, the checkpoint's tokenizer (`tokenizer`, else the folder's tokenizer.json) and a
    config with the run's `overrides` (data, train, optim...); every path in it absolute, so the run resumes
    from any directory. Everything is checked before `out` is written."""
    check_output_path(out, "--out")
    if out.exists() and any(out.iterdir()):
        raise HFImportError(f"output directory {out} exists; choose a new --out")
    hf, state = read_hf_dir(hf_dir)
    config, model, difference = convert_from_hf(hf, state, strategy_name, warm_start)
    tokenizer = tokenizer if tokenizer is not None else hf_dir / "tokenizer.json"
    if tokenizer is not None and not tokenizer.is_file():
        if tokenizer != hf_dir / "tokenizer.json":
            raise HFImportError(f"--tokenizer {tokenizer} not found; give the tokenizer.json the checkpoint was "
                                "trained with")
        tokenizer = None
    out = out.resolve()
    base = to_dict(config)
    base["train"]["init_from"] = str(out / "init" / "model.safetensors")
    base["data"] |= {"tokenizer": str(out / "tokenizer.json") if tokenizer else "", "dir": str(out / "data")}
    keys = {".".join(parse_override(text)[0]) for text in overrides}
    clash = sorted(keys & {"train.init_from", "train.branch_from"})
    if clash:  # the run starts from the imported weights, which the import writes into it
        raise HFImportError(f"--set {clash[0]}: the import starts the run from the checkpoint's weights; leave it out")
    try:
        config = load_config(base, overrides)
        # a run that could never prepare its data (the import's own tokenizer.json is written below)
        check_data(replace(config.data, tokenizer=config.data.tokenizer if "data.tokenizer" in keys else ""))
    except BadInput as err:
        raise HFImportError(f"--set: {err}") from None
    if Path(config.data.dir) != out / "data":
        config.data.dir = str(Path(config.data.dir).resolve())
    config.data.inputs = [str(Path(p).resolve()) for p in config.data.inputs]
    def shapes(state: dict) -> tuple:
        return tuple((k, tuple(v.shape)) for k, v in state.items())

    if shapes(Decoder(config.model, config.strategy, config.moe).state_dict()) != shapes(model.state_dict()):
        raise HFImportError("--set changes the shape of the imported weights (model or strategy); set only "
                            "data, train, optim, schedule and seed, or import with another --strategy")
    if tokenizer is not None:
        vocab = load_tokenizer_vocab(tokenizer)
        if vocab > config.model.vocab_size:
            raise HFImportError(f"tokenizer {tokenizer} has {vocab} tokens, more than the checkpoint's vocab_size "
                                f"{config.model.vocab_size}; give the checkpoint's own tokenizer")
    created = not out.exists()
    try:
        with writing(f"the import {out}", "import again", kept="nothing was kept"):
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
        raise HFImportError(f"cannot load tokenizer {path}: {str(err).splitlines()[0]}") from None
