"""Dataset manifests: one CSV row per scan, validated before any training starts (DESIGN.md section 3).

Columns (blank = absent; paths relative to the manifest's folder)::

    subject, session, run, source (synthetic|invivo), field, total_field, chi, mask, magnitude,
    phase, seg, te, b0_tesla, b0_dir, voxel_size, group

- ``subject``, ``field`` and ``mask`` are required (columns and values).
- ``source`` is ``synthetic`` or ``invivo``; blank means ``invivo`` (the cautious choice: in-vivo rows
  may enter test folds, synthetic rows never do).
- ``te``: echo time(s) in seconds, one value or a space/comma-separated list; ``b0_tesla``: field (T).
- ``b0_dir``, ``voxel_size``: ``"x y z"`` (space- or comma-separated). When blank they come from the
  ``field`` NIfTI: ``b0_dir`` via :func:`qsmlab.physics.geometry.resolve_b0_dir` (JSON sidecar
  ``B0_dir`` > affine), ``voxel_size`` from the affine's column norms.
- A row's images must share one grid (3-D shape and affine), checked from the NIfTI headers only.
- ``(subject, session, run)`` identifies a scan and must be unique.

:func:`load_manifest` raises :class:`QSMInputError` with the first problem; :func:`check_manifest` returns
every problem. Each message names the row (1-based data row and subject) and the column at fault.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from qsmlab.errors import QSMInputError
from qsmlab.physics.geometry import resolve_b0_dir, voxel_size_from_affine

COLUMNS = ("subject", "session", "run", "source", "field", "total_field", "chi", "mask", "magnitude",
           "phase", "seg", "te", "b0_tesla", "b0_dir", "voxel_size", "group")
REQUIRED = ("subject", "field", "mask")
IMAGE_COLUMNS = ("field", "total_field", "chi", "mask", "magnitude", "phase", "seg")
SOURCES = ("synthetic", "invivo")
GRID_ATOL = 1e-3  # mm / unitless rotation, as qsmlab.data.nifti.check_same_grid


@dataclass
class Row:
    """One validated scan. Paths are absolute; absent images are None; geometry always filled.

    ``te`` in seconds (tuple, possibly empty), ``b0_tesla`` in T or None, ``b0_dir`` a unit 3-vector in
    voxel axes, ``voxel_size`` in mm, ``index`` the 1-based data row in the CSV.
    """

    index: int
    subject: str
    field: Path
    mask: Path
    session: str = ""
    run: str = ""
    source: str = "invivo"
    total_field: Path | None = None
    chi: Path | None = None
    magnitude: Path | None = None
    phase: Path | None = None
    seg: Path | None = None
    te: tuple[float, ...] = ()
    b0_tesla: float | None = None
    b0_dir: tuple[float, float, float] = (0.0, 0.0, 1.0)
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0)
    group: str = ""

    @property
    def key(self) -> str:
        """Scan identifier ``subject/session/run`` (blank parts dropped)."""
        return "/".join(p for p in (self.subject, self.session, self.run) if p)

    @property
    def synthetic(self) -> bool:
        return self.source == "synthetic"

    def images(self) -> dict[str, Path]:
        """Existing image paths by column name."""
        return {c: getattr(self, c) for c in IMAGE_COLUMNS if getattr(self, c) is not None}


@dataclass
class ManifestTable:
    """Validated manifest: its rows, the sha256 of the CSV bytes (identifies the dataset) and its path."""

    rows: list[Row]
    hash: str
    path: Path
    columns: tuple[str, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    @property
    def subjects(self) -> list[str]:
        """Unique subjects in first-appearance order."""
        return list(dict.fromkeys(r.subject for r in self.rows))

    def select(self, subjects) -> list[Row]:
        """Rows whose subject is in ``subjects`` (manifest order)."""
        s = set(subjects)
        return [r for r in self.rows if r.subject in s]


def manifest_hash(path: str | Path) -> str:
    """sha256 hex digest of the manifest file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _floats(text: str) -> list[float]:
    parts = [p for p in re.split(r"[\s,;]+", text.strip().strip("[]()")) if p]
    return [float(p) for p in parts]


class _Problems:
    """Collects problems; in ``first`` mode the first one raises immediately."""

    def __init__(self, manifest: Path, first: bool):
        self.manifest, self.first, self.items = manifest, first, []

    def add(self, msg: str, row: int | None = None, subject: str = "", column: str | None = None) -> None:
        where = [str(self.manifest)]
        if row is not None:
            where.append(f"row {row}" + (f" (subject {subject})" if subject else ""))
        if column is not None:
            where.append(f"column '{column}'")
        text = ", ".join(where) + ": " + msg
        if self.first:
            raise QSMInputError(text)
        self.items.append(text)


