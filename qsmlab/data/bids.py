"""BIDS filenames and multi-echo GRE (MEGRE) acquisitions: parse, group, read their metadata.

Why our own module and not pybids: pybids is not in the project's lock, pulls in SQLAlchemy/formulaic/
bids-validator and indexes a whole dataset into a database; qsmlab needs one narrow slice of BIDS —
entity parsing, the ``echo-<n>_part-{mag,phase}_MEGRE`` grouping and the sidecar inheritance principle —
which fits in this small, tested module (tests/test_bids_names.py).

Conventions followed (BIDS 1.9, "Common principles" and "Magnetic Resonance Imaging / anat"):

- a filename is ``<key>-<label>[_<key>-<label>…]_<suffix><extension>``; labels are alphanumeric; the
  entity order is :data:`ENTITY_ORDER`;
- a MEGRE acquisition is every ``*_MEGRE.nii[.gz]`` file with the same entities apart from ``echo`` and
  ``part``; each echo needs ``part-mag`` and ``part-phase`` (a file without ``part`` is a magnitude,
  as in BIDS before 1.5);
- metadata follow the inheritance principle: every JSON sidecar with the same suffix whose entities are a
  subset of the image's, found in the image's folder or one of its parents up to the dataset root, is
  merged from the least to the most specific (the closest folder wins ties);
- phase ``Units``: ``rad``, or ``arbitrary`` (vendor integers, rescaled by the file's range to [-pi, pi));
  absent means radians if the values span at most 2 pi.

Errors are :class:`qsmlab.errors.QSMInputError` with one line naming the file at fault.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qsmlab.errors import QSMInputError

ENTITY_ORDER: tuple[str, ...] = (
    "sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain", "rec", "dir", "run",
    "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "split", "recording", "chunk", "seg",
    "res", "den", "label", "desc")
"""BIDS entity order (specification appendix "Entity table")."""
ACQ_ENTITIES: tuple[str, ...] = ("sub", "ses", "acq", "ce", "rec", "dir", "run")
"""Entities that identify one MEGRE acquisition (kept in every derivative's name)."""
IMAGE_EXTS = (".nii.gz", ".nii")
PHASE_UNITS = ("rad", "arbitrary")

_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_PAIR = re.compile(r"^([a-z]+)-([A-Za-z0-9]+)$")


@dataclass(frozen=True)
class BidsName:
    """A parsed BIDS filename: ordered entities, suffix and extension (``.nii.gz``, ``.json``, …)."""

    entities: tuple[tuple[str, str], ...]
    suffix: str
    extension: str

    @property
    def ents(self) -> dict[str, str]:
        return dict(self.entities)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.ents.get(key, default)

    def filename(self) -> str:
        return build_name(self.ents, self.suffix, self.extension)


def parse_name(name: str) -> BidsName | None:
    """Parse a BIDS filename (no folder); None when it is not of the form ``key-label[_…]_suffix.ext``."""
    base, ext = name, ""
    for e in (".nii.gz", ".nii", ".json", ".tsv.gz", ".tsv"):
        if name.endswith(e):
            base, ext = name[: -len(e)], e
            break
    else:
        return None
    parts = base.split("_")
    if not _LABEL.match(parts[-1]):  # a suffix alone (a top-level "MEGRE.json") has no entities
        return None
    ents = []
    for p in parts[:-1]:
        m = _PAIR.match(p)
        if m is None:
            return None
        ents.append((m.group(1), m.group(2)))
    keys = [k for k, _ in ents]
    if len(set(keys)) != len(keys):
        return None
    return BidsName(entities=tuple(ents), suffix=parts[-1], extension=ext)


def build_name(entities: Mapping[str, str], suffix: str, extension: str = ".nii.gz") -> str:
    """``sub-01_ses-1_run-2_<suffix><extension>``: entities in BIDS order (unknown keys last, as given)."""
    for k, v in entities.items():
        if not _LABEL.match(str(v)):
            raise QSMInputError(f"BIDS entity {k}-{v}: labels must be alphanumeric")
    known = [k for k in ENTITY_ORDER if k in entities]
    other = [k for k in entities if k not in ENTITY_ORDER]
    return "_".join([f"{k}-{entities[k]}" for k in known + other] + [suffix]) + extension


def acquisition_entities(entities: Mapping[str, str]) -> dict[str, str]:
    """The entities of ``entities`` that identify an acquisition (:data:`ACQ_ENTITIES`), in order."""
    return {k: entities[k] for k in ACQ_ENTITIES if k in entities}


def read_json(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise QSMInputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise QSMInputError(f"{path}: expected a JSON object")
    return d


def inherited_metadata(image: Path, root: Path) -> dict:
    """Merged sidecar metadata of ``image`` by the BIDS inheritance principle (see module docstring)."""
    name = parse_name(image.name)
    if name is None:
        return {}
    ents = name.ents
    found: list[tuple[int, int, Path]] = []  # (depth, specificity, path): merged in this order
    folder, depth = image.parent, 0
    root = root.resolve()
    chain = []
    while True:
        chain.append(folder)
        if folder.resolve() == root or folder.parent == folder:
            break
        folder = folder.parent
    for depth, d in enumerate(reversed(chain)):  # root first: closer folders override
        for j in sorted([*d.glob(f"{name.suffix}.json"), *d.glob(f"*_{name.suffix}.json")]):
            jn = parse_name(j.name)
            if jn is None or jn.suffix != name.suffix:
                continue
            if all(ents.get(k) == v for k, v in jn.entities):
                found.append((depth, len(jn.entities), j))
    meta: dict = {}
    for _, _, j in sorted(found, key=lambda t: (t[0], t[1])):
        meta.update(read_json(j))
    return meta


@dataclass
class Echo:
    """One echo: magnitude and phase files (either may be None while grouping) and merged metadata."""

    index: int
    mag: Path | None = None
    phase: Path | None = None
    mag_meta: dict = field(default_factory=dict)
    phase_meta: dict = field(default_factory=dict)


@dataclass
class Acquisition:
    """A multi-echo GRE acquisition: its identifying entities and echoes sorted by echo time.

    ``te`` in s, ``b0_tesla`` in T, ``phase_units`` ``"rad"`` / ``"arbitrary"`` / ``None`` (absent: radians
    checked on load), ``b0_dir`` from a sidecar ``B0_dir`` or None (then from the affine).
    """

    entities: dict[str, str]
    echoes: list[Echo]
    te: tuple[float, ...]
    b0_tesla: float
    phase_units: list[str | None]
    b0_dir: tuple[float, float, float] | None = None

    @property
    def subject(self) -> str:
        return self.entities["sub"]

    @property
    def key(self) -> str:
        """``sub-01_ses-1_run-2``: the BIDS prefix of every derivative of this acquisition."""
        return "_".join(f"{k}-{v}" for k, v in self.entities.items())

    @property
    def folder(self) -> Path:
        """``sub-01/ses-1/anat`` (relative): where its raw data and derivatives live."""
        p = Path(f"sub-{self.entities['sub']}")
        if "ses" in self.entities:
            p = p / f"ses-{self.entities['ses']}"
        return p / "anat"

    @property
    def mag_files(self) -> list[Path]:
        return [e.mag for e in self.echoes]

    @property
    def phase_files(self) -> list[Path]:
        return [e.phase for e in self.echoes]


def _image_files(root: Path, subjects: Iterable[str] | None) -> list[Path]:
    subs = sorted(p for p in root.glob("sub-*") if p.is_dir())
    if subjects is not None:
        subs = [p for p in subs if p.name[4:] in set(subjects)]
    files = []
    for s in subs:
        for ext in IMAGE_EXTS:
            files += s.glob(f"anat/*_MEGRE{ext}")
            files += s.glob(f"ses-*/anat/*_MEGRE{ext}")
    return sorted(set(files))


def _number(meta: dict, key: str, path: Path, what: str) -> float:
    if key not in meta:
        raise QSMInputError(f"{path}: no {key} in its JSON sidecar(s); expected {what}")
    v = meta[key]
    if isinstance(v, list) and len(v) == 1:
        v = v[0]
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise QSMInputError(f"{path}: {key} = {v!r}; expected {what}") from None
    if not x > 0:
        raise QSMInputError(f"{path}: {key} = {v!r}; expected {what}")
    return x


def _group(root: Path, files: Sequence[Path]) -> dict[tuple, dict[int, Echo]]:
    groups: dict[tuple, dict[int, Echo]] = {}
    for f in files:
        n = parse_name(f.name)
        if n is None or "sub" not in n.ents:
            continue  # not a BIDS name: BIDS tools ignore such files
        ents = n.ents
        if f"sub-{ents['sub']}" not in f.parts:
            raise QSMInputError(f"{f}: sub-{ents['sub']} in the name but not in the folder")
        acq = tuple(acquisition_entities(ents).items())
        try:
            idx = int(ents.get("echo", "1"))
        except ValueError:
            raise QSMInputError(f"{f}: echo-{ents['echo']} is not an integer echo index") from None
        echo = groups.setdefault(acq, {}).setdefault(idx, Echo(idx))
        part = ents.get("part", "mag")
        if part not in ("mag", "phase"):
            continue  # real/imag parts are not used
        if getattr(echo, part) is not None:  # .nii and .nii.gz of the same image
            raise QSMInputError(f"{f}: duplicates {getattr(echo, part)}")
        setattr(echo, part, f)
        setattr(echo, f"{part}_meta", inherited_metadata(f, root))
    return groups


def _acquisition(ents: dict[str, str], echoes: dict[int, Echo]) -> Acquisition:
    es = [echoes[i] for i in sorted(echoes)]
    for e in es:
        if e.phase is None:
            raise QSMInputError(f"{e.mag}: magnitude of echo {e.index} has no phase (part-phase) file beside it")
        if e.mag is None:
            raise QSMInputError(f"{e.phase}: phase of echo {e.index} has no magnitude (part-mag) file beside it")
    te = [_number({**e.mag_meta, **e.phase_meta}, "EchoTime", e.phase, "the echo time in seconds") for e in es]
    for t, e in zip(te, es):
        if t > 1.0:  # 20 means milliseconds: a unit error
            raise QSMInputError(f"{e.phase}: EchoTime = {t:g}; BIDS echo times are in seconds (e.g. 0.02)")
    order = sorted(range(len(es)), key=lambda i: te[i])
    es, te = [es[i] for i in order], [te[i] for i in order]
    if any(b <= a for a, b in zip(te, te[1:])):
        raise QSMInputError(f"{es[0].phase}: two echoes share EchoTime {te}; expected distinct echo times")
    b0s = {_number({**e.mag_meta, **e.phase_meta}, "MagneticFieldStrength", e.phase, "the field strength in tesla")
           for e in es}
    if len(b0s) > 1:
        raise QSMInputError(f"{es[0].phase}: echoes disagree on MagneticFieldStrength {sorted(b0s)}")
    units = []
    for e in es:
        u = e.phase_meta.get("Units")
        if u is not None and str(u).lower() not in PHASE_UNITS:
            raise QSMInputError(f"{e.phase}: phase Units {u!r} unknown; expected one of {list(PHASE_UNITS)}")
        units.append(None if u is None else str(u).lower())
    b0_dir = None
    bd = es[0].phase_meta.get("B0_dir", es[0].mag_meta.get("B0_dir"))
    if bd is not None:
        from qsmlab.physics.geometry import normalize_b0_dir

        b0_dir = tuple(float(x) for x in normalize_b0_dir(bd, what=f"{es[0].phase}: B0_dir"))
    return Acquisition(entities=ents, echoes=es, te=tuple(te), b0_tesla=b0s.pop(), phase_units=units,
                       b0_dir=b0_dir)


def find_acquisitions(root: str | Path, participant_labels: Sequence[str] | None = None,
                      on_error=None) -> list[Acquisition]:
    """Every MEGRE acquisition under ``root`` (a BIDS raw dataset), sorted by name.

    Args:
        participant_labels: only these subjects (``01`` or ``sub-01``); one that is absent is an error.
        on_error: ``callable(entities, QSMInputError)`` for an acquisition whose files or metadata are
            wrong; it is skipped and the others are returned. None: the first such error raises.
    """
    root = Path(root)
    if not root.is_dir():
        raise QSMInputError(f"{root}: BIDS folder not found")
    labels = None
    if participant_labels:
        labels = [s[4:] if s.startswith("sub-") else s for s in participant_labels]
        present = {p.name[4:] for p in root.glob("sub-*") if p.is_dir()}
        missing = [s for s in labels if s not in present]
        if missing:
            raise QSMInputError(f"--participant-label {missing[0]}: no sub-{missing[0]} folder in {root} "
                                f"(subjects: {', '.join(sorted(present)) or 'none'})")
    files = _image_files(root, labels)
    if not files:
        raise QSMInputError(f"{root}: no multi-echo GRE images (sub-*/[ses-*/]anat/*_echo-<n>_part-mag|phase"
                            "_MEGRE.nii[.gz]) found")
    out = []
    for acq, echoes in sorted(_group(root, files).items()):
        try:
            out.append(_acquisition(dict(acq), echoes))
        except QSMInputError as e:
            if on_error is None:
                raise
            on_error(dict(acq), e)
    return out
