"""Structure libraries: list files, read them into raw rows, parse raw rows into Structures.

A *library* is a local file, a directory (searched recursively), a glob, or an ``s3://bucket/prefix``.
Supported files (each optionally gzipped: ``.gz``, though gzip data is recognised by its content):

========================  ======================================================================
suffix                    content
========================  ======================================================================
``.cif``                  one raw row per data block with atom sites (metadata-only blocks, such
                          as a journal's ``data_global``, are skipped)
``.vasp``/``*POSCAR*``    one VASP POSCAR/CONTCAR (``.poscar``, or any name holding ``POSCAR`` or
                          ``CONTCAR``, as pymatgen and ASE take them, unless another suffix of
                          this table says otherwise: ``CONTCARs.extxyz`` is extended XYZ); VASP 4
                          files without a species line may name the species on their comment line
``.xyz``/``.extxyz``      extended XYZ, one raw row per frame
``.res``                  SHELX/AIRSS ``.res``, one raw row per ``TITL`` block (AIRSS results
                          concatenated into one file read as they are); the id is the name on the
                          ``TITL`` line (AIRSS's structure name) when there is one
``.db``/``.traj``         an ASE database (one raw row per row; ``structure_id``/``material_id``
                          and label keys ride along) or ASE trajectory (one per frame); each
                          structure becomes extended-XYZ text, the file is read from a copy
``vasprun*.xml*``         a VASP run's final ionic step (one raw row; read by ASE like the above);
                          a run that did not finish (no closing ``</modeling>``) is unreadable
``.json``                 a pymatgen ``Structure.as_dict()``, an item, a list of either, or
                          items written one after another (JSON lines saved as ``.json``)
``.jsonl``/``.ndjson``    one item or Structure dict per line (e.g. Materials Project summary docs)
``.parquet``              a ``cif`` or ``structure_json`` column (+ optional ``structure_id`` /
                          ``material_id`` and label columns), read in record batches; with
                          several, each row uses its first filled one of ``structure_json``,
                          ``cif``, ``structure``
========================  ======================================================================

An *item* is a dict ``{"structure_id" | "material_id" | "entry_id": ..., "structure": {...},
<labels>}`` (a pymatgen ``ComputedStructureEntry.as_dict()`` is one); the
structure may also be CIF text, under ``structure`` or ``cif`` (as in Parquet, where a ``structure``
or ``structure_json`` column may hold CIF text too).

Readers never parse structures: they yield raw rows (see :mod:`cathode_ray.data.records`) whose
``payload`` is text, so that a broken structure becomes a reject row in
:func:`cathode_ray.data.parse.parse_raw`, never an exception that kills a job. A file that cannot be
read at all (truncated gzip, corrupt Parquet, not UTF-8) yields one ``fmt="error"`` row with code
``unreadable_file``; an empty file yields one ``empty_source`` row. Text is UTF-8 (a byte-order
mark is ignored) or UTF-16 with its byte-order mark; CIF, POSCAR and XYZ files that are not UTF-8
but hold no NUL bytes are read as Windows-1252 (CIFs exported on Windows often are), or Latin-1.

Structure ids are stable: the id given in the file (``structure_id``, ``material_id`` or a pymatgen
entry's ``entry_id``, first found), else ``<file name>#<index within the file>``
(``<parent dir>/POSCAR#0``, ``<parent dir>/vasprun.xml#0`` for generic VASP names), else a
content hash.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cathode_ray.data.records import RejectCode, short_error
from cathode_ray.storage import filesystem_for, s3_path

log = logging.getLogger(__name__)

#: Label / provenance fields that ride along from a library item or Parquet column to the valid row.
PASSTHROUGH_FIELDS: tuple[str, ...] = (
    "energy_above_hull",  # eV/atom
    "formation_energy_per_atom",  # eV/atom
    "energy_per_atom",  # eV/atom
    "uncorrected_energy_per_atom",  # eV/atom
    "is_stable",
    "database_snapshot",
    "parent_id",
    "transformation",
)

#: Raw-row ``fmt`` values.
FORMATS: tuple[str, ...] = ("cif", "poscar", "extxyz", "res", "pymatgen_json", "error")

#: Rows per Parquet row group in the libraries this package writes, and per screen read task of
#: a large Parquet file: a task then decodes only its own row group.
LIBRARY_ROW_GROUP_ROWS = 1024

_ID_FIELDS: tuple[str, ...] = ("structure_id", "material_id", "entry_id")  # first found is the id
_PARQUET_BATCH_ROWS = 1024
_GENERIC_VASP_NAMES = ("POSCAR", "CONTCAR")
_VASPRUN = "vasprun"  # vasprun.xml, vasprun.xml.relax2 (custodian), vasprun.relax.xml, + .gz
#: The names VASP (and custodian, phonopy) give a run folder's structure files: POSCAR, CONTCAR,
#: POSCAR-001, CONTCAR.relax1, + .gz; vasprun*.xml*. Such a name says nothing without its folder.
_VASP_RUN_FILE = re.compile(r"^(?:(?:POSCAR|CONTCAR)(?:[.-].*)?|vasprun.*\.xml.*)$")
_ASE_SUFFIXES = {".db": "ASE .db", ".traj": "ASE .traj", ".xml": "VASP vasprun.xml"}
_GLOB_CHARS = re.compile(r"[*?\[]")
_GZIP_MAGIC = b"\x1f\x8b"
_WHITESPACE = re.compile(r"\s*")
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_OTHER_COMPRESSION = (".bz2", ".xz", ".zst", ".lzma", ".zip", ".7z")  # not read: gzip only
_CIF_BLOCK = re.compile(r"^[ \t]*data_(\S*)", re.IGNORECASE | re.MULTILINE)
_CIF_ATOM_SITES = re.compile(r"^[ \t]*_atom_site[._](?:fract|cartn)_x\b", re.IGNORECASE | re.MULTILINE)
_RES_TITL = re.compile(r"^[ \t]*TITL\b", re.MULTILINE)
_THUMBS_DB = "thumbs.db"  # Windows Explorer's thumbnail cache: a SQLite file, not an ASE database
_SUPPORTED = (".cif, POSCAR/.vasp, vasprun.xml, .xyz/.extxyz, .res, ASE .db/.traj, .json/.jsonl, "
              ".parquet (+ .gz)")
_XYZ_ID = re.compile(r"""(?:^|\s)(?:structure_id|material_id)=("[^"]*"|'[^']*'|\S+)""")

