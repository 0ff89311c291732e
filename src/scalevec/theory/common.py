"""Figures, summaries and the toy data the experiments share."""

from __future__ import annotations

import functools
import json
import lzma
from pathlib import Path

import torch

from ..data.sources import CORPUS_DIR
from ..outputs import write_atomic, write_text_atomic


def single_threaded(fn):
    """Run fn on one thread: these toys are too small to gain from threads, and on a busy machine extra threads
    spin-wait (measured: 10x slower with 2 threads on 2 shared cores)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


def figure(ncols: int = 1, width: float = 5.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 3.6), squeeze=False)
    return fig, list(axes[0])


def finish(fig, out: Path, name: str, summary: dict) -> dict:
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    write_atomic(out / f"{name}.png", lambda path: fig.savefig(path, dpi=100, format="png"))
    plt.close(fig)
    write_text_atomic(out / f"{name}.json", json.dumps(summary, indent=1) + "\n")
    return summary


def describe(summary: dict) -> list[str]:
    """The lines `scalevec theory` prints: the claim, every measured and control value, and whether it held."""
    def leaves(value, path: str):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from leaves(item, f"{path}.{key}" if path else str(key))
        elif isinstance(value, list):
            yield path, "[" + ", ".join(text(item) for item in value) + "]"
        else:
            yield path, text(value)

    def text(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)

    lines = [f"claim: {summary['claim']}"]
    for section in ("measured", "control"):
        lines += [f"  {section}: {path} = {value}" for path, value in leaves(summary[section], "")]
    verdict = "true" if summary["holds"] else "false (the claim, or its control, did not come out as stated)"
    return lines + [f"holds: {verdict}"]


def regression_problem(n: int, d_in: int, d_out: int, seed: int,
                       teacher_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized inputs x̂ (rows of RMS 1) and targets of a random linear teacher plus noise, float64.

    The teacher's columns have norm about teacher_scale·sqrt(d_out/d_in)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    x_hat = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    teacher = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) * teacher_scale / d_in**0.5
    y = x_hat @ teacher.T + 0.1 * torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    return x_hat, y


def corpus_bytes(n_tokens: int) -> torch.Tensor:
    """The first bytes of Moby-Dick as tokens (vocabulary 256): a tiny LM needs no tokenizer."""
    with lzma.open(CORPUS_DIR / "moby_dick.jsonl.xz", "rt", encoding="utf-8") as fh:
        text = json.loads(fh.readline())["text"] + json.loads(fh.readline())["text"]
    return torch.tensor(list(text.encode()[:n_tokens]), dtype=torch.long)
