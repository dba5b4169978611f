"""Models spread over GPUs, host memory and disk by accelerate's big-model dispatch (`--device-map`).

transformers loads with `device_map`, `max_memory` and `offload_folder`; accelerate then hooks every module: the
hook moves a module's inputs to its *execution device* and, for an offloaded module, loads its weights from host
memory or disk before the forward and puts them back on the meta device after it. Hence, for this package:
- outside a forward an offloaded weight is a meta tensor: every read goes through `weights(linear)`;
- a linear that pruning or compensation replaces is placed like the one it replaces (`place_like`): on the same
  device, or, for an offloaded one, with its (smaller) weights in host memory, loaded per forward;
- a new module object over a hooked one (the trials' path-only copies) runs its own children (`rebind_forward`):
  accelerate binds each hooked `forward` to the module it hooked;
- saving is transformers' `save_pretrained`, which reads offloaded tensors one shard at a time.
"""

from __future__ import annotations

import functools
import json
import re
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adapruner.errors import AdaPrunerError
from adapruner.staging import check_writable

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE_NAME = re.compile(r"cpu|disk|cuda(:\d+)?|\d+")


@dataclass(frozen=True)
class Dispatch:
    """How to spread a model: a strategy name or a JSON device-map file, memory per device (bytes),
    an offload folder."""

    device_map: str
    max_memory: tuple[tuple[str, int], ...] = ()
    offload_dir: str | None = None

    @classmethod
    def of(
        cls, device_map: str | None, max_memory: str | None = None, offload_dir: str | None = None
    ) -> Dispatch | None:
        """None without a device map; --max-memory and --offload-dir alone are refused."""
        if device_map is None:
            if max_memory or offload_dir:
                raise AdaPrunerError("--max-memory and --offload-dir shape a --device-map: add --device-map auto")
            return None
        if max_memory and device_map not in STRATEGIES:
            raise AdaPrunerError(
                f"--device-map {device_map} places every module itself: drop --max-memory (it shapes auto, balanced, …)"
            )
        dispatch = cls(device_map, tuple(parse_max_memory(max_memory).items()) if max_memory else (), offload_dir)
        _ = dispatch.module_map  # a map file is read (and checked) once, here
        if offload_dir:
            if Path(offload_dir).exists() and not Path(offload_dir).is_dir():
                raise AdaPrunerError(f"--offload-dir {offload_dir} is a file: pass a folder")
            check_writable(Path(offload_dir) / "weights", "--offload-dir")
        dispatch.check_devices()
        return dispatch

    @functools.cached_property
    def module_map(self) -> dict | None:
        """The JSON file's {module name: device}; None for a strategy name."""
        return None if self.device_map in STRATEGIES else read_device_map(self.device_map)

    def load_kwargs(self) -> dict:
        """Keyword arguments for `from_pretrained`."""
        kwargs: dict = {"device_map": self.module_map or self.device_map}
        if self.max_memory:
            kwargs["max_memory"] = {int(k) if k.isdigit() else k: v for k, v in self.max_memory}
        if self.offload_dir:
            Path(self.offload_dir).mkdir(parents=True, exist_ok=True)
            kwargs["offload_folder"] = self.offload_dir
        return kwargs

    def check_devices(self) -> None:
        """GPU indices in --max-memory or the map must be visible here."""
        named = [k for k, _ in self.max_memory if k.isdigit()]
        if self.module_map is not None:
            named += [str(v).removeprefix("cuda:") for v in self.module_map.values() if str(v) not in ("cpu", "disk")]
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        wrong = next((n for n in named if n.isdigit() and int(n) >= visible), None)
        if wrong is not None:
            raise AdaPrunerError(
                f"--device-map/--max-memory name GPU {wrong} and {visible} are visible here: "
                "use cpu (and disk) entries or fewer GPUs"
            )

    def describe(self) -> dict:
        return {"device_map": self.device_map, "max_memory": dict(self.max_memory), "offload_dir": self.offload_dir}


def read_device_map(path: str) -> dict:
    """A JSON device-map file: {module name: GPU index, 'cuda:N', 'cpu' or 'disk'}; a bad one is a one-line error."""
    try:
        mapping = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdaPrunerError(
            f"--device-map {path!r} is neither {', '.join(STRATEGIES)} nor a readable JSON file "
            f"({exc.__class__.__name__})"
        ) from None
    if (
        not isinstance(mapping, dict)
        or not mapping
        or not all(isinstance(k, str) and _DEVICE_NAME.fullmatch(str(v)) for k, v in mapping.items())
    ):
        raise AdaPrunerError(
            f"--device-map {path}: write an object {{module name: GPU index, 'cuda:N', 'cpu' or 'disk'}}"
        )
    return mapping