#: Errors that mean "this file cannot be read": they become one ``unreadable_file`` row.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    zlib.error,
    UnicodeDecodeError,
    pa.ArrowException,
)


# --------------------------------------------------------------------------- filesystems
# filesystem_for lives in cathode_ray.storage (shared by every stage).
def _uri(spec: str, path: str) -> str:
    """Turn a filesystem path back into the user's addressing scheme (URI or local path)."""
    scheme = urlparse(spec).scheme
    return f"{scheme}://{path}" if scheme and len(scheme) > 1 and scheme != "file" else path


# --------------------------------------------------------------------------- listing
def library_format(path: str) -> str | None:
    """Container format of a file from its name: ``cif``, ``poscar``, ``extxyz``, ``res``,
    ``ase``, ``json``, ``jsonl``, ``parquet``, or ``None`` when unsupported (``.gz`` is looked
    through; other compression, ``vasprun.xml.bz2`` say, is unsupported)."""
    name = PurePosixPath(path).name
    lower = name.lower()
    if lower.endswith(_OTHER_COMPRESSION):
        return None
    if lower.endswith(".gz"):
        name, lower = name[:-3], lower[:-3]
    suffix = PurePosixPath(lower).suffix
    if suffix == ".cif":
        return "cif"
    if lower.startswith(_VASPRUN) and ".xml" in lower:
        return "ase"
    if suffix in _SUFFIX_FORMATS:  # before the name rule: relaxed_CONTCARs.extxyz is extended XYZ
        return _SUFFIX_FORMATS[suffix]
    if any(n in name for n in _GENERIC_VASP_NAMES):  # as pymatgen and ASE take POSCAR/CONTCAR names
        return "poscar"
    return None


_SUFFIX_FORMATS = {".vasp": "poscar", ".poscar": "poscar", ".xyz": "extxyz", ".extxyz": "extxyz",
                   ".res": "res", ".db": "ase", ".traj": "ase", ".json": "json", ".jsonl": "jsonl",
                   ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True, kw_only=True)
class LibraryFile:
    """One file of a library as listed: where it is, its size (bytes) and last change."""

    uri: str  # local path or URI, in the user's addressing scheme
    size: int  # bytes
    mtime: str  # ISO 8601; "" when the store gives none


