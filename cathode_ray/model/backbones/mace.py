"""MACE adapter (MACE-MP-0 and any local MACE / ScaleShiftMACE ``.model`` file).

Split of the MACE forward pass (``mace/modules/models.py``, ``MACE`` and ``ScaleShiftMACE``)::

    trunk (frozen, no grad)                      last block (trainable copy)
    ----------------------------------------     -------------------------------------------
    node embedding, edge SH + radial features    edge SH + radial features (recomputed from
    interactions[:-1], products[:-1]             the cached edge vectors; no parameters)
    E0 + pair repulsion + readouts[:-1]          interactions[-1], products[-1], readouts[-1]
    (scale/shift applied) -> e_frozen [eV]       scale * readout -> + e_frozen -> eV/atom

MACE's energy is ``E = sum_atoms E0(Z) + sum_atoms (scale * (pair + sum_l readout_l) + shift)``
for ScaleShiftMACE (``scale = 1, shift = 0`` for plain MACE), which is linear in the last
readout, so the split reproduces the full model exactly (up to float rounding).

MACE-MP-0 predicts *uncorrected* GGA/GGA+U energies (it was trained on raw MPtrj energies):
``energy_is_mp2020_corrected = False``; MP2020 corrections are added downstream.

Security: a MACE ``.model`` file is a full pickle of the ``torch.nn.Module`` (that is how MACE
ships models), so loading it runs arbitrary code. Only pass trusted model files. The file's
sha256 is computed before unpickling, recorded as ``weights_sha256`` and, when
``expected_sha256`` is given, verified before anything is unpickled. Note that ``import mace``
sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for the whole process (e3nn relies on it at import);
every ``torch.load`` in this project therefore passes ``weights_only=...`` explicitly.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from pymatgen.core import Structure
from torch import nn

from .base import (
    Backbone,
    LastBlock,
    TrunkBatch,
    TrunkBatchFn,
    TrunkFeatures,
    batch_to_device,
    segment_mean,
    segment_sum,
    sha256_file,
    strict_float32,
)

#: Backbone spec name -> key of ``mace.calculators.foundations_models.mace_mp_urls``.
#: Only models trained on MP-compatible PBE/PBE+U energies (MPtrj, sAlex) are aliased: their
#: energies can be MP2020-corrected and compared with the MP hull. Other foundation models
#: (OMat, MatPES r2SCAN, multi-head) are reachable as ``mace-mp:KEY`` at the caller's risk.
FOUNDATION_ALIASES: dict[str, str] = {
    "mace-mp-0-small": "small",
    "mace-mp-0-medium": "medium",
    "mace-mp-0-large": "large",
    "mace-mp-0b-small": "small-0b",
    "mace-mp-0b-medium": "medium-0b",
    "mace-mp-0b2-small": "small-0b2",
    "mace-mp-0b2-medium": "medium-0b2",
    "mace-mp-0b2-large": "large-0b2",
    "mace-mp-0b3-medium": "medium-0b3",
    "mace-mpa-0-medium": "medium-mpa-0",
}

#: ``AtomicData`` fields the trunk and the full model (``reference_energy``) read; the trunk
#: needs all but ``cell``. Models with charge/spin embeddings also keep their ``embedding_specs``.
GRAPH_FIELDS: tuple[str, ...] = ("edge_index", "positions", "shifts", "cell", "node_attrs", "head")

_FALLBACK_HINT = (
    "use '--backbone chgnet' (weights ship with the chgnet wheel) or download the model file "
    "elsewhere and pass '--backbone mace:PATH'"
)


class BackboneUnavailableError(RuntimeError):
    """The requested backbone weights cannot be obtained (offline, bad cache, ...)."""


class WeightsMismatchError(RuntimeError):
    """A model file's sha256 differs from the expected one (file not trusted, not loaded)."""


# --------------------------------------------------------------------------- loading


def _mace_modules() -> tuple[type, type]:
    """``(MACE, ScaleShiftMACE)`` classes (imports mace lazily; see module docstring)."""
    from mace.modules.models import MACE, ScaleShiftMACE

    return MACE, ScaleShiftMACE


def cueq_available() -> bool:
    """Whether NVIDIA's cuEquivariance kernels (``cuequivariance_torch``) are importable."""
    try:
        import cuequivariance_torch  # noqa: F401
    except ImportError:
        return False
    return True


