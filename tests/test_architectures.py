"""Issue "Fits the user's own stack": Mistral (with its window), Gemma 2, Gemma 3 and OLMo 2 through import,
export and apply_strategy, with logit parity on tiny random transformers models, and the model features
they need (sliding windows, per-layer RoPE, soft-capping, GeGLU, scaled embeddings, post-norm blocks)."""

import dataclasses

import pytest
import torch
from test_export import make_run
from test_model import randomize_scales

from scalevec import apply_strategy, build_model, param_groups, param_info, strategy, unapply
from scalevec.apply import ApplyError
from scalevec.checkpoint import load_run_model
from scalevec.cli import main
from scalevec.config import ConfigError, ModelConfig, load_config
from scalevec.export.hf import export_run
from scalevec.generate import generate
from scalevec.hf_import import HFImportError, import_hf

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-6)
TOKENS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))  # 20 positions > window 5


def hf_config(architecture: str):
    """A tiny random config of each family; `-other` variants try another shape and the features left off."""
    if architecture == "gemma2-other":  # no caps, a window as long as the context, SwiGLU, untied, MQA
        return transformers.Gemma2Config(**{**COMMON, "num_key_value_heads": 1, "head_dim": 16}, sliding_window=4096,
                                         attn_logit_softcapping=None, final_logit_softcapping=None,
                                         hidden_activation="silu", tie_word_embeddings=False)
    if architecture == "olmo2-other":  # tied, MQA, Llama 3.1 RoPE scaling
        return transformers.Olmo2Config(**{**COMMON, "num_key_value_heads": 1}, tie_word_embeddings=True,
                                        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 16})
    if architecture == "mistral":
        return transformers.MistralConfig(**COMMON, sliding_window=5)
    if architecture == "gemma2":  # small caps, so that soft-capping changes the numbers
        return transformers.Gemma2Config(**COMMON, sliding_window=5, query_pre_attn_scalar=12,
                                         attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    if architecture == "gemma3":  # local and global RoPE, linear scaling on the global layers
        return transformers.Gemma3TextConfig(
            **COMMON, sliding_window=5, query_pre_attn_scalar=12, final_logit_softcapping=4.0,
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    return transformers.Olmo2Config(**COMMON)


CLASSES = {"mistral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
           "olmo2": "Olmo2ForCausalLM"}
ARCHITECTURES = [*CLASSES, "gemma2-other", "olmo2-other"]


def family(architecture: str) -> str:
    return architecture.removesuffix("-other")


def hf_model(architecture: str):
    config = hf_config(architecture)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, CLASSES[family(architecture)])(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma stores γ - 1; every γ > 0, as ER needs
                p.copy_((0.0 if architecture.startswith("gemma") else 1.0) + 0.3 * torch.randn_like(p).clamp(-2, 2))
    return model


def logits(model):
    with torch.no_grad():
        out = model(TOKENS)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(scope="module", params=ARCHITECTURES)
def checkpoint(request, tmp_path_factory):
    model = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(path)
    return request.param, path, logits(model)


@pytest.mark.parametrize("name", ["standard", "hg+dp+er", "or"])
def test_import_is_exact_and_export_writes_the_same_tensors(checkpoint, tmp_path, name):
    from safetensors.torch import load_file

    variant, path, expected = checkpoint
    architecture = family(variant)
    assert import_hf(path, name, tmp_path / "run", warm_start=False, log=lambda *_: None) < 1e-4
    config, ours = load_run_model(tmp_path / "run")
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=1e-5)
    m, s = config.model, config.strategy
    assert m.embedding_scale == architecture.startswith("gemma") and m.pre_norm == (architecture != "olmo2")
    assert s.post_norms == (architecture != "mistral") and bool(s.dnp) == (architecture in ("gemma3", "olmo2"))
    assert (m.sliding_window, m.full_attention_every) == {"mistral": (5, 0), "gemma2": (5, 2), "gemma3": (5, 4),
                                                          "olmo2": (0, 0), "gemma2-other": (0, 0),
                                                          "olmo2-other": (0, 0)}[variant]
    written = export_run(tmp_path / "run", tmp_path / "out", log=lambda *_: None)
    assert written == architecture
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert type(reloaded).__name__ == CLASSES[architecture]
    torch.testing.assert_close(logits(reloaded.eval()), expected, atol=1e-5, rtol=1e-5)
    source, exported = load_file(path / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert source.keys() == exported.keys()
    if name != "hg+dp+er":  # (HG and DP scales are folded into the matrices: the same function, other tensors)
        for key in source:
            torch.testing.assert_close(exported[key], source[key], atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("name", ["standard", "hg", "dp", "er", "hg+dp+or+iwd"])
def test_apply_strategy_keeps_logits_and_unapply_reloads(tmp_path, architecture, name):
    model = hf_model(architecture)
    expected = logits(model)
    apply_strategy(model, name)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    infos = param_info(model)
    assert sorted(infos) == sorted(n for n, _ in model.named_parameters())
    grouped = [n for g in param_groups(model, strategy(name).scale_decay) for n in g["names"]]
    assert sorted(grouped) == sorted(infos)
    post = [info for n, info in infos.items() if "post_" in n and "layernorm" in n]  # Mistral's is a pre-norm
    per_scale = 1 if strategy(name).scale == "plain" else 2  # γ, or direction and magnitude
    assert len(post) == (0 if architecture == "mistral" else 4 * 2 * per_scale)
    assert all(info.role.value == "output" and not info.feeds for info in post)  # Output-Norms: never feed a matrix
    unapply(model)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "plain")
    reloaded, info = type(model).from_pretrained(tmp_path / "plain", output_loading_info=True,
                                                 attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(reloaded.eval()), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["gemma2", "olmo2"])
def test_function_changing_strategies_keep_the_norms_the_model_has(tmp_path, architecture):
    model = hf_model(architecture)
    apply_strategy(model, "unified")
    s = model.scalevec_strategy
    assert s.post_norms and set(s.dnp) == {"q", "k", "gate", "up"}
    if architecture == "olmo2":  # its QK-norm spans all heads, so the kept one does too
        assert (s.qk_norm_group, s.qk_scale_shape) == ("full", "full")
    with pytest.raises(ApplyError, match="unapply: DNP on"):
        unapply(model)


@pytest.mark.parametrize("architecture", ["gemma2", "gemma3", "olmo2", "mistral"])
def test_a_run_trained_here_exports_as_the_architecture_of_its_model(small_data, tmp_path, architecture):
    features = {"gemma2": dict(embedding_scale=True, activation="gelu_tanh", sliding_window=6,
                               full_attention_every=2, attn_softcap=3.0, final_softcap=5.0, query_pre_attn_scalar=12),
                "gemma3": dict(embedding_scale=True, activation="gelu_tanh", sliding_window=6, full_attention_every=2,
                               rope_local_theta=500.0, rope_scaling="linear", rope_factor=2.0),
                "olmo2": dict(pre_norm=False), "mistral": dict(sliding_window=6)}[architecture]
    strat = {"gemma2": strategy("standard", post_norms=True), "gemma3": strategy("gemma"),
             "olmo2": strategy("qknorm", post_norms=True, qk_scale_shape="full", qk_norm_group="full"),
             "mistral": strategy("hg+dp")}[architecture]
    model = make_run(tmp_path / "run", small_data, strat, tie=architecture != "olmo2", model=features)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    assert export_run(tmp_path / "run", tmp_path / "out", log=lambda *_: None) == architecture
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)


def test_gemma3_never_soft_caps_attention_so_neither_way_carries_a_cap(small_data, tmp_path, capsys):
    """Gemma 3 keeps attn_logit_softcapping in its config, but its attention never applies it (transformers 5.24):
    a checkpoint that sets it imports without a cap, and a model here whose attention is capped leaves as remote
    code (a Gemma 3 checkpoint would compute other logits)."""
    from scalevec.hf_import import hf_model as read_model
    from scalevec.hf_import import read_hf_dir

    config = transformers.Gemma3TextConfig(**COMMON, sliding_window=5, attn_logit_softcapping=2.0,
                                           layer_types=["sliding_attention"] * 3 + ["full_attention"])
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    imported, _ = read_model(*read_hf_dir(tmp_path / "hf"))
    assert imported.config.attn_softcap == 0
    torch.testing.assert_close(logits(imported), logits(hf), atol=1e-4, rtol=1e-4)

    model = make_run(tmp_path / "run", small_data, strategy("gemma"),
                     model=dict(embedding_scale=True, attn_softcap=2.0))
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "g3"), "--family", "gemma3"]) == 2
    assert "model.attn_softcap has no Gemma3ForCausalLM form" in capsys.readouterr().err
    assert not (tmp_path / "g3").exists()
    assert export_run(tmp_path / "run", tmp_path / "out", log=lambda *_: None) == "remote"
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    tokens = TOKENS % 512
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)


