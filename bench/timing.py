"""Timing helpers shared by the bench scripts: median wall time with device synchronisation (the same as
`adapruner.evaluation.speed` times inference with), and the device's name."""

from __future__ import annotations

import torch

from adapruner.evaluation.speed import median_seconds, sync

__all__ = ["device_name", "median_seconds", "sync"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"
