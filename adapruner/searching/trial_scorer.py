"""A search trial's score: validation perplexity of the pruned model, without redoing what every trial shares.

- Prefix: decoder layers before `start` (the first prunable one) are the dense model's in every trial, so the hidden
  states entering layer `start`, H = layers[:start](embed(ids)), are computed once; a trial runs layers[start:],
  the final norm and the head on H (passed as `inputs_embeds`). Same numbers as a full forward of the pruned model.
- Copy: a trial's model is new module objects only along the path to the linears it cuts (model → layers → layer →
  attention / MLP); every other module and tensor is the base model's, so a trial pays for the gather alone.
- Dtype: trials run in `dtype` — `auto` is bf16 where the hardware multiplies bf16 natively (CUDA with bf16, CPUs
  with AVX512-BF16/AMX), else fp32. Only the validation forward changes dtype: importance reads the weights in the
  model's own dtype (`--dtype`: fp32 on the CPU, bf16 on CUDA by default), with fp32 arithmetic in the kernels.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from adapruner.choosing.plan import PrunePlan
from adapruner.cutting.removal import cut
from adapruner.devices import DTYPES, dtype_name, model_device
from adapruner.errors import AdaPrunerError
from adapruner.evaluation.divergence import DenseTopK, dense_top_k, mean_kl
from adapruner.evaluation.evaluate import perplexity
from adapruner.kernels.dispatch import native_bf16
from adapruner.model.big_model import is_dispatched, rebind_forward
from adapruner.model.families import family_of
from adapruner.model.structure import decoder_layers, layers_owner
from adapruner.scoring.collect import layer_inputs

VAL_DTYPES = DTYPES  # the validation forward takes the weight dtypes


def resolve_val_dtype(name: str, device: torch.device) -> str:
    """`auto` → `bfloat16` where `native_bf16(device)`, else `float32`; other names are checked and returned."""
    if name == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    if name not in VAL_DTYPES:
        raise AdaPrunerError(f"unknown --val-dtype {name!r}: choose auto, {', '.join(VAL_DTYPES)}")
    return name


def shared_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A new module tree over the same parameter and buffer tensors (parameters of another dtype are cast once).

    `cut` replaces linears rather than writing into them, so pruning the copy leaves `model` untouched.
    """
    memo: dict[int, object] = {id(buffer): buffer for buffer in model.buffers()}
    for param in model.parameters():
        same = dtype is None or param.dtype == dtype or not param.is_floating_point()
        memo[id(param)] = param if same else nn.Parameter(param.detach().to(dtype), requires_grad=False)
    return copy.deepcopy(model, memo)


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object over the same children, parameters and buffers (its own tables, so setattr stays local)."""
    clone = copy.copy(module)
    clone._modules, clone._parameters, clone._buffers = (
        dict(module._modules),
        dict(module._parameters),
        dict(module._buffers),
    )
    rebind_forward(clone, module)  # a dispatched module's hooked forward would run the original's children
    return clone


def pruned_copy(model: nn.Module, plan: PrunePlan, updates: dict | None = None) -> nn.Module:
    """`model` pruned by `plan` (with the refit output linears `updates` installed) as a new model object; `model` is
    left as it was and shares all it can with the copy."""
    family = family_of(model.config)
    *path, leaf = family.layers.split(".")
    copied = owner = _shallow(model)
    for part in path:  # shallow copies down to the module that holds the layers
        setattr(owner, part, _shallow(getattr(owner, part)))
        owner = getattr(owner, part)
    layers = nn.ModuleList(decoder_layers(model))
    for index in set(plan.attention) | set(plan.mlp):
        layers[index] = _shallow(layers[index])
        for block in (family.attention, family.mlp):
            setattr(layers[index], block, _shallow(getattr(layers[index], block)))
        mlp = getattr(layers[index], family.mlp)
        if family.experts and hasattr(mlp, family.experts):  # a MoE layer's experts lose channels too
            setattr(mlp, family.experts, _shallow(getattr(mlp, family.experts)))
    setattr(owner, leaf, layers)
    cut(copied, plan, updates)
    return copied


def drop_leading_layers(model: nn.Module, start: int) -> None:
    """Remove decoder layers [0, start) in place; the model then expects the hidden states entering layer `start`
    (as `inputs_embeds`: a base model that scales its input embeddings in its forward, Granite's
    `embedding_multiplier`, must not scale them again)."""
    layers = decoder_layers(model)
    base, leaf = layers_owner(model)
    setattr(base, leaf, nn.ModuleList(list(layers)[start:]))
    if hasattr(base, "embedding_multiplier"):
        base.embedding_multiplier = 1.0
    base.config = copy.copy(base.config)
    base.config.num_hidden_layers = len(layers) - start
    if getattr(base.config, "layer_types", None) is not None:
        base.config.layer_types = list(base.config.layer_types)[start:]


class ValidationScorer:
    """Validation perplexity of pruned variants of one base model on fixed windows (prefix computed once)."""

    def __init__(
        self, model: nn.Module, windows: torch.Tensor, start: int, dtype: str = "float32", batch_size: int = 8
    ):
        if is_dispatched(
            model
        ):  # its tensors stay where the device map put them: trials copy the path to each cut only
            if next(model.parameters()).dtype != VAL_DTYPES[dtype]:
                raise AdaPrunerError(
                    "a model spread by --device-map validates in its own dtype: "
                    f"pass --val-dtype {dtype_name(next(model.parameters()).dtype)}"
                )
            self.base = model
        else:
            self.base = shared_copy(model, VAL_DTYPES[dtype]).eval()
        self.windows, self.start, self.batch_size = windows.to(model_device(model)), start, batch_size
        self.prefix = self._hidden_entering_start()
        self.dense: DenseTopK | None = None  # the base model's top-k distributions, for `kl`

    def _hidden_entering_start(self) -> torch.Tensor:
        """(n × seq_len × hidden) inputs of decoder layer `start`, batch by batch as the trials will read them."""
        hidden, _arguments = layer_inputs(self.base, self.windows, [self.start], self.batch_size)
        return torch.cat(hidden)

    def pruned(self, plan: PrunePlan, updates: dict | None = None) -> nn.Module:
        """The whole pruned model in the validation dtype, sharing every tensor the plan does not cut, with the
        compensated output linears `updates` (see `adapruner.cutting.compensation`) installed."""
        return pruned_copy(self.base, plan, updates)

    def score(
        self, plan: PrunePlan, report: Callable[[int, float], None] | None = None, updates: dict | None = None
    ) -> float:
        """Validation perplexity of the base model pruned by `plan` (and compensated by `updates`;
        only layers `start`… run)."""
        model = self._from_start(plan, updates)
        return perplexity(
            model, self.windows, self.batch_size, progress=False, report=report, inputs_embeds=self.prefix
        )

    def kl(self, plan: PrunePlan, updates: dict | None = None) -> float:
        """Mean KL divergence of the pruned model's next-token distributions from the base model's on the windows,
        on the base model's top k (`adapruner.evaluation.divergence`, computed on the first call; both run layers
        `start`… on the cached prefix)."""
        if self.dense is None:
            dense = self._from_start(PrunePlan())
            self.dense = dense_top_k(dense, self.windows, batch_size=self.batch_size, inputs_embeds=self.prefix)
        return mean_kl(self._from_start(plan, updates), self.windows, self.dense, self.batch_size, self.prefix)

    def _from_start(self, plan: PrunePlan, updates: dict | None = None) -> nn.Module:
        """`pruned(plan, updates)` without the layers before `start`: it reads the cached prefix as `inputs_embeds`."""
        if any(index < self.start for index in (*plan.attention, *plan.mlp)):
            raise AdaPrunerError(f"the plan prunes a layer before {self.start}, whose output the scorer has cached")
        model = self.pruned(plan, updates)
        drop_leading_layers(model, self.start)
        return model
