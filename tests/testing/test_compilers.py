"""cxx_compiler_available looks for a C++ compiler on PATH."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cathode_ray.testing.compilers import cxx_compiler_available


def test_finds_a_compiler_on_path_and_none_without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not cxx_compiler_available()
    fake = tmp_path / "clang++"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert cxx_compiler_available()
    os.remove(fake)
    assert not cxx_compiler_available()
