"""Output names for de-identified files: a name that carries an identifier of the file is replaced.

Real archives name files and folders by what identifies them: the SOPInstanceUID
(`1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm`), the patient (`DOE^JOHN_12345/`), the study
date or accession number. Header de-identification alone would leave those in the output path. A path part
is identifying when it holds something shaped like a UID or contains (letters and digits compared, case
ignored) a value the profile removes or replaces in any file of the tree (names, IDs, dates, UIDs...).

- an identifying file name becomes the file's new SOPInstanceUID + ".dcm" (`instance-N.dcm` without one);
- an identifying folder that is a UID becomes its remapped UID (a StudyInstanceUID folder is named by the
  new StudyInstanceUID of the files in it); any other identifying folder becomes `folder-N`;
- other names (`slice7.dcm`, `PT000000/ST000000/SE000000/IM000001`, `CR1`) are kept, so the tree stays readable.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from pathlib import Path

from openmedgemma.imaging.deid import UIDMapper, profile_action

# four or more dot-separated numbers: a DICOM UID (or most of one) in a name
_UID = re.compile(r"(?<![\w.])\d+(?:\.\d+){3,}(?![\w])")
_WHOLE_UID = re.compile(r"\d+(?:\.\d+){3,}")
_TEXT_VRS = {"PN", "LO", "SH", "DA", "DT", "TM", "UI", "AE", "ST", "LT", "UT", "CS", "IS"}
MIN_MATCH = 3  # shorter values ("2", "M") would match almost any name


def _squash(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def header(path: Path):
    """The data set without pixels, or None when the file is not readable DICOM (it is skipped later)."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # not DICOM or corrupt: de-identification reports it
        return None


def identifying_values(ds) -> set[str]:
    """Squashed values of the elements the profile removes or replaces (and each part of a person name)."""
    values: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for elem in ds.iterall():
            if elem.VR not in _TEXT_VRS or profile_action(int(elem.tag)) == "K" or elem.value in (None, ""):
                continue
            items = elem.value if type(elem.value).__name__ == "MultiValue" else [elem.value]
            for item in items:
                text = str(item)
                parts = [text, *re.split(r"[\^=\s]+", text)] if elem.VR == "PN" else [text]
                # a value of one repeated character (time "000000") identifies nothing and would match IM000001
                values.update(s for s in map(_squash, parts) if len(s) >= MIN_MATCH and len(set(s)) > 1)
    return values


def is_identifying(name: str, values: Iterable[str]) -> bool:
    stem = Path(name).stem if Path(name).suffix.lower() in (".dcm", ".dicom", ".ima") else name
    if _UID.search(stem):
        return True
    squashed = _squash(stem)
    return any(v in squashed for v in values)


def plan_names(source: Path, target: Path, files: list[Path], mapper: UIDMapper) -> list[tuple[Path, Path]]:
    """(input, output) for each file under `source`, with identifying names replaced (see the module)."""
    headers = {path: header(path) for path in files}
    values: set[str] = set()
    for ds in headers.values():
        if ds is not None:
            values |= identifying_values(ds)
    folders: dict[Path, Path] = {Path(): Path()}
    counters: dict[Path, int] = {}
    used: set[Path] = set()
    pairs = []
    for path in files:
        rel = path.relative_to(source)
        parent = Path()
        for part in rel.parts[:-1]:
            key = parent / part
            if key not in folders:
                new_parent = folders[parent]
                if not is_identifying(part, values):
                    folders[key] = new_parent / part
                elif _WHOLE_UID.fullmatch(part):
                    folders[key] = new_parent / mapper(part)
                else:
                    counters[new_parent] = counters.get(new_parent, 0) + 1
                    folders[key] = new_parent / f"folder-{counters[new_parent]}"
            parent = key
        out = folders[parent] / rel.name
        if is_identifying(rel.name, values):
            ds = headers[path]
            uid = str(ds.get("SOPInstanceUID", "") or "").strip() if ds is not None else ""
            out = folders[parent] / (f"{mapper(uid)}.dcm" if uid else "instance.dcm")
        out = _unique(out, used)
        used.add(out)
        pairs.append((path, target / out))
    return pairs


def _unique(path: Path, used: set[Path]) -> Path:
    """`path`, or `stem-2.ext`, `stem-3.ext`... when an earlier file already took it (duplicates, or no UID)."""
    n, candidate = 1, path
    while candidate in used:
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate
