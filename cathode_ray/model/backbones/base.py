"""The one backbone interface: a frozen trunk (cacheable per structure) and a trainable last block.

Every backbone adapter (CHGNet, MACE) implements :class:`Backbone`; ``tests/model/conformance.py``
holds the small conformance check that each of them passes.

Flow for N structures::

    graphs = [bb.build_graph(s) for s in structures]      # CPU, the backbone's own neighbour list
    feats  = bb.trunk(graphs)                              # frozen, no grad; list of N TrunkFeatures
    batch  = bb.collate(feats, device)                     # one padded/concatenated batch
    e_pa, emb = last_block(batch)                          # [B] eV/atom, [B, D]

Training caches ``feats`` (the trunk runs once per structure for every member and epoch).
Inference needs no cache: ``bb.trunk_batch(graphs, device)`` equals ``collate(trunk(graphs))``
but keeps the trunk's output on ``device``, skipping the per-structure split to host memory
and the re-collation (host work that starves a GPU).

``feats`` are plain dicts of CPU tensors, so they can be cached in memory, in Ray's object store
or on disk with ``torch.save`` (loaded with ``weights_only=True``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from pymatgen.core import Structure
from torch import nn

#: Per-structure frozen-trunk output: CPU tensors keyed by name (backbone-specific).
TrunkFeatures = dict[str, torch.Tensor]
#: A collated batch of TrunkFeatures on one device (backbone-specific keys, plus "n_atoms" [B]).
TrunkBatch = dict[str, torch.Tensor]
#: ``trunk_batch``'s call: (graphs, device) -> collated trunk batch on that device.
TrunkBatchFn = Callable[[Sequence[Any], "str | torch.device"], TrunkBatch]


class LastBlock(nn.Module):
    """Trainable last interaction block plus the backbone's energy readout.

    ``forward(batch) -> (energy_per_atom [B] eV/atom, embedding [B, D])``. The energy is on the
    backbone's own scale (CHGNet: MP2020-compatible; MACE-MP-0: uncorrected GGA/GGA+U).
    """

    def forward(self, batch: TrunkBatch) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class Backbone(ABC):
    """A pretrained interatomic potential split into a frozen trunk and a trainable last block.

    Attributes:
        name: identity string, e.g. ``"chgnet-0.3.0"`` or ``"mace:/path/x.model"``.
        weights_sha256: sha256 of the weights file the backbone was loaded from.
        cutoff: neighbour-list cutoff radius in Angstrom.
        embedding_dim: D, channels of the last block's structure embedding.
        trunk_embedding_dim: D', scalar channels of the frozen trunk's node features.
        energy_is_mp2020_corrected: whether the backbone's energy already includes MP2020
            anion/U corrections (CHGNet) or needs them added (MACE-MP-0).
        trunk_revision: bumped when an adapter's code changes the trunk's numbers (even in the
            last bits), so that trunk features cached on disk by an older version are recomputed.
    """

    name: str
    weights_sha256: str
    cutoff: float
    embedding_dim: int
    trunk_embedding_dim: int
    energy_is_mp2020_corrected: bool
    trunk_revision: int = 1

    @abstractmethod
    def build_graph(self, structure: Structure) -> Any:
        """Neighbour graph of one structure with the backbone's own code (CPU, picklable)."""

    @abstractmethod
    def trunk(self, graphs: Sequence[Any], *, device: str | torch.device = "cpu") -> list[TrunkFeatures]:
        """Frozen trunk for a batch of graphs; returns one CPU TrunkFeatures per graph."""

    @abstractmethod
    def collate(self, feats: Sequence[TrunkFeatures], device: str | torch.device = "cpu") -> TrunkBatch:
        """Concatenate per-structure trunk features into one batch on ``device``."""

    def trunk_batch(self, graphs: Sequence[Any], device: str | torch.device = "cpu") -> TrunkBatch:
        """Frozen trunk straight into one collated batch on ``device`` (inference path).

        Must equal ``collate(trunk(graphs), device)`` (the conformance check compares them).
        This default does exactly that; adapters override it to skip the host round trip. Runs
        under ``torch.inference_mode`` (the batch only feeds inference).
        """
        with torch.inference_mode():
            return self.collate(self.trunk(graphs, device=device), device)

    @abstractmethod
    def new_last_block(self) -> LastBlock:
        """A fresh trainable copy of the pretrained last block (weights copied, grads on)."""

    def trunk_embedding(self, batch: TrunkBatch) -> torch.Tensor:
        """Frozen structure embedding from the trunk output, [B, D'] (for the OOD gate).

        Default: mean over atoms of the ``node_feats`` scalar channels.
        """
        return segment_mean(batch["node_scalars"], batch["atom_owners"], batch["n_atoms"])  # [B, D']

    def compile_trunk(self) -> TrunkBatchFn:
        """:meth:`trunk_batch` with the trunk's tensor work through ``torch.compile`` (TorchInductor,
        dynamic shapes; one graph where the library's ops allow); the host-side batching of graphs
        stays eager.

        Compiles on the first call. Must equal :meth:`trunk_batch` to float rounding (the
        conformance check compares them). Default: NotImplementedError, and the ensemble then
        runs the trunk uncompiled.
        """
        raise NotImplementedError(f"backbone {self.name} has no compiled trunk")

    def compile_template(self, last_block: LastBlock) -> nn.Module:
        """A module of ``last_block``'s structure that ``torch.compile`` can trace (eval mode).

        :class:`~cathode_ray.model.compiled.CompiledLastBlocks` calls it with each member's
        weights (``torch.func.functional_call``). Default: a deep copy. Adapters whose library
        modules Dynamo cannot trace (MACE: e3nn's TorchScript) rebuild them here, and raise
        NotImplementedError where they cannot.
        """
        return copy.deepcopy(last_block).eval()

    def vmap_context(self) -> contextlib.AbstractContextManager[Any]:
        """Context entered around a ``torch.func.vmap`` over members' last blocks.

        Default: nothing. A backbone whose library code uses in-place scatters (not vmap-safe)
        swaps them for out-of-place equivalents here (see the MACE adapter).
        """
        return contextlib.nullcontext()

    def identity(self) -> dict[str, Any]:
        """Backbone identity for manifests: name, weights sha256, cutoff."""
        return {"name": self.name, "weights_sha256": self.weights_sha256, "cutoff": self.cutoff}


