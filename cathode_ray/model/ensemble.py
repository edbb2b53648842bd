"""The ensemble: one backbone, its frozen trunk run once per structure, M members on top.

``Ensemble.load(model_dir)`` verifies every file's sha256 against the manifest before any tensor
is read, checks that the installed backbone is the one the members were trained on, and builds
the members. ``predict_batch`` runs all members on one collated trunk batch (shared trunk), from
cached features (``predict_feats``, training) or straight from graphs with the trunk's output kept
on the device (``predict_graphs``, the screen):

- head-only ensembles: the pretrained last block once, M heads;
- last-block ensembles: the M last blocks + heads one after another (default), or stacked into
  one vectorised call (:class:`~cathode_ray.model.stacked.StackedMembers`, ``stack_members=True``;
  falls back to the loop when a backbone's ops cannot be vmapped). Measured on CPU the stacked
  call is slower (0.72x the loop with CHGNet, 0.57x with a MACE-MP-0-medium-shaped model,
  ``scripts/bench_ensemble.py``); on an H100 it gains 6 % for CHGNet. MACE fell back to the loop
  there (TorchScript's fused kernels cannot be vmapped); its stacked call now runs with the fuser
  off (``MaceBackbone.vmap_context``), not yet measured on a GPU;
- or through one ``torch.compile``d function (:class:`~cathode_ray.model.compiled.CompiledLastBlocks`,
  ``compile_model=True``, float32 only; falls back to the loop when compiling fails).

``compile_model=True`` also compiles the trunk (``Backbone.compile_trunk``; :meth:`Ensemble.trunk_batch`)
and a head-only ensemble's one last block; each part falls back by itself, logged. Measured on CPU:
see ``docs/performance.md``.

``precision`` (``float32`` | ``tf32`` | ``bf16``) applies to the last block(s); heads stay float32.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from cathode_ray.data.splits import SoapClusterer

from .artifact import ArtifactIntegrityError, ModelDir
from .backbones import Backbone, TrunkBatch, TrunkBatchFn, TrunkFeatures, load_backbone
from .compiled import CompiledLastBlocks, LastBlockFn
from .head import HeadConfig
from .member import Member, Normalizer, ThermoInputs
from .prediction import EnsemblePrediction
from .stacked import StackedMembers, check_precision, precision_deviation

log = logging.getLogger(__name__)
T = TypeVar("T")


def _one_call_at_a_time(method: Callable[..., T]) -> Callable[..., T]:
    """Run ``method`` under the ensemble's lock.

    A GPU inference actor takes two calls at once (threads), and so may a notebook. The model's
    paths keep state that two threads would share: Dynamo compiles on a compiled function's first
    call (two first calls at once fail, "Attempted to inline function marked as skipped"; then the
    ensemble falls back to eager), ``torch.func.functional_call`` swaps weights into the one stacked
    or compile-template module (and MACE's bf16 path into each member), and the TF32, TorchScript
    fuser and vmap switches are process-wide. So the model runs one call at a time; what the
    second call overlaps is the work around it (reading blocks, unpickling graphs, writing output).
    """

    @functools.wraps(method)
    def locked(self: Ensemble, *args: Any, **kwargs: Any) -> T:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


@dataclass
class Ensemble:
    """A loaded, verified ensemble ready for inference (eval mode, no grad)."""

    backbone: Backbone
    members: list[Member]
    normalizer: Normalizer
    manifest: dict[str, Any]
    uri: str
    files: dict[str, bytes]
    precision: str = "float32"
    stack_members: bool = False
    compile_model: bool = False
    _stacked: StackedMembers | None = field(default=None, repr=False)
    _compiled: CompiledLastBlocks | None = field(default=None, repr=False)
    _compiled_trunk: TrunkBatchFn | None = field(default=None, repr=False)
    #: parts that failed to compile and run uncompiled from then on ("trunk", "members") -> reason
    compile_failures: dict[str, str] = field(default_factory=dict, init=False)
    #: the model runs one call at a time (see :func:`_one_call_at_a_time`)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.stack_members and self.compile_model:
            raise ValueError("stack_members and compile_model are alternatives: choose one")

    @property
    def shared_last_block(self) -> bool:
        """True for head-only ensembles: every member uses the pretrained last block."""
        return not self.manifest.get("config", {}).get("train_last_block", True)

    @property
    def model_id(self) -> str:
        return str(self.manifest["model_id"])

    @classmethod
    def load(cls, uri: str, *, device: str = "cpu", backbone: Backbone | None = None,
             precision: str = "float32", stack_members: bool = False,
             compile_model: bool = False) -> Ensemble:
        md = ModelDir(uri=uri)
        manifest = md.read_manifest(verify=False)
        files = md.verify(manifest)  # raises before anything is deserialised
        bb = backbone or load_backbone(manifest["backbone"]["spec"], device=device,
                                       expected_sha256=manifest["backbone"]["weights_sha256"])
        want = manifest["backbone"]
        if bb.weights_sha256 != want["weights_sha256"] or abs(bb.cutoff - float(want["cutoff"])) > 1e-9:
            raise ArtifactIntegrityError(
                f"{uri}: members were trained on backbone {want['name']} (sha256 "
                f"{want['weights_sha256'][:12]}, cutoff {want['cutoff']} A) but the installed one is "
                f"{bb.name} (sha256 {bb.weights_sha256[:12]}, cutoff {bb.cutoff} A)"
            )
        normalizer = Normalizer.from_json(files["normalizer.json"].decode())
        head = HeadConfig(**manifest["config"]["head"])
        members = []
        for m in manifest["members"]:
            member = Member.create(bb, head, normalizer)
            member.load_state_dict(ModelDir.load_tensors(files[m["file"]]))
            members.append(member.to(device).eval())
        if not members:
            raise ArtifactIntegrityError(f"{uri}: manifest lists no members")
        return cls(backbone=bb, members=members, normalizer=normalizer, manifest=manifest, uri=uri,
                   files=files, precision=check_precision(precision), stack_members=stack_members,
                   compile_model=compile_model)

    def soap_clusterer(self) -> SoapClusterer | None:
        """The dataset's SOAP cluster model, to assign clusters to new structures."""
        data = self.files.get("soap_clusterer.json")
        return None if data is None else SoapClusterer.from_dict(json.loads(data))

    @_one_call_at_a_time
    def member_outputs(self, batch: TrunkBatch, thermo: ThermoInputs, precision: str | None = None,
                       ) -> dict[str, torch.Tensor]:
        """Every member's outputs on one collated batch, stacked: each value [M, B] (or [M, B, D])."""
        precision = self.precision if precision is None else precision
        compiled = self.compile_model and precision == "float32" and "members" not in self.compile_failures
        if self.shared_last_block:  # head-only members: one last-block pass, M heads
            def inputs(last_block: LastBlockFn | None = None) -> tuple[torch.Tensor, ...]:
                return self.members[0].head_inputs(batch, thermo, precision, last_block)

            if compiled:
                x, zs, e_pa = self._compiled_part("members", lambda: inputs(self._compiled_last_block(0)), inputs)
            else:
                x, zs, e_pa = inputs()
            outs = [m.outputs(x, zs, e_pa, thermo.has_ref) for m in self.members]
        elif compiled:
            outs = self._compiled_part(
                "members", lambda: [m(batch, thermo, "float32", self._compiled_last_block(i))
                                    for i, m in enumerate(self.members)],
                lambda: [m(batch, thermo) for m in self.members],
            )
        elif self.stack_members and len(self.members) > 1:
            try:
                if self._stacked is None:
                    self._stacked = StackedMembers(self.members, context=self.backbone.vmap_context)
                return self._stacked(batch, thermo, precision)
            except Exception as exc:  # noqa: BLE001 - a backbone op without a vmap rule
                outs = [m(batch, thermo, precision) for m in self.members]  # raises if not vmap's fault
                log.warning("stacked members failed (%s); running members one after another", _reason(exc))
                self.stack_members, self._stacked = False, None
        else:
            outs = [m(batch, thermo, precision) for m in self.members]
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}

    @_one_call_at_a_time
    def trunk_batch(self, graphs: Sequence[Any], device: str | torch.device = "cpu") -> TrunkBatch:
        """The backbone's frozen trunk on ``graphs``, collated on ``device`` (the screen's path);
        compiled (``Backbone.compile_trunk``) when ``compile_model`` is on."""
        if not self.compile_model or "trunk" in self.compile_failures:
            return self.backbone.trunk_batch(graphs, device)

        def compiled() -> TrunkBatch:
            if self._compiled_trunk is None:
                self._compiled_trunk = self.backbone.compile_trunk()
            return self._compiled_trunk(graphs, device)

        return self._compiled_part("trunk", compiled, lambda: self.backbone.trunk_batch(graphs, device))

    def _compiled_last_block(self, i: int) -> LastBlockFn:
        """Member ``i``'s last block through the members' one compiled function (built once)."""
        if self._compiled is None:
            blocks = [m.last_block for m in self.members[:1 if self.shared_last_block else None]]
            self._compiled = CompiledLastBlocks(self.backbone.compile_template(blocks[0]), blocks)
        return self._compiled.member(i)

    def _compiled_part(self, part: str, compiled: Callable[[], T], uncompiled: Callable[[], T]) -> T:
        """``compiled()``; on its first failure (no compiler, an op Dynamo cannot trace), ``part``
        runs ``uncompiled()`` from then on, logged and recorded in :attr:`compile_failures`."""
        try:
            return compiled()
        except Exception as exc:  # noqa: BLE001 - compiler or tracer failure
            out = uncompiled()  # raises if not the compiler's fault
            self.compile_failures[part] = _reason(exc)
            log.warning("compiled %s failed (%s); running the %s uncompiled", part, _reason(exc), part)
            return out

    @torch.inference_mode()
    @_one_call_at_a_time
    def precision_deviation(self, batch: TrunkBatch, thermo: ThermoInputs, *,
                            precision: str | None = None) -> float:
        """Largest |q50 or energy| change (eV/atom) of ``precision`` against float32 on one
        collated batch (``backbone.trunk_batch`` or ``collate``).

        ``inf`` when the backbone's ops cannot run at that precision (logged).
        """
        precision = self.precision if precision is None else check_precision(precision)
        th = thermo.to(batch["n_atoms"].device)
        try:
            return precision_deviation(lambda p: self.member_outputs(batch, th, p), precision)
        except Exception as exc:  # noqa: BLE001 - ops without a kernel for that dtype
            log.warning("%s inference is not supported by backbone %s (%s: %s)", precision,
                        self.backbone.name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return float("inf")

    @torch.inference_mode()
    def predict_batch(self, batch: TrunkBatch, thermo: ThermoInputs) -> EnsemblePrediction:
        """All members on one collated trunk batch (the trunk is shared); numpy out."""
        out = self.member_outputs(batch, thermo.to(batch["n_atoms"].device))
        arr = lambda k: out[k].float().cpu().numpy()  # noqa: E731  [M, B]
        return EnsemblePrediction(
            q10=arr("q10"), q50=arr("q50"), q90=arr("q90"), p_stable=arr("p_stable"),
            p_metastable=arr("p_metastable"),
            embedding=self.backbone.trunk_embedding(batch).float().cpu().numpy(),  # [B, D]
            zero_shot_ehull=arr("zero_shot")[0],  # [B] (member 0's last block)
            has_reference=thermo.has_ref.cpu().numpy().astype(bool),
        )

    def predict_feats(self, feats: Sequence[TrunkFeatures], thermo: ThermoInputs, *,
                      device: str = "cpu") -> EnsemblePrediction:
        """All members on one batch of cached trunk features (training and reports)."""
        return self.predict_batch(self.backbone.collate(feats, device), thermo)

    def predict_feats_batched(self, feats: Sequence[TrunkFeatures], thermo: ThermoInputs, *,
                              device: str = "cpu", batch_size: int = 64) -> EnsemblePrediction:
        """:meth:`predict_feats` over cached features in chunks of ``batch_size``."""
        parts = []
        for s in range(0, len(feats), batch_size):
            sl = slice(s, s + batch_size)
            th = ThermoInputs(hull_pa=thermo.hull_pa[sl], corr_pa=thermo.corr_pa[sl], has_ref=thermo.has_ref[sl])
            parts.append(self.predict_feats(feats[sl], th, device=device))
        return EnsemblePrediction.concat(parts)

    def predict_graphs(self, graphs: Sequence[Any], thermo: ThermoInputs, *, device: str = "cpu",
                       batch_size: int = 32) -> EnsemblePrediction:
        """Trunk then members, in chunks of ``batch_size`` structures; the trunk's output stays
        on ``device`` (:meth:`trunk_batch`)."""
        parts = []
        for s in range(0, len(graphs), batch_size):
            sl = slice(s, s + batch_size)
            th = ThermoInputs(hull_pa=thermo.hull_pa[sl], corr_pa=thermo.corr_pa[sl], has_ref=thermo.has_ref[sl])
            parts.append(self.predict_batch(self.trunk_batch(graphs[sl], device), th))
        return EnsemblePrediction.concat(parts)


def _reason(exc: BaseException) -> str:
    """``Type: first line of the message`` for a log line."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def as_numpy_prediction(pred: EnsemblePrediction) -> dict[str, np.ndarray]:
    """Flatten an EnsemblePrediction into named arrays (for debugging and reports)."""
    return {k: getattr(pred, k) for k in ("q10", "q50", "q90", "p_stable", "p_metastable",
                                          "embedding", "zero_shot_ehull", "has_reference")}