def parse_max_memory(text: str) -> dict[str, int]:
    """`0=70GiB,cpu=200GiB` → {"0": bytes, "cpu": bytes}; a wrong entry is a one-line error."""
    from accelerate.utils import convert_file_size_to_int

    limits: dict[str, int] = {}
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        device, _, size = entry.partition("=")
        device = device.strip()
        if not (device.isdigit() or device == "cpu") or not size:
            raise AdaPrunerError(
                f"--max-memory entry {entry!r}: write DEVICE=SIZE with DEVICE a GPU index or cpu, "
                "e.g. 0=70GiB,cpu=200GiB"
            )
        try:
            limits[device] = convert_file_size_to_int(size.strip())
        except ValueError:
            raise AdaPrunerError(f"--max-memory size {size!r}: write a size such as 70GiB or 500MB") from None
        if limits[device] <= 0:
            raise AdaPrunerError(f"--max-memory size {size!r} must be positive")
    if not limits:
        raise AdaPrunerError("--max-memory is empty: write e.g. 0=70GiB,cpu=200GiB")
    return limits


def is_dispatched(model: nn.Module) -> bool:
    """True for a model accelerate has hooked (loaded with a device map)."""
    return any(hasattr(module, "_hf_hook") for module in model.modules())


def is_offloaded(module: nn.Module) -> bool:
    """True when the module's own weights live in host memory or on disk and are loaded per forward."""
    if not hasattr(module, "_hf_hook"):  # not dispatched: no accelerate import on the common path
        return False
    from accelerate.utils import has_offloaded_params

    return has_offloaded_params(module)


def execution_device(module: nn.Module) -> torch.device:
    """Where the module computes: its hook's execution device, else the device of its first tensor."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next(t.device for t in (*module.parameters(), *module.buffers()))


def home_device(module: nn.Module) -> torch.device:
    """Where the module's tensors are kept between forwards: host memory for an offloaded module (its replacement is
    made there, see `place_like`), else its execution device."""
    return torch.device("cpu") if is_offloaded(module) else execution_device(module)


@contextmanager
def weights(module: nn.Module) -> Iterator[nn.Module]:
    """The module with its weights readable (an offloaded module's loaded on its execution device meanwhile)."""
    if not is_offloaded(module):
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module


def place_like(new: nn.Module, old: nn.Module) -> nn.Module:
    """Put `new` (made on the execution device) where `old` lives: offloaded `old` → `new`'s weights move to host
    memory and load per forward onto the same execution device."""
    if is_offloaded(old):
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module

        add_hook_to_module(new, AlignDevicesHook(execution_device=old._hf_hook.execution_device, offload=True))
    return new


def rebind_forward(clone: nn.Module, original: nn.Module) -> None:
    """Make a shallow copy of a hooked module run through the same hook with the copy's own children."""
    if "forward" not in original.__dict__:
        return
    bound = original.__dict__.get("_old_forward")
    if (
        not hasattr(original, "_hf_hook")
        or not isinstance(bound, types.MethodType)
        or not isinstance(original.forward, functools.partial)
    ):
        raise AdaPrunerError(
            f"{type(original).__name__} has a forward of its own that is not accelerate's hook: "
            "a trial's copy of it cannot run its own children"
        )
    clone._old_forward = types.MethodType(bound.__func__, clone)
    clone.forward = functools.update_wrapper(functools.partial(original.forward.func, clone), clone._old_forward)


@dataclass(frozen=True)
class _Offloaded:
    """What autograd saved in place of a view of an offloaded module's loaded tensor: where to load it from again."""

    module: nn.Module
    name: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@contextmanager
def reload_offloaded_in_backward(model: nn.Module) -> Iterator[list[int]]:
    """While active, autograd saves a *reference* to an offloaded module's weight (one that a forward loaded from host
    memory or disk) instead of the tensor, and the backward loads it again onto the execution device when it needs it.
    Without this every weight the forward loads stays alive until the backward: the whole model on its first device.
    Yields a one-element list counting the tensors saved by reference."""
    offloaded = [module for module in model.modules() if is_offloaded(module)]
    saved_by_reference = [0]
    if not offloaded:
        yield saved_by_reference
        return

    def pack(tensor: torch.Tensor):
        if tensor.device.type == "meta":
            return tensor
        storage = tensor.untyped_storage().data_ptr()
        for module in offloaded:
            for name, param in module._parameters.items():
                loaded = param is not None and param.device == tensor.device and param.is_contiguous()
                if (
                    loaded and param.untyped_storage().data_ptr() == storage
                ):  # the module's loaded tensor, or a view of it
                    saved_by_reference[0] += 1
                    return _Offloaded(
                        module,
                        name,
                        tuple(tensor.shape),
                        tuple(tensor.stride()),
                        tensor.storage_offset() - param.storage_offset(),
                    )
        return tensor

    def unpack(packed):
        if not isinstance(packed, _Offloaded):
            return packed
        hook = packed.module._hf_hook
        dtype = packed.module._parameters[packed.name].dtype
        value = hook.weights_map[packed.name].to(hook.execution_device, dtype).contiguous()
        return value.as_strided(packed.shape, packed.stride, packed.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield saved_by_reference


def unique_tensors(model: nn.Module, buffers: bool = False) -> list[tuple[str, torch.Tensor]]:
    """`named_parameters()` (and `named_buffers()`) less the copies the model declares tied (`lm_head.weight` with tied
    embeddings): once an offloaded model has run, accelerate's hooks hold tied tensors as separate objects (the copy
    may even come back as a buffer), so identity no longer dedupes them."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    named = [*model.named_parameters(), *(model.named_buffers() if buffers else ())]
    return [(name, tensor) for name, tensor in named if name not in tied]
