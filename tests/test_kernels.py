"""Issue 29: the fused kernels (DNP-SwiGLU; q's and k's norm, scale and RoPE) equal the torch ops they replace,
forward and backward, in and out of torch.compile, and fall back to them where they cannot run."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from scalevec import kernels
from scalevec.config import ModelConfig, MoEConfig
from scalevec.model import build_model
from scalevec.projection import normalize
from scalevec.rope import apply_rope, rope_tables
from scalevec.strategy import strategy

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="no C compiler builds the fused kernels")
EPS = 1e-6
TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40, max_seq_len=16)


def reference(y, gate_scale, up_scale, eps=EPS):
    """The torch ops the model runs without the kernel (Projection.branch_outputs, then SwiGLU)."""
    gate, up = y.chunk(2, dim=-1)
    return F.silu(normalize(gate, gate.shape[-1], "rms", eps, gate_scale)) * normalize(up, up.shape[-1], "rms", eps,
                                                                                       up_scale)


def outputs_and_grads(function, y, gate_scale, up_scale, grad, dtype):
    leaves = [None if t is None else t.to(dtype).detach().requires_grad_() for t in (y, gate_scale, up_scale)]
    h = function(*leaves, EPS)
    h.backward(grad.to(dtype))
    return [h.double()] + [leaf.grad.double() for leaf in leaves if leaf is not None]


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape", [(2048, 2 * 352), (3, 5, 2 * 7), (4, 33, 2 * 19), (1, 1, 2 * 3)])
@pytest.mark.parametrize("scales", ["both", "none", "gate"])
def test_fused_equals_the_reference_forward_and_backward(shape, scales):
    """Against the float64 reference: as close as the float32 torch ops are (within 1e-6 relative), for widths
    that fill no vector register evenly, a batch dimension, and absent scales (1)."""
    generator = torch.Generator().manual_seed(sum(shape))
    width = shape[-1] // 2
    y = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    gate_scale = torch.rand(width, generator=generator, dtype=torch.float64) + 0.5 if scales != "none" else None
    up_scale = torch.randn(width, generator=generator, dtype=torch.float64) if scales == "both" else None
    grad = torch.randn(*shape[:-1], width, generator=generator, dtype=torch.float64)
    exact = outputs_and_grads(reference, y, gate_scale, up_scale, grad, torch.float64)
    fused = outputs_and_grads(kernels.dnp_swiglu, y, gate_scale, up_scale, grad, torch.float32)
    assert len(fused) == len(exact)
    for name, got, want in zip(["h", "dy", "d gate scale", "d up scale"], fused, exact):
        assert got.shape == want.shape
        assert relative_error(got, want) < 1e-6, name


def test_the_kernel_is_deterministic_and_propagates_nan():
    y = torch.randn(64, 2 * 24, requires_grad=True)
    scales = [torch.rand(24, requires_grad=True) for _ in range(2)]
    grads = []
    for _ in range(2):
        h = kernels.dnp_swiglu(y, *scales, EPS)
        h.sum().backward()
        grads.append([y.grad.clone(), scales[0].grad.clone(), scales[1].grad.clone()])
        for t in (y, *scales):
            t.grad = None
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    broken = y.detach().clone()
    broken[3, 5] = float("nan")
    h = kernels.dnp_swiglu(broken, *scales, EPS)
    assert h[3].isnan().all() and not h[[0, 1, 2, 4]].isnan().any()


def test_thread_count_changes_only_the_rounding():
    y = torch.randn(257, 2 * 40, requires_grad=True)
    scale = torch.rand(40, requires_grad=True)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            kernels.dnp_swiglu(y, scale, None, EPS).pow(2).sum().backward()
            results.append((y.grad.clone(), scale.grad.clone()))
            y.grad = scale.grad = None
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert relative_error(two.double(), one.double()) < 1e-6


def qk_reference(y, q_scale, k_scale, cos, sin, heads, kv_heads, eps=EPS):
    """The torch ops the model runs without the kernel (Projection.branch_outputs, then RoPE in Attention)."""
    batch, seq, width = y.shape
    head_dim = width // (heads + 2 * kv_heads)
    q, k, v = y.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = (normalize(t, head_dim, "rms", eps, scale) for t, scale in ((q, q_scale), (k, k_scale)))
    q, k, v = (t.view(batch, seq, -1, head_dim).transpose(1, 2) for t in (q, k, v))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def qk_case(batch, seq, heads, kv_heads, head_dim, scales="both", seed=0):
    """y, both scales (None where `scales` leaves one out), RoPE's tables and a gradient for each output, float64."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, seq, (heads + 2 * kv_heads) * head_dim, generator=generator, dtype=torch.float64) * 3
    q_scale = torch.rand(head_dim, generator=generator, dtype=torch.float64) + 0.5 if scales != "none" else None
    k_scale = torch.randn(head_dim, generator=generator, dtype=torch.float64) if scales == "both" else None
    config = ModelConfig(d_model=heads * head_dim, n_heads=heads, n_kv_heads=kv_heads, max_seq_len=seq + 3)
    cos, sin = (table[3:].double() for table in rope_tables(config))  # positions 3.. as in a cached decode
    grads = [torch.randn(batch, h, seq, head_dim, generator=generator, dtype=torch.float64)
             for h in (heads, kv_heads, kv_heads)]
    return y, q_scale, k_scale, cos, sin, grads


