"""Theory lab: the paper's claims (docs/paper-notes.md sections 2-4) as small deterministic experiments.

Each experiment `run(out, fast)` measures its quantities with plain gradient descent (the
theorems concern gradient flow / GD, not Adam or Muon), writes `NAME.png` and `NAME.json` to
`out`, and returns the summary, which states whether the claim held where its hypothesis holds.
"""

from . import dual_placement, fold, preconditioning, reparam, weight_decay

EXPERIMENTS = {
    "fold": fold.run,
    "preconditioning": preconditioning.run,
    "weight-decay": weight_decay.run,
    "dual-placement": dual_placement.run,
    "reparam": reparam.run,
}
