"""Radiology report datasets in their published formats -> (study id, image, reference report).

The reference report is FINDINGS followed by IMPRESSION (either may be absent, not both).

- IU X-ray, CSV form (Kaggle "Chest X-rays (Indiana University)"): indiana_reports.csv
  (uid, findings, impression, ...) + indiana_projections.csv (uid, filename, projection); images in
  images/images_normalized/, images/ or the folder itself; the first Frontal image is used.
- IU X-ray, OpenI XML form: ecgen-radiology/*.xml with <AbstractText Label="FINDINGS|IMPRESSION">
  and <parentImage id="...">; images NLMCXR_png/<id>.png (the first image listed is used).
- R2Gen `annotation.json` (IU X-ray and MIMIC-CXR as most report-generation work ships them):
  {"train": [...], "val": [...], "test": [...]}, each entry {id, report, image_path: [relative paths],
  split}; images under images/ next to the file (or the folder itself); the first image is used.
- MIMIC-CXR: reports files/p<2>/p<subject>/s<study>.txt (free text with "FINDINGS:" and
  "IMPRESSION:" headers), mimic-cxr-2.0.0-split.csv(.gz) for the split, images from MIMIC-CXR-JPG
  at files/p<2>/p<subject>/s<study>/<dicom_id>.jpg (a PA/AP view when the metadata file is there).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from openmedgemma.errors import DataError

from .files import read_csv, require_columns


@dataclass
class ReportItem:
    id: str
    image: Path
    reference: str


def _join(findings: str, impression: str) -> str:
    parts = [p.strip() for p in (findings, impression) if p and p.strip() and p.strip().lower() != "nan"]
    return "\n".join(parts)


def read_iu_csv(reports_path: Path) -> list[ReportItem]:
    folder = reports_path.parent
    projections_path = folder / "indiana_projections.csv"
    if not projections_path.is_file():
        raise DataError(f"iu-xray: {projections_path} not found next to {reports_path.name}")
    reports = read_csv(reports_path)
    require_columns(reports_path, reports[0], ["uid", "findings", "impression"])
    projections = read_csv(projections_path)
    require_columns(projections_path, projections[0], ["uid", "filename", "projection"])
    frontal: dict[str, str] = {}
    for row in projections:
        if row["projection"].strip().lower() == "frontal":
            frontal.setdefault(row["uid"].strip(), row["filename"].strip())
    image_dirs = [folder / "images" / "images_normalized", folder / "images", folder]
    image_dir = next((d for d in image_dirs if d.is_dir() and any(d.glob("*.png"))), image_dirs[0])
    items = []
    for row in reports:
        uid, text = row["uid"].strip(), _join(row["findings"], row["impression"])
        if text and uid in frontal:
            items.append(ReportItem(uid, image_dir / frontal[uid], text))
    if not items:
        raise DataError(f"{reports_path}: no report with text and a frontal image in {projections_path.name}")
    return items


def read_iu_xml(folder: Path) -> list[ReportItem]:
    files = sorted(folder.glob("*.xml"))
    if not files:
        raise DataError(f"iu-xray: no .xml report in {folder}")
    image_dir = folder.parent / "NLMCXR_png"
    items = []
    for path in files:
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as err:
            raise DataError(f"{path}: not valid XML ({err})") from None
        sections = {el.get("Label", "").upper(): "".join(el.itertext()) for el in root.iter("AbstractText")}
        images = [el.get("id") for el in root.iter("parentImage") if el.get("id")]
        text = _join(sections.get("FINDINGS", ""), sections.get("IMPRESSION", ""))
        if text and images:
            items.append(ReportItem(path.stem, image_dir / f"{images[0]}.png", text))
    if not items:
        raise DataError(f"iu-xray: no report in {folder} has findings/impression and an image")
    return items


R2GEN_FILE = "annotation.json"
# split names as copies of annotation.json spell them -> train / val / test
_SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
           "validation": "val", "dev": "val", "test": "test", "testing": "test"}  # fmt: skip


def split_name(name: str) -> str | None:
    return _SPLITS.get(str(name).strip().lower())


def read_r2gen(path: Path, split: str, task: str) -> list[ReportItem]:
    """R2Gen's annotation.json. An entry's own `split` field wins over the key it is listed under (copies
    differ: "validation" or "valid" keys, every entry under one key, a bare list of entries)."""
    wanted = split_name(split)
    if wanted is None:
        raise DataError(f"{task}: split must be train, val or test for {path.name}, got {split!r}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not readable JSON ({err})") from None
    groups = data.items() if isinstance(data, dict) else [("", data)]
    entries = []
    for key, value in groups:
        if not isinstance(value, list):
            continue  # other top-level fields (a version, a description) are not entries
        for n, entry in enumerate(value):
            where = f"{path}: {key or 'entry'}[{n}]"
            if not isinstance(entry, dict):
                raise DataError(f"{where}: expected an object with id, report and image_path")
            require_columns(where, entry, ["id", "report", "image_path"])
            own = split_name(entry["split"]) if entry.get("split") not in (None, "") else split_name(key)
            if own is None:
                raise DataError(f"{where}: split {entry.get('split', key)!r} is not train, val or test")
            entries.append((own, entry, where))
    if not entries:
        raise DataError(f"{path}: no entries (expected {{\"train\": [...], \"val\": [...], \"test\": [...]}})")
    images = path.parent / "images"
    items = []
    for own, entry, where in entries:
        paths = entry["image_path"]
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise DataError(f"{where}: image_path must be a non-empty list of relative paths")
        text = str(entry["report"] or "").strip()
        if own == wanted and text:
            first = Path(paths[0])
            base = images if (images / first).is_file() or not (path.parent / first).is_file() else path.parent
            items.append(ReportItem(str(entry["id"]), base / first, text))
    if not items:
        counts = {s: sum(o == s for o, _, _ in entries) for s in ("train", "val", "test")}
        raise DataError(f"{path}: no {wanted} entry with a report (entries per split: {counts})")
    return items


_HEADER = re.compile(r"^\s*([A-Z][A-Z /&]+):", re.M)


def mimic_sections(text: str) -> dict[str, str]:
    """Upper-case "HEADER:" sections of a MIMIC-CXR free-text report."""
    heads = list(_HEADER.finditer(text))
    return {
        m.group(1).strip(): text[m.end() : heads[i + 1].start() if i + 1 < len(heads) else len(text)].strip()
        for i, m in enumerate(heads)
    }


def read_mimic_reports(folder: Path, split: str) -> list[ReportItem]:
    split_path = next(
        (
            folder / n
            for n in ("mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv")
            if (folder / n).is_file()
        ),
        None,
    )
    if split_path is None:
        raise DataError(f"mimic-cxr-report: mimic-cxr-2.0.0-split.csv(.gz) not found in {folder}")
    rows = read_csv(split_path)
    require_columns(split_path, rows[0], ["dicom_id", "study_id", "subject_id", "split"])
    meta_path = next(
        (
            folder / n
            for n in ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv")
            if (folder / n).is_file()
        ),
        None,
    )
    frontal = None
    if meta_path is not None:
        frontal = {
            r["dicom_id"] for r in read_csv(meta_path) if r.get("ViewPosition", "").strip() in ("PA", "AP")
        }
    studies: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["split"].strip() == split and (frontal is None or r["dicom_id"] in frontal):
            studies.setdefault((r["subject_id"].strip(), r["study_id"].strip()), []).append(
                r["dicom_id"].strip()
            )
    items, unreadable = [], 0
    for (subject, study), dicoms in studies.items():
        base = folder / "files" / f"p{subject[:2]}" / f"p{subject}"
        report = base / f"s{study}.txt"
        if not report.is_file():
            unreadable += 1
            continue
        sections = mimic_sections(report.read_text(encoding="utf-8", errors="replace"))
        text = _join(sections.get("FINDINGS", ""), sections.get("IMPRESSION", ""))
        if text:
            items.append(ReportItem(f"s{study}", base / f"s{study}" / f"{sorted(dicoms)[0]}.jpg", text))
    if not items:
        raise DataError(
            f"mimic-cxr-report: no {split} study in {folder} has a report with findings or impression "
            f"({unreadable} report files missing under files/)"
        )
    return items