def qk_outputs_and_grads(function, y, q_scale, k_scale, cos, sin, grads, heads, kv_heads, dtype):
    leaves = [None if t is None else t.to(dtype).detach().requires_grad_() for t in (y, q_scale, k_scale)]
    outputs = function(*leaves, cos.to(dtype), sin.to(dtype), heads, kv_heads, EPS)
    torch.autograd.backward(outputs, [grad.to(dtype) for grad in grads])
    return [t.double() for t in outputs] + [leaf.grad.double() for leaf in leaves if leaf is not None]


@pytest.mark.parametrize("shape", [(8, 256, 8, 4, 32), (3, 5, 2, 2, 6), (2, 33, 6, 2, 18), (1, 1, 1, 1, 2)])
@pytest.mark.parametrize("scales", ["both", "none", "q"])
def test_fused_qk_equals_the_reference_forward_and_backward(shape, scales):
    """Against the float64 reference, within 1e-6 relative: GQA and not, head sizes that fill no vector register,
    one token, absent scales (1); v passes through, its gradient too."""
    *_, heads, kv_heads, _ = shape
    y, q_scale, k_scale, cos, sin, grads = qk_case(*shape, scales=scales, seed=sum(shape))
    exact = qk_outputs_and_grads(qk_reference, y, q_scale, k_scale, cos, sin, grads, heads, kv_heads, torch.float64)
    fused = qk_outputs_and_grads(kernels.qk_norm_rope, y, q_scale, k_scale, cos, sin, grads, heads, kv_heads,
                                 torch.float32)
    assert len(fused) == len(exact) == 4 + (scales != "none") + (scales == "both")
    for name, got, want in zip(["q", "k", "v", "dy", "d q scale", "d k scale"], fused, exact):
        assert got.shape == want.shape
        assert relative_error(got, want) < 1e-6, name


def test_the_qk_backward_reads_its_gradients_through_their_strides():
    """Attention's backward hands over gradients laid out (batch, seq, heads, head_dim), viewed transposed, with no
    unit stride along head_dim, or broadcast (stride 0, a gradient of `.expand`): each gives the result of the
    contiguous gradients, bit for bit."""
    y, q_scale, k_scale, cos, sin, grads = qk_case(2, 7, 4, 2, 8, seed=5)
    y, q_scale, k_scale, cos, sin = (t.float() for t in (y, q_scale, k_scale, cos, sin))
    grads = [grad.float() for grad in grads]
    want = kernels._qk_backward(*grads, y, q_scale, k_scale, cos, sin, EPS)
    seq_major = [grad.transpose(1, 2).contiguous().transpose(1, 2) for grad in grads]
    feature_major = [grad.transpose(-1, -2).contiguous().transpose(-1, -2) for grad in grads]
    for layout in (seq_major, feature_major):
        assert [g.is_contiguous() for g in layout] == [False] * 3
        got = kernels._qk_backward(*layout, y, q_scale, k_scale, cos, sin, EPS)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    broadcast = [grad[:1, :, :1].expand_as(grad) for grad in grads]
    want = kernels._qk_backward(*(grad.contiguous() for grad in broadcast), y, q_scale, k_scale, cos, sin, EPS)
    got = kernels._qk_backward(*broadcast, y, q_scale, k_scale, cos, sin, EPS)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_the_qk_kernel_is_deterministic_and_its_thread_count_changes_only_the_rounding():
    y, q_scale, k_scale, cos, sin, grads = qk_case(3, 57, 4, 2, 16, seed=7)
    y, q_scale, k_scale, cos, sin = (t.float() for t in (y, q_scale, k_scale, cos, sin))
    grads = [grad.float() for grad in grads]
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 2):
            torch.set_num_threads(count)
            results.append(kernels._qk_backward(*grads, y, q_scale, k_scale, cos, sin, EPS))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(results[1], results[2]))
    for one, two in zip(results[0], results[1]):
        assert relative_error(two.double(), one.double()) < 1e-6


