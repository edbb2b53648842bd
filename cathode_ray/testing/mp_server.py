"""A local HTTP server that answers like the Materials Project API from recorded documents.

It lets the real ``mp_api.client.MPRester`` run offline (tests, demos)::

    with MPServer(summary_docs=docs, thermo_docs=thermo_docs_from_entries(entries)) as url:
        with MPRester(api_key="x" * 32, endpoint=url) as mpr:
            mpr.materials.summary.search(elements=["Li", "O", "Mn"], fields=["material_id"])

Routes (the ones ``MPRester`` uses for summary search and ``get_entries_in_chemsys``):

* ``GET /heartbeat`` -> ``{"db_version", "version", "access_controlled_batch_ids"}``
* ``GET /materials/summary/`` with ``elements``, ``exclude_elements``, ``chemsys``, ``formula``,
  ``material_ids``, ``nelements_min/max``, ``batch_id`` filters
* ``GET /materials/thermo/`` with ``chemsys``, ``thermo_types``, ``material_ids`` filters
  (documents from :func:`thermo_docs_from_entries` for hulls, :func:`thermo_docs_from_summary`
  for labels)

Both collection routes page with ``_skip``/``_limit`` and project with ``_fields``/``_all_fields``;
responses are ``{"data": [...], "meta": {"total_doc": N, ...}}``. An unknown filter parameter is
answered with HTTP 400 (never silently ignored), so a test notices when the client sends a filter
this server does not implement. The API key header is accepted but not checked.

Energies in the served documents are whatever was recorded (eV/atom for summary fields, eV for
entry totals); the server does not interpret them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pymatgen.core import Composition

from cathode_ray.data.sources import LABEL_FIELDS

#: Emmet version reported on /heartbeat; mp-api warns below its MIN_EMMET_VERSION (0.86.3rc0).
EMMET_VERSION: str = "0.86.3"
DEFAULT_DB_VERSION: str = "2025.04.10"
#: Paging parameters every collection route understands.
_PAGING = frozenset({"_skip", "_limit", "_fields", "_all_fields", "_page", "_per_page"})
_MAX_LIMIT: int = 1000

Doc = dict[str, Any]
Params = dict[str, str]


@dataclass(frozen=True, kw_only=True)
class LoggedRequest:
    """One request the server answered: path and flattened query parameters."""

    path: str
    params: dict[str, str]
    status: int


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def _doc_elements(doc: Doc) -> set[str]:
    if "elements" in doc:
        return {str(e) for e in doc["elements"]}
    return set(str(doc.get("chemsys", "")).split("-")) - {""}


def _chemsys_key(value: str) -> str:
    return "-".join(sorted(value.split("-")))


def _reduced_formula(doc: Doc) -> str:
    if "formula_pretty" in doc:
        return Composition(doc["formula_pretty"]).reduced_formula
    return ""


#: Filter name -> predicate(doc, raw value). Shared by summary and thermo collections.
_FILTERS: dict[str, Callable[[Doc, str], bool]] = {
    "elements": lambda d, v: set(_csv(v)) <= _doc_elements(d),
    "exclude_elements": lambda d, v: not (set(_csv(v)) & _doc_elements(d)),
    "chemsys": lambda d, v: (
        _chemsys_key(str(d.get("chemsys", ""))) in {_chemsys_key(c) for c in _csv(v)}
    ),
    "formula": lambda d, v: (
        _reduced_formula(d) in {Composition(f).reduced_formula for f in _csv(v)}
    ),
    "material_ids": lambda d, v: d.get("material_id") in set(_csv(v)),
    "nelements_min": lambda d, v: len(_doc_elements(d)) >= int(v),
    "nelements_max": lambda d, v: len(_doc_elements(d)) <= int(v),
    "thermo_types": lambda d, v: d.get("thermo_type") in set(_csv(v)),
    # Access-controlled batches (e.g. GNoME) are never served here.
    "batch_id": lambda d, v: d.get("batch_id") == v,
    "deprecated": lambda d, v: bool(d.get("deprecated", False)) == (v.lower() == "true"),
}


@dataclass
class _State:
    """Mutable server state, shared with the handler threads under a lock."""

    summary: list[Doc] = field(default_factory=list)
    thermo: list[Doc] = field(default_factory=list)
    db_version: str = DEFAULT_DB_VERSION
    max_limit: int = _MAX_LIMIT
    log: list[LoggedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _thermo_head(material_id: str, elements: list[str], thermo_type: str) -> Doc:
    """The identifying fields every thermo document has."""
    return {
        "material_id": material_id,
        "thermo_id": f"{material_id}_{thermo_type}",
        "thermo_type": thermo_type,
        "chemsys": "-".join(elements),
        "elements": elements,
        "nelements": len(elements),
    }


def thermo_docs_from_entries(
    entries: Iterable[Doc], *, thermo_type: str = "GGA_GGA+U"
) -> list[Doc]:
    """Wrap ComputedStructureEntry dicts as MP thermo documents (one per entry).

    Each document carries ``material_id``, ``thermo_id``, ``thermo_type``, ``chemsys``,
    ``elements``, ``nelements`` and ``entries`` = ``{run_type: entry_dict}``, which is what
    ``MPRester.get_entries`` unpacks. ``data.material_id`` of the entry names the material.
    """
    docs: list[Doc] = []
    for entry in entries:
        material_id = str(entry.get("data", {}).get("material_id") or entry["entry_id"])
        elements = sorted(Composition(entry["composition"]).chemical_system.split("-"))
        run_type = str(entry.get("parameters", {}).get("run_type", "GGA"))
        docs.append(
            _thermo_head(material_id, elements, thermo_type) | {"entries": {run_type: entry}}
        )
    return docs


def thermo_docs_from_summary(
    summary_docs: Iterable[Doc], *, thermo_type: str = "GGA_GGA+U"
) -> list[Doc]:
    """Thermo documents of ``thermo_type`` carrying each summary document's label fields.

    On the live API a material has one thermo document per thermo type, and the summary shows the
    mixed GGA/GGA+U/r2SCAN one's values; a recorded snapshot's labels are GGA/GGA+U. Serve these
    beside the summary documents to answer label queries like MP (without ``entries``; use
    :func:`thermo_docs_from_entries` for hull queries).
    """
    docs: list[Doc] = []
    for summary in summary_docs:
        material_id = str(summary["material_id"])
        elements = sorted(_doc_elements(summary))
        labels = {k: summary[k] for k in LABEL_FIELDS if k in summary}
        docs.append(_thermo_head(material_id, elements, thermo_type) | labels)
    return docs


def _flatten(query: str) -> Params:
    return {k: ",".join(v) for k, v in parse_qs(query, keep_blank_values=True).items()}


def _project(doc: Doc, params: Params) -> Doc:
    if params.get("_all_fields", "false").lower() == "true" or "_fields" not in params:
        return doc
    wanted = _csv(params["_fields"])
    return {k: doc[k] for k in wanted if k in doc}


def answer_collection(
    docs: Sequence[Doc], params: Params, *, db_version: str, max_limit: int = _MAX_LIMIT
) -> Doc:
    """Filter, page and project ``docs`` like an MP collection route.

    Raises:
        ValueError: for a filter parameter this server does not implement.
    """
    unknown = sorted(set(params) - _PAGING - set(_FILTERS))
    if unknown:
        raise ValueError(f"unsupported query parameter(s) {unknown}; known: {sorted(_FILTERS)}")
    hits = [d for d in docs if all(_FILTERS[k](d, v) for k, v in params.items() if k in _FILTERS)]
    skip = int(params.get("_skip", 0))
    limit = min(int(params.get("_limit", max_limit)), max_limit)
    page = [_project(d, params) for d in hits[skip : skip + limit]]
    meta = {
        "total_doc": len(hits),
        "max_limit": max_limit,
        "db_version": db_version,
        "api_version": EMMET_VERSION,
    }
    return {"data": page, "meta": meta}


def _make_handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            return  # keep test output quiet; requests are in MPServer.requests

        def _send(self, status: int, body: Doc) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            parts = urlsplit(self.path)
            path = "/" + parts.path.strip("/")
            params = _flatten(parts.query)
            status, body = self._route(path, params)
            with state.lock:
                state.log.append(LoggedRequest(path=path, params=params, status=status))
            self._send(status, body)

        def _route(self, path: str, params: Params) -> tuple[int, Doc]:
            with state.lock:
                collections = {
                    "/materials/summary": state.summary,
                    "/materials/thermo": state.thermo,
                }
                db_version, max_limit = state.db_version, state.max_limit
            if path == "/heartbeat":
                return 200, {
                    "db_version": db_version,
                    "version": EMMET_VERSION,
                    "access_controlled_batch_ids": [],
                }
            if path not in collections:
                return 404, {"error": f"no route {path} on the local MP server"}
            try:
                return 200, answer_collection(
                    collections[path], params, db_version=db_version, max_limit=max_limit
                )
            except ValueError as exc:
                return 400, {"error": str(exc)}

    return Handler


class MPServer:
    """Local MP-API-shaped server on 127.0.0.1 (ephemeral port), run in a daemon thread.

    ``max_limit`` caps a page (MP's is 1000) so tests can exercise the client's paging.
    Use as a context manager; ``__enter__`` returns the base URL (with a trailing slash, as
    ``MPRester`` expects, e.g. ``http://127.0.0.1:40123/``).
    """

    def __init__(
        self,
        *,
        summary_docs: Iterable[Doc] = (),
        thermo_docs: Iterable[Doc] = (),
        db_version: str = DEFAULT_DB_VERSION,
        max_limit: int = _MAX_LIMIT,
    ) -> None:
        if max_limit < 1:
            raise ValueError(f"max_limit must be >= 1, got {max_limit}")
        self._state = _State(
            summary=list(summary_docs),
            thermo=list(thermo_docs),
            db_version=db_version,
            max_limit=max_limit,
        )
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL ``http://127.0.0.1:PORT/``; raises if the server is not running."""
        if self._httpd is None:
            raise RuntimeError("MPServer is not running; use it as a context manager or start()")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/"

    @property
    def requests(self) -> list[LoggedRequest]:
        """Copy of the request log (path, params, HTTP status), oldest first."""
        with self._state.lock:
            return list(self._state.log)

    def set_db_version(self, db_version: str) -> None:
        """Change what /heartbeat reports as ``db_version`` (e.g. ``"2025.04.01"``)."""
        with self._state.lock:
            self._state.db_version = db_version

    def set_documents(
        self, summary_docs: Iterable[Doc] | None = None, thermo_docs: Iterable[Doc] | None = None
    ) -> None:
        """Replace the served summary and/or thermo documents (``None`` keeps the current)."""
        with self._state.lock:
            if summary_docs is not None:
                self._state.summary = list(summary_docs)
            if thermo_docs is not None:
                self._state.thermo = list(thermo_docs)

    def start(self) -> str:
        """Bind 127.0.0.1:0, serve in a daemon thread and return the base URL."""
        if self._httpd is not None:
            return self.url
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self._state))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="mp-server",
            daemon=True,
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd, self._thread = None, None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
