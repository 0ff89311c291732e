"""Fused CPU kernels for DNP: its norms, their scales and what follows them, in fewer passes over the data.

    FFN:     h = silu(γg ⊙ RMSNorm(gate)) ⊙ (γu ⊙ RMSNorm(up))    (gate, up: the halves of one fused matmul's rows)
    q and k: q = RoPE(γq ⊙ RMSNorm(q_head)) for each head, k alike  (v passes through)

Composed from torch ops, Inductor makes several passes over these activations, and the scales' gradients, sums
over every token, become separate column reductions that re-read them (the profile in benchmarks/README.md).
`dnp_swiglu` is one C pass forward and one backward. `qk_norm_rope` keeps its forward in torch ops, which Inductor
fuses well (no slower than standard's RoPE), and runs its backward as one C pass: per head, RoPE's transpose,
the scale's gradient, the norm's backward, written straight into the gradient of the q/k/v matmul's output
(v's copied beside them, as Inductor's concatenation would). In each backward pass every thread accumulates the
scales' gradients in its own buffer, summed in a fixed order afterwards (so a result depends on the thread count,
never on scheduling).

No maintained library fuses these on CPU (Liger-Kernel's and quack's kernels are Triton, for GPUs, and fuse the
norm before a matmul, not after it), so the kernels are ours: plain C with OpenMP, compiled once per machine
with the C compiler torch.compile uses on CPU, and registered as torch.library custom ops with their autograd
formulas, so compiled graphs keep them as nodes. Where no compiler is found, or the tensors are not fp32 on CPU,
the caller keeps the reference path (torch ops), which the tests compare against, forward and backward.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from .rope import apply_rope

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Cephes' single-precision exp (rel. error ~1e-7), written so that loops over it vectorize: libm's expf does not */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float k = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23;
    float two_k;
    memcpy(&two_k, &bits, sizeof two_k);
    return p * two_k;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

static float rsqrt_mean_square(const float *x, int64_t n, float eps) {
    float sum = 0.0f;
    #pragma omp simd reduction(+:sum)
    for (int64_t j = 0; j < n; j++) sum += x[j] * x[j];
    return 1.0f / sqrtf(sum / (float)n + eps);
}

/* y: rows of [gate | up], each `width` wide; gate_scale, up_scale: width each.
   Writes h (rows x width) and each row's two reciprocal RMS values (rstd: rows x 2). */
void dnp_swiglu_forward(const float *restrict y, const float *restrict gate_scale, const float *restrict up_scale,
                        float *restrict h, float *restrict rstd, int64_t rows, int64_t width, float eps, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < rows; t++) {
        const float *gate = y + t * 2 * width, *up = gate + width;
        float rg = rsqrt_mean_square(gate, width, eps), ru = rsqrt_mean_square(up, width, eps);
        rstd[2 * t] = rg;
        rstd[2 * t + 1] = ru;
        float *out = h + t * width;
        #pragma omp simd
        for (int64_t j = 0; j < width; j++) {
            float g = gate[j] * rg * gate_scale[j], u = up[j] * ru * up_scale[j];
            out[j] = g * sigmoid(g) * u;
        }
    }
}

/* The backward passes give each thread a contiguous share of the rows. A thread sums the two scales' gradients
   (n entries each, side by side) in float over blocks of BLOCK_ROWS rows, then in double into its own block of
   `partial` (threads x 2n); the blocks are added in thread order, so a result depends on the thread count, never
   on scheduling. */
#define BLOCK_ROWS 64

/* This thread's rows [begin, end); returns its block of `partial`. */
static double *thread_share(double *partial, int64_t n, int64_t rows, int64_t *begin, int64_t *end) {
    int id = 0, count = 1;
    #ifdef _OPENMP
    id = omp_get_thread_num();
    count = omp_get_num_threads();
    #endif
    *begin = rows * id / count;
    *end = rows * (id + 1) / count;
    return partial + (int64_t)id * 2 * n;
}

/* total += acc, then acc = 0: one block's float sums into the thread's double ones. */
static void add_block(double *restrict total, float *restrict acc, int64_t length) {
    for (int64_t j = 0; j < length; j++) {
        total[j] += acc[j];
        acc[j] = 0.0f;
    }
}

static void sum_partials(const double *restrict partial, int threads, int64_t n, float *restrict first,
                         float *restrict second) {
    for (int64_t j = 0; j < n; j++) {
        double sum_first = 0.0, sum_second = 0.0;
        for (int i = 0; i < threads; i++) {
            sum_first += partial[(int64_t)i * 2 * n + j];
            sum_second += partial[(int64_t)i * 2 * n + n + j];
        }
        first[j] = (float)sum_first;
        second[j] = (float)sum_second;
    }
}

/* dh: rows x width. Writes dy (rows x 2 width) and the scales' gradients (width each). */
void dnp_swiglu_backward(const float *restrict y, const float *restrict gate_scale, const float *restrict up_scale,
                         const float *restrict rstd, const float *restrict dh, float *restrict dy,
                         float *restrict d_gate_scale, float *restrict d_up_scale, double *restrict partial,
                         int64_t rows, int64_t width, int threads) {
    memset(partial, 0, sizeof(double) * (size_t)threads * 2 * (size_t)width);
    #pragma omp parallel num_threads(threads)
    {
        int64_t begin, end;
        double *total = thread_share(partial, width, rows, &begin, &end);
        float *acc_gate = calloc(2 * (size_t)width, sizeof(float)), *acc_up = acc_gate + width;
        for (int64_t block = begin; block < end; block += BLOCK_ROWS) {
            int64_t stop = block + BLOCK_ROWS < end ? block + BLOCK_ROWS : end;
            for (int64_t t = block; t < stop; t++) {
                const float *gate = y + t * 2 * width, *up = gate + width, *grad = dh + t * width;
                float rg = rstd[2 * t], ru = rstd[2 * t + 1];
                float *d_gate = dy + t * 2 * width, *d_up = d_gate + width;
                float dot_gate = 0.0f, dot_up = 0.0f;
                #pragma omp simd reduction(+:dot_gate, dot_up)
                for (int64_t j = 0; j < width; j++) {
                    float sg = gate_scale[j], su = up_scale[j];
                    float ng = gate[j] * rg, nu = up[j] * ru;
                    float g = ng * sg, u = nu * su, s = sigmoid(g);
                    float du = grad[j] * g * s;                            /* dh/du = silu(g) */
                    float dg = grad[j] * u * s * (1.0f + g * (1.0f - s));  /* silu'(g) */
                    acc_gate[j] += dg * ng;
                    acc_up[j] += du * nu;
                    float dng = dg * sg, dnu = du * su;
                    dot_gate += dng * ng;
                    dot_up += dnu * nu;
                    d_gate[j] = dng;
                    d_up[j] = dnu;
                }
                float mg = dot_gate / (float)width, mu = dot_up / (float)width;
                #pragma omp simd
                for (int64_t j = 0; j < width; j++) {
                    d_gate[j] = rg * (d_gate[j] - gate[j] * rg * mg);
                    d_up[j] = ru * (d_up[j] - up[j] * ru * mu);
                }
            }
            add_block(total, acc_gate, 2 * width);
        }
        free(acc_gate);
    }
    sum_partials(partial, threads, width, d_gate_scale, d_up_scale);
}

/* One head's backward through RoPE (rotate-half layout), the scale and RMSNorm. x: the head's values before the
   norm; grad: the gradient of its rotated output; cos, sin: its position's tables. Writes dx; adds the scale's
   gradient to acc. */
static inline void norm_rope_head_backward(const float *restrict x, const float *restrict grad,
                                           const float *restrict gamma, const float *restrict cos,
                                           const float *restrict sin, float *restrict dx, float *restrict acc,
                                           int64_t hd, float eps) {
    int64_t half = hd / 2;
    float r = rsqrt_mean_square(x, hd, eps);
    float dot = 0.0f;
    #pragma omp simd reduction(+:dot)
    for (int64_t j = 0; j < half; j++) {
        /* out = z cos + rotate_half(z) sin, rotate_half(z) = [-z_hi, z_lo]: the transpose maps grad back to z */
        float g_lo = grad[j] * cos[j] + grad[j + half] * sin[j + half];
        float g_hi = grad[j + half] * cos[j + half] - grad[j] * sin[j];
        float n_lo = x[j] * r, n_hi = x[j + half] * r;
        acc[j] += g_lo * n_lo;
        acc[j + half] += g_hi * n_hi;
        float d_lo = g_lo * gamma[j], d_hi = g_hi * gamma[j + half];
        dot += d_lo * n_lo + d_hi * n_hi;
        dx[j] = d_lo;
        dx[j + half] = d_hi;
    }
    float mean = dot / (float)hd;
    #pragma omp simd
    for (int64_t j = 0; j < hd; j++) dx[j] = r * (dx[j] - x[j] * r * mean);
}

/* y: batch x seq rows of [q heads | k heads | v heads], hd each, y_width wide. grad_q, grad_k, grad_v: (batch,
   heads, seq, hd) with the strides stride_q... of their first three dimensions and unit stride along hd.
   cos, sin: seq x hd. Writes dy (rows x y_width) and the two scales' gradients (hd each). */
void qk_norm_rope_backward(const float *restrict y, const float *restrict gamma_q, const float *restrict gamma_k,
                           const float *restrict cos, const float *restrict sin,
                           const float *restrict grad_q, const int64_t *stride_q,
                           const float *restrict grad_k, const int64_t *stride_k,
                           const float *restrict grad_v, const int64_t *stride_v,
                           float *restrict dy, float *restrict d_gamma_q, float *restrict d_gamma_k,
                           double *restrict partial, int64_t batch, int64_t seq, int64_t q_heads, int64_t kv_heads,
                           int64_t hd, int64_t y_width, float eps, int threads) {
    int64_t rows = batch * seq;
    memset(partial, 0, sizeof(double) * (size_t)threads * 2 * (size_t)hd);
    #pragma omp parallel num_threads(threads)
    {
        int64_t begin, end;
        double *total = thread_share(partial, hd, rows, &begin, &end);
        float *acc_q = calloc(2 * (size_t)hd, sizeof(float)), *acc_k = acc_q + hd;
        for (int64_t block = begin; block < end; block += BLOCK_ROWS) {
            int64_t stop = block + BLOCK_ROWS < end ? block + BLOCK_ROWS : end;
            for (int64_t row = block; row < stop; row++) {
                int64_t b = row / seq, t = row % seq;
                const float *x = y + row * y_width, *c = cos + t * hd, *s = sin + t * hd;
                float *d = dy + row * y_width;
                for (int64_t h = 0; h < q_heads; h++)
                    norm_rope_head_backward(x + h * hd, grad_q + b * stride_q[0] + h * stride_q[1] + t * stride_q[2],
                                            gamma_q, c, s, d + h * hd, acc_q, hd, eps);
                x += q_heads * hd;
                d += q_heads * hd;
                for (int64_t h = 0; h < kv_heads; h++)
                    norm_rope_head_backward(x + h * hd, grad_k + b * stride_k[0] + h * stride_k[1] + t * stride_k[2],
                                            gamma_k, c, s, d + h * hd, acc_k, hd, eps);
                d += kv_heads * hd;
                for (int64_t h = 0; h < kv_heads; h++)
                    memcpy(d + h * hd, grad_v + b * stride_v[0] + h * stride_v[1] + t * stride_v[2],
                           sizeof(float) * (size_t)hd);
            }
            add_block(total, acc_q, 2 * hd);
        }
        free(acc_q);
    }
    sum_partials(partial, threads, hd, d_gamma_q, d_gamma_k);
}
"""
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    """$SCALEVEC_CACHE/kernels, else the user's cache directory ($XDG_CACHE_HOME or ~/.cache)/scalevec/kernels."""
    if os.environ.get("SCALEVEC_CACHE"):
        return Path(os.environ["SCALEVEC_CACHE"]) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scalevec" / "kernels"