def model_loss_and_grads(model, tokens, compiled=False):
    def loss_of(inputs):
        return F.cross_entropy(model(inputs[:, :-1]).flatten(0, 1), inputs[:, 1:].flatten())

    loss = (torch.compile(loss_of, fullgraph=True, dynamic=False) if compiled else loss_of)(tokens)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("preset, fused_per_layer, scale", [("unified", 2, "gate"), ("dnp-ffn", 1, "gate"),
                                                            ("qknorm", 1, "q"), ("dnp+none", 2, None)])
def test_a_model_with_fused_kernels_trains_as_with_torch_ops(preset, fused_per_layer, scale):
    """Same loss and every gradient (the scales' included) as the reference path, eager and compiled as one graph
    (fullgraph: the custom ops cause no graph break)."""
    torch.manual_seed(0)
    tokens = torch.randint(0, TINY.vocab_size, (3, TINY.max_seq_len + 1))
    reference_model = build_model(TINY, strategy(preset), seed=3)
    fused_model = build_model(TINY, strategy(preset), seed=3)
    assert reference_model.use_fused_kernels(False) == 0
    assert fused_model.use_fused_kernels() == fused_per_layer * TINY.n_layers
    want_loss, want = model_loss_and_grads(reference_model, tokens)
    for compiled in (False, True):
        loss, grads = model_loss_and_grads(fused_model, tokens, compiled)
        assert abs(loss.item() - want_loss.item()) < 1e-6
        assert grads.keys() == want.keys()
        names = " ".join(grads)
        assert f".out_scales.{scale}" in names if scale else ".out_scales." not in names  # dnp+none: no γa
        for name in want:
            assert torch.allclose(grads[name], want[name], rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("changes", [dict(qkv_bias=True, head_dim=12), dict(n_kv_heads=1), dict(n_kv_heads=4),
                                     dict(sliding_window=6, rope_local_theta=100.0, full_attention_every=2,
                                          attn_softcap=20.0, query_pre_attn_scalar=16)])
def test_fused_attention_trains_as_with_torch_ops_in_other_shapes(changes):
    """q/k/v biases, a head size set apart from d_model, MQA and MHA, Gemma 3's windows with their own RoPE base:
    the same loss and gradients as the torch ops (eager; the compiled graph is checked above)."""
    config = replace(TINY, **changes)
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, config.vocab_size, (2, config.max_seq_len + 1), generator=generator)
    results = []
    for fused in (False, True):
        model = build_model(config, strategy("qknorm+dp", dual_placement=["v"]), seed=5)
        assert model.use_fused_kernels(fused) == config.n_layers * fused
        results.append(model_loss_and_grads(model, tokens))
    (want_loss, want), (loss, grads) = results
    assert abs(loss.item() - want_loss.item()) < 1e-6 and grads.keys() == want.keys()
    for name in want:
        assert torch.allclose(grads[name], want[name], rtol=1e-4, atol=1e-7), name


def fused_kinds(model):
    from scalevec.model import Attention, FeedForward

    model.use_fused_kernels()
    return sorted(type(m).__name__ for m in model.modules() if isinstance(m, Attention | FeedForward) and m.fused)


