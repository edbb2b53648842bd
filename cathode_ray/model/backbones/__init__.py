"""Backbone adapters behind one interface (see :mod:`.base`); :func:`load_backbone` picks one."""

from __future__ import annotations

from .base import Backbone, LastBlock, TrunkBatch, TrunkBatchFn, TrunkFeatures

__all__ = ["Backbone", "LastBlock", "TrunkBatch", "TrunkBatchFn", "TrunkFeatures", "load_backbone"]


def load_backbone(spec: str, *, device: str = "cpu", expected_sha256: str | None = None) -> Backbone:
    """Backbone from a spec string.

    ``chgnet`` (CHGNet 0.3.0 shipped in the chgnet wheel), ``mace-mp-0-medium`` (and the other
    names :func:`mace.calculators.mace_mp` knows: ``mace-mp-0-small``, ``mace-mp-0-large``,
    ``mace-mpa-0-medium``, ...; downloaded and cached by mace), or ``mace:PATH`` for a local
    ``.model`` file. ``expected_sha256`` (a model manifest's ``backbone.weights_sha256``): a MACE
    file (a pickled module) must have it before it is unpickled; CHGNet's weights come from the
    installed wheel and are compared by the caller.
    """
    if spec == "chgnet" or spec.startswith("chgnet-"):
        from .chgnet import ChgnetBackbone

        return ChgnetBackbone(device=device)
    if spec.startswith("mace"):
        from .mace import MaceBackbone

        return MaceBackbone.from_spec(spec, device=device, expected_sha256=expected_sha256)
    raise ValueError(
        f"unknown backbone {spec!r}: use 'chgnet', 'mace-mp-0-medium' (or another MACE foundation "
        "name) or 'mace:PATH' for a local .model file"
    )