def list_library(spec: str) -> list[LibraryFile]:
    """All supported library files under ``spec`` (file, directory, glob or ``s3://`` prefix),
    sorted, with the size and time that the listing itself returns: an S3 prefix of 100,000
    objects costs 100 list requests, not 100,000 HEADs.

    A file named explicitly is returned even with an unsupported suffix (reading it then yields an
    ``unreadable_file`` row); files found by directory or glob search with unsupported suffixes
    (READMEs, logs) are skipped and counted in a log warning.

    Raises:
        FileNotFoundError: when ``spec`` does not exist or matches no supported file.
    """
    fs, path = filesystem_for(spec)
    info = fs.get_file_info(path)  # first: "sample[1].cif" and "LiCoO2 [mp-22526]/" are names
    root = path.rstrip("/") if info.type != pafs.FileType.NotFound else _root(path)
    if info.type == pafs.FileType.File:
        return [_library_file(spec, info)]
    if info.type == pafs.FileType.Directory:
        selector = pafs.FileSelector(path, recursive=True)
        found = [i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]
        if isinstance(fs, pafs.LocalFileSystem):  # pyarrow lists no dangling symlink
            found += [pafs.FileInfo(p, pafs.FileType.NotFound) for p in _dangling_links(path)]
    elif _GLOB_CHARS.search(path):
        found = _glob(fs, path)
    else:
        raise FileNotFoundError(
            f"library {spec!r} does not exist: give a file, a directory, a glob or s3://bucket/prefix"
        )
    supported = sorted((i for i in found if library_format(i.path) and not _hidden(i.path, root)),
                       key=lambda i: i.path)
    if len(supported) < len(found):
        skipped = sorted({i.path for i in found} - {i.path for i in supported})
        log.warning("%s: skipped %d unsupported or hidden files (e.g. %s)", spec, len(skipped),
                    ", ".join(PurePosixPath(p).name for p in skipped[:5]))
    if not supported:
        raise FileNotFoundError(
            f"no structure files ({_SUPPORTED}) found in {spec!r}"
        )
    _warn_vasp_runs_read_twice(spec, [i.path for i in supported])
    return [_library_file(spec, i) for i in supported]


def _warn_vasp_runs_read_twice(spec: str, paths: Sequence[str]) -> None:
    """Log when VASP run folders hold more than one structure file (POSCAR, CONTCAR, vasprun.xml):
    each becomes its own row (initial and final structure alike), which is rarely what is meant."""
    per_run: dict[str, int] = {}
    for path in paths:
        p = PurePosixPath(path)
        if _VASP_RUN_FILE.match(p.name):
            per_run[str(p.parent)] = per_run.get(str(p.parent), 0) + 1
    runs = sorted(d for d, n in per_run.items() if n > 1)
    if runs:
        log.warning("%s: %d VASP run folders hold several of POSCAR/CONTCAR/vasprun.xml (e.g. %s); "
                    "each file is screened as its own structure. For one structure per run give a "
                    "glob such as '%s/**/vasprun.xml*' or '%s/**/CONTCAR'", spec, len(runs),
                    PurePosixPath(runs[0]).name, spec.rstrip("/"), spec.rstrip("/"))


def list_library_files(spec: str) -> list[str]:
    """The paths/URIs of :func:`list_library`."""
    return [f.uri for f in list_library(spec)]


def _library_file(spec: str, info: pafs.FileInfo) -> LibraryFile:
    return LibraryFile(uri=_uri(spec, info.path), size=int(info.size or 0),
                       mtime=info.mtime.isoformat() if info.mtime is not None else "")


def _root(path: str, fs: pafs.FileSystem | None = None) -> str:
    """Filesystem path of a library's root: the directory, a glob's fixed leading folder, or
    (for one file) the file itself. With ``fs``, a path that exists as named is its own root,
    glob characters and all ("LiCoO2 [mp-22526]/")."""
    match = _GLOB_CHARS.search(path)
    if match and fs is not None and fs.get_file_info(path).type != pafs.FileType.NotFound:
        return path.rstrip("/")
    if match:
        return path[: match.start()].rsplit("/", 1)[0]
    return path.rstrip("/")


def file_labels(spec: str, files: Sequence[str]) -> list[str]:
    """Names for fallback ids (:func:`file_label`) of ``files`` as listed from ``spec``: paths
    relative to the library's root, so that ``a/structure.cif`` and ``b/structure.cif`` differ."""
    root = _root(*reversed(filesystem_for(spec)))
    return [file_label(_fs_path(f), root=root) for f in files]


def _fs_path(uri: str) -> str:
    """Path of a listed file inside its filesystem (``bucket/key`` on S3), without making one."""
    key = s3_path(uri)
    return key if key is not None else filesystem_for(uri)[1]


def _hidden(path: str, root: str) -> bool:
    """A dot-file, a file inside a dot-directory below ``root`` (``.ipynb_checkpoints/``,
    ``.git/``, a writer's ``.name.in-progress``), or Windows Explorer's ``Thumbs.db``."""
    rel = path[len(root):] if path.startswith(root) else PurePosixPath(path).name
    parts = PurePosixPath(rel).parts
    return any(part.startswith(".") for part in parts) or (
        bool(parts) and parts[-1].lower() == _THUMBS_DB)