def batch_to_device(batch: TrunkBatch, device: str | torch.device) -> TrunkBatch:
    """Move a collated CPU batch to ``device``; to CUDA through pinned memory, asynchronously
    (the copy overlaps the previous batch's kernels)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return {k: v.to(dev) for k, v in batch.items()}
    return {k: v.pin_memory().to(dev, non_blocking=True) for k, v in batch.items()}


@contextlib.contextmanager
def strict_float32(x: torch.Tensor) -> Iterator[None]:
    """Strict float32 for an energy readout on ``x``'s device: autocast off and TF32 matmuls off.

    Per-atom energies of several eV need float32: bfloat16 resolves only ~0.03 eV at 5 eV, and
    TF32 rounds matmul inputs to 10 mantissa bits, which moved CHGNet energies by up to 2 meV/atom
    in the readout MLP alone (CPU emulation, ``scripts/bench_precision.py``). Cast the readout's input with
    ``.float()`` inside. The TF32 flags are restored on exit.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type=x.device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def segment_mean(values: torch.Tensor, owners: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Mean of per-atom rows per structure. values [A, C], owners [A] (0..B-1), n [B] -> [B, C]."""
    out = torch.zeros(n.shape[0], values.shape[1], dtype=values.dtype, device=values.device)
    out = out.index_add(0, owners.long(), values)  # out of place: works under torch.func.vmap
    return out / n.to(values.dtype)[:, None]


def segment_sum(values: torch.Tensor, owners: torch.Tensor, n_graphs: int) -> torch.Tensor:
    """Sum of per-atom values per structure. values [A] or [A, C], owners [A] -> [B] or [B, C]."""
    shape = (n_graphs, *values.shape[1:])
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return out.index_add(0, owners.long(), values)  # out of place: works under torch.func.vmap
