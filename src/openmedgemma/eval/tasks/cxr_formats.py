"""Chest X-ray label files in their published formats -> images with per-condition labels.

Label values: 1 positive, 0 negative, UNCERTAIN (-1, CheXpert/MIMIC "-1.0"), MISSING (blank).

- NIH ChestX-ray14: Data_Entry_2017_v2020.csv(.gz), "Finding Labels" pipe-separated, complete
  labels ("No Finding" = all negative); split from test_list.txt when present.
- Google expert labels for CXR14 (Majkowska et al. 2019): YES/NO columns Fracture, Pneumothorax,
  Airspace opacity, Nodule or mass; test rows by "Set Id" (combined file) or the test file.
- CheXpert: a CSV with "Path" and 14 observation columns (1.0 / 0.0 / -1.0 / blank); frontal views
  only when a "Frontal/Lateral" column is present.
- MIMIC-CXR-JPG: mimic-cxr-2.0.0-chexpert.csv(.gz) (per study), -split.csv(.gz) (per image,
  split = test), optional -metadata.csv(.gz) (frontal views: ViewPosition PA/AP); images at
  files/p<first 2 digits>/p<subject>/s<study>/<dicom_id>.jpg.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from openmedgemma.errors import DataError

from .files import read_csv, require_columns, require_dir

UNCERTAIN = -1
MISSING = None


@dataclass
class LabelledImage:
    id: str
    image: Path
    labels: dict[str, int | None]  # label column -> 1 / 0 / UNCERTAIN / MISSING


def _first_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def locate(data_dir: Path | str, folders: tuple[str, ...], names: tuple[str, ...], task: str) -> Path:
    """The label file: the first of `names` inside the first of `folders` that has one."""
    root = require_dir(data_dir, task)
    for folder in folders:
        found = _first_file(root / folder, names)
        if found:
            return found
    looked = ", ".join(str(Path(f) / n) for f in folders for n in names)
    raise DataError(f"{task}: no label file found under {root} (looked for: {looked})")


def image_index(folder: Path) -> dict[str, Path]:
    """File name -> path for the NIH layouts: folder/, folder/images/, folder/images_*/images/."""
    places = [folder, folder / "images"] + sorted(folder.glob("images_*/images"))
    index: dict[str, Path] = {}
    for place in places:
        if place.is_dir():
            with os.scandir(place) as entries:
                for entry in entries:
                    if entry.name.lower().endswith((".png", ".jpg", ".jpeg")):
                        index.setdefault(entry.name, Path(entry.path))
    return index


def _split_list(folder: Path, name: str) -> set[str] | None:
    path = folder / name
    if not path.is_file():
        return None
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


NIH_FILES = ("Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
NIH_FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)


def read_nih(path: Path, split: str) -> tuple[list[LabelledImage], str]:
    """(images, description of the split used). split: test | train | all."""
    rows = read_csv(path)
    require_columns(path, rows[0], ["Image Index", "Finding Labels"])
    folder = path.parent
    wanted, used = None, "all labelled images (no split requested)"
    if split in ("test", "train"):
        list_name = "test_list.txt" if split == "test" else "train_val_list.txt"
        wanted = _split_list(folder, list_name)
        used = f"{list_name}" if wanted is not None else f"all labelled images ({list_name} not found)"
    elif split != "all":
        raise DataError(f"NIH labels: split must be test, train or all, got {split!r}")
    index = image_index(folder)
    out = []
    for row in rows:
        name = row["Image Index"].strip()
        if wanted is not None and name not in wanted:
            continue
        found = set(row["Finding Labels"].split("|"))
        unknown = found - set(NIH_FINDINGS) - {"No Finding"}
        if unknown:
            raise DataError(f"{path}: {name}: unknown finding(s) {sorted(unknown)}")
        labels = {f: int(f in found) for f in NIH_FINDINGS}
        out.append(LabelledImage(name, index.get(name, folder / "images" / name), labels))
    return out, used


GOOGLE_FILES = (
    "google2019_nih-chest-xray-labels.csv.gz",
    "google2019_nih-chest-xray-labels.csv",
    "four_findings_expert_labels_test_labels.csv",
)
GOOGLE_FINDINGS = ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")


def read_google_nih(path: Path, split: str) -> tuple[list[LabelledImage], str]:
    rows = read_csv(path)
    require_columns(path, rows[0], ["Image Index", *GOOGLE_FINDINGS])
    used = "all rows"
    if "Set Id" in rows[0] and split != "all":
        if split not in {r["Set Id"] for r in rows}:
            raise DataError(f"{path}: no row with Set Id = {split!r}")
        rows = [r for r in rows if r["Set Id"] == split]
        used = f"Set Id == {split}"
    index = image_index(path.parent)
    out = []
    for row in rows:
        labels = {}
        for finding in GOOGLE_FINDINGS:
            value = row[finding].strip().upper()
            if value not in ("YES", "NO"):
                raise DataError(
                    f"{path}: {row['Image Index']}: {finding} = {row[finding]!r}, expected YES/NO"
                )
            labels[finding] = int(value == "YES")
        name = row["Image Index"].strip()
        out.append(LabelledImage(name, index.get(name, path.parent / "images" / name), labels))
    return out, used


CHEXPERT_FINDINGS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)


def _chexpert_value(raw: str, where: str) -> int | None:
    raw = raw.strip()
    if raw == "":
        return MISSING
    try:
        value = float(raw)
    except ValueError:
        raise DataError(f"{where}: label {raw!r} is not 1, 0, -1 or blank") from None
    if value not in (1.0, 0.0, -1.0):
        raise DataError(f"{where}: label {raw!r} is not 1, 0, -1 or blank")
    return int(value)


def read_chexpert(path: Path, findings: tuple[str, ...]) -> tuple[list[LabelledImage], str]:
    rows = read_csv(path)
    require_columns(path, rows[0], ["Path", *findings])
    used = path.name
    if "Frontal/Lateral" in rows[0]:
        rows = [r for r in rows if r["Frontal/Lateral"].strip() == "Frontal"]
        used += ", frontal views"
    out = []
    for number, row in enumerate(rows, 2):
        rel = Path(row["Path"].strip())
        candidates = [path.parent / rel, path.parent.parent / rel, path.parent / Path(*rel.parts[1:])]
        image = next((c for c in candidates if c.is_file()), candidates[0])
        labels = {f: _chexpert_value(row[f], f"{path}: row {number}, {f}") for f in findings}
        out.append(LabelledImage(str(rel), image, labels))
    return out, used


MIMIC_LABELS = ("mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-chexpert.csv")


def read_mimic(path: Path, findings: tuple[str, ...], split: str) -> tuple[list[LabelledImage], str]:
    folder = path.parent
    split_path = _first_file(folder, ("mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv"))
    if split_path is None:
        raise DataError(
            f"mimic-cxr: mimic-cxr-2.0.0-split.csv(.gz) not found next to {path.name} in {folder}"
        )
    labels_rows = read_csv(path)
    require_columns(path, labels_rows[0], ["subject_id", "study_id", *findings])
    by_study = {r["study_id"].strip(): r for r in labels_rows}
    split_rows = read_csv(split_path)
    require_columns(split_path, split_rows[0], ["dicom_id", "study_id", "subject_id", "split"])
    images = [r for r in split_rows if r["split"].strip() == split]
    if not images:
        raise DataError(f"{split_path}: no image with split = {split!r}")
    used = f"{split_path.name}: split == {split}"
    meta_path = _first_file(folder, ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv"))
    if meta_path is not None:
        meta = read_csv(meta_path)
        require_columns(meta_path, meta[0], ["dicom_id", "ViewPosition"])
        frontal = {r["dicom_id"] for r in meta if r["ViewPosition"].strip() in ("PA", "AP")}
        images = [r for r in images if r["dicom_id"] in frontal]
        used += ", frontal views (PA/AP)"
    out = []
    for r in images:
        study, subject = r["study_id"].strip(), r["subject_id"].strip()
        row = by_study.get(study)
        if row is None:  # studies without a labelled report are not evaluable
            continue
        rel = Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{r['dicom_id'].strip()}.jpg"
        labels = {f: _chexpert_value(row[f], f"{path}: study {study}, {f}") for f in findings}
        out.append(LabelledImage(r["dicom_id"].strip(), folder / rel, labels))
    return out, used