def _dangling_links(directory: str) -> list[str]:
    """Symlinks below a local ``directory`` whose target is gone (a purged scratch file): listed,
    so that each becomes an ``unreadable_file`` row instead of vanishing from the inputs."""
    return [p for top, dirs, files in os.walk(directory, followlinks=True)
            for p in (os.path.join(top, n) for n in (*files, *dirs))
            if os.path.islink(p) and not os.path.exists(p)]


def _glob(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    if isinstance(fs, pafs.LocalFileSystem):
        matches = [os.path.abspath(p) for p in glob.glob(path, recursive=True)]
        return [i for i in fs.get_file_info(matches) if i.type == pafs.FileType.File
                or (i.type == pafs.FileType.NotFound and os.path.islink(i.path))]
    selector = pafs.FileSelector(_root(path), recursive=True, allow_not_found=True)
    infos = fs.get_file_info(selector)
    return [i for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]


# --------------------------------------------------------------------------- ids and rows
def file_label(path: str, *, root: str | None = None) -> str:
    """Name used in fallback ids: the path below ``root`` for a file in a subfolder of the
    library, else the file name, or ``<parent dir>/<name>`` for a name VASP gives every run
    folder (POSCAR, CONTCAR-like names, vasprun*.xml; not ``POSCAR_set.json``)."""
    if root and path.startswith(root.rstrip("/") + "/"):
        rel = path[len(root.rstrip("/")) + 1:]
        if "/" in rel:
            return rel
    p = PurePosixPath(path.replace("\\", "/"))
    if _VASP_RUN_FILE.match(p.name) and p.parent.name:
        return f"{p.parent.name}/{p.name}"
    return p.name


def make_structure_id(given: Any, file_name: str, index: int, payload: str = "") -> str:
    """Stable id: ``given`` when set, else ``<file_name>#<index>``, else a content hash of payload."""
    if given is not None and str(given).strip():
        return str(given).strip()
    if file_name:
        return f"{file_name}#{index}"
    return "sha1-" + hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]


def raw_row(structure_id: str, source: str, fmt: str, payload: str, **labels: Any) -> dict[str, Any]:
    """A raw row (see :mod:`cathode_ray.data.records`), with label fields riding along."""
    return {"structure_id": structure_id, "source": source, "fmt": fmt, "payload": payload,
            "error": "", **labels}


def error_row(structure_id: str, source: str, code: RejectCode, message: str) -> dict[str, Any]:
    """A raw row for something the reader could not turn into a payload."""
    return {"structure_id": structure_id, "source": source, "fmt": "error", "payload": message,
            "error": str(code)}


def _labels(item: dict[str, Any]) -> dict[str, Any]:
    """Scalar pass-through fields of an item (NaN floats are kept; validation reads them)."""
    out: dict[str, Any] = {}
    for key in PASSTHROUGH_FIELDS:
        value = item.get(key)
        if value is None or isinstance(value, bool | int | float | str):
            if key in item:
                out[key] = value
    return out


# --------------------------------------------------------------------------- reading
def read_library_file(path: str, fs: pafs.FileSystem | None = None, *,
                      rows: tuple[int, int] | None = None,
                      label: str | None = None) -> Iterator[dict[str, Any]]:
    """Yield raw rows for every structure in one library file; never raises on bad content.

    ``path`` is a local path or URI as returned by :func:`list_library_files`; ``fs`` (optional) is
    the filesystem it lives on, else resolved with :func:`filesystem_for`. ``rows=(start, stop)``
    reads only rows ``start <= index < stop`` of a Parquet file, so that one large file can be
    read by several tasks; ids and indices stay those of the whole file. ``label``: the file's
    name in fallback ids (:func:`file_labels`; default :func:`file_label` of the path).
    """
    if fs is None:
        fs, fs_path = filesystem_for(path)
    else:
        fs_path = s3_path(path) or path  # a path of the given filesystem as it is
    name = label or file_label(fs_path)
    fmt = library_format(fs_path)
    if fmt is None:
        yield error_row(name, path, RejectCode.UNREADABLE_FILE,
                        f"{path}: unsupported file type; use {_SUPPORTED}")
        return
    if rows is not None and fmt != "parquet":
        raise ValueError(f"{path}: row ranges are only supported for Parquet files")
    if isinstance(fs, pafs.LocalFileSystem) and os.path.islink(fs_path) and not os.path.exists(fs_path):
        yield error_row(name, path, RejectCode.UNREADABLE_FILE,
                        f"{path}: a symlink to {os.readlink(fs_path)!r}, which does not exist (a "
                        "purged scratch file?); restore the target or remove the link")
        return
    start = 0 if rows is None else rows[0]
    count = 0
    try:
        reader = (_READERS[fmt](fs, fs_path, path, name) if rows is None
                  else _read_parquet(fs, fs_path, path, name, rows=rows))
        for row in reader:
            count += 1
            yield row
    except _READ_ERRORS as exc:
        where = f" after {start + count} structures" if start + count else ""
        yield error_row(name if not start + count else f"{name}#{start + count}", path,
                        RejectCode.UNREADABLE_FILE,
                        f"{path}: cannot read file{where} ({type(exc).__name__}: {exc}); "
                        "re-export or re-download it (a .gz may be truncated)")
        return
    if count == 0 and start == 0:
        yield error_row(name, path, RejectCode.EMPTY_SOURCE,
                        f"{path}: file contains no structures; remove it or check the export")


