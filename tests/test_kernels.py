"""Issue 29: the fused DNP-SwiGLU kernel equals the torch ops it replaces, forward and backward, in and out of
torch.compile, and falls back to them where it cannot run."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from scalevec import kernels
from scalevec.config import ModelConfig, MoEConfig
from scalevec.model import build_model
from scalevec.projection import normalize
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


def model_loss_and_grads(model, tokens, compiled=False):
    def loss_of(inputs):
        return F.cross_entropy(model(inputs[:, :-1]).flatten(0, 1), inputs[:, 1:].flatten())

    loss = (torch.compile(loss_of, fullgraph=True, dynamic=False) if compiled else loss_of)(tokens)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("preset", ["unified", "dnp-ffn"])
def test_a_model_with_fused_ffns_trains_as_with_torch_ops(preset):
    """Same loss and every gradient (the scales' included) as the reference path, eager and compiled as one graph
    (fullgraph: the custom op causes no graph break)."""
    torch.manual_seed(0)
    tokens = torch.randint(0, TINY.vocab_size, (3, TINY.max_seq_len + 1))
    reference_model = build_model(TINY, strategy(preset), seed=3)
    fused_model = build_model(TINY, strategy(preset), seed=3)
    assert reference_model.use_fused_kernels(False) == 0
    assert fused_model.use_fused_kernels() == TINY.n_layers
    want_loss, want = model_loss_and_grads(reference_model, tokens)
    for compiled in (False, True):
        loss, grads = model_loss_and_grads(fused_model, tokens, compiled)
        assert abs(loss.item() - want_loss.item()) < 1e-6
        assert grads.keys() == want.keys()
        assert any(".out_scales.gate" in name or ".out_scales.up" in name for name in grads)
        for name in want:
            assert torch.allclose(grads[name], want[name], rtol=1e-4, atol=1e-7), name


def test_which_ffns_fuse():
    """Only FFNs whose gate and up are both DNP with RMSNorm and SwiGLU; an MoE block's shared expert is one."""
    assert build_model(TINY, strategy("standard")).use_fused_kernels() == 0
    assert build_model(TINY, strategy("qknorm")).use_fused_kernels() == 0
    assert build_model(replace(TINY, activation="gelu_tanh"), strategy("unified")).use_fused_kernels() == 0
    assert build_model(replace(TINY, norm="layer"), strategy("unified")).use_fused_kernels() == 0
    moe = replace(TINY, moe_experts=4, moe_top_k=2, moe_d_expert=16, moe_shared_expert=True)
    assert build_model(moe, strategy("unified"), moe=MoEConfig()).use_fused_kernels() == TINY.n_layers


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
def test_train_fused_kernels_reaches_every_ffn(small_data, tmp_path, on):
    from test_train import quiet, tiny_config

    from scalevec.model import FeedForward
    from scalevec.train.trainer import Trainer

    trainer = Trainer(tiny_config(small_data, f"train.fused_kernels={str(on).lower()}"), tmp_path / "run",
                      progress=False, log=quiet)
    assert [m.fused for m in trainer.model.modules() if isinstance(m, FeedForward)] == [on, on]


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