def test_gemma3_sliding_layers_keep_their_rope_when_the_window_spans_the_context(tmp_path):
    """A window as long as the context masks nothing, but Gemma 3's sliding layers still rotate with their local
    base: the import keeps them apart (it used to drop the window and the local base with it), and the run exports
    back as the same Gemma 3."""
    config = transformers.Gemma3TextConfig(**COMMON, sliding_window=4096, layer_types=["sliding_attention",
                                                                                       "full_attention"] * 2,
                                           rope_parameters={"full_attention": {"rope_type": "default",
                                                                               "rope_theta": 1e6},
                                                            "sliding_attention": {"rope_type": "default",
                                                                                  "rope_theta": 100.0}})
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", "standard", tmp_path / "run", warm_start=False, log=lambda *_: None)
    _, model = load_run_model(tmp_path / "run")
    assert model.config.rope_local_theta == 100.0
    torch.testing.assert_close(logits(model), logits(hf), atol=1e-4, rtol=1e-4)
    assert export_run(tmp_path / "run", tmp_path / "out", log=lambda *_: None) == "gemma3"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(back), logits(hf), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("features, reason", [
    (dict(embedding_scale=True), "model.embedding_scale has no LlamaForCausalLM form"),
    (dict(sliding_window=6, full_attention_every=2), "model.sliding_window has no LlamaForCausalLM form"),
    (dict(final_softcap=30.0), "model.final_softcap has no LlamaForCausalLM form"),
])
def test_export_refuses_features_the_architecture_lacks(small_data, tmp_path, features, reason, capsys):
    make_run(tmp_path / "run", small_data, strategy("standard"), model=features)
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "hf"), "--family", "llama"]) == 2
    err = capsys.readouterr().err
    assert reason in err and err.count("\n") == 1 and not (tmp_path / "hf").exists()