def _open_bytes(fs: pafs.FileSystem, fs_path: str) -> bytes:
    """A whole file's bytes, gunzipped when they are gzip data (whatever the suffix says)."""
    with fs.open_input_stream(fs_path, compression=None) as stream:
        data = bytes(stream.read())
    return gzip.decompress(data) if data[:2] == _GZIP_MAGIC else data


def _open_text(fs: pafs.FileSystem, fs_path: str, *, latin1_fallback: bool = False) -> str:
    """A whole file as text: UTF-8 without its byte-order mark, or UTF-16 with one (Windows'
    "Unicode"); with ``latin1_fallback``, text that is not UTF-8 but holds no NUL byte (so is not
    binary) is read as Windows-1252, or as Latin-1 when it holds a byte Windows-1252 leaves
    undefined. Latin-1 alone read Windows' ellipsis (0x85) as U+0085, which ``str.splitlines``
    and pymatgen take for a line break."""
    data = _open_bytes(fs, fs_path)
    if data[:2] in _UTF16_BOMS:
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        if latin1_fallback and b"\x00" not in data:
            try:
                return data.decode("cp1252")
            except UnicodeDecodeError:
                return data.decode("latin-1").replace("\x85", "...")
        raise


def _gunzipped(stream: Any) -> BinaryIO:
    """A pyarrow input stream as a binary file object, gunzipped on the fly when it holds gzip
    data (whatever the suffix says)."""
    buffered = io.BufferedReader(stream)  # a pyarrow NativeFile is a RawIOBase
    return gzip.GzipFile(fileobj=buffered) if buffered.peek(2)[:2] == _GZIP_MAGIC else buffered


def _iter_lines(fs: pafs.FileSystem, fs_path: str) -> Iterator[str]:
    """Stream text lines (for JSON lines), gunzipping gzip data on the fly: UTF-8 (a leading
    byte-order mark is dropped) or UTF-16 with its byte-order mark (PowerShell's ``>``)."""
    with fs.open_input_stream(fs_path, compression=None) as stream:
        binary = _gunzipped(stream)
        utf16 = binary.peek(2)[:2] in _UTF16_BOMS
        yield from io.TextIOWrapper(binary, encoding="utf-16" if utf16 else "utf-8-sig")


def cif_structure_blocks(text: str) -> list[str]:
    """The data blocks of a CIF that hold atom sites, each as CIF text of its own.

    Blocks without ``_atom_site_fract_x`` / ``_atom_site_Cartn_x`` (a journal's ``data_global``
    with authors and citation, say) are left out; text before the first block is dropped.
    """
    starts = [m.start() for m in _CIF_BLOCK.finditer(text)]
    ends = [*starts[1:], len(text)] if starts else []
    blocks = [text[a:b] for a, b in zip(starts, ends, strict=True)]
    return [block for block in blocks if _CIF_ATOM_SITES.search(block)]


def _read_cif(fs: pafs.FileSystem, fs_path: str, source: str, name: str) -> Iterator[dict]:
    text = _open_text(fs, fs_path, latin1_fallback=True)
    if not text.strip():
        return
    blocks = cif_structure_blocks(text)
    if len(blocks) <= 1:  # the parser finds the one structure, or says why there is none
        yield raw_row(make_structure_id(None, name, 0, text), source, "cif", text)
        return
    for index, block in enumerate(blocks):
        yield raw_row(make_structure_id(None, name, index, block), source, "cif", block)


def _read_poscar(fs: pafs.FileSystem, fs_path: str, source: str, name: str) -> Iterator[dict]:
    text = _open_text(fs, fs_path, latin1_fallback=True)
    if text.strip():
        yield raw_row(make_structure_id(None, name, 0, text), source, "poscar", text)


