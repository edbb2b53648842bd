"""Members run together: stacked weights and one vectorised call, and reduced-precision inference.

:class:`StackedMembers` stacks the M members' parameters (``torch.func.stack_module_state``) and
runs last block + head of all of them as one ``torch.func.vmap`` call over the member axis, instead
of M sequential calls. The trunk batch is shared (not mapped), so every member sees the same
input; outputs gain a leading member axis ``[M, B]``. Results equal the sequential loop to float
rounding (tested).

:func:`precision_context` applies an inference precision around the members' part:

- ``float32``: as trained;
- ``tf32``: TF32 matmuls and convolutions on CUDA (no effect on CPU);
- ``bf16``: ``torch.autocast`` to bfloat16 (CPU and CUDA). Energy sums stay in float64/float32.
  A backbone whose ops mix dtypes under autocast casts its last block's weights instead (MACE:
  e3nn contractions; see ``backbones.mace``).

:func:`precision_deviation` measures how far a precision moves predictions against float32 on a
batch; the screen checks it on its first batch and falls back to float32 above the bound.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

PRECISIONS: tuple[str, ...] = ("float32", "tf32", "bf16")


def check_precision(precision: str) -> str:
    """Return ``precision`` if known, else raise ValueError naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


@contextlib.contextmanager
def precision_context(precision: str, device: str | torch.device) -> Iterator[None]:
    """Run the enclosed inference at ``precision`` on ``device`` (restores global flags after)."""
    check_precision(precision)
    dev_type = torch.device(device).type
    if precision == "float32":
        yield
    elif precision == "tf32":
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    else:
        with torch.autocast(device_type=dev_type, dtype=torch.bfloat16):
            yield


class StackedMembers:
    """M modules of identical structure called as one vectorised function over stacked weights.

    The weights are copied into stacked tensors at construction (M x one member's last block +
    head: a few MB for MACE-MP-0-medium); build it after the members are loaded.

    Args:
        modules: the members (same class, same parameter shapes, same device), in eval mode.
        context: a context-manager factory entered around each call; a backbone whose library
            code is not vmap-safe supplies one that makes it so (``Backbone.vmap_context``).
    """

    def __init__(self, modules: Sequence[nn.Module],
                 context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext) -> None:
        if len(modules) < 1:
            raise ValueError("need at least one module to stack")
        self.params, self.buffers = torch.func.stack_module_state(list(modules))  # each [M, ...]
        self.base = copy.deepcopy(modules[0]).to("meta")  # structure only; weights come from params
        self.context = context

    def __call__(self, *args: Any) -> Any:
        """``module(*args)`` for every member at once; output tensors gain a leading [M] axis."""

        def one(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], *a: Any) -> Any:
            return torch.func.functional_call(self.base, (params, buffers), a)

        in_dims = (0, 0, *([None] * len(args)))  # weights mapped, inputs shared
        with self.context():
            return torch.func.vmap(one, in_dims=in_dims)(self.params, self.buffers, *args)


def precision_deviation(run: Callable[[str], dict[str, torch.Tensor]], precision: str,
                        keys: Sequence[str] = ("q50", "energy_pa")) -> float:
    """Largest |output(precision) - output(float32)| over ``keys`` (eV/atom) for one batch.

    ``run(precision)`` returns the outputs to compare (tensors of any shape, eV/atom).
    """
    ref = run("float32")
    low = run(precision)
    return max(float((low[k].double() - ref[k].double()).abs().max()) for k in keys)
