"""TF32 matmuls emulated on the CPU, so the TF32 precision path can be tested without a GPU.

On an NVIDIA GPU with ``torch.backends.cuda.matmul.allow_tf32`` set, float32 matmuls round their
inputs to TF32 (10 explicit mantissa bits instead of 23) and accumulate in float32. CPUs have no
TF32, so the flag changes nothing here. :func:`emulated_tf32` makes it change something: while
active, every float32 matmul-like call (``linear``, ``matmul``, ``mm``, ``bmm``, ``addmm``,
``einsum``, ``@``) made *while the flag is set* first rounds its float32 tensor arguments to TF32.
Code that switches the flag off (a strict float32 readout) is then left exact, as on a GPU.

Limits: Python-level calls only (TorchScript'd code, e.g. e3nn's compiled contractions, bypasses
it), and the rounding mode of GPU kernels is not documented: ``mode="round"`` rounds to nearest
even, ``mode="truncate"`` drops the low bits (the worse case).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_MATMULS = frozenset({"linear", "matmul", "__matmul__", "mm", "bmm", "addmm", "einsum"})  # by name:
# ``a @ b`` arrives as ``TensorBase.matmul``, ``torch.mm`` and ``a.mm`` as different objects
_LOW_BITS = 0x1FFF  # float32 keeps 23 mantissa bits, TF32 10: the low 13 go


def to_tf32(x: torch.Tensor, *, mode: str = "round") -> torch.Tensor:
    """``x`` (float32, finite) rounded to the TF32 grid, still stored as float32."""
    bits = x.contiguous().view(torch.int32)
    if mode == "round":  # to nearest, ties to even
        bits = bits + (_LOW_BITS >> 1) + ((bits >> 13) & 1)
    elif mode != "truncate":
        raise ValueError(f"mode must be 'round' or 'truncate'; got {mode!r}")
    return (bits & ~_LOW_BITS).view(torch.float32)


class _TF32Mode(TorchFunctionMode):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if getattr(func, "__name__", "") in _MATMULS and torch.backends.cuda.matmul.allow_tf32:
            args = tuple(to_tf32(a, mode=self.mode)
                         if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a for a in args)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def emulated_tf32(mode: str = "round") -> Iterator[None]:
    """Within the block, float32 matmuls behave as TF32 ones whenever the TF32 flag is set."""
    to_tf32(torch.zeros(1), mode=mode)  # validate the mode before entering
    with _TF32Mode(mode):
        yield