def split_extxyz(text: str) -> list[str]:
    """Split extended-XYZ text into frames at their atom-count lines (no parsing of content).

    A frame runs from its count line to the next line holding only an integer (the next frame's
    count line; atom lines never are) or the end of the text, whatever its own count says: a count
    that disagrees with the frame's atom lines is then that frame's reject
    (:func:`cathode_ray.data.parse.parse_raw`), and the frames after it are read as they are.
    """
    lines = text.splitlines()
    frames: list[str] = []
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        end = i + 2  # count line, comment line, then atom lines
        while end < len(lines) and not lines[end].strip().isdigit():
            end += 1
        frames.append("\n".join(lines[i:end]) + "\n")
        i = end
    return frames


def _read_extxyz(fs: pafs.FileSystem, fs_path: str, source: str, name: str) -> Iterator[dict]:
    for index, frame in enumerate(split_extxyz(_open_text(fs, fs_path, latin1_fallback=True))):
        comment = frame.split("\n", 2)[1] if frame.count("\n") >= 2 else ""
        match = _XYZ_ID.search(comment)
        given = match.group(1).strip("\"'") if match else None
        yield raw_row(make_structure_id(given, name, index, frame), source, "extxyz", frame)


def split_res(text: str) -> list[str]:
    """Split SHELX/AIRSS ``.res`` text into one block per ``TITL`` line (AIRSS results are often
    concatenated into one file); text before the first ``TITL`` is dropped, and text without any
    is returned whole for the parser to accept or reject."""
    starts = [m.start() for m in _RES_TITL.finditer(text)]
    if not starts:
        return [text]
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def _read_res(fs: pafs.FileSystem, fs_path: str, source: str, name: str) -> Iterator[dict]:
    text = _open_text(fs, fs_path, latin1_fallback=True)
    if not text.strip():
        return
    for index, block in enumerate(split_res(text)):
        title = block.split("\n", 1)[0].split()  # AIRSS: TITL <name> <pressure> <volume> ...
        given = title[1] if len(title) > 1 and title[0].upper() == "TITL" else None
        if given is not None and ("=" in given or given == "None"):  # ASE: TITL key=value ... / None
            given = None
        yield raw_row(make_structure_id(given, name, index, block), source, "res", block)


def _read_ase(fs: pafs.FileSystem, fs_path: str, source: str, name: str) -> Iterator[dict]:
    """ASE database rows, trajectory frames or a vasprun.xml's final ionic step, each as an
    extended-XYZ payload.

    ASE reads only real files, and connecting to a database may write to it (an empty file gets
    tables), so the file is copied (gunzipped) into a temporary folder first and the user's file is
    never opened for writing. A file ASE cannot read raises OSError (one ``unreadable_file`` row,
    after the rows read before it), and so does a vasprun.xml without its closing tag: ASE would
    return the last finished ionic step of a killed run as if it were the result. A row that cannot
    be written as XYZ becomes a reject row.
    """
    suffix = _ase_suffix(fs_path)
    with tempfile.TemporaryDirectory(prefix="cathode-ray-ase-") as tmp:
        local = os.path.join(tmp, "library" + suffix)
        with fs.open_input_stream(fs_path, compression=None) as stream, open(local, "wb") as out:
            shutil.copyfileobj(_gunzipped(stream), out, 1 << 20)
        if os.path.getsize(local) == 0:
            return
        if suffix == ".xml":
            _check_vasprun_finished(local)
        for index, (atoms, keys) in enumerate(_ase_items(local, suffix)):
            given = next((keys[k] for k in _ID_FIELDS if keys.get(k) is not None), None)
            try:
                text = _extxyz_text(atoms)
            except Exception as exc:  # noqa: BLE001 - untrusted content: a reject, not a crash
                yield error_row(make_structure_id(given, name, index), source,
                                RejectCode.UNPARSEABLE, f"{source} item {index}: cannot convert "
                                f"({type(exc).__name__}: {short_error(exc)})")
            else:
                yield raw_row(make_structure_id(given, name, index, text), source, "extxyz", text,
                              **_labels(keys))


def _ase_suffix(fs_path: str) -> str:
    """``.db``, ``.traj`` or ``.xml`` (vasprun): which ASE reader a file of the ``ase`` format needs."""
    lower = PurePosixPath(fs_path).name.lower().removesuffix(".gz")
    return ".xml" if lower.startswith(_VASPRUN) else PurePosixPath(lower).suffix


