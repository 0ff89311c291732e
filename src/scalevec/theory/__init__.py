"""Theory lab: the paper's claims (docs/paper-notes.md sections 2-4) as small deterministic experiments.

Each experiment `run(out, fast)` measures its quantities with plain gradient descent (the
theorems concern gradient flow / GD, not Adam or Muon), writes `NAME.png` and `NAME.json` to
`out`, and returns the summary: `claim`, `setup`, `measured` (the claim's test where its hypothesis
holds), `control` (the same test where it must fail) and `holds`, true only when the claim reproduced
and the control did not.
"""

from . import dual_placement, fold, preconditioning, reparam, weight_decay
from .common import describe

__all__ = ["EXPERIMENTS", "describe"]

EXPERIMENTS = {
    "fold": fold.run,
    "preconditioning": preconditioning.run,
    "weight-decay": weight_decay.run,
    "dual-placement": dual_placement.run,
    "reparam": reparam.run,
}