def maybe_enable_cueq(model: torch.nn.Module, enable: bool, device: str | torch.device) -> torch.nn.Module:
    """Convert ``model`` to cuEquivariance kernels when asked and installed; else unchanged.

    The conversion is mace's own (``mace.cli.convert_e3nn_cueq.run``). Without the package (as on
    the machines this was written on) it logs a warning and keeps the e3nn kernels, so results
    are the same, only slower on a GPU.
    """
    if not enable:
        return model
    if not cueq_available():
        logging.getLogger(__name__).warning(
            "cuEquivariance requested but cuequivariance_torch is not installed; MACE keeps e3nn kernels")
        return model
    from mace.cli.convert_e3nn_cueq import run as convert_to_cueq

    return convert_to_cueq(model, device=str(device), return_model=True)


def _scatter_sum_out_of_place(src: torch.Tensor, index: torch.Tensor, dim: int = -1,
                              out: torch.Tensor | None = None, dim_size: int | None = None,
                              reduce: str = "sum") -> torch.Tensor:
    """``mace.tools.scatter.scatter_sum`` without the in-place ``scatter_add_`` (vmap-safe)."""
    from mace.tools.scatter import _broadcast

    if reduce != "sum":
        raise ValueError(f"only reduce='sum' is supported, got {reduce!r}")
    index = _broadcast(index, src, dim)
    if out is None:
        size = list(src.size())
        if dim_size is not None:
            size[dim] = dim_size
        else:
            size[dim] = 0 if index.numel() == 0 else int(index.max()) + 1
        out = torch.zeros(size, dtype=src.dtype, device=src.device)
    return out.scatter_add(dim, index, src)


@contextlib.contextmanager
def vmap_safe_scatter() -> Iterator[None]:
    """Swap mace's in-place ``scatter_sum`` in ``mace.modules.blocks`` for an out-of-place one.

    ``torch.func.vmap`` over stacked members cannot write mapped values into an unmapped
    ``torch.zeros`` buffer in place; the sum is the same either way. Restored on exit. Not
    thread-safe: an inference actor runs one batch at a time.
    """
    import mace.modules.blocks as blocks

    original = blocks.scatter_sum
    blocks.scatter_sum = _scatter_sum_out_of_place
    try:
        yield
    finally:
        blocks.scatter_sum = original


def no_jit_fusion() -> contextlib.AbstractContextManager[None]:
    """TorchScript's kernel fusers off (``torch.jit.fuser("none")``; restored on exit).

    e3nn compiles its contractions with TorchScript. After a profiling call TorchScript fuses
    them into kernels (NNC on CUDA by default; on CPU only when forced, and this CPU build has no
    LLVM to compile them), and a fused kernel has no ``vmap`` batching rule: stacked members
    failed on an H100 with "The following operation failed in the TorchScript interpreter". Not
    fusing keeps every op vmap can batch. Whether this is the whole story on CUDA is not yet
    measured; the ensemble still falls back to the member loop if a stacked call fails.
    """
    return torch.jit.fuser("none")


