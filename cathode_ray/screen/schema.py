"""The pyarrow schemas of screening output: one result row per screened structure, one reject row
per input that did not become a result. Energies are eV/atom; probabilities and scores in [0, 1].

:func:`conform` casts a table to a schema, adding missing nullable columns and failing loudly on
missing required columns, wrong types or nulls in non-nullable fields.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from cathode_ray.data.records import REJECT_SCHEMA

RESULT_SCHEMA = pa.schema(
    [
        pa.field("structure_id", pa.string(), nullable=False),
        pa.field("formula", pa.string(), nullable=False),  # reduced formula
        pa.field("chemsys", pa.string(), nullable=False),  # e.g. "Co-Li-O"
        pa.field("nsites", pa.int32(), nullable=False),
        pa.field("e_hull_pred", pa.float64(), nullable=False),  # E_hull estimate >= 0, eV/atom (e_hull_source)
        pa.field("e_hull_lo", pa.float64(), nullable=False),  # calibrated lower bound >= 0, eV/atom
        pa.field("e_hull_hi", pa.float64(), nullable=False),  # calibrated upper bound, eV/atom
        pa.field("q10", pa.float64(), nullable=False),  # aggregated raw q10, eV/atom
        pa.field("q90", pa.float64(), nullable=False),  # aggregated raw q90, eV/atom
        pa.field("epistemic_std", pa.float64(), nullable=False),  # member spread of q50, eV/atom
        pa.field("aleatoric_width", pa.float64(), nullable=False),  # mean q90 - q10, eV/atom
        pa.field("p_stable", pa.float64(), nullable=False),  # P(E_hull < 0.05 eV/atom)
        pa.field("p_metastable", pa.float64(), nullable=False),  # P(E_hull < 0.10 eV/atom)
        pa.field("ood_score", pa.float64(), nullable=False),  # [0, 1]
        pa.field("ood_gates", pa.string(), nullable=False),  # comma-joined fired gates, "" if none
        pa.field("soap_cluster", pa.int32()),  # null when the model has no SOAP clusterer
        pa.field("decision", pa.string(), nullable=False),  # KEEP / MAYBE / KILL
        pa.field("decision_reason", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("has_reference", pa.bool_(), nullable=False),  # reference hull existed
        pa.field("zero_shot_ehull", pa.float64()),  # backbone E_hull, eV/atom, unclipped; null w/o refs
        # which estimate e_hull_pred is: "ensemble", or "zero_shot" for a new chemical system
        # (cathode_ray.calibrate.fallback); null in results written before the column existed
        pa.field("e_hull_source", pa.string()),
    ]
)

#: Rejects: :data:`REJECT_SCHEMA` plus ``occurrence`` (0 for the first input with an id, k for
#: the k-th later duplicate; makes every input addressable for resume) and ``run_id``.
SCREEN_REJECT_SCHEMA = pa.schema(
    [
        *REJECT_SCHEMA,
        pa.field("occurrence", pa.int32(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)


def required_columns(schema: pa.Schema) -> list[str]:
    """Names of the non-nullable fields of ``schema``."""
    return [f.name for f in schema if not f.nullable]


class SchemaError(ValueError):
    """A table does not conform to a screening schema."""


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly the columns of ``schema`` (in order, cast to its types).

    Missing nullable columns are added as nulls; extra columns are dropped.

    Raises:
        SchemaError: a required column is missing, a value cannot be cast, or a non-nullable
            column holds nulls (or NaN for floats).
    """
    columns: list[pa.Array] = []
    for field in schema:
        if field.name not in table.column_names:
            if not field.nullable:
                raise SchemaError(f"required column {field.name!r} is missing "
                                  f"(have {table.column_names})")
            columns.append(pa.nulls(table.num_rows, type=field.type))
            continue
        col = table.column(field.name)
        try:
            col = col.cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise SchemaError(f"column {field.name!r} ({col.type}) cannot be cast to "
                              f"{field.type}: {exc}") from exc
        if not field.nullable:
            bad = col.null_count
            if pa.types.is_floating(field.type):
                bad += int(pc.sum(pc.is_nan(col)).as_py() or 0)
            if bad:
                raise SchemaError(f"column {field.name!r} has {bad} null/NaN values but is "
                                  "required")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)