def test_which_modules_fuse():
    """FFNs whose gate and up are both DNP with RMSNorm and SwiGLU (an MoE block's shared expert is one), and
    attentions whose q and k are DNP per head with RMSNorm and head-shaped scales, v not (DP on v folds into the
    matmul, so it fuses)."""
    layers = TINY.n_layers
    assert fused_kinds(build_model(TINY, strategy("standard"))) == []
    assert fused_kinds(build_model(TINY, strategy("qknorm"))) == ["Attention"] * layers
    assert fused_kinds(build_model(TINY, strategy("dnp-ffn"))) == ["FeedForward"] * layers
    geglu = replace(TINY, activation="gelu_tanh")
    assert fused_kinds(build_model(geglu, strategy("unified"))) == ["Attention"] * layers
    assert fused_kinds(build_model(replace(TINY, norm="layer"), strategy("unified"))) == []
    for unfusable_qk in (dict(qk_scale_shape="full"), dict(qk_scale_shape="full", qk_norm_group="full"),
                         dict(dnp=["q", "k", "v", "gate", "up"]), dict(dnp=["q", "gate", "up"])):
        assert fused_kinds(build_model(TINY, strategy("unified", **unfusable_qk))) == ["FeedForward"] * layers
    dual_v = strategy("unified", dual_placement=["v"])
    assert fused_kinds(build_model(TINY, dual_v)) == ["Attention"] * layers + ["FeedForward"] * layers
    moe = replace(TINY, moe_experts=4, moe_top_k=2, moe_d_expert=16, moe_shared_expert=True)
    moe_model = build_model(moe, strategy("unified"), moe=MoEConfig())
    assert fused_kinds(moe_model) == ["Attention"] * layers + ["FeedForward"] * layers


def test_a_fused_model_decodes_with_its_cache_as_the_reference():
    """Generation feeds the fused path one position at a time (RoPE's tables from the cache's length on)."""
    torch.manual_seed(1)
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    logits = []
    for fused in (False, True):
        model = build_model(TINY, strategy("unified"), seed=4)
        assert model.use_fused_kernels(fused) == 2 * TINY.n_layers * fused
        with torch.no_grad():
            cache = model.new_cache()
            steps = [model(tokens[:, :5], cache)[:, -1]]
            steps += [model(tokens[:, i:i + 1], cache)[:, -1] for i in range(5, 9)]
        logits.append(torch.stack(steps))
    assert torch.allclose(logits[1], logits[0], rtol=1e-5, atol=1e-6)


def test_without_a_compiler_the_torch_ops_run(monkeypatch, tmp_path):
    monkeypatch.setenv("SCALEVEC_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    kernels.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="fused kernels unavailable: no C compiler"):
            assert kernels.library() is None
        model = build_model(TINY, strategy("unified"))
        assert model.use_fused_kernels() == 0
        assert not any(getattr(m, "fused", False) for m in model.modules())
    finally:
        kernels.library.cache_clear()
    assert not any(tmp_path.iterdir())


def test_a_build_is_cached_per_machine_and_written_whole(monkeypatch, tmp_path):
    monkeypatch.setenv("SCALEVEC_CACHE", str(tmp_path))
    kernels.library.cache_clear()
    try:
        assert kernels.library() is not None
        built = sorted((tmp_path / "kernels").iterdir())
        assert [p.suffix for p in built] == [".so"]  # no temporary left behind
        kernels.library.cache_clear()
        stamp = built[0].stat().st_mtime_ns
        assert kernels.library() is not None and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    finally:
        kernels.library.cache_clear()


@pytest.mark.parametrize("on", [True, False])
def test_train_fused_kernels_reaches_every_module(small_data, tmp_path, on):
    from test_train import quiet, tiny_config

    from scalevec.model import Attention, FeedForward
    from scalevec.train.trainer import Trainer

    trainer = Trainer(tiny_config(small_data, f"train.fused_kernels={str(on).lower()}"), tmp_path / "run",
                      progress=False, log=quiet)
    assert [m.fused for m in trainer.model.modules() if isinstance(m, Attention | FeedForward)] == [on] * 4


def test_a_damaged_build_in_the_cache_falls_back_with_its_name(monkeypatch, tmp_path):
    """A cached library that cannot load (damaged, or built by another machine of a shared cache) is named in one
    warning, and the torch ops run."""
    monkeypatch.setenv("SCALEVEC_CACHE", str(tmp_path / "good"))
    kernels.library.cache_clear()
    try:
        assert kernels.library() is not None
        name = next((tmp_path / "good" / "kernels").iterdir()).name
        damaged = tmp_path / "shared" / "kernels" / name  # another path: dlopen would reuse a loaded one
        damaged.parent.mkdir(parents=True)
        damaged.write_bytes(b"not a shared library")
        monkeypatch.setenv("SCALEVEC_CACHE", str(tmp_path / "shared"))
        kernels.library.cache_clear()
        with pytest.warns(UserWarning, match=f"cannot load {damaged}.*delete it to rebuild"):
            assert kernels.library() is None
    finally:
        kernels.library.cache_clear()
