"""Where a search's memory goes, computed from the model's shapes before anything is loaded (`search --memory-plan`).

Order (docs/design.md): model weights on `--device` → the activation cache (its file under `--cache-dir` on disk),
in the first place that holds it (`cache_placement`):
    device   at most `--cache-mem` and fits beside the model (never for a model spread by `--device-map`, which fills
             the devices);
    pinned   beside a CUDA device, in page-locked host memory when twice its size (pinned blocks are rounded up to
             powers of two) fits in the available host memory, less a spread model's bytes (some of them may be there):
             a trial gathers its subset's rows there and copies them over asynchronously, while the device works on
             the previous linear;
    mapped   memory-mapped from its file (pages read on first touch, shared by the workers of one machine), rows
             gathered and copied over per linear
→ the refit pool (`--refit-calib`: fp32 input moments of the pruned linears and the Gram of every output projection)
collected and kept on the device where it fits beside the model and a device-held cache, else collected one decoder
layer at a time into host memory, from where each output projection's Gram goes to the device when its module is read
(`refit_placement`)
→ a widths search's layer variants (`--structure widths`: no activation cache) in host memory, up to
`variant_store_bytes`, least recently used dropped beyond it
→ working buffers. The cache's and the pool's sizes are exact: the tensors `build_cache` and `collect_refit_pool`
store for these shapes, pools and metrics (X and dY only when taylor1/mix or lsq compensation are in the space).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from adapruner.errors import AdaPrunerError

GIB = 2**30
VARIANT_HOST_SHARE = 0.25  # the share of available host memory a widths search's variants may hold
VARIANTS_WHERE = "host memory at most: each structure's refits, least recently used dropped beyond it (solved again)"


@dataclass
class MemoryPlan:
    """Bytes the search will hold and where (free bytes as measured now)."""

    device: str
    model_bytes: int
    cache_bytes: int
    cache_dir: str
    cache_place: str  # device | pinned | mapped (see the module docstring)
    device_free_bytes: int
    host_available_bytes: int
    disk_free_bytes: int
    device_map: str | None = None  # the model is spread by accelerate (GPUs, then host memory, then disk)
    refit_bytes: int = 0  # the refit pool (0: none)
    refit_place: str = "device"  # device | host (`refit_placement`)
    variants_bytes: int = 0  # a widths search's variant store bound in host memory (0: no widths search)

    @property
    def cache_on_device(self) -> bool:
        return self.cache_place == "device"

    def rows(self) -> list[list[object]]:
        where = {
            "device": f"on {self.device}",
            "pinned": "pinned host memory, rows copied per trial asynchronously",
            "mapped": "memory-mapped in host memory, rows copied per trial",
        }[self.cache_place]
        model_where = (
            f"on {self.device}"
            if self.device_map is None
            else f"spread by --device-map {self.device_map} from {self.device}"
        )
        return [
            ["model weights", f"{self.model_bytes / GIB:.3f} GiB", model_where],
            ["activation cache", f"{self.cache_bytes / GIB:.3f} GiB", where],
            [
                "cache file",
                f"{self.cache_bytes / GIB:.3f} GiB",
                f"under {self.cache_dir} (reused when one of the same key is there)",
            ],
            *([["refit pool", f"{self.refit_bytes / GIB:.3f} GiB", self.refit_where]] if self.refit_bytes else []),
            *(
                [["layer variants", f"{self.variants_bytes / GIB:.3f} GiB", VARIANTS_WHERE]]
                if self.variants_bytes
                else []
            ),
            [f"free on {self.device}", f"{self.device_free_bytes / GIB:.3f} GiB", "now"],
            ["host memory available", f"{self.host_available_bytes / GIB:.3f} GiB", "now"],
            ["disk free under --cache-dir", f"{self.disk_free_bytes / GIB:.3f} GiB", "now"],
        ]

    @property
    def refit_where(self) -> str:
        if self.refit_place == "device":
            return f"on {self.device} (collected there, kept for every trial)"
        return f"host memory, collected layer by layer: one layer's Grams on {self.device} at a time"

    def table(self) -> str:
        from adapruner.output.report import format_table

        return format_table(["memory plan", "size", "where"], self.rows())

    def check(self, cache_exists: bool = False) -> None:
        """One-line errors naming the flag when the plan cannot fit (the disk only matters for a cache to build)."""
        if self.device_map is None and self.model_bytes > self.device_free_bytes:
            fix = (
                "pass --device-map auto (with --max-memory, --offload-dir) or --dtype bfloat16"
                if self.device != "cpu"
                else "pass --device-map auto --offload-dir DIR (or a smaller model)"
            )
            raise AdaPrunerError(
                f"the model needs {self.model_bytes / GIB:.2f} GiB and {self.device} has "
                f"{self.device_free_bytes / GIB:.2f} GiB free: {fix}"
            )
        if not cache_exists and self.cache_bytes > self.disk_free_bytes:
            raise AdaPrunerError(
                f"the activation cache needs {self.cache_bytes / GIB:.2f} GiB and its folder has "
                f"{self.disk_free_bytes / GIB:.2f} GiB free: "
                "pass a --cache-dir with room, or lower --pool-size or --cache-dtype"
            )


def host_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux), else free physical pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available_bytes()


def memory_plan(
    device: torch.device,
    model_bytes: int,
    cache_bytes: int,
    cache_dir: Path,
    cache_mem_bytes: int,
    device_map: str | None = None,
    refit_bytes: int = 0,
    structure_bytes: int = 0,
) -> MemoryPlan:
    """The plan, made before the model loads, for a model of `model_bytes` on `device` (or spread from it by
    `device_map`, which fills the devices: the cache then stays in host memory), a cache of `cache_bytes`, a refit
    pool of `refit_bytes` and, for a widths search, variants of at most `structure_bytes` per structure."""
    folder = cache_dir.expanduser().absolute()
    while not folder.exists():
        folder = folder.parent
    free, host = device_free_bytes(device), host_available_bytes()
    place = cache_placement(device.type, model_bytes, cache_bytes, cache_mem_bytes, free, host, device_map is not None)
    return MemoryPlan(
        str(device),
        model_bytes,
        cache_bytes,
        str(cache_dir),
        place,
        free,
        host,
        shutil.disk_usage(folder).free,
        device_map,
        refit_bytes,
        refit_placement(model_bytes + (cache_bytes if place == "device" else 0), refit_bytes, free, device_map),
        variant_store_bytes(structure_bytes, host) if structure_bytes else 0,
    )


def variant_store_bytes(one_structure: int, host_available: int) -> int:
    """The variants' bound in host memory: `VARIANT_HOST_SHARE` of what is available, and at least two structures'
    worth (the parent's and a child's)."""
    return max(2 * one_structure, int(VARIANT_HOST_SHARE * host_available))


def refit_placement(held_bytes: int, refit_bytes: int, device_free: int, device_map: str | None = None) -> str:
    """`device` where the pool fits beside what the device already holds (`held_bytes`: the model, a device-held
    cache) within half of what is left — the other half is the trials' working set — else `host`. A model spread by
    --device-map fills its devices: its pool goes to host memory."""
    if device_map is None and refit_bytes <= (device_free - held_bytes) // 2:
        return "device"
    return "host"


def cache_placement(
    device_type: str,
    model_bytes: int,
    cache_bytes: int,
    cache_mem_bytes: int,
    device_free: int,
    host_available: int,
    spread: bool = False,
) -> str:
    """`device`, `pinned` or `mapped`: the first tier of the module docstring that holds the cache."""
    if not spread and cache_bytes <= cache_mem_bytes and model_bytes + cache_bytes <= device_free:
        return "device"
    if device_type == "cuda" and 2 * cache_bytes <= host_available - (
        model_bytes if spread else 0
    ):  # pinned blocks round up to 2^k
        return "pinned"
    return "mapped"
