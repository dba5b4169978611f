"""Importance and gather kernels (import name `adapruner.kernels`); each op sits beside its torch reference.

Submodules: `channel_importance` (per-channel scores of one weight), `cached_gradient` (scores from cached X and
dY), `gather` (kept rows and columns of several tensors), `dispatch` (when Triton runs).
"""
