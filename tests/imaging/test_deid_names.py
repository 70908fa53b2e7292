"""`openmedgemma deid` on a folder laid out like a PACS export: names that carry identifiers are replaced.

The tree is written in the test from the shared DICOM files: a patient folder named by name and ID, a study
folder named by date, a series folder named by its SeriesInstanceUID and files named by their
SOPInstanceUID (what many archives export), next to a DICOMDIR-style tree whose names identify nothing.
"""

from __future__ import annotations

import csv
import re
import shutil

import pydicom
import pytest

from openmedgemma.cli import main

from .helpers import tree_digest

UID_SHAPED = re.compile(r"\d+(?:\.\d+){3,}")


@pytest.fixture
def pacs_export(dicom_dir, tmp_path):
    tests = dicom_dir / "pydicom_test_files" / "dicomdirtests"
    root = tmp_path / "export"
    for path in sorted((tests / "77654033").glob("*/*")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        study = root / f"{ds.PatientName}_{ds.PatientID}" / f"{ds.StudyDate}_{ds.Modality}"
        target = study / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    tiny = tests / "TINY_ALPHA"
    for path in sorted((tiny / "PT000000" / "ST000000" / "SE000000").iterdir())[:3]:
        target = root / "TINY_ALPHA" / path.relative_to(tiny)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    shutil.copy(tiny / "DICOMDIR", root / "TINY_ALPHA" / "DICOMDIR")
    (root / "README.txt").write_text("export of 2001-01-01\n")
    return root


def originals(root):
    """Every original UID, name, ID and date of the export's files."""
    values = set()
    for path in root.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        values |= {ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.PatientID, ds.StudyDate,
                   str(ds.PatientName), *str(ds.PatientName).split("^")}  # fmt: skip
    return {v for v in values if v}


def test_identifying_names_are_replaced_and_the_rest_kept(pacs_export, tmp_path, capsys):
    before = tree_digest(pacs_export)
    secrets = originals(pacs_export)
    out = tmp_path / "clean"
    assert main(["deid", str(pacs_export), str(out)]) == 0, capsys.readouterr().err
    assert tree_digest(pacs_export) == before  # the input is never modified
    written = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len(written) == 7 + 3
    for rel in written:
        for secret in secrets:
            assert secret.lower() not in str(rel).lower(), f"{rel} still carries {secret!r}"
        ds = pydicom.dcmread(out / rel)
        if rel.parts[0] == "TINY_ALPHA":  # DICOMDIR-style names identify nothing: kept as they were
            assert rel.parts[:4] == ("TINY_ALPHA", "PT000000", "ST000000", "SE000000")
            assert re.fullmatch(r"IM0000\w\w", rel.name)
            continue
        # UID-named series folder and file: named by the new UIDs the files now carry
        assert rel.name == f"{ds.SOPInstanceUID}.dcm" and rel.parts[2] == ds.SeriesInstanceUID
        assert ds.SOPInstanceUID.startswith("2.25.") and re.fullmatch(r"folder-\d", rel.parts[0])
        assert all(not UID_SHAPED.search(part) or part.startswith("2.25.") for part in rel.parts)
    assert not list(tmp_path.glob("*.csv")) and not list(out.rglob("*.csv"))  # no mapping unless asked


def test_mapping_only_when_asked_and_never_inside_the_output(pacs_export, tmp_path, capsys):
    out, mapping = tmp_path / "clean", tmp_path / "keys" / "mapping.csv"
    assert main(["deid", str(pacs_export), str(out), "--mapping", str(out / "map.csv")]) == 2
    assert "must not be inside the output" in capsys.readouterr().err and not out.exists()
    assert main(["deid", str(pacs_export), str(out), "--mapping", str(mapping)]) == 0
    rows = list(csv.DictReader(mapping.open(encoding="utf-8")))
    files = {r["original"]: r["deidentified"] for r in rows if r["kind"] == "file"}
    uids = {r["original"]: r["deidentified"] for r in rows if r["kind"] == "uid"}
    assert len(files) == 10 and all((pacs_export / k).is_file() and (out / v).is_file() for k, v in files.items())
    for old, new in files.items():  # the mapping re-identifies: each output file traces back to its input
        if not old.startswith("TINY_ALPHA"):
            original = pydicom.dcmread(pacs_export / old, stop_before_pixels=True)
            assert uids[original.SOPInstanceUID] == pydicom.dcmread(out / new).SOPInstanceUID
    assert main(["deid", str(pacs_export), str(tmp_path / "again"), "--mapping", str(mapping)]) == 2
    assert "already exists" in capsys.readouterr().err
    argv = ["deid", "--dicomweb", "http://127.0.0.1:9", "--study", "1.2.3", str(tmp_path / "web"), "--mapping", "m.csv"]
    assert main(argv) == 2 and "--mapping applies to a local IN" in capsys.readouterr().err  # refused before any request


def test_single_file_named_by_its_uid(pacs_export, tmp_path, capsys):
    source = next(pacs_export.rglob("1.*.dcm"))
    (tmp_path / "one").mkdir()
    assert main(["deid", str(source), str(tmp_path / "one")]) == 0
    [written] = list((tmp_path / "one").iterdir())
    assert written.name == f"{pydicom.dcmread(written).SOPInstanceUID}.dcm" and written.name != source.name
