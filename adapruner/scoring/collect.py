"""Calibration statistics of the prunable linears from a forward+backward over the samples.

For samples s with per-sample loss L_s (mean next-token cross-entropy over the window):
    grad    G = Σ_s ∂L_s/∂W                (the gradient of the loss summed over samples)
    fisher  F = (1/n) Σ_s (∂L_s/∂W)²       (empirical Fisher diagonal, from per-sample gradients)
    act     a_i = sqrt(Σ_tokens x_i²)       (input-feature norm over all calibration tokens)
    output Fisher  f_r = (1/n) Σ_s Σ_{t∈s} (∂L_s/∂y_tr)²   (of a linear's outputs y: the loss's sensitivity to each)
Samples go through in batches of `batch_size`. G alone is the summed loss's weight gradient. F needs per-sample
gradients: hooks take each linear's input X and output gradient dY of the batch, and since the samples of a batch
are independent, sample s's gradient is G_s = dY_sᵀ X_s over its own token rows (no weight gradient is formed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adapruner.data.calibration import window_batches
from adapruner.devices import model_device
from adapruner.model.big_model import execution_device, is_offloaded, reload_offloaded_in_backward
from adapruner.model.structure import decoder_layers, output_projections, prunable_linears
from adapruner.scoring.importance import MOMENT_STATS, InputMoments, LinearStats

LOSS_WINDOWS = 64  # the `loss` allocation's output Fisher reads the first 64 calibration windows (docs/results.md)


class _Entered(Exception):
    """Stops a capture's pass once the last layer it records is entered."""


@torch.no_grad()
def layer_inputs(
    model: nn.Module, input_ids: torch.Tensor, layers: list[int], batch_size: int = 8
) -> tuple[list[torch.Tensor], dict[int, list[tuple[tuple, dict]]]]:
    """The hidden states entering the first of `layers` (sorted), batch by batch, and every listed layer's other
    arguments (positional, keyword: masks, rotary tables) per batch, from passes of `model` over `input_ids` that stop
    as the last of them is entered: no layer from there on runs."""
    hidden: list[torch.Tensor] = []
    arguments: dict[int, list[tuple[tuple, dict]]] = {index: [] for index in layers}
    blocks = decoder_layers(model)

    def recorder(index: int):
        def record(_module, args, kwargs):
            kwargs = dict(kwargs)
            states, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
            if index == layers[0]:
                hidden.append(states.detach())
            arguments[index].append((rest, kwargs))
            if index == layers[-1]:
                raise _Entered

        return record

    handles = [blocks[index].register_forward_pre_hook(recorder(index), with_kwargs=True) for index in layers]
    try:
        for _start, batch in window_batches(input_ids, batch_size, model_device(model)):
            try:
                model(input_ids=batch, use_cache=False)
            except _Entered:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return hidden, arguments


class LayerRun:
    """One decoder layer over the recorded batches of hidden states with their other arguments (`layer_inputs`)."""

    def __init__(self, layer: nn.Module, hidden: list[torch.Tensor], arguments: list[tuple[tuple, dict]]):
        self.layer, self.hidden, self.arguments = layer, hidden, arguments

    @property
    def tokens(self) -> int:
        """Tokens of all batches."""
        return sum(math.prod(states.shape[:-1]) for states in self.hidden)

    def outputs(self) -> list[torch.Tensor]:
        """The layer's outputs, batch by batch (hooks on its modules see every batch)."""
        return [
            _first(self.layer(states, *args, **kwargs)) for states, (args, kwargs) in zip(self.hidden, self.arguments)
        ]


