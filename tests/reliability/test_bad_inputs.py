"""Item 1: a corpus of bad input files through the real screen pipeline (Ray Data + CHGNet).

Every bad file lands in DEST/rejects with its own code and an actionable message, the good files
(MP structures, and every supported format with its quirks: multi-block and journal CIFs, Latin-1,
byte-order marks) become results, the job completes and ``results + rejects == inputs``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cathode_ray.data.library import iter_library
from cathode_ray.data.records import RejectCode
from cathode_ray.screen import runs
from cathode_ray.screen.pipeline import ScreenConfig, ScreenSummary, run
from tests.data.badfiles import SHARED_ID, write_bad_library
from tests.data.badfiles import write_good_library as write_every_format
from tests.reliability.helpers import local_ray, run_output, write_good_library

pytestmark = pytest.mark.slow

#: Words of which a reject message must contain at least one: it tells the user what to do.
ACTION_WORDS: tuple[str, ...] = ("use ", "fix", "remove", "check", "give", "split", "re-export",
                                 "re-download", "add ", "raise", "reorder", "order the", "relax",
                                 "screen this")


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A private local Ray for this module."""
    with local_ray() as address:
        yield address


def _config(model: str, references: str, library: Path, out: Path, run_id: str) -> ScreenConfig:
    return ScreenConfig(library=str(library), model=model, out=str(out), references=references,
                        run_id=run_id, min_rows_per_file=8, verbose=False)


@pytest.fixture(scope="module")
def corpus_run(ray_address: str, model: str, references: str,
               tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[ScreenSummary, dict[str, RejectCode], list[str], Path]:
    """One screen of write_bad_library (+ 3 good structures): (summary, expected, good ids, DEST)."""
    root = tmp_path_factory.mktemp("corpus")
    expected = write_bad_library(root / "lib" / "bad")
    good_ids = write_good_library(root / "lib" / "good", n=3, files=1)
    write_every_format(root / "lib" / "formats")
    good_ids += [r["structure_id"] for r in iter_library(str(root / "lib"))  # ids as the screen reads them
                 if "/formats/" in r["source"]]
    summary = run(_config(model, references, root / "lib", root / "dest", "corpus"))
    return summary, expected, good_ids, root / "dest"


def test_every_bad_file_is_rejected_with_its_code_and_a_hint(
        corpus_run: tuple[ScreenSummary, dict[str, RejectCode], list[str], Path]) -> None:
    summary, expected, good_ids, dest = corpus_run
    results, rejects = run_output(str(dest), "corpus")
    n_inputs = len(expected) + len(good_ids)
    # the job completed and accounted for every input exactly once
    assert summary.n_inputs == n_inputs
    assert len(results) + len(rejects) == n_inputs
    assert sorted(results) == sorted(good_ids)
    manifest = runs.read_json(runs.RunPaths(dest=str(dest), run_id="corpus").manifest)
    assert manifest is not None and manifest["status"] == "complete"
    assert manifest["invariant"]["results_plus_rejects_equals_inputs"]
    # each bad file: exactly one reject, with its own code and a message saying what to do
    by_file: dict[str, list[dict[str, Any]]] = {}
    for r in rejects:
        by_file.setdefault(Path(r["source"]).name, []).append(r)
    assert sorted(by_file) == sorted(expected)
    for name, code in expected.items():
        (row,) = by_file[name]
        assert row["reason"] == str(code), f"{name}: {row['reason']} != {code} ({row['message']})"
        message = row["message"].lower()
        assert len(message) > 20 and any(w in message for w in ACTION_WORDS), (
            f"{name}: message does not tell the user what to do: {row['message']!r}")
        assert row["run_id"] == "corpus"
    dup = by_file["zz_duplicate_id.json"][0]
    assert dup["structure_id"] == SHARED_ID and dup["occurrence"] == 1
    assert summary.reject_reasons == {str(c): list(expected.values()).count(c)
                                      for c in set(expected.values())}


def test_library_with_only_an_empty_file_completes(ray_address: str, model: str, references: str,
                                                   tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "structures.jsonl").write_text("")
    summary = run(_config(model, references, lib, tmp_path / "dest", "empty"))
    assert (summary.n_inputs, summary.n_results, summary.n_rejects) == (1, 0, 1)
    results, rejects = run_output(str(tmp_path / "dest"), "empty")
    assert not results
    (row,) = rejects
    assert row["reason"] == str(RejectCode.EMPTY_SOURCE)
    assert "no structures" in row["message"] and "remove it" in row["message"]
    manifest = runs.read_json(runs.RunPaths(dest=str(tmp_path / "dest"), run_id="empty").manifest)
    assert manifest is not None and manifest["status"] == "complete"
    assert manifest["n_inputs"] == 1 and json.dumps(manifest["reject_reasons"]) == (
        '{"empty_source": 1}')


def test_library_without_structure_files_is_refused_clearly(ray_address: str, model: str,
                                                            references: str,
                                                            tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "README.txt").write_text("notes, not structures\n")
    with pytest.raises(FileNotFoundError, match="no structure files"):
        run(_config(model, references, lib, tmp_path / "dest", "nofiles"))
    assert not (tmp_path / "dest" / "results").exists()
    assert not (tmp_path / "dest" / "rejects").exists()
