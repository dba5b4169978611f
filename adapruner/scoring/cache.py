"""Activation cache: one forward+backward of the dense model over a candidate pool, then any subset's importance.

Per prunable linear W (out × in) of the pruned layers and per sample s (token rows of s: t ∈ s):
    x        X (tokens × in), stored once per distinct input (q/k/v share one, gate/up share one)
    dy       dY = ∂(Σ_s L_s)/∂Y (tokens × out); because samples are independent, rows of s hold ∂L_s/∂Y_s
    vec      rows: Σ_{t∈s} dY_tj (X_t·W_j)      cols: Σ_{t∈s} X_ti (dY_t·W)_i   (signed; Σ_s gives Σ W⊙G)
    fisher   rows: Σ_i W² (G_s)²                cols: Σ_j W² (G_s)²             (G_s = dY_sᵀ X_s)
    act      Σ_{t∈s} X_ti²                       xsum  Σ_{t∈s} X_ti   (act and xsum: once per distinct input)
The per-sample statistics are computed in fp32 before x and dy are stored (bf16 by default). A subset S then
scores as: vector |Σ_S vec|, taylor2 ½ Σ_S fisher / |S|, act Σ |W|·sqrt(Σ_S act), fluct ‖W[:, i]‖²·(Σ_S act/T −
(Σ_S xsum/T)²) with T = |S|·seq_len, taylor1/mix through the fused cached-gradient kernel on the token rows of S (for
mix it also forms F_S = mean_S G_s² per sample, in registers). Compensation reads μ_S = Σ_S xsum / T and, for lsq,
C_S = X_Sᵀ X_S / T from the stored inputs' rows of S.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapruner.choosing.spec import DEFAULT_OBS_DAMP
from adapruner.data.calibration import seeded_draw, window_batches
from adapruner.devices import dtype_name, model_device
from adapruner.errors import AdaPrunerError, first_line
from adapruner.kernels.cached_gradient import cached_grad_importance, sample_fisher_stats
from adapruner.kernels.channel_importance import channel_importance
from adapruner.model.big_model import weights
from adapruner.model.structure import Member, decoder_layers, input_owner, prunable_linears
from adapruner.scoring.collect import linear_io, sample_loss
from adapruner.scoring.importance import Importance, InputMoments
from adapruner.scoring.metrics import ACTIVATION_METRICS, METRICS
from adapruner.staging import staged_file

CACHE_FORMAT = 2  # bumped whenever what the file holds changes meaning; part of every key


@dataclass(frozen=True)
class CacheKey:
    """What a cache depends on; its digest names the file on disk."""

    model: str
    pools: tuple[str, ...]
    pool_size: int
    seq_len: int
    layers: tuple[int, int]
    seed: int
    activations: bool
    dtype: str
    model_dtype: str = "float32"  # the weights' dtype when the cache was built (a bf16 model gives other X, dY)
    model_digest: str = ""  # `fingerprint.model_digest`: the weights, config and tokenizer, not the path
    pool_digests: tuple[str, ...] = ()  # `fingerprint.text_digest` of each pool: a file changed in place is a new key
    format: int = CACHE_FORMAT

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True, default=list).encode()).hexdigest()[:16]


class ActivationCache:
    """Tensors by name (safetensors-friendly) plus the (pool, index) address of every cached sample."""

    def __init__(self, key: CacheKey, tensors: dict[str, torch.Tensor], addresses: list[tuple[str, int]]):
        self.key, self.tensors, self.addresses = key, tensors, addresses

    @property
    def n_samples(self) -> int:
        return len(self.addresses)

    def samples_of_pool(self, pool: str) -> list[int]:
        return [i for i, (p, _) in enumerate(self.addresses) if p == pool]

    def token_rows(self, samples: torch.Tensor) -> torch.Tensor:
        """Token-row indices of the given samples in the stored x / dy tensors."""
        L = self.key.seq_len
        return (samples[:, None] * L + torch.arange(L)).reshape(-1)

    def channel_scores(
        self, metric: str, name: str, weight: torch.Tensor, dim: int, samples: torch.Tensor
    ) -> torch.Tensor:
        """Channel scores of linear `name` along `dim` for the sample subset `samples` (indices into the pool)."""
        if samples.numel() == 0:
            raise AdaPrunerError("the sample subset is empty: choose at least one sample")
        side = "rows" if dim == 0 else "cols"
        source = METRICS[metric].cached
        if source == "sample_products":  # vector: |Σ_s Σ w·g|
            return self._sample_sum(f"vec_{side}/{name}", samples, weight.device).abs()
        if source == "sample_fisher":  # taylor2: ½ Σ_s f_s / |S|
            return 0.5 * self._sample_sum(f"fisher_{side}/{name}", samples, weight.device) / samples.numel()
        if source == "input_squares":  # act: ‖x_i‖₂ from Σ x²
            act_norm = self._sample_sum(f"act/{self.owner(name)}", samples, weight.device).sqrt()
            return channel_importance(metric, weight, dim, act_norm=act_norm)
        if source == "input_moments":  # fluct: the inputs' variance
            act_var = self.input_moments(name, samples, weight.device).variance
            return channel_importance(metric, weight, dim, act_var=act_var)
        if source == "activations":
            if not self.key.activations:
                raise AdaPrunerError(
                    f"metric {metric!r} needs cached activations: "
                    f"rebuild the cache with {'/'.join(sorted(ACTIVATION_METRICS))} in --metrics"
                )
            x, dy = self.tensors[f"x/{self.owner(name)}"], self.tensors[f"dy/{name}"]
            rows = self.token_rows(samples).to(x.device)
            if (
                x.device != weight.device
            ):  # a host-resident cache (over --cache-mem): stage the subset's rows on the device
                x, dy = rows_on(x, rows, weight.device), rows_on(dy, rows, weight.device)
                rows = torch.arange(rows.numel(), device=weight.device)
            return cached_grad_importance(metric, weight, x, dy, rows, self.key.seq_len)[dim]
        raise AdaPrunerError(f"metric {metric!r} does not read the cache")

    def owner(self, name: str) -> str:
        """The linear whose inputs the cache holds for `name` (`structure.input_owner`: k/v read q's, up gate's)."""
        owner = input_owner(name)
        return owner if f"xsum/{owner}" in self.tensors else name

    def input_moments(
        self, name: str, samples: torch.Tensor, device: torch.device | str, gram: bool = False
    ) -> InputMoments:
        """Moments of linear `name`'s inputs over the token rows of the sample subset (see the module docstring)."""
        tokens = samples.numel() * self.key.seq_len
        owner = self.owner(name)
        mean = self._sample_sum(f"xsum/{owner}", samples, device) / tokens
        square_mean = self._sample_sum(f"act/{owner}", samples, device) / tokens
        if not gram:
            return InputMoments(mean, square_mean)
        if not self.key.activations:
            raise AdaPrunerError(
                "lsq compensation, the obs metric and the error allocation need cached inputs: rebuild the cache "
                "with lsq in --compensations (or obs/taylor1/mix in --metrics, error in --allocations)"
            )
        x = self.tensors[f"x/{owner}"]
        rows = rows_on(x, self.token_rows(samples).to(x.device), torch.device(device)).float()
        return InputMoments(mean, square_mean, rows.t() @ rows / tokens)

    def output_fisher(self, name: str, samples: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """The output Fisher of linear `name` over the sample subset, Σ_{s∈S} Σ_{t∈s} dY_t² / |S| (the one
        `collect.collect_output_fisher` forms live; dY rows of s hold ∂L_s/∂Y_s)."""
        if not self.key.activations:
            raise AdaPrunerError(
                "the loss allocation needs cached output gradients: rebuild the cache with loss in --allocations"
            )
        dy = self.tensors[f"dy/{name}"]
        rows = rows_on(dy, self.token_rows(samples).to(dy.device), torch.device(device)).float()
        return rows.square().sum(0) / samples.numel()

    def _sample_sum(self, name: str, samples: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Σ over the subset's rows of a per-sample statistic, on `device`."""
        stats = self.tensors[name]
        return stats.index_select(0, samples.to(stats.device)).sum(0).to(device)

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    @property
    def pinned(self) -> bool:
        """Held in page-locked host memory (see `load`)."""
        return next(iter(self.tensors.values())).is_pinned()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def save(self, path: Path) -> None:
        """safetensors file written through a temporary name, then renamed."""
        metadata = {"key": json.dumps(self.key.__dict__, default=list), "addresses": json.dumps(self.addresses)}
        with staged_file(path) as tmp:
            save_file(
                {k: v.contiguous().cpu() for k, v in self.tensors.items()}, str(tmp), metadata=metadata
            )  # staged on the host to write

    @classmethod
    def load(
        cls, path: Path, max_memory_bytes: int = 0, device: torch.device | str = "cpu", pin: bool = False
    ) -> ActivationCache:
        """Read onto `device` when the file is at most `max_memory_bytes`; otherwise into page-locked host memory with
        `pin` (CUDA only: a trial's rows then copy over asynchronously, see `rows_on`), else memory-mapped in host
        memory (pages are read on first touch and shared between worker processes on one machine; a trial on a GPU
        then copies only its subset's rows over). A file that is not a whole cache raises `DamagedCache`."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata()
            raw = json.loads(metadata["key"])
            key = CacheKey(
                **{
                    **raw,
                    "pools": tuple(raw["pools"]),
                    "layers": tuple(raw["layers"]),
                    "pool_digests": tuple(raw.get("pool_digests", ())),
                }
            )
            addresses = [tuple(a) for a in json.loads(metadata["addresses"])]
            fits = path.stat().st_size <= max_memory_bytes
            if fits and torch.device(device).type != "cpu":
                tensors = load_file(str(path), device=str(device))
            else:
                tensors = load_file(str(path))
                if fits:
                    tensors = {name: tensor.clone() for name, tensor in tensors.items()}
                elif pin and torch.cuda.is_available():
                    tensors = {name: tensor.pin_memory() for name, tensor in tensors.items()}
        except (
            SafetensorError,
            ValueError,
            KeyError,
            TypeError,
        ) as exc:  # not a whole cache we wrote (I/O and memory errors pass)
            raise DamagedCache(first_line(exc)) from None
        return cls(key, tensors, addresses)

    def check(self, model: nn.Module, key: CacheKey) -> None:
        """Raise `DamagedCache` unless this cache was made for `key` and holds every tensor it should, in the
        shape and dtype `build_cache` gives for `model`."""
        if self.key != key:
            raise DamagedCache(f"it holds the key of another cache ({self.key.digest()})")
        n = self.n_samples
        if n != key.pool_size * len(key.pools):
            raise DamagedCache(f"it holds {n} samples, not {key.pool_size * len(key.pools)}")
        expected = expected_tensors(model, key)
        found = {name: (tuple(t.shape), t.dtype) for name, t in self.tensors.items()}
        wrong = next(
            (name for name in sorted(set(expected) | set(found)) if expected.get(name) != found.get(name)), None
        )
        if wrong is not None:
            raise DamagedCache(
                f"tensor {wrong!r} is {found.get(wrong, 'missing')}, not {expected.get(wrong, 'expected')}"
            )


def rows_on(tensor: torch.Tensor, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor[rows]` on `device`, gathered where `tensor` lives. From pinned host memory the rows are gathered into a
    fresh pinned buffer and copied without blocking: the host goes on to the next gather while the copy and the
    device's work on earlier rows run (the pinned allocator keeps the buffer until its copy has finished)."""
    if tensor.device == device:
        return tensor.index_select(0, rows.to(device))
    rows = rows.to(tensor.device)
    if tensor.is_pinned():
        staged = torch.empty((rows.numel(), *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=True)
        return torch.index_select(tensor, 0, rows, out=staged).to(device, non_blocking=True)
    return tensor.index_select(0, rows).to(device)


def expected_tensors(model: nn.Module, key: CacheKey) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype) of every tensor `build_cache` stores for `model` and `key` (shapes only: a model on the
    meta device will do)."""
    n, L, store = key.pool_size * len(key.pools), key.seq_len, getattr(torch, key.dtype)
    expected = {}
    linears = prunable_linears(model, range(*key.layers))
    for name, linear in linears.items():
        out_features, in_features = linear.weight.shape
        for stat, width in (
            ("vec_rows", out_features),
            ("vec_cols", in_features),
            ("fisher_rows", out_features),
            ("fisher_cols", in_features),
        ):
            expected[f"{stat}/{name}"] = ((n, width), torch.float32)
        if input_owner(name, linears) == name:
            expected[f"act/{name}"] = expected[f"xsum/{name}"] = ((n, in_features), torch.float32)
        if key.activations:
            expected[f"dy/{name}"] = ((n * L, out_features), store)
            if input_owner(name, linears) == name:
                expected[f"x/{name}"] = ((n * L, in_features), store)
    return expected


def planned_bytes(model: nn.Module, key: CacheKey) -> int:
    """Bytes of the tensors a cache for `key` holds (its file adds a small JSON header)."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in expected_tensors(model, key).values())


class DamagedCache(AdaPrunerError):
    """A cache file that cannot be read or does not hold what its key promises; the message says what is wrong."""


class CachedImportance(Importance):
    """`Importance` whose data metrics read an `ActivationCache` for a sample subset instead of live gradients."""

    def __init__(
        self,
        cache: ActivationCache,
        metric: str,
        aggregation: str,
        samples: torch.Tensor,
        seed: int = 0,
        damp: float = DEFAULT_OBS_DAMP,
    ):
        super().__init__(metric, aggregation, seed=seed, damp=damp)
        self.cache, self.samples = cache, samples

    def covariance(self, member: Member) -> torch.Tensor:
        with weights(member.linear) as linear:
            device = linear.weight.device
        return self.cache.input_moments(member.name, self.samples, device, gram=True).covariance

    def output_fisher(self, member: Member) -> torch.Tensor:
        with weights(member.linear) as linear:
            device = linear.weight.device
        return self.cache.output_fisher(member.name, self.samples, device)

    def channel_scores(self, member: Member) -> torch.Tensor:
        if self.definition.cached == "weights" or member.weights_only:
            return super().channel_scores(member)
        if self.definition.columns_only and member.dim == 0:
            raise AdaPrunerError(f"{self.metric} scores input columns only (the output projections)")
        with weights(member.linear) as linear:
            return self.cache.channel_scores(self.metric, member.name, linear.weight.detach(), member.dim, self.samples)


def candidate_pool(
    tokenizer, pools: list[str], pool_size: int, seq_len: int, seed: int
) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """`pool_size` calibration windows of each pool (seeded draw, in draw order), with their (pool, index) addresses."""
    rows, addresses = [], []
    for pool in pools:
        chosen, windows = seeded_draw(tokenizer, pool, pool_size, seq_len, seed, "lower --pool-size to at most {n}")
        rows.append(windows)
        addresses += [(pool, int(i)) for i in chosen]
    return torch.cat(rows), addresses


def build_cache(
    model: nn.Module,
    key: CacheKey,
    input_ids: torch.Tensor,
    addresses: list[tuple[str, int]],
    batch_size: int = 4,
    progress: bool = True,
    device_budget_bytes: int | None = None,
) -> ActivationCache:
    """One forward+backward per batch of the pool with hooks on every prunable linear of `key.layers`.

    The first batch's tensors tell each stored tensor's rows per window: then every one is allocated whole — where the
    model runs if the whole cache, projected from that batch, fits `device_budget_bytes` (None: no limit), else in host
    memory — and each batch writes its rows in place (no list of parts concatenated at the end: the cache is held
    once)."""
    layers = range(*key.layers)
    linears = prunable_linears(model, layers)
    store_dtype = getattr(torch, key.dtype)
    first: dict[str, torch.Tensor] = {}  # the first batch's tensors, until the stores are allocated
    stores: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    inputs: dict[str, torch.Tensor] = {}
    products: dict[str, torch.Tensor] = {}  # each linear's X·Wᵀ + b of the batch, until its backward
    L = key.seq_len
    windows, n_batches = input_ids.shape[0], math.ceil(input_ids.shape[0] / batch_size)

    def keep(name: str, tensor: torch.Tensor) -> None:
        if not stores:
            first[name] = tensor
            return
        start = filled[name]
        stores[name][start : start + tensor.shape[0]].copy_(tensor)
        filled[name] = start + tensor.shape[0]

    def allocate(batch_windows: int) -> None:
        """The stores, sized from the first batch (`batch_windows` windows), holding its rows."""
        kept = sum(t.numel() * t.element_size() for t in first.values())
        on_host = device_budget_bytes is not None and kept * n_batches > device_budget_bytes
        for name, tensor in first.items():
            rows = tensor.shape[0] // batch_windows * windows
            device = "cpu" if on_host else tensor.device
            stores[name] = torch.empty((rows, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
            stores[name][: tensor.shape[0]].copy_(tensor)
            filled[name] = tensor.shape[0]
        first.clear()

    def on_input(name: str, x: torch.Tensor) -> None:
        if input_owner(name, linears) == name:
            inputs[name] = x
            keep(f"act/{name}", x.square().view(-1, L, x.shape[1]).sum(1))
            keep(f"xsum/{name}", x.view(-1, L, x.shape[1]).sum(1))
            if key.activations:
                keep(f"x/{name}", x.to(store_dtype))

    def on_grad(name: str, dy: torch.Tensor) -> None:
        x = inputs[input_owner(name, linears)]
        with weights(linears[name]) as linear:  # an offloaded weight is loaded again for its backward
            w = linear.weight.detach().float()
            bias = None if linear.bias is None else linear.bias.detach().float()
        product = products.pop(name) if bias is None else products.pop(name) - bias  # X·Wᵀ, kept from the forward
        keep(f"vec_rows/{name}", (dy * product).view(-1, L, dy.shape[1]).sum(1))
        keep(f"vec_cols/{name}", (x * (dy @ w)).view(-1, L, x.shape[1]).sum(1))
        fisher_rows, fisher_cols = sample_fisher_stats(w, x, dy, L)
        keep(f"fisher_rows/{name}", fisher_rows)
        keep(f"fisher_cols/{name}", fisher_cols)
        if key.activations:
            keep(f"dy/{name}", dy.to(store_dtype))

    with linear_io(model, linears, on_input, on_grad, products.__setitem__):
        bar = "cache" if progress else None
        for _start, batch in window_batches(input_ids, batch_size, model_device(model), bar):
            sample_loss(model, batch).sum().backward()
            inputs.clear()
            if not stores:
                allocate(batch.shape[0])
    return ActivationCache(key, stores, addresses)


@dataclass(frozen=True)
class CandidatePool:
    """The windows a cache holds: `pool_size` seeded windows of `seq_len` tokens from each text pool."""

    pools: tuple[str, ...]
    pool_size: int
    seq_len: int
    seed: int = 0


def cache_key(
    model_name: str, model: nn.Module, pool: CandidatePool, layers: range, activations: bool, dtype: str = "bfloat16"
) -> CacheKey:
    """The key of a cache of `pool` on `layers` of `model` (X and dY stored in `dtype` when `activations`); the
    content digests are added by the caller that read them (`dataclasses.replace`)."""
    if layers.step != 1 or not 0 <= layers.start < layers.stop <= len(decoder_layers(model)):
        raise AdaPrunerError("cached layer range must be contiguous and inside the model")
    model_dtype = dtype_name(next(model.parameters()).dtype)  # the weights' dtype
    return CacheKey(
        model_name,
        tuple(pool.pools),
        pool.pool_size,
        pool.seq_len,
        (layers.start, layers.stop),
        pool.seed,
        activations,
        dtype,
        model_dtype,
    )


def load_or_build(
    model: nn.Module,
    tokenizer,
    key: CacheKey,
    cache_dir: Path,
    max_memory_bytes: int = 0,
    progress: bool = True,
    pin: bool = False,
) -> ActivationCache:
    """Reuse `cache_dir/<digest>.safetensors` when it holds a whole cache for `key`; else (missing, or damaged:
    noted and replaced) build it and save it. Then load it onto the model's device (see `load`)."""
    path = cache_dir / f"{key.digest()}.safetensors"
    if path.is_file():
        try:
            cache = ActivationCache.load(path, max_memory_bytes, model_device(model), pin)
            cache.check(model, key)
            return cache
        except DamagedCache as exc:
            print(f"note: activation cache {path} is damaged ({exc}): rebuilding it")
    input_ids, addresses = candidate_pool(tokenizer, list(key.pools), key.pool_size, key.seq_len, key.seed)
    build_cache(model, key, input_ids, addresses, progress=progress, device_budget_bytes=max_memory_bytes).save(path)
    return ActivationCache.load(path, max_memory_bytes, model_device(model), pin)
