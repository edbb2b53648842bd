"""Members' last blocks through one ``torch.compile``d function (TorchInductor), weights as inputs.

A MACE member's last block is 80-90 % of its cost on a GPU, and e3nn runs it as many small,
memory-bound ops: one product per tensor-product path, the concatenation of their outputs, layout
copies, and a scatter of a 5,120-wide message per edge (MACE-MP-0-medium). Inductor fuses such
ops. One compiled function serves every member: it calls a template module of the last block's
structure (``Backbone.compile_template``) through ``torch.func.functional_call`` with the member's
weights passed as inputs, so Dynamo traces and compiles once for all members, with dynamic shapes
(batches differ in atoms and edges), instead of once per member. The whole last block must be one
graph (``fullgraph=True``; MACE and CHGNet are): a graph break raises, and the ensemble falls back.

The first call compiles (25-50 s for the MACE-MP-0-medium shape on 2 CPU cores; Inductor
caches the result on disk for later processes). Outputs equal the uncompiled members to float
rounding (tested). ``Ensemble(compile_model=True)`` uses it (and compiles the trunk,
``Backbone.compile_trunk``) and falls back to the uncompiled loop, logged, if compiling fails.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .backbones.base import TrunkBatch

#: A last block's call: collated trunk batch -> (energy per atom [B] eV/atom, embedding [B, D]).
LastBlockFn = Callable[[TrunkBatch], tuple[torch.Tensor, torch.Tensor]]


class CompiledLastBlocks:
    """M last blocks of identical structure run by one compiled function.

    The members' tensors are referenced, not copied (a member's weights changed in place are
    seen by the next call). Parameters must all be present in every member; a buffer a member
    lacks is taken from the template (constants the template rebuilt from the same model).

    Args:
        template: a module of the last blocks' structure that Dynamo can trace, in eval mode.
        blocks: the members' last blocks (same parameter names and shapes, same device).
        backend: ``torch.compile`` backend (default Inductor).
    """

    def __init__(self, template: nn.Module, blocks: Sequence[nn.Module], *,
                 backend: str = "inductor") -> None:
        own = {**dict(template.named_parameters()), **dict(template.named_buffers())}
        params = {name for name, _ in template.named_parameters()}
        self.states: list[dict[str, torch.Tensor]] = []
        for i, block in enumerate(blocks):
            have = {**dict(block.named_parameters()), **dict(block.named_buffers())}
            missing = sorted(params - have.keys())
            if missing:
                raise ValueError(f"member {i}'s last block lacks parameters of the compile template: "
                                 f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
            self.states.append({name: have.get(name, t) for name, t in own.items()})
        self.template = template
        self._fn = torch.compile(self._forward, dynamic=True, fullgraph=True, backend=backend)

    def _forward(self, state: dict[str, torch.Tensor], batch: TrunkBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.func.functional_call(self.template, state, (batch,))

    def __call__(self, i: int, batch: TrunkBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Member ``i``'s last block on ``batch``: (e_pa [B] eV/atom, embedding [B, D])."""
        return self._fn(self.states[i], batch)

    def member(self, i: int) -> LastBlockFn:
        """Member ``i``'s compiled last block as a plain callable (for ``Member.head_inputs``)."""
        return functools.partial(self, i)
