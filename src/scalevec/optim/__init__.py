"""Role-aware optimizer groups (one table), AdamW and Muon."""

from .muon import Muon, orthogonalize
from .optimizers import Optimizers
from .policy import PolicyError, decay_counts, param_groups, policy_table

__all__ = ["Muon", "Optimizers", "PolicyError", "decay_counts", "orthogonalize", "param_groups", "policy_table"]