def _machine() -> str:
    """What -march=native compiles for: the CPU's model and feature flags (a shared cache on mixed nodes)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built once per source, flags and CPU), or None with one warning saying why not."""
    compiler = _compiler()
    if compiler is None:
        return _unavailable("no C compiler (cc, gcc or clang) on PATH")
    key = hashlib.sha256("\n".join([SOURCE, compiler, *FLAGS, _machine()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"kernels_{key}.so"
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                source = Path(tmp) / "kernels.c"
                source.write_text(SOURCE)
                built = Path(tmp) / path.name
                subprocess.run([compiler, *FLAGS, str(source), "-o", str(built), "-lm"], check=True,
                               capture_output=True, text=True)
                os.replace(built, path)  # whole or absent: several processes may build at once
        except (OSError, subprocess.CalledProcessError) as err:
            lines = (getattr(err, "stderr", "") or str(err)).strip().splitlines() or ["no output"]
            detail = next((line for line in lines if "error" in line), lines[-1])
            return _unavailable(f"{compiler} could not build them ({detail.strip()[:200]})")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:  # e.g. a library another machine of a shared cache built for itself
        return _unavailable(f"cannot load {path} ({err}); delete it to rebuild")
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.dnp_swiglu_forward.argtypes = [pointer] * 5 + [size, size, ctypes.c_float, ctypes.c_int]
    lib.dnp_swiglu_backward.argtypes = [pointer] * 9 + [size, size, ctypes.c_int]
    lib.qk_norm_rope_backward.argtypes = [pointer] * 15 + [size] * 6 + [ctypes.c_float, ctypes.c_int]
    return lib


def _unavailable(reason: str) -> None:
    warnings.warn(f"fused kernels unavailable: {reason}; the reference path (torch ops) runs instead", stacklevel=3)
    return None


def computes(y: torch.Tensor) -> bool:
    """Whether the fused kernels compute on `y` (fp32 on CPU); `library()` must have been built before."""
    return y.device.type == "cpu" and y.dtype == torch.float32


def _ones_where_missing(y: torch.Tensor, size: int, *scales: torch.Tensor | None) -> list[torch.Tensor]:
    """The scales, a None one (no scale vector) as 1s of `size`: one tensor each, since dynamo cannot trace an
    autograd.Function given the same tensor twice."""
    return [y.new_ones(size) if scale is None else scale for scale in scales]


@torch.library.custom_op("scalevec::dnp_swiglu", mutates_args=())
def _forward(y: torch.Tensor, gate_scale: torch.Tensor, up_scale: torch.Tensor, eps: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    y, gate_scale, up_scale = y.contiguous(), gate_scale.contiguous(), up_scale.contiguous()
    width = y.shape[-1] // 2
    rows = y.numel() // (2 * width)
    h = y.new_empty((*y.shape[:-1], width))
    rstd = y.new_empty((*y.shape[:-1], 2))
    library().dnp_swiglu_forward(y.data_ptr(), gate_scale.data_ptr(), up_scale.data_ptr(), h.data_ptr(),
                                 rstd.data_ptr(), rows, width, eps, torch.get_num_threads())
    return h, rstd


@_forward.register_fake
def _(y, gate_scale, up_scale, eps):
    return y.new_empty((*y.shape[:-1], y.shape[-1] // 2)), y.new_empty((*y.shape[:-1], 2))


@torch.library.custom_op("scalevec::dnp_swiglu_backward", mutates_args=())
def _backward(grad: torch.Tensor, y: torch.Tensor, gate_scale: torch.Tensor, up_scale: torch.Tensor,
              rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad, y, gate_scale, up_scale, rstd = (t.contiguous() for t in (grad, y, gate_scale, up_scale, rstd))
    width = y.shape[-1] // 2
    rows = y.numel() // (2 * width)
    threads = torch.get_num_threads()
    dy = torch.empty_like(y)
    d_gate, d_up = torch.empty_like(gate_scale), torch.empty_like(up_scale)
    partial = y.new_empty(threads * 2 * width, dtype=torch.float64)
    library().dnp_swiglu_backward(y.data_ptr(), gate_scale.data_ptr(), up_scale.data_ptr(), rstd.data_ptr(),
                                  grad.data_ptr(), dy.data_ptr(), d_gate.data_ptr(), d_up.data_ptr(),
                                  partial.data_ptr(), rows, width, threads)
    return dy, d_gate, d_up


@_backward.register_fake
def _(grad, y, gate_scale, up_scale, rstd):
    return torch.empty_like(y), torch.empty_like(gate_scale), torch.empty_like(up_scale)


def _setup_context(ctx, inputs, output):
    y, gate_scale, up_scale, _ = inputs
    ctx.save_for_backward(y, gate_scale, up_scale, output[1])


def _autograd(ctx, grad_h, _grad_rstd):
    y, gate_scale, up_scale, rstd = ctx.saved_tensors
    dy, d_gate, d_up = _backward(grad_h, y, gate_scale, up_scale, rstd)
    return dy, d_gate, d_up, None


_forward.register_autograd(_autograd, setup_context=_setup_context)


def dnp_swiglu(y: torch.Tensor, gate_scale: torch.Tensor | None, up_scale: torch.Tensor | None, eps: float
               ) -> torch.Tensor:
    """silu(γg ⊙ RMSNorm(gate)) ⊙ (γu ⊙ RMSNorm(up)) for y = [gate | up] along the last dimension, fused
    (`computes(y)` and a built `library()`). A None scale is 1 (no scale vector)."""
    return _forward(y, *_ones_where_missing(y, y.shape[-1] // 2, gate_scale, up_scale), eps)[0]


@torch.library.custom_op("scalevec::qk_norm_rope_backward", mutates_args=())
def _qk_backward(grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, y: torch.Tensor,
                 q_scale: torch.Tensor, k_scale: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = [grad if grad.stride(-1) == 1 else grad.contiguous() for grad in (grad_q, grad_k, grad_v)]
    y, q_scale, k_scale, cos, sin = (t.contiguous() for t in (y, q_scale, k_scale, cos, sin))
    batch, q_heads, seq, head_dim = grads[0].shape
    threads = torch.get_num_threads()
    dy = torch.empty_like(y)
    d_q_scale, d_k_scale = torch.empty_like(q_scale), torch.empty_like(k_scale)
    partial = y.new_empty(threads * 2 * head_dim, dtype=torch.float64)
    strides = [(ctypes.c_int64 * 3)(*grad.stride()[:3]) for grad in grads]
    library().qk_norm_rope_backward(
        y.data_ptr(), q_scale.data_ptr(), k_scale.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        grads[0].data_ptr(), strides[0], grads[1].data_ptr(), strides[1], grads[2].data_ptr(), strides[2],
        dy.data_ptr(), d_q_scale.data_ptr(), d_k_scale.data_ptr(), partial.data_ptr(),
        batch, seq, q_heads, grads[1].shape[1], head_dim, y.shape[-1], eps, threads)
    return dy, d_q_scale, d_k_scale


@_qk_backward.register_fake
def _(grad_q, grad_k, grad_v, y, q_scale, k_scale, cos, sin, eps):
    return torch.empty_like(y), torch.empty_like(q_scale), torch.empty_like(k_scale)


class _QKNormRope(torch.autograd.Function):
    """Forward: the model's torch ops (Inductor fuses them); backward: `_qk_backward`, from the saved matmul output."""

    @staticmethod
    def forward(ctx, y, q_scale, k_scale, cos, sin, heads: int, kv_heads: int, eps: float):
        ctx.save_for_backward(y, q_scale, k_scale, cos, sin)
        ctx.eps = eps
        head_dim = q_scale.shape[0]
        q, k, v = y.unflatten(-1, (heads + 2 * kv_heads, head_dim)).split([heads, kv_heads, kv_heads], dim=-2)
        q = F.rms_norm(q, (head_dim,), q_scale, eps).transpose(1, 2)
        k = F.rms_norm(k, (head_dim,), k_scale, eps).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.transpose(1, 2)  # v: a view of y, as unfused

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        y, q_scale, k_scale, cos, sin = ctx.saved_tensors
        dy, d_q_scale, d_k_scale = _qk_backward(grad_q, grad_k, grad_v, y, q_scale, k_scale, cos, sin, ctx.eps)
        return dy, d_q_scale, d_k_scale, None, None, None, None, None


def qk_norm_rope(y: torch.Tensor, q_scale: torch.Tensor | None, k_scale: torch.Tensor | None, cos: torch.Tensor,
                 sin: torch.Tensor, heads: int, kv_heads: int, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v (batch, heads, seq, head_dim) from the q/k/v matmul's output y (batch, seq, (heads + 2 kv_heads)
    head_dim): q = RoPE(γq ⊙ RMSNorm(q)) per head, k alike, v as it is; its backward fused (`computes(y)` and a
    built `library()`). A None scale is 1 (no scale vector)."""
    q_scale, k_scale = _ones_where_missing(y, y.shape[-1] // (heads + 2 * kv_heads), q_scale, k_scale)
    return _QKNormRope.apply(y, q_scale, k_scale, cos, sin, heads, kv_heads, eps)
