"""Figures, summaries and the toy data the experiments share."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import torch

from ..data.sources import CORPUS_DIR
from ..outputs import write_atomic, write_text_atomic


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


def regression_problem(n: int, d_in: int, d_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized inputs x̂ (rows of RMS 1) and targets of a random linear teacher plus noise, float64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    x_hat = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    teacher = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / d_in**0.5
    y = x_hat @ teacher.T + 0.1 * torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    return x_hat, y


def corpus_bytes(n_tokens: int) -> torch.Tensor:
    """The first bytes of Moby-Dick as tokens (vocabulary 256): a tiny LM needs no tokenizer."""
    with lzma.open(CORPUS_DIR / "moby_dick.jsonl.xz", "rt", encoding="utf-8") as fh:
        text = json.loads(fh.readline())["text"] + json.loads(fh.readline())["text"]
    return torch.tensor(list(text.encode()[:n_tokens]), dtype=torch.long)
