"""Row contracts shared by every stage: raw library rows, valid structure rows, reject rows.

A *raw row* is what a library reader yields before parsing (so that parsing errors become
reject rows, not exceptions)::

    {"structure_id": str, "source": str, "fmt": str, "payload": str, "error": str}

``fmt`` is one of ``cif``, ``poscar``, ``extxyz``, ``res``, ``pymatgen_json`` or ``error`` (the reader
could not even produce a payload, e.g. a truncated gzip; ``error`` then holds the reject code and
``payload`` the message). Extra label columns (``energy_above_hull`` ...) may ride along.

A *valid row* is a parsed, validated structure::

    {"structure_id", "source", "formula", "chemsys", "nsites", "structure_json", ...labels}

A *reject row* follows :data:`REJECT_SCHEMA`. Invariant everywhere: valid + rejects == inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import pyarrow as pa


class RejectCode(StrEnum):
    """Why an input did not become a result. Each code has a user-facing hint in REJECT_HINTS."""

    UNREADABLE_FILE = "unreadable_file"
    UNPARSEABLE = "unparseable"
    MULTIPLE_STRUCTURES = "multiple_structures"
    PARTIAL_OCCUPANCY = "partial_occupancy"
    UNSUPPORTED_ELEMENT = "unsupported_element"
    TOO_MANY_ATOMS = "too_many_atoms"
    DEGENERATE_LATTICE = "degenerate_lattice"
    NON_FINITE_COORDINATES = "non_finite_coordinates"
    OVERLAPPING_ATOMS = "overlapping_atoms"
    ISOLATED_ATOM = "isolated_atom"
    DUPLICATE_ID = "duplicate_id"
    OUT_OF_SCOPE = "out_of_scope"
    MISSING_LABEL = "missing_label"
    EMPTY_SOURCE = "empty_source"
    INFERENCE_FAILED = "inference_failed"


REJECT_SCHEMA = pa.schema(
    [
        pa.field("structure_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True, kw_only=True)
class Reject:
    """One input that was set aside, with a code and a message telling the user what to do."""

    structure_id: str
    source: str
    reason: RejectCode
    message: str

    def as_row(self) -> dict[str, str]:
        return {
            "structure_id": self.structure_id,
            "source": self.source,
            "reason": str(self.reason),
            "message": self.message,
        }


def short_error(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut at ``limit`` characters (for reject messages)."""
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
