"""Fixtures of the reliability tests (see docs/reliability.md)."""

from __future__ import annotations

import pytest

from tests.reliability.helpers import BUNDLED_MODEL, REFERENCES_FILE, missing_data_message


@pytest.fixture(scope="session")
def references() -> str:
    """``snapshot:`` reference source of the shared MP entries (skips when absent)."""
    if (msg := missing_data_message()) is not None:
        pytest.skip(msg)
    return f"snapshot:{REFERENCES_FILE}"


@pytest.fixture(scope="session")
def model(references: str) -> str:
    """The bundled calibrated model directory (hash-verified on load)."""
    return str(BUNDLED_MODEL)