def test_a_layer_pattern_without_a_rule_is_refused_before_writing(tmp_path):
    config = transformers.Qwen2Config(**{**COMMON, "num_hidden_layers": 3}, use_sliding_window=True, sliding_window=5,
                                      max_window_layers=1)  # full, sliding, sliding: not every n-th layer full
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "m")
    with pytest.raises(HFImportError, match="sliding-window layers"):
        import_hf(tmp_path / "m", "standard", tmp_path / "run", warm_start=False, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


SHAPE = ModelConfig(preset="", vocab_size=256, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=48,
                    max_seq_len=64, sliding_window=5, full_attention_every=2, attn_softcap=2.0, final_softcap=3.0,
                    rope_local_theta=100.0, embedding_scale=True, activation="gelu_tanh")


@pytest.mark.parametrize("shape", [SHAPE, dataclasses.replace(SHAPE, attn_softcap=0.0, query_pre_attn_scalar=20)])
def test_cached_decoding_equals_the_full_forward_with_windows_and_caps(shape):
    model = build_model(shape, strategy("gemma"), seed=1)
    randomize_scales(model)
    prompt = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(0))
    cached = generate(model, prompt, 16, use_cache=True)
    assert torch.equal(cached, generate(model, prompt, 16, use_cache=False))
    cache = model.new_cache()
    with torch.no_grad():
        steps = [model(cached[:, :4], cache)[:, -1]] + [model(cached[:, t:t + 1], cache)[:, -1] for t in range(4, 19)]
        full = model(cached[:, :19])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 3:], atol=1e-5, rtol=1e-5)


def test_model_feature_values_are_checked():
    bad = [({"sliding_window": -1}, "model.sliding_window=-1 must be >= 0"),
           ({"full_attention_every": 2}, "set model.sliding_window too"),
           ({"attn_softcap": -1.0}, "model.attn_softcap=-1.0 must be >= 0"),
           ({"activation": "relu"}, "model.activation"),
           ({"rope_scaling": "linear", "rope_factor": 0.0}, "rope_factor > 0")]
    for fields, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_config({"model": fields})
    with pytest.raises(ConfigError, match="set strategy.post_norms=true"):
        load_config({"model": {"pre_norm": False}})
    with pytest.raises(ConfigError, match="set strategy.qk_scale_shape=full"):
        load_config({"strategy": {"preset": "qknorm", "qk_norm_group": "full"}})
