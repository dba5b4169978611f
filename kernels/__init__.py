"""Importance and gather kernels (import name `adapruner.kernels`); each op sits beside its torch reference."""
from adapruner.kernels.channel_importance import (
    METRICS_NEEDING,
    channel_importance,
    channel_importance_torch,
    channel_importance_triton,
)

__all__ = ["METRICS_NEEDING", "channel_importance", "channel_importance_torch", "channel_importance_triton"]