def _read_csv(path: Path, problems: _Problems) -> pd.DataFrame | None:
    if not path.is_file():
        problems.add("manifest file not found")
        return None
    try:
        # Everything as text: IDs like "01" must stay strings; numbers are parsed per column below.
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        problems.add(f"cannot parse CSV ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return None
    df.columns = [str(c).strip() for c in df.columns]
    unknown = [c for c in df.columns if c not in COLUMNS]
    if unknown:
        problems.add(f"unknown column(s) {unknown}; expected a subset of {list(COLUMNS)}")
    missing = [c for c in REQUIRED if c not in df.columns]
    for c in missing:
        problems.add("required column missing", column=c)
    if missing:
        return None
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = ""
    return df.apply(lambda s: s.str.strip())


def _parse_row(i: int, rec: dict, base: Path, problems: _Problems, check_files: bool) -> Row | None:
    subj = rec["subject"]
    n_before = len(problems.items)

    def bad(msg: str, column: str) -> None:
        problems.add(msg, row=i, subject=subj, column=column)

    for c in REQUIRED:
        if not rec[c]:
            bad("required value is blank", c)
    source = rec["source"].lower() or "invivo"
    if source not in SOURCES:
        bad(f"source must be one of {list(SOURCES)}, got {rec['source']!r}", "source")

    paths: dict[str, Path] = {}
    for c in IMAGE_COLUMNS:
        if rec[c]:
            p = Path(rec[c])
            p = p if p.is_absolute() else base / p
            if check_files and not p.is_file():
                bad(f"file not found: {p}", c)
            else:
                paths[c] = p

    te: tuple[float, ...] = ()
    if rec["te"]:
        try:
            te = tuple(_floats(rec["te"]))
            if not te or any(not (np.isfinite(t) and t > 0) for t in te):
                raise ValueError
        except ValueError:
            te = ()
            bad(f"expected positive echo time(s) in seconds, got {rec['te']!r}", "te")
        if any(t > 1.0 for t in te):  # 20 means milliseconds: a unit error, not a long echo
            bad(f"te must be in seconds (e.g. 0.02), got {rec['te']!r}", "te")
    b0_tesla = None
    if rec["b0_tesla"]:
        try:
            b0_tesla = float(rec["b0_tesla"])
            if not (np.isfinite(b0_tesla) and b0_tesla > 0):
                raise ValueError
        except ValueError:
            bad(f"expected a positive field strength in tesla, got {rec['b0_tesla']!r}", "b0_tesla")

    b0_dir = voxel_size = None
    if rec["b0_dir"]:
        try:
            v = np.asarray(_floats(rec["b0_dir"]))
            if v.shape != (3,) or not np.all(np.isfinite(v)) or np.linalg.norm(v) < 1e-12:
                raise ValueError
            b0_dir = v / np.linalg.norm(v)
        except ValueError:
            bad(f"expected a non-zero 3-vector 'x y z', got {rec['b0_dir']!r}", "b0_dir")
    if rec["voxel_size"]:
        try:
            v = np.asarray(_floats(rec["voxel_size"]))
            if v.shape != (3,) or not np.all(np.isfinite(v) & (v > 0)):
                raise ValueError
            voxel_size = v
        except ValueError:
            bad(f"expected 3 positive voxel sizes in mm 'x y z', got {rec['voxel_size']!r}", "voxel_size")

    # Grid agreement from headers only (nib.load is lazy: no voxel data is read).
    headers: dict[str, nib.Nifti1Image] = {}
    if check_files:
        for c, p in paths.items():
            try:
                headers[c] = nib.load(str(p))
            except Exception as e:  # nibabel raises many types for corrupt files
                bad(f"cannot read NIfTI header of {p} ({type(e).__name__})", c)
        ref = "field" if "field" in headers else next(iter(headers), None)
        if ref is not None:
            rs, ra = headers[ref].shape[:3], headers[ref].affine
            for c, img in headers.items():
                if c == ref:
                    continue
                if img.shape[:3] != rs:
                    bad(f"grid shape {img.shape[:3]} does not match {ref} {rs}", c)
                elif not np.allclose(img.affine, ra, atol=GRID_ATOL):
                    bad(f"affine differs from {ref} by up to {np.abs(img.affine - ra).max():.3g}", c)
        if "field" in headers:
            aff = headers["field"].affine
            try:
                if b0_dir is None:
                    b0_dir = resolve_b0_dir(aff, None, paths["field"])
                if voxel_size is None:
                    voxel_size = voxel_size_from_affine(aff)
            except QSMInputError as e:
                bad(f"cannot derive geometry from the field header ({e})", "b0_dir")

    if len(problems.items) > n_before:
        return None
    return Row(
        index=i, subject=subj, field=paths["field"], mask=paths["mask"], session=rec["session"],
        run=rec["run"], source=source, total_field=paths.get("total_field"), chi=paths.get("chi"),
        magnitude=paths.get("magnitude"), phase=paths.get("phase"), seg=paths.get("seg"), te=te,
        b0_tesla=b0_tesla,
        b0_dir=tuple(float(x) for x in (b0_dir if b0_dir is not None else (0.0, 0.0, 1.0))),
        voxel_size=tuple(float(x) for x in (voxel_size if voxel_size is not None else (1.0, 1.0, 1.0))),
        group=rec["group"],
    )


def _validate(path: str | Path, check_files: bool, first: bool) -> tuple[ManifestTable | None, list[str]]:
    p = Path(path)
    problems = _Problems(p, first)
    df = _read_csv(p, problems)
    if df is None:
        return None, problems.items
    if len(df) == 0:
        problems.add("manifest has no data rows")
        return None, problems.items
    rows: list[Row] = []
    seen: dict[tuple[str, str, str], int] = {}
    for n, rec in enumerate(df.to_dict("records"), start=1):
        key = (rec["subject"], rec["session"], rec["run"])
        if rec["subject"] and key in seen:
            problems.add(f"duplicated scan (subject, session, run) = {key}, first at row {seen[key]}",
                         row=n, subject=rec["subject"], column="subject")
            continue
        seen[key] = n
        row = _parse_row(n, rec, p.parent, problems, check_files)
        if row is not None:
            rows.append(row)
    table = ManifestTable(rows=rows, hash=manifest_hash(p), path=p.resolve(), columns=tuple(df.columns))
    return table, problems.items


def load_manifest(path: str | Path, check_files: bool = True) -> ManifestTable:
    """Read and validate a manifest; raise :class:`QSMInputError` naming the first bad row/column.

    Args:
        path: CSV file; relative image paths resolve against its folder.
        check_files: verify that files exist, read their headers (grid check) and fill blank
            ``b0_dir``/``voxel_size`` from the ``field`` header. Without it, blanks become
            ``(0, 0, 1)`` / ``(1, 1, 1)``.
    Returns:
        :class:`ManifestTable` (rows + sha256 of the file bytes).
    """
    table, _ = _validate(path, check_files, first=True)
    assert table is not None
    return table


def check_manifest(path: str | Path) -> list[str]:
    """Every problem in a manifest, one line each (empty list = valid)."""
    _, problems = _validate(path, check_files=True, first=False)
    return problems


def merge_manifests(inputs, output: str | Path) -> Path:
    """Merge manifests into ``output`` (a hybrid manifest): every input validated, image paths rewritten
    relative to the output's folder, rows in input order. A scan key ``(subject, session, run)`` found in
    two inputs raises :class:`QSMInputError` naming both files. Written atomically; returns its path."""
    import csv
    import io
    import os

    from qsmlab.data.nifti import atomic_write_text

    out = Path(output)
    if len(inputs) < 2:
        raise QSMInputError(f"manifest merge: expected at least two manifests, got {len(inputs)}")
    base = out.resolve().parent
    seen: dict[tuple[str, str, str], Path] = {}
    rows: list[dict] = []
    for src in inputs:
        load_manifest(src)  # every problem of an input is reported against that input
        p = Path(src)
        df = pd.read_csv(p, dtype=str, keep_default_na=False, skipinitialspace=True)
        df.columns = [str(c).strip() for c in df.columns]
        for rec in df.to_dict("records"):
            rec = {c: str(rec.get(c, "")).strip() for c in COLUMNS}
            key = (rec["subject"], rec["session"], rec["run"])
            if key in seen:
                raise QSMInputError(f"{p}: scan (subject, session, run) = {key} is also in {seen[key]}; "
                                    "rename one subject before merging")
            seen[key] = p
            for c in IMAGE_COLUMNS:
                if rec[c]:
                    q = Path(rec[c])
                    q = q if q.is_absolute() else p.resolve().parent / q
                    rec[c] = os.path.relpath(q.resolve(), base)
            rows.append(rec)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    w.writeheader()
    w.writerows(rows)
    return atomic_write_text(out, buf.getvalue())
