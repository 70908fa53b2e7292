"""Small datasets written in the official formats of data not available here (SLAKE, CheXpert,
MIMIC-CXR, IU X-ray, Google CXR14 labels, NIH split lists). Images are the two real NIH PNGs from
shared/data/cxr_samples, converted where the format wants JPEG."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

from PIL import Image

CARDIO, NORMAL = "00000001_000.png", "00027426_000.png"  # the two real NIH images


def _copy_image(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix.lower() in (".jpg", ".jpeg"):
        Image.open(src).convert("L").save(dst, quality=90)
    else:
        shutil.copy(src, dst)
    return dst


def _write_csv(path: Path, header: list[str], rows: list[list], gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = (lambda p: gzip.open(p, "wt", newline="")) if gz else (lambda p: open(p, "w", newline=""))
    with opener(path) as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


SLAKE_RECORDS = [
    # official SLAKE test.json fields; two English, one Chinese (filtered out), one English CLOSED
    {
        "img_id": 1,
        "img_name": "xmlab1/source.jpg",
        "question": "Which organ is abnormal?",
        "answer": "Heart",
        "q_lang": "en",
        "location": "Chest",
        "modality": "X-Ray",
        "answer_type": "OPEN",
        "base_type": "vqa",
        "content_type": "Organ",
        "triple": ["vhead", "_", "_"],
        "qid": 11,
    },
    {
        "img_id": 1,
        "img_name": "xmlab1/source.jpg",
        "question": "Is the heart enlarged?",
        "answer": "Yes",
        "q_lang": "en",
        "location": "Chest",
        "modality": "X-Ray",
        "answer_type": "CLOSED",
        "base_type": "vqa",
        "content_type": "Abnormality",
        "triple": ["vhead", "_", "_"],
        "qid": 12,
    },
    {
        "img_id": 1,
        "img_name": "xmlab1/source.jpg",
        "question": "心脏增大了吗?",
        "answer": "是",
        "q_lang": "zh",
        "location": "Chest",
        "modality": "X-Ray",
        "answer_type": "CLOSED",
        "base_type": "vqa",
        "content_type": "Abnormality",
        "triple": ["vhead", "_", "_"],
        "qid": 13,
    },
    {
        "img_id": 2,
        "img_name": "xmlab2/source.jpg",
        "question": "Does the picture contain lung?",
        "answer": "Yes",
        "q_lang": "en",
        "location": "Chest",
        "modality": "X-Ray",
        "answer_type": "CLOSED",
        "base_type": "vqa",
        "content_type": "Organ",
        "triple": ["vhead", "_", "_"],
        "qid": 14,
    },
    {
        "img_id": 2,
        "img_name": "xmlab2/source.jpg",
        "question": "Is this image normal?",
        "answer": "Yes",
        "q_lang": "en",
        "location": "Chest",
        "modality": "X-Ray",
        "answer_type": "CLOSED",
        "base_type": "vqa",
        "content_type": "Abnormality",
        "triple": ["vhead", "_", "_"],
        "qid": 15,
    },
]


def write_slake(root: Path, cxr: Path) -> Path:
    folder = root / "Slake1.0"
    folder.mkdir(parents=True)
    (folder / "test.json").write_text(json.dumps(SLAKE_RECORDS, ensure_ascii=False), encoding="utf-8")
    images = root / "user_images"
    _copy_image(cxr / CARDIO, images / "xmlab1/source.jpg")
    _copy_image(cxr / NORMAL, images / "xmlab2/source.jpg")
    return images


CHEXPERT_COLUMNS = [
    "Path",
    "Sex",
    "Age",
    "Frontal/Lateral",
    "AP/PA",
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
]


def write_chexpert(root: Path, cxr: Path) -> Path:
    """valid.csv with 3 frontal + 1 lateral view. Labels (Atelectasis, Cardiomegaly, Consolidation,
    Edema, Pleural Effusion) per frontal image:
      p1: 1, 1.0, blank, 0.0, -1.0      p2: 0, 0.0, 0.0, -1.0, 1.0      p3: blank, 1.0, 0.0, 0.0, 0.0
    """
    base = root / "CheXpert-v1.0-small"
    specs = [
        (
            "patient00001",
            CARDIO,
            "Frontal",
            {
                "Atelectasis": "1.0",
                "Cardiomegaly": "1.0",
                "Consolidation": "",
                "Edema": "0.0",
                "Pleural Effusion": "-1.0",
            },
        ),
        (
            "patient00002",
            NORMAL,
            "Frontal",
            {
                "Atelectasis": "0.0",
                "Cardiomegaly": "0.0",
                "Consolidation": "0.0",
                "Edema": "-1.0",
                "Pleural Effusion": "1.0",
            },
        ),
        (
            "patient00003",
            CARDIO,
            "Frontal",
            {
                "Atelectasis": "",
                "Cardiomegaly": "1.0",
                "Consolidation": "0.0",
                "Edema": "0.0",
                "Pleural Effusion": "0.0",
            },
        ),
        (
            "patient00003",
            NORMAL,
            "Lateral",
            {
                "Atelectasis": "1.0",
                "Cardiomegaly": "1.0",
                "Consolidation": "1.0",
                "Edema": "1.0",
                "Pleural Effusion": "1.0",
            },
        ),
    ]
    rows = []
    for i, (patient, src, view, labels) in enumerate(specs):
        rel = f"CheXpert-v1.0-small/valid/{patient}/study1/view{i + 1}_{view.lower()}.jpg"
        _copy_image(cxr / src, root / rel)
        row = {c: "" for c in CHEXPERT_COLUMNS}
        row.update(
            {
                "Path": rel,
                "Sex": "Male",
                "Age": "60",
                "Frontal/Lateral": view,
                "AP/PA": "PA" if view == "Frontal" else "",
            }
        )
        row.update(labels)
        rows.append([row[c] for c in CHEXPERT_COLUMNS])
    _write_csv(base / "valid.csv", CHEXPERT_COLUMNS, rows)
    return base


MIMIC_FINDINGS = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
]


def write_mimic(root: Path, cxr: Path) -> Path:
    """Two test studies (one frontal + one lateral image in the first), one train study.
    s50000001 (subject 10000001): Cardiomegaly 1.0, Edema -1.0, Pleural Effusion blank, others 0.0
    s50000002 (subject 10000002): all 0.0 except Atelectasis 1.0"""
    folder = root / "mimic-cxr-jpg" / "2.0.0"
    labels = {
        "50000001": {"Cardiomegaly": "1.0", "Edema": "-1.0", "Pleural Effusion": ""},
        "50000002": {"Atelectasis": "1.0"},
        "50000003": {"Cardiomegaly": "1.0"},
    }
    rows = []
    for study, special in labels.items():
        subject = "1000000" + study[-1]
        values = {f: "0.0" for f in MIMIC_FINDINGS}
        values.update(special)
        rows.append([subject, study] + [values[f] for f in MIMIC_FINDINGS])
    _write_csv(
        folder / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id"] + MIMIC_FINDINGS, rows, gz=True
    )
    images = [
        ("d1-frontal", "50000001", "10000001", "test", "PA", CARDIO),
        ("d1-lateral", "50000001", "10000001", "test", "LATERAL", NORMAL),
        ("d2-frontal", "50000002", "10000002", "test", "AP", NORMAL),
        ("d3-frontal", "50000003", "10000003", "train", "PA", CARDIO),
    ]
    _write_csv(
        folder / "mimic-cxr-2.0.0-split.csv.gz",
        ["dicom_id", "study_id", "subject_id", "split"],
        [[d, st, su, sp] for d, st, su, sp, _, _ in images],
        gz=True,
    )
    _write_csv(
        folder / "mimic-cxr-2.0.0-metadata.csv.gz",
        ["dicom_id", "subject_id", "study_id", "ViewPosition"],
        [[d, su, st, v] for d, st, su, _, v, _ in images],
        gz=True,
    )
    reports = {
        "50000001": "FINAL REPORT\n EXAMINATION: CHEST (PA AND LAT)\n\n FINDINGS: The heart is enlarged. "
        "There is no pneumothorax.\n\n IMPRESSION: Cardiomegaly without pneumothorax.\n",
        "50000002": "FINAL REPORT\n FINDINGS: Left basilar atelectasis. No pleural effusion.\n\n IMPRESSION: "
        "Atelectasis.\n",
        "50000003": "FINAL REPORT\n IMPRESSION: Cardiomegaly.\n",
    }
    for d, study, subject, _, _, src in images:
        base = folder / "files" / f"p{subject[:2]}" / f"p{subject}"
        _copy_image(cxr / src, base / f"s{study}" / f"{d}.jpg")
        (base / f"s{study}.txt").write_text(reports[study])
    return folder


IU_REPORTS = [
    # uid, findings, impression, frontal image
    ("1", "The cardiac silhouette is enlarged. No pneumothorax.", "Cardiomegaly.", CARDIO),
    (
        "2",
        "The lungs are clear. No pleural effusion or pneumothorax.",
        "No acute cardiopulmonary abnormality.",
        NORMAL,
    ),
    ("3", "Small right pleural effusion.", "", NORMAL),
]


def reference_text(findings: str, impression: str) -> str:
    """The reference report as the formats define it: findings, then impression."""
    return "\n".join(part for part in (findings, impression) if part)


def write_iu_csv(root: Path, cxr: Path) -> Path:
    folder = root / "iu_xray"
    header = ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"]
    _write_csv(
        folder / "indiana_reports.csv",
        header,
        [[u, "normal", "normal", "Xray Chest PA and Lateral", "", "", f, i] for u, f, i, _ in IU_REPORTS]
        + [["4", "", "", "", "", "", "", ""]],
    )  # a report without text is skipped
    projections = []
    for uid, _, _, src in IU_REPORTS:
        frontal, lateral = f"{uid}_IM-0001-4001.dcm.png", f"{uid}_IM-0001-3001.dcm.png"
        _copy_image(cxr / src, folder / "images" / "images_normalized" / frontal)
        projections += [[uid, lateral, "Lateral"], [uid, frontal, "Frontal"]]
    _write_csv(folder / "indiana_projections.csv", ["uid", "filename", "projection"], projections)
    return folder


def write_iu_xml(root: Path, cxr: Path) -> Path:
    folder = root / "openi"
    (folder / "ecgen-radiology").mkdir(parents=True)
    for uid, findings, impression, src in IU_REPORTS:
        image_id = f"CXR{uid}_1_IM-0001-4001"
        (folder / "ecgen-radiology" / f"{uid}.xml").write_text(
            f'<?xml version="1.0" encoding="utf-8"?><eCitation><MedlineCitation><Article><Abstract>'
            f'<AbstractText Label="COMPARISON">None.</AbstractText>'
            f'<AbstractText Label="FINDINGS">{findings}</AbstractText>'
            f'<AbstractText Label="IMPRESSION">{impression}</AbstractText>'
            f'</Abstract></Article></MedlineCitation><parentImage id="{image_id}"><caption>PA</caption>'
            f"</parentImage></eCitation>"
        )
        _copy_image(cxr / src, folder / "NLMCXR_png" / f"{image_id}.png")
    return folder


def write_google_cxr14(root: Path, cxr: Path, real_labels: Path) -> tuple[Path, list[str]]:
    """The real Google expert label file, with the two real images saved under the names of the
    first two test rows (so the pipeline runs on real labels; the pixels do not match them)."""
    folder = root / "cxr14"
    folder.mkdir(parents=True)
    shutil.copy(real_labels, folder / real_labels.name)
    with gzip.open(real_labels, "rt", newline="") as fh:
        names = [r["Image Index"] for r in csv.DictReader(fh) if r["Set Id"] == "test"][:2]
    for name, src in zip(names, (CARDIO, NORMAL)):
        _copy_image(cxr / src, folder / "images" / name)
    return folder, names