def load_mace_model_file(path: str | Path, *, expected_sha256: str | None = None) -> tuple[nn.Module, str]:
    """Unpickle a trusted MACE ``.model`` file onto the CPU.

    Args:
        path: a ``torch.save``-d MACE or ScaleShiftMACE module. It is a full pickle: only pass
            files you trust.
        expected_sha256: when given, the file's sha256 must match (checked before unpickling).

    Returns:
        ``(model, sha256)``.

    Raises:
        FileNotFoundError: no such file.
        WeightsMismatchError: sha256 differs from ``expected_sha256``.
        TypeError: the file does not hold a plain ``MACE`` / ``ScaleShiftMACE`` module.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MACE model file not found: {path}")
    sha = sha256_file(path)
    if expected_sha256 is not None and sha != expected_sha256.lower():
        raise WeightsMismatchError(f"{path}: sha256 {sha} != expected {expected_sha256}; not loaded")
    mace_cls, scale_shift_cls = _mace_modules()
    # MACE's format is a whole pickled nn.Module: weights_only=True cannot load it. Only trusted
    # model files are loaded (full pickle, MACE's format); sha256 computed above, before unpickling.
    model = torch.load(path, map_location="cpu", weights_only=False)
    if type(model) not in (mace_cls, scale_shift_cls):
        raise TypeError(
            f"{path} holds a {type(model).__module__}.{type(model).__qualname__}; expected a "
            "mace.modules.models.MACE or ScaleShiftMACE (subclasses override forward and are "
            "not supported by this split)"
        )
    return model, sha


def foundation_key(spec: str) -> str:
    """``mace_mp_urls`` key for a backbone spec (``mace-mp-0-medium`` or ``mace-mp:KEY``)."""
    from mace.calculators.foundations_models import mace_mp_urls

    key = spec.removeprefix("mace-mp:") if spec.startswith("mace-mp:") else FOUNDATION_ALIASES.get(spec)
    if key is None or key not in mace_mp_urls:
        known = sorted(FOUNDATION_ALIASES) + [f"mace-mp:{k}" for k in mace_mp_urls]
        raise ValueError(f"unknown MACE foundation model {spec!r}; known: {', '.join(known)}, or mace:PATH")
    return key


def download_foundation(spec: str) -> Path:
    """Local path of a MACE foundation model, downloaded into mace's cache if needed.

    Uses ``mace.calculators.foundations_models.download_mace_mp_checkpoint`` (cache:
    ``$XDG_CACHE_HOME/mace`` or ``~/.cache/mace``).

    Raises:
        BackboneUnavailableError: the download failed (e.g. no network); the message names the
            ``--backbone chgnet`` and ``--backbone mace:PATH`` alternatives.
    """
    from mace.calculators.foundations_models import download_mace_mp_checkpoint

    key = foundation_key(spec)
    try:
        return Path(download_mace_mp_checkpoint(key))
    except Exception as exc:  # urllib.error.URLError, OSError, TimeoutError, RuntimeError
        raise BackboneUnavailableError(
            f"cannot obtain MACE foundation model {spec!r} (mace_mp key {key!r}): "
            f"{type(exc).__name__}: {exc}. Offline? {_FALLBACK_HINT}"
        ) from exc


# --------------------------------------------------------------------------- helpers


def _scalar_columns(irreps: Any) -> torch.Tensor:
    """Column indices of the 0e (scalar, even) channels of a feature with e3nn ``irreps``."""
    cols: list[int] = []
    start = 0
    for mul, ir in irreps:
        width = mul * ir.dim
        if ir.l == 0 and ir.p == 1:
            cols.extend(range(start, start + width))
        start += width
    return torch.tensor(cols, dtype=torch.long)


def _irreps_out(block: nn.Module) -> Any:
    """Output irreps of a product block / node embedding (its final e3nn Linear)."""
    return block.linear.irreps_out


def _energy_scale(model: nn.Module) -> torch.Tensor:
    """Per-head multiplier of the interaction energies, [n_heads] (1 for plain MACE)."""
    if hasattr(model, "scale_shift"):
        return torch.atleast_1d(model.scale_shift.scale).detach().clone()
    return torch.ones(len(getattr(model, "heads", ["Default"])), dtype=model.r_max.dtype)


def _scale_shift(model: nn.Module, node_es: torch.Tensor, node_heads: torch.Tensor) -> torch.Tensor:
    """ScaleShiftMACE's ``scale[h] * e + shift[h]`` per atom (identity for plain MACE)."""
    if hasattr(model, "scale_shift"):
        return model.scale_shift(node_es, node_heads)
    return node_es


