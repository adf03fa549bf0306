"""lp: layer pruning, LinearPatch and baselines (see README.md)."""