def _check_vasprun_finished(path: str) -> None:
    """Raise OSError unless the vasprun.xml at ``path`` ends with ``</modeling>`` (VASP writes it
    last; a run killed by the queue or out of time leaves the file without it)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4096))
        tail = f.read()
    if b"</modeling>" not in tail:
        raise OSError("vasprun.xml has no closing </modeling>: the VASP run did not finish or the "
                      "file was cut, so its last structure is not a result; screen its CONTCAR "
                      "if you want that structure")


def _ase_items(path: str, suffix: str) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(ase.Atoms, key-value pairs) of every row of an ASE database, frame of a trajectory, or
    the final ionic step of a vasprun.xml; whatever ASE raises on a corrupt file (sqlite3, ULM,
    XML, numpy errors) becomes an OSError."""
    try:
        if suffix == ".db":
            import ase.db

            for row in ase.db.connect(path, type="db").select():
                yield row.toatoms(), dict(row.key_value_pairs)
        elif suffix == ".xml":
            from ase.io import read

            yield read(path, index=-1, format="vasp-xml"), {}
        else:
            from ase.io import iread

            for atoms in iread(path, index=":", format="traj"):
                yield atoms, {}
    except Exception as exc:  # noqa: BLE001 - any failure of ASE's reader: the file is unreadable
        raise OSError(f"not a readable {_ASE_SUFFIXES[suffix]} file ({type(exc).__name__}: "
                      f"{short_error(exc)})") from exc


def _extxyz_text(atoms: Any) -> str:
    """Extended-XYZ text of one ase.Atoms (cell, pbc, species, positions in Angstrom); a
    calculator's energy and forces (a database row's, a VASP step's) are left out."""
    from ase.io import write

    buffer = io.StringIO()
    write(buffer, atoms.copy(), format="extxyz")  # Atoms.copy() drops the calculator
    return buffer.getvalue()


def _structure_text_format(text: str) -> str:
    """``cif`` for CIF text found where a Structure dict was expected (a ``structure`` field or
    column holding CIFs), else ``pymatgen_json``."""
    if not text.lstrip().startswith(("{", "[")) and _CIF_BLOCK.search(text):
        return "cif"
    return "pymatgen_json"


def _item_row(item: Any, source: str, name: str, index: int) -> dict[str, Any]:
    """Raw row for one JSON item: a Structure dict, or an item with a ``structure`` field (a
    Structure dict or CIF text) or a ``cif`` field."""
    if not isinstance(item, dict):
        return error_row(f"{name}#{index}", source, RejectCode.UNPARSEABLE,
                         f"{source} item {index}: expected a JSON object, got {type(item).__name__}")
    given = next((item[k] for k in _ID_FIELDS if item.get(k) is not None), None)
    if "lattice" in item and "sites" in item:
        structure: Any = item
    else:
        structure = next((item[k] for k in ("structure", "structure_json", "cif")
                          if item.get(k) is not None), None)
    sid = make_structure_id(given, name, index, json.dumps(item, sort_keys=True, default=str))
    if structure is None:
        return error_row(sid, source, RejectCode.UNPARSEABLE,
                         f"{source} item {index}: no 'structure' or 'cif' field and not a pymatgen "
                         "Structure dict; give Structure.as_dict() under 'structure'")
    if isinstance(structure, str):
        return raw_row(sid, source, _structure_text_format(structure), structure, **_labels(item))
    return raw_row(sid, source, "pymatgen_json", json.dumps(structure), **_labels(item))


def _read_json(fs: pafs.FileSystem, fs_path: str, source: str, name: str) -> Iterator[dict]:
    text = _open_text(fs, fs_path)
    if not text.strip():
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON values in a row: JSON lines saved as .json
            yield from _concatenated_items(text, source, name)
            return
        yield error_row(name, source, RejectCode.UNPARSEABLE,
                        f"{source}: not valid JSON ({exc}); for one object per line use .jsonl")
        return
    items = obj if isinstance(obj, list) else [obj]
    for index, item in enumerate(items):
        yield _item_row(item, source, name, index)


def _concatenated_items(text: str, source: str, name: str) -> Iterator[dict]:
    """Raw rows for JSON values written one after another (one per line, or pretty-printed); the
    first value that does not parse becomes one reject row for the rest of the file."""
    decoder = json.JSONDecoder()
    index, pos = 0, 0
    while (pos := _WHITESPACE.match(text, pos).end()) < len(text):  # type: ignore[union-attr]
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield error_row(f"{name}#{index}", source, RejectCode.UNPARSEABLE,
                            f"{source} item {index} and after: not valid JSON ({exc}); fix the file "
                            "or write one object per line as .jsonl")
            return
        for one in item if isinstance(item, list) else [item]:  # JSON arrays appended to a file
            yield _item_row(one, source, name, index)
            index += 1