def _buffers_only(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` into a buffer (frozen, device-following, not trained)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            del sub._parameters[name]
            sub.register_buffer(name, param.detach().clone())
    return module


class MaceEdgeEmbedding(nn.Module):
    """Frozen edge features from edge vectors: spherical harmonics + radial basis (no params)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.spherical_harmonics = _buffers_only(copy.deepcopy(model.spherical_harmonics))
        self.radial_embedding = _buffers_only(copy.deepcopy(model.radial_embedding))
        self.register_buffer("atomic_numbers", model.atomic_numbers.detach().clone())

    def forward(
        self, vectors: torch.Tensor, node_attrs: torch.Tensor, edge_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """vectors [E, 3] Angstrom -> edge_attrs [E, (max_ell+1)^2], edge_feats [E, n_bessel], cutoff."""
        lengths = torch.linalg.norm(vectors, dim=-1, keepdim=True)  # [E, 1]
        edge_attrs = self.spherical_harmonics(vectors)
        edge_feats, cutoff = self.radial_embedding(lengths, node_attrs, edge_index, self.atomic_numbers)
        return edge_attrs, edge_feats, cutoff


def _interact(
    interaction: nn.Module, product: nn.Module, *, node_attrs: torch.Tensor, node_feats: torch.Tensor,
    edge_attrs: torch.Tensor, edge_feats: torch.Tensor, edge_index: torch.Tensor,
    cutoff: torch.Tensor | None, first_layer: bool,
) -> torch.Tensor:
    """One MACE layer (interaction + product), called exactly as ``MACE.forward`` does."""
    node_feats, sc = interaction(
        node_attrs=node_attrs, node_feats=node_feats, edge_attrs=edge_attrs, edge_feats=edge_feats,
        edge_index=edge_index, cutoff=cutoff, first_layer=first_layer,
        lammps_class=None, lammps_natoms=(0, 0),
    )
    return product(node_feats=node_feats, sc=sc, node_attrs=node_attrs)


#: The trunk's tensors: node features [A, F] after layer L-2, edge vectors [E, 3] (Angstrom),
#: frozen energy [B] (eV, float64) and the frozen edge embedding (``edge_attrs``, ``edge_feats``,
#: ``edge_cutoff`` when the model has one).
TrunkOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def trunk_tensors(m: nn.Module, data: dict[str, torch.Tensor]) -> TrunkOutputs:
    """Frozen layers 0..L-2 of MACE model ``m`` and its frozen energy terms on one batch dict
    (mace's ``Batch.to_dict()``, floats in the model's dtype), as ``MACE.forward`` computes them.

    Tensor work only (no host-side batching), so :meth:`MaceBackbone.compile_trunk` can compile
    it: the number of structures is read from a shape (``ptr`` [B + 1]), not passed as an int.
    """
    from mace.modules.utils import get_edge_vectors_and_lengths

    node_attrs = data["node_attrs"]  # [A, n_elements]
    edge_index = data["edge_index"]  # [2, E]
    node_heads = data["head"][data["batch"]]  # [A]
    arange = torch.arange(node_attrs.shape[0], device=node_attrs.device)
    vectors, lengths = get_edge_vectors_and_lengths(data["positions"], edge_index, data["shifts"])
    node_e0 = m.atomic_energies_fn(node_attrs)[arange, node_heads]  # [A] eV
    node_feats = m.node_embedding(node_attrs)
    edge_attrs = m.spherical_harmonics(vectors)
    edge_feats, cutoff = m.radial_embedding(lengths, node_attrs, edge_index, m.atomic_numbers)
    if hasattr(m, "pair_repulsion"):  # ZBL pair repulsion per atom [A] eV (unscaled)
        pair_es = m.pair_repulsion_fn(lengths, node_attrs, edge_index, m.atomic_numbers)
    else:
        pair_es = torch.zeros_like(node_e0)
    if hasattr(m, "joint_embedding"):  # charge/spin embeddings of newer MACE models
        node_feats = node_feats + m.joint_embedding(data["batch"], {name: data[name] for name in m.embedding_specs})
        if hasattr(m, "embedding_readout"):
            node_e0 = node_e0 + m.embedding_readout(node_feats, node_heads)[arange, node_heads]
    feats_list: list[torch.Tensor] = []
    for i, (interaction, product) in enumerate(zip(m.interactions[:-1], m.products[:-1], strict=True)):
        node_feats = _interact(
            interaction, product, node_attrs=node_attrs, node_feats=node_feats, edge_attrs=edge_attrs,
            edge_feats=edge_feats, edge_index=edge_index, cutoff=cutoff, first_layer=(i == 0),
        )
        feats_list.append(node_feats)
    node_inter = pair_es
    for i, readout in enumerate(m.readouts[:-1]):  # readout i <-> layer i; the last is the last block's
        node_inter = node_inter + readout(feats_list[i], node_heads)[arange, node_heads]
    node_frozen = node_e0.double() + _scale_shift(m, node_inter, node_heads).double()  # [A] eV
    e_frozen = segment_sum(node_frozen, data["batch"], data["ptr"].shape[0] - 1)  # [B] eV
    edges = {"edge_attrs": edge_attrs, "edge_feats": edge_feats}
    if cutoff is not None:
        edges["edge_cutoff"] = cutoff
    return node_feats, vectors, e_frozen, edges


def _autocast_low_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of an autocast active on ``device`` (e.g. bfloat16), or None."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _in_dtype(module: nn.Module, dtype: torch.dtype) -> Any:
    """``module`` callable with its weights and floating inputs cast to ``dtype``.

    e3nn's contractions mix dtypes under ``torch.autocast`` (some operands are cast, some are
    not), so a reduced precision for MACE casts whole modules instead: a cast copy of the
    parameters and buffers per call (``torch.func.functional_call``), leaving the float32
    weights that are trained and saved untouched. Works inside ``vmap`` (stacked members).
    """

    def call(**kwargs: Any) -> Any:
        state = {k: v.to(dtype) if v.is_floating_point() else v
                 for k, v in [*module.named_parameters(), *module.named_buffers()]}
        kw = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in kwargs.items()}
        return torch.func.functional_call(module, state, (), kw)

    return call


# --------------------------------------------------------------------------- last block


class MaceLastBlock(LastBlock):
    """Last MACE interaction + product + readout (trainable copies) on cached trunk features.

    Parameters are only those of the copied interaction/product/readout (all trainable); the
    edge embedding and the energy scale are buffers. ``copy_modules=False`` takes the model's
    own modules instead of copies (for a model built only to give them, see
    :meth:`MaceBackbone.compile_template`).
    """

    def __init__(self, model: nn.Module, *, copy_modules: bool = True) -> None:
        super().__init__()
        take = copy.deepcopy if copy_modules else (lambda m: m)
        self.edge_embedding = MaceEdgeEmbedding(model)
        self.interaction = take(model.interactions[-1])
        self.product = take(model.products[-1])
        self.readout = take(model.readouts[-1])
        self.first_layer = len(model.interactions) == 1
        self.register_buffer("energy_scale", _energy_scale(model))  # [n_heads]
        self.register_buffer("scalar_cols", _scalar_columns(_irreps_out(model.products[-1])))
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, batch: TrunkBatch) -> tuple[torch.Tensor, torch.Tensor]:
        node_attrs = batch["node_attrs"]  # [A, n_elements] one-hot
        edge_index = batch["edge_index"]  # [2, E] batch-global (sender, receiver)
        node_heads = batch["node_heads"]  # [A]
        if "edge_attrs" in batch:  # computed once by the trunk for every member (trunk_batch)
            edge_attrs, edge_feats, cutoff = batch["edge_attrs"], batch["edge_feats"], batch.get("edge_cutoff")
        else:  # cached features keep only the edge vectors (4x less memory per edge)
            edge_attrs, edge_feats, cutoff = self.edge_embedding(batch["edge_vectors"], node_attrs, edge_index)
        interaction, product = self.interaction, self.product
        device = node_attrs.device
        if (low := _autocast_low_dtype(device)) is not None:  # bf16: cast modules, not ops
            interaction, product = _in_dtype(interaction, low), _in_dtype(product, low)
        with torch.autocast(device_type=device.type, enabled=False):
            node_feats = _interact(
                interaction, product, node_attrs=node_attrs, node_feats=batch["node_feats"],
                edge_attrs=edge_attrs, edge_feats=edge_feats, edge_index=edge_index, cutoff=cutoff,
                first_layer=self.first_layer,
            )  # [A, last hidden irreps dim], in the low dtype under a bf16 autocast
        arange = torch.arange(node_feats.shape[0], device=node_feats.device)
        with strict_float32(node_feats):  # the readout: no autocast, no TF32
            node_feats = node_feats.to(torch.promote_types(node_feats.dtype, torch.float32))
            node_es = self.readout(node_feats, node_heads)[arange, node_heads]  # [A] eV
        node_es = node_es * self.energy_scale[node_heads].to(node_es.dtype)
        owners = batch["atom_owners"]  # [A]
        n = batch["n_atoms"]  # [B]
        e_total = segment_sum(node_es.double(), owners, n.shape[0]) + batch["e_frozen"]  # [B] eV
        e_pa = (e_total / n.double()).to(node_feats.dtype)  # [B] eV/atom
        emb = segment_mean(node_feats[:, self.scalar_cols], owners, n)  # [B, D]
        return e_pa, emb


# --------------------------------------------------------------------------- backbone


class MaceBackbone(Backbone):
    """A MACE / ScaleShiftMACE model split into a frozen trunk and a trainable last block.

    Per-structure TrunkFeatures (CPU): ``node_feats`` [n, F] (output of the second-to-last
    layer), ``species`` [n] (index into the model's element table), ``edge_index`` [2, E] int32
    (local), ``edge_vectors`` [E, 3] (Angstrom, receiver - sender + shift), ``head`` [1] and
    ``e_frozen`` [1] float64 (eV, total frozen energy: E0 + pair + scaled earlier readouts +
    shift). Edge vectors rather than edge features are cached: ~4x less memory per edge.
    """

    energy_is_mp2020_corrected = False

    def __init__(
        self, model: nn.Module, *, name: str, weights_sha256: str, device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32, head: str | None = None,
    ) -> None:
        if len(model.interactions) != len(model.products):
            raise ValueError("MACE model has mismatched interactions/products")
        self.dtype = dtype
        self.device = torch.device(device)
        self.model = model.to(dtype=dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.to(self.device)
        self.name = name
        self.weights_sha256 = weights_sha256
        self.cutoff = float(self.model.r_max)  # Angstrom
        self.heads: list[str] = list(getattr(self.model, "heads", None) or ["Default"])
        self.head = self._pick_head(head)
        self.z_list: list[int] = [int(z) for z in self.model.atomic_numbers]
        trunk_out = self.model.products[-2] if len(self.model.products) > 1 else self.model.node_embedding
        self._trunk_scalar_cols = _scalar_columns(_irreps_out(trunk_out))
        self.trunk_embedding_dim = int(self._trunk_scalar_cols.numel())
        self.embedding_dim = int(_scalar_columns(_irreps_out(self.model.products[-1])).numel())
        self.trunk_embedding_dim = int(self._trunk_scalar_cols.numel())

    def _pick_head(self, head: str | None) -> str:
        """The readout head to use: ``head`` if given, else the only / the 'default' head."""
        if head is not None:
            if head not in self.heads:
                raise ValueError(f"head {head!r} not in model heads {self.heads}")
            return head
        if len(self.heads) == 1:
            return self.heads[0]
        default = [h for h in self.heads if h.lower() == "default"]
        if not default:
            raise ValueError(f"multi-head MACE model: pass head=... (one of {self.heads})")
        return default[0]

    @classmethod
    def from_spec(
        cls, spec: str, device: str | torch.device = "cpu", *, expected_sha256: str | None = None,
        dtype: torch.dtype = torch.float32, head: str | None = None, enable_cueq: bool = False,
    ) -> MaceBackbone:
        """Backbone from ``mace:PATH`` (trusted local ``.model``) or a foundation name.

        Foundation names: :data:`FOUNDATION_ALIASES` (``mace-mp-0-medium``, ...) or
        ``mace-mp:KEY`` for any key of mace's ``mace_mp_urls``; downloaded into mace's cache.

        Raises:
            BackboneUnavailableError: a foundation model cannot be downloaded / loaded.
            WeightsMismatchError: ``expected_sha256`` given and the file differs.
        """
        if spec.startswith("mace:"):
            path = Path(os.path.expanduser(spec.removeprefix("mace:")))
            model, sha = load_mace_model_file(path, expected_sha256=expected_sha256)
            model = maybe_enable_cueq(model, enable_cueq, device)
            return cls(model, name=f"mace:{path}", weights_sha256=sha, device=device, dtype=dtype, head=head)
        path = download_foundation(spec)
        try:
            model, sha = load_mace_model_file(path, expected_sha256=expected_sha256)
        except (WeightsMismatchError, TypeError):
            raise
        except Exception as exc:  # truncated / HTML / foreign pickle in the cache
            raise BackboneUnavailableError(
                f"cached MACE model {path} for {spec!r} cannot be loaded ({exc}); delete it to "
                f"re-download, or {_FALLBACK_HINT}"
            ) from exc
        model = maybe_enable_cueq(model, enable_cueq, device)
        return cls(model, name=spec, weights_sha256=sha, device=device, dtype=dtype, head=head)

    # ------------------------------------------------------------------ graphs

    def build_graph(self, structure: Structure) -> Any:
        """MACE ``AtomicData`` (matscipy neighbour list in float64, cutoff ``r_max``) holding only
        what the model reads (:data:`GRAPH_FIELDS` plus the model's extra embedding inputs), floats
        in the model's dtype.

        mace's ``AtomicData`` also carries training labels and their weights (forces, stress,
        dipole, ...: 31 fields). Dropping them and storing float32 rather than float64 makes a
        graph ~3x smaller to pickle through Ray's object store and mace's ``Batch`` collation ~2x
        faster (``docs/performance.md``); the trunk casts floats to the model's dtype anyway.
        """
        from mace.data import AtomicData, config_from_atoms
        from mace.tools import torch_tools
        from mace.tools.utils import AtomicNumberTable
        from pymatgen.io.ase import AseAtomsAdaptor

        missing = sorted({el.symbol for el in structure.composition.elements if el.Z not in self.z_list})
        if missing:
            raise ValueError(f"{self.name} does not cover elements {missing}")
        atoms = AseAtomsAdaptor.get_atoms(structure)
        with torch_tools.default_dtype(torch.float64):
            config = config_from_atoms(atoms, head_name=self.head)
            graph = AtomicData.from_config(
                config, z_table=AtomicNumberTable(self.z_list), cutoff=self.cutoff, heads=self.heads
            )
        keep = {*GRAPH_FIELDS, *getattr(self.model, "embedding_specs", {})}
        for key in list(graph.keys):
            value = graph[key]
            if key not in keep:
                graph[key] = None  # None fields are not part of the graph (its ``keys``)
            elif torch.is_tensor(value) and value.is_floating_point():
                graph[key] = value.to(self.dtype)
        return graph

    def _batch_dict(self, graphs: Sequence[Any], device: torch.device) -> dict[str, torch.Tensor]:
        """Concatenate AtomicData graphs (mace's Batch) on ``device``, floats in model dtype."""
        from mace.tools.torch_geometric import Batch

        data = Batch.from_data_list(list(graphs)).to(device).to_dict()
        return {
            k: (v.to(self.dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in data.items()
        }

    # ------------------------------------------------------------------ trunk

    @torch.no_grad()
    def trunk(self, graphs: Sequence[Any], *, device: str | torch.device | None = None) -> list[TrunkFeatures]:
        """Frozen layers 0..L-2 and frozen energy terms; one CPU TrunkFeatures per graph."""
        data = self._batch_dict(graphs, torch.device(device) if device is not None else self.device)
        node_feats, vectors, e_frozen, _ = trunk_tensors(self.model, data)
        return self._split(graphs, node_feats, vectors, e_frozen)

    def trunk_batch(self, graphs: Sequence[Any], device: str | torch.device = "cpu") -> TrunkBatch:
        """:meth:`trunk` + :meth:`collate` without leaving ``device`` (same keys and values),
        plus the frozen edge embedding the trunk computed (``edge_attrs`` [E, (l_max+1)^2],
        ``edge_feats`` [E, n_bessel], ``edge_cutoff``), so members do not recompute it."""
        return self._trunk_batch(graphs, device, functools.partial(trunk_tensors, self.model))

    def compile_trunk(self) -> TrunkBatchFn:
        """:meth:`trunk_batch` with :func:`trunk_tensors` compiled, on a copy of the model rebuilt
        for Dynamo (see :meth:`compile_template`; same NotImplementedError for plain MACE)."""
        core = torch.compile(functools.partial(trunk_tensors, self._traceable_model()),
                             dynamic=True, fullgraph=True)
        return functools.partial(self._trunk_batch, core=core)

    @torch.inference_mode()
    def _trunk_batch(self, graphs: Sequence[Any], device: str | torch.device,
                     core: Callable[[dict[str, torch.Tensor]], TrunkOutputs]) -> TrunkBatch:
        data = self._batch_dict(graphs, torch.device(device))
        node_feats, vectors, e_frozen, edges = core(data)
        owners = data["batch"]  # [A]
        return edges | {
            "node_feats": node_feats,  # [A, F]
            "node_attrs": data["node_attrs"],  # [A, n_elements] one-hot, model dtype
            "edge_index": data["edge_index"],  # [2, E] batch-global
            "edge_vectors": vectors,  # [E, 3] Angstrom
            "node_heads": data["head"][owners],  # [A]
            "atom_owners": owners,
            "n_atoms": data["ptr"][1:] - data["ptr"][:-1],  # [B]
            "e_frozen": e_frozen,  # [B] eV, float64
            "node_scalars": node_feats[:, self._trunk_scalar_cols.to(node_feats.device)],  # [A, D']
        }

    def _traceable_model(self) -> nn.Module:
        """A copy of the model that Dynamo can trace: rebuilt from its config with e3nn's code
        generation off and simplified (what mace's ``prepare(extract_model)`` does for
        ``mace_mp(compile_mode=...)``, without its global autograd setting); eval mode, frozen.

        Raises:
            NotImplementedError: mace cannot rebuild this model class from its config (mace's
                ``extract_config_mace_model`` knows ScaleShiftMACE, the MACE-MP-0 class, but not
                plain MACE).
        """
        from mace.tools.compile import disable_e3nn_codegen, simplify
        from mace.tools.scripts_utils import extract_config_mace_model, extract_model

        if "error" in (config := extract_config_mace_model(self.model)):
            raise NotImplementedError(f"cannot compile {type(self.model).__name__}: {config['error']}")
        with disable_e3nn_codegen():
            rebuilt = simplify(extract_model(self.model, map_location=str(self.device)))
        rebuilt = rebuilt.to(device=self.device, dtype=self.dtype).eval()
        for p in rebuilt.parameters():
            p.requires_grad_(False)
        return rebuilt

    @staticmethod
    def _split(
        graphs: Sequence[Any], node_feats: torch.Tensor, vectors: torch.Tensor, e_frozen: torch.Tensor
    ) -> list[TrunkFeatures]:
        """Cut batch tensors back into per-structure CPU TrunkFeatures (local edge indices)."""
        out: list[TrunkFeatures] = []
        a0 = e0 = 0
        for i, g in enumerate(graphs):
            n_atoms = int(g.node_attrs.shape[0])
            n_edges = int(g.edge_index.shape[1])
            out.append({
                "node_feats": node_feats[a0:a0 + n_atoms].cpu(),  # [n, F]
                "species": g.node_attrs.argmax(dim=-1).cpu(),  # [n] element-table index
                "edge_index": g.edge_index.to(torch.int32).cpu(),  # [2, E] local
                "edge_vectors": vectors[e0:e0 + n_edges].cpu(),  # [E, 3] Angstrom
                "head": g.head.reshape(1).long().cpu(),  # [1]
                "e_frozen": e_frozen[i:i + 1].cpu(),  # [1] eV, float64
            })
            a0 += n_atoms
            e0 += n_edges
        return out

    # ------------------------------------------------------------------ batch / last block

    def collate(self, feats: Sequence[TrunkFeatures], device: str | torch.device = "cpu") -> TrunkBatch:
        """Concatenate TrunkFeatures; edge indices offset to batch-global atom indices."""
        edge_index, owners, heads = [], [], []
        a_off = 0
        for i, f in enumerate(feats):
            n_atoms = int(f["species"].shape[0])
            edge_index.append(f["edge_index"].long() + a_off)
            owners.append(torch.full((n_atoms,), i, dtype=torch.long))
            heads.append(f["head"].expand(n_atoms))
            a_off += n_atoms
        node_feats = torch.cat([f["node_feats"] for f in feats])  # [A, F]
        species = torch.cat([f["species"] for f in feats])  # [A]
        batch = {
            "node_feats": node_feats,
            "node_attrs": nn.functional.one_hot(species, len(self.z_list)).to(node_feats.dtype),
            "edge_index": torch.cat(edge_index, dim=1),  # [2, E]
            "edge_vectors": torch.cat([f["edge_vectors"] for f in feats]),  # [E, 3]
            "node_heads": torch.cat(heads),  # [A]
            "atom_owners": torch.cat(owners),  # [A]
            "n_atoms": torch.tensor([f["species"].shape[0] for f in feats], dtype=torch.long),
            "e_frozen": torch.cat([f["e_frozen"] for f in feats]),  # [B] eV
            "node_scalars": node_feats[:, self._trunk_scalar_cols],  # [A, D']
        }
        return batch_to_device(batch, device)

    def new_last_block(self) -> MaceLastBlock:
        return MaceLastBlock(self.model).to(self.device)

    def compile_template(self, last_block: LastBlock) -> MaceLastBlock:
        """A last block that ``torch.compile`` can trace, with the pretrained weights.

        e3nn runs its contractions as TorchScript, which Dynamo cannot trace into, and copying or
        pickling an e3nn module scripts them again. So the modules come from a model rebuilt for
        Dynamo (:meth:`_traceable_model`) and are used as they are, not copied: their
        contractions stay ``torch.fx`` graphs. The members' weights are passed in at call time.

        Raises:
            NotImplementedError: plain MACE (see :meth:`_traceable_model`); compiled members then
                fall back to the uncompiled loop.
        """
        return MaceLastBlock(self._traceable_model(), copy_modules=False).to(self.device).eval()

    def vmap_context(self) -> contextlib.AbstractContextManager[None]:
        """mace's interaction blocks scatter in place (see :func:`vmap_safe_scatter`), and e3nn's
        TorchScript'd contractions must not be fused (see :func:`no_jit_fusion`)."""
        stack = contextlib.ExitStack()
        stack.enter_context(vmap_safe_scatter())
        stack.enter_context(no_jit_fusion())
        return stack

    @torch.no_grad()
    def reference_energy(self, structures: Sequence[Structure]) -> torch.Tensor:
        """Full MACE forward (the model's own ``forward``), energy per atom [N] eV/atom."""
        graphs = [self.build_graph(s) for s in structures]
        data = self._batch_dict(graphs, self.device)
        out = self.model(data, training=False, compute_force=False)
        n = torch.tensor([len(s) for s in structures], dtype=torch.float64)
        return out["energy"].detach().double().cpu() / n
