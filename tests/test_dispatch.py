"""`auto` dispatch: CUDA tensors take the Triton kernels, CPU tensors the torch references (or the bf16 CPU path)."""

from importlib import import_module

import pytest
import torch

from adapruner.kernels.dispatch import kernel_backend

# the modules (the package re-exports a function named channel_importance)
cached_gradient, channel_importance, gather = (
    import_module(f"adapruner.kernels.{name}") for name in ("cached_gradient", "channel_importance", "gather")
)

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it)"
)


def spy(monkeypatch, module, name: str, calls: list[str]) -> None:
    real = getattr(module, name)

    def recorded(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recorded)


def call_every_entry_point(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(0)
    w, g = (torch.randn(24, 40, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    x, dy = (
        torch.randn(18, 40, generator=gen).to(device, torch.bfloat16),
        torch.randn(18, 24, generator=gen).to(device, torch.bfloat16),
    )
    rows = torch.arange(18, device=device)
    channel_importance.channel_importance("taylor1", w, 0, g)
    cached_gradient.cached_grad_importance("mix", w, x, dy, rows, 9)
    cached_gradient.sample_fisher_stats(w, x.float(), dy.float(), 9)
    gather.gather([(w, rows[:5], None)])


ENTRY_POINTS = [
    (channel_importance, "channel_importance"),
    (cached_gradient, "cached_grad_importance"),
    (cached_gradient, "sample_fisher_stats"),
    (gather, "gather"),
]


@needs_cuda
def test_cuda_tensors_select_triton(monkeypatch):
    calls: list[str] = []
    for module, name in ENTRY_POINTS:
        spy(monkeypatch, module, f"{name}_triton", calls)
        spy(monkeypatch, module, f"{name}_torch", calls)
    call_every_entry_point(torch.device("cuda"))
    assert calls == [f"{name}_triton" for _, name in ENTRY_POINTS]
    assert kernel_backend(torch.device("cuda")) == "triton"


def test_cpu_tensors_select_torch(monkeypatch):
    calls: list[str] = []
    for module, name in ENTRY_POINTS:
        spy(monkeypatch, module, f"{name}_triton", calls)
    monkeypatch.setattr(cached_gradient, "native_bf16", lambda _device: False)  # the reference, not the bf16 CPU path
    call_every_entry_point(torch.device("cpu"))
    assert calls == []
    assert kernel_backend(torch.device("cpu")) == "torch"