def _first(out) -> torch.Tensor:
    """A decoder layer's hidden states (older families return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def collect_layer_moments(
    model: nn.Module, input_ids: torch.Tensor, layers: range, store: torch.device | str = "cpu", progress: bool = True
) -> dict[str, InputMoments]:
    """`InputMoments` of every prunable linear of `layers`, with XᵀX/T for their output projections (the refit pool's),
    one decoder layer at a time: the windows' hidden states go through each layer in turn and a layer's moments move
    to `store` as soon as it is done, so the device holds one layer's Grams, not every layer's. The same sums as
    `collect_input_moments` over the whole model's passes."""
    hidden, arguments = layer_inputs(model, input_ids, list(layers))
    blocks, moments = decoder_layers(model), {}
    for index in tqdm(layers, desc="input moments", unit="layer", disable=not progress):
        outputs = output_projections(model, [index])
        run = LayerRun(blocks[index], hidden, arguments[index])
        with input_moment_sums(prunable_linears(model, [index]) | outputs, outputs) as sums:
            hidden = run.outputs()
        moments.update({name: m.to(store) for name, m in sums.items()})
    return moments


def sample_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample mean next-token cross-entropy, shape (batch,); `input_ids` move to the model's device."""
    input_ids = input_ids.to(model_device(model))
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return token_loss.view(targets.shape).mean(1)


def collect_stats(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    input_ids: torch.Tensor,
    need: frozenset[str],
    progress: bool = True,
    batch_size: int = 8,
) -> dict[str, LinearStats]:
    """`LinearStats` for every linear in `linears`, holding only what `need` names (grad, fisher, act_norm)."""
    stats = {name: LinearStats() for name in linears}
    if not need:
        return stats
    act_sq = (
        {name: torch.zeros(lin.in_features, device=execution_device(lin)) for name, lin in linears.items()}
        if "act_norm" in need
        else {}
    )
    inputs: dict[str, torch.Tensor] = {}
    seq_len = input_ids.shape[1]

    def per_sample_sums(name: str, dy: torch.Tensor) -> None:
        entry, x = stats[name], inputs.pop(name)
        grad = entry.grad if entry.grad is not None else torch.zeros(dy.shape[1], x.shape[1], device=dy.device)
        fisher = entry.fisher if entry.fisher is not None else torch.zeros_like(grad)
        for dy_s, x_s in zip(dy.split(seq_len), x.split(seq_len)):
            g = dy_s.t() @ x_s
            grad.add_(g)
            fisher.addcmul_(g, g)
        entry.grad, entry.fisher = grad, fisher

    from_hooks = "fisher" in need or (
        "grad" in need and any(is_offloaded(lin) for lin in linears.values())
    )  # offloaded: no .grad
    if from_hooks:
        passes = linear_io(model, linears, inputs.__setitem__, per_sample_sums)
    else:
        passes = only_these_require_grad(model, linears.values() if "grad" in need else ())
    with passes, _input_square_sums(linears, act_sq):
        bar = "calibration" if progress else None
        for _start, batch in window_batches(input_ids, batch_size, model_device(model), bar):
            if not need & {"grad", "fisher"}:
                with torch.no_grad():
                    model(input_ids=batch)
                continue
            sample_loss(model, batch).sum().backward()
            if from_hooks:
                continue
            for name, linear in linears.items():
                grad = linear.weight.grad.float()
                linear.weight.grad = None
                entry = stats[name]
                entry.grad = grad.clone() if entry.grad is None else entry.grad.add_(grad)
    n = input_ids.shape[0]
    for name, entry in stats.items():
        if entry.fisher is not None:
            entry.fisher = entry.fisher.div_(n) if "fisher" in need else None
        if "grad" not in need:
            entry.grad = None
        if name in act_sq:
            entry.act_norm = act_sq[name].sqrt()
    return stats


def collect_output_fisher(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    input_ids: torch.Tensor,
    progress: bool = True,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """The output Fisher f (out,) of every listed linear (module docstring): the diagonal of E[(∂L/∂y)(∂L/∂y)ᵀ] that
    turns an output error δ into the loss increase it costs to second order, ½ Σ_r f_r δ_r² (the `loss` allocation).
    The backward goes one decoder layer at a time (`layer_gradients`), so a batch holds one layer's activations and
    every layer's input, not every layer's activations; no weight gradient is formed."""
    sums = {name: torch.zeros(linear.out_features, device=execution_device(linear)) for name, linear in linears.items()}

    def on_output(name: str, out_features: int):
        def add(grad: torch.Tensor) -> None:
            sums[name].add_(grad.detach().float().reshape(-1, out_features).square().sum(0))

        def hook(_module, _args, output):
            if output.requires_grad:  # the layer's run with autograd, not the recording forward
                output.register_hook(add)

        return hook

    down_to = lowest_layer(model, linears.values())
    handles = [linear.register_forward_hook(on_output(name, linear.out_features)) for name, linear in linears.items()]
    try:
        with only_these_require_grad(model, ()), reload_offloaded_in_backward(model):
            bar = "output fisher" if progress else None
            for _start, batch in window_batches(input_ids, batch_size, model_device(model), bar):
                layer_gradients(model, batch, down_to)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / input_ids.shape[0] for name, total in sums.items()}


def lowest_layer(model: nn.Module, modules: Collection[nn.Module]) -> int:
    """The index of the first decoder layer holding one of `modules`."""
    wanted = {id(module) for module in modules}
    return next(i for i, block in enumerate(decoder_layers(model)) if any(id(m) in wanted for m in block.modules()))


def layer_gradients(model: nn.Module, input_ids: torch.Tensor, down_to: int = 0) -> None:
    """The backward of Σ_s L_s (`sample_loss`) over `input_ids`, one decoder layer at a time, down to layer
    `down_to`: a forward without autograd in the layers records each layer's input (the head after the last layer
    runs with it), the head's backward gives ∂L/∂h at the last layer's output, and each layer, run again from its
    recorded input, passes ∂L/∂h to the one before (gradient checkpointing at layer boundaries). Hooks on the layers'
    modules see one forward without and one with autograd per layer; no parameter's gradient is touched."""
    blocks = decoder_layers(model)
    last = len(blocks) - 1
    recorded: dict[int, tuple[torch.Tensor, tuple, dict]] = {}
    head_input: list[torch.Tensor] = []

    def enter(index: int):
        def record(_module, args, kwargs):
            torch.set_grad_enabled(False)
            kwargs = dict(kwargs)
            states, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
            if index >= down_to:
                recorded[index] = (states.detach(), rest, kwargs)

        return record

    def leave(index: int):
        def done(_module, _args, _kwargs, output):
            torch.set_grad_enabled(True)
            if index == last:  # the head's input: a leaf whose gradient starts the walk down
                head_input.append(_first(output).detach().requires_grad_())
                return _with_first(output, head_input[0])
            return None

        return done

    handles = [block.register_forward_pre_hook(enter(i), with_kwargs=True) for i, block in enumerate(blocks)]
    handles += [block.register_forward_hook(leave(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        with torch.enable_grad():
            loss = sample_loss(model, input_ids).sum()
    finally:
        for handle in handles:
            handle.remove()
    (grad,) = torch.autograd.grad(loss, head_input)
    with torch.enable_grad():
        for index in range(last, down_to - 1, -1):
            states, args, kwargs = recorded.pop(index)
            states.requires_grad_()
            (grad,) = torch.autograd.grad(_first(blocks[index](states, *args, **kwargs)), states, grad)


def _with_first(output, first: torch.Tensor):
    """A decoder layer's output with its hidden states replaced by `first`."""
    return (first, *output[1:]) if isinstance(output, tuple) else first


@contextmanager
def linear_io(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    on_input: Callable[[str, torch.Tensor], None],
    on_grad: Callable[[str, torch.Tensor], None],
    on_output: Callable[[str, torch.Tensor], None] | None = None,
):
    """While active, a forward calls `on_input(name, X)` for each listed linear (X: tokens × in, fp32, detached),
    with `on_output` also `on_output(name, Y)` (its output X·Wᵀ + b, tokens × out, fp32, detached), and the backward
    of its loss `on_grad(name, dY)` (dY: tokens × out, fp32). Every parameter is frozen meanwhile: gradients flow from
    the embeddings' output, and no weight gradient is formed."""

    def forward_hook(name: str):
        def hook(module, args, output):
            on_input(name, args[0].detach().float().reshape(-1, module.in_features))
            if on_output is not None:
                on_output(name, output.detach().float().reshape(-1, module.out_features))
            output.register_hook(lambda grad: on_grad(name, grad.detach().float().reshape(-1, module.out_features)))

        return hook

    handles = [linear.register_forward_hook(forward_hook(name)) for name, linear in linears.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    try:
        with (
            only_these_require_grad(model, ()),
            reload_offloaded_in_backward(model),
        ):  # a spread model's backward reloads weights
            yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def only_these_require_grad(model: nn.Module, linears):
    """Turn off gradients of every parameter but the given linears' weights; restore on exit."""
    before = {p: p.requires_grad for p in model.parameters()}
    targets = {id(lin.weight) for lin in linears}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in targets)
        yield
    finally:
        for p, flag in before.items():
            p.requires_grad_(flag)
            p.grad = None


@contextmanager
def _input_square_sums(linears: dict[str, nn.Linear], sums: dict[str, torch.Tensor]):
    """While active, add Σ_tokens x_i² of each listed linear's input into `sums[name]`."""
    handles = []
    for name in sums:

        def hook(_module, inputs, _output, name=name):
            x = inputs[0].detach().float()
            sums[name].add_(x.reshape(-1, x.shape[-1]).square().sum(0))

        handles.append(linears[name].register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def collect_input_moments(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    input_ids: torch.Tensor,
    gram: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    gram_of: Collection[str] = (),
) -> dict:
    """`InputMoments` (mean, mean square, and with `gram` XᵀX/T) of every listed linear's inputs over all tokens of
    `input_ids`, from forward passes alone; `gram_of` names the linears that get XᵀX/T without `gram`."""
    with input_moment_sums(linears, linears if gram else gram_of) as moments:
        bar = "input moments" if progress else None
        for _start, batch in window_batches(input_ids, batch_size, model_device(model), bar):
            model(input_ids=batch, use_cache=False)
    return moments


def moment_stats(
    moments: Mapping[str, InputMoments],
    tokens: int,
    required: Collection[str] = MOMENT_STATS,
    device: torch.device | str | None = None,
) -> dict[str, LinearStats]:
    """The `LinearStats` that input moments over `tokens` tokens give, holding what `required` names (on `device`;
    None: where they are): act_norm ‖x_i‖₂ = sqrt(T · mean x_i²), act_var, and act_cov Σ where a Gram is."""

    def placed(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if device is None else tensor.to(device)

    stats = {}
    for name, m in moments.items():
        entry = LinearStats()
        if "act_norm" in required:
            entry.act_norm = placed((m.square_mean * tokens).sqrt())
        if "act_var" in required:
            entry.act_var = placed(m.variance)
        if "act_cov" in required and m.gram is not None:
            entry.act_cov = placed(m.covariance)
        stats[name] = entry
    return stats


@contextmanager
def input_moment_sums(linears: dict[str, nn.Linear], gram_of: Collection[str] = ()):
    """While active, hooks add up the inputs of every listed linear (tokens, Σx, Σx², and XᵀX for those named in
    `gram_of`); on exit the yielded dict holds their `InputMoments`."""
    sums = {name: [0, 0.0, 0.0, None] for name in linears}  # tokens, Σx, Σx², XᵀX

    def hook(name: str):
        def record(module, args, _output):
            x = args[0].detach().float().reshape(-1, module.in_features)
            entry = sums[name]
            entry[0] += x.shape[0]
            entry[1] = entry[1] + x.sum(0)
            entry[2] = entry[2] + x.square().sum(0)
            if name in gram_of:
                entry[3] = x.t() @ x if entry[3] is None else entry[3].addmm_(x.t(), x)

        return record

    moments: dict[str, InputMoments] = {}
    handles = [linear.register_forward_hook(hook(name)) for name, linear in linears.items()]
    try:
        yield moments
    finally:
        for handle in handles:
            handle.remove()
    for name, (n, s, sq, g) in sums.items():  # in place: a second copy of every Gram would double the pass's peak
        moments[name] = InputMoments(s / n, sq / n, None if g is None else g.div_(n))