def _read_jsonl(fs: pafs.FileSystem, fs_path: str, source: str, name: str) -> Iterator[dict]:
    index = 0
    for line in _iter_lines(fs, fs_path):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            yield error_row(f"{name}#{index}", source, RejectCode.UNPARSEABLE,
                            f"{source} line item {index}: not valid JSON ({exc})")
        else:
            yield _item_row(item, source, name, index)
        index += 1


def _read_parquet(fs: pafs.FileSystem, fs_path: str, source: str, name: str, *,
                  rows: tuple[int, int] | None = None) -> Iterator[dict]:
    if fs_path.lower().endswith(".gz"):
        pfile = pq.ParquetFile(pa.BufferReader(_open_bytes(fs, fs_path)))
    else:
        pfile = pq.ParquetFile(fs.open_input_file(fs_path))
    columns = set(pfile.schema_arrow.names)
    # every structure column the file has, in order of preference; each row uses its first filled one
    payload_cols = tuple((c, f) for c, f in _PARQUET_PAYLOADS if c in columns)
    if not payload_cols:
        yield error_row(name, source, RejectCode.UNREADABLE_FILE,
                        f"{source}: Parquet has no 'cif' or 'structure_json' column (columns: "
                        f"{sorted(columns)}); add one")
        return
    wanted = [c for c, _ in payload_cols] + [c for c in (*_ID_FIELDS, *PASSTHROUGH_FIELDS) if c in columns]
    start, stop = rows if rows is not None else (0, pfile.metadata.num_rows)
    # only the row groups that overlap [start, stop) are decoded
    groups, index = [], None
    offset = 0
    for g in range(pfile.metadata.num_row_groups):
        n = pfile.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append(g)
            index = offset if index is None else index
        offset += n
    if not groups:
        return
    for batch in pfile.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=wanted, row_groups=groups):
        if index + batch.num_rows <= start:
            index += batch.num_rows
            continue
        for record in batch.to_pylist():  # one dict per row of this batch only
            if start <= index < stop:
                yield _parquet_row(record, payload_cols, source, name, index)
            index += 1
        if index >= stop:
            return


_PARQUET_PAYLOADS = (("structure_json", "pymatgen_json"), ("cif", "cif"), ("structure", "pymatgen_json"))


def _parquet_row(record: dict[str, Any], payload_cols: tuple[tuple[str, str], ...], source: str,
                 name: str, index: int) -> dict[str, Any]:
    payload, fmt, column = next(((record[c], f, c) for c, f in payload_cols if record.get(c)),
                                (None, "", ""))
    problem = None
    if isinstance(payload, dict):  # a 'structure' column stored as a Parquet struct
        payload = json.dumps(payload, default=str)
    elif isinstance(payload, bytes):  # a binary column of UTF-8 text
        try:
            payload = payload.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            payload, problem = repr(payload[:64]), f"is binary, not UTF-8 text ({exc.reason})"
    elif payload is not None and not isinstance(payload, str):
        payload, problem = repr(payload)[:200], f"holds a {type(payload).__name__} value"
    given = next((record[k] for k in _ID_FIELDS if record.get(k) is not None), None)
    sid = make_structure_id(given, name, index, payload or "")
    if problem is not None:
        return error_row(sid, source, RejectCode.UNPARSEABLE,
                         f"{source} row {index}: column '{column}' {problem}; it must hold a "
                         "Structure as JSON text or a struct, or CIF text")
    if not payload:
        named = " and ".join(f"'{c}'" for c, _ in payload_cols)
        return error_row(sid, source, RejectCode.UNPARSEABLE,
                         f"{source} row {index}: empty {named} value; fill it or drop the row")
    if fmt == "pymatgen_json":
        fmt = _structure_text_format(payload)
    return raw_row(sid, source, fmt, payload, **_labels(record))


_READERS = {
    "cif": _read_cif,
    "poscar": _read_poscar,
    "extxyz": _read_extxyz,
    "res": _read_res,
    "ase": _read_ase,
    "json": _read_json,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
}


def iter_library(spec: str) -> Iterator[dict[str, Any]]:
    """Raw rows of every file of a library, files in :func:`list_library_files` order."""
    files = list_library_files(spec)
    for path, label in zip(files, file_labels(spec, files), strict=True):
        yield from read_library_file(path, label=label)


def iter_raw(specs: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Raw rows of several libraries, in the order given."""
    for spec in specs:
        yield from iter_library(spec)


def is_missing(value: Any) -> bool:
    """True for None and NaN (labels)."""
    return value is None or (isinstance(value, float) and math.isnan(value))
