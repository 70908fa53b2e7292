"""Two promises checked on real files through the real commands.

- Nothing that could identify a patient is logged: the identifying values of the DICOM test files (names, IDs,
  birth dates, addresses, institutions, accession numbers) appear in no error message, warning, log record or
  CLI output of load, preview, deid, ask and eval, nor in the files eval writes.
- Input files are never modified: every input file (bytes and modification time) is the same after load_image,
  load_series, preview, deid, eval and train.
The eval, ask and train runs here are also the no-network checks of those commands (the `no_network` fixture).
"""

from __future__ import annotations

import csv
import logging
import shutil
import warnings
from pathlib import Path

import pydicom
import pytest

from openmedgemma.cli import main
from openmedgemma.errors import OpenMedGemmaError
from tests.imaging.helpers import tree_digest

ROOT = Path(__file__).resolve().parents[1]
NANO_GEMMA, NANO_SIGLIP = ROOT / "models" / "medgemma-nano", ROOT / "models" / "medsiglip-nano"

# Distinctive values written into copies of real files, on top of the identifying values they already carry.
EXTRA_PHI = {
    "PatientName": "Quintavalle^Ottoline^Marguerite",
    "PatientID": "MRN-7730419",
    "PatientBirthDate": "19480317",
    "OtherPatientIDs": "NHS-4857773456",
    "PatientAddress": "17 Larkspur Crescent, Dunmore",
    "PatientTelephoneNumbers": "+44-1632-960983",
    "AccessionNumber": "ACC99812734",
    "InstitutionName": "Saint Hilda Memorial Infirmary",
    "ReferringPhysicianName": "Fairweather^Cornelius",
}
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "PatientAddress",
               "PatientTelephoneNumbers", "AccessionNumber", "InstitutionName", "ReferringPhysicianName")  # fmt: skip


def phi_values(paths) -> set[str]:
    """Identifying values of these files, and the parts of person names, long enough not to occur by chance."""
    values = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in IDENTIFYING:
            value = str(ds.get(keyword, "") or "").strip()
            values.add(value)
            values.update(part for part in value.replace("^", " ").split() if len(part) >= 5)
    return {v for v in values if len(v) >= 5}


def with_phi(src: Path, dst: Path, **extra) -> Path:
    ds = pydicom.dcmread(src)
    for keyword, value in {**EXTRA_PHI, **extra}.items():
        setattr(ds, keyword, value)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


@pytest.fixture(scope="module")
def phi_files(shared_data, tmp_path_factory) -> dict[str, Path]:
    """Real DICOM files carrying identifying values: the CR (Doe^Archibald) and the pacsman series as they are
    (the CR copied),
    a CT and a CR with EXTRA_PHI added, and a CT whose pixel data is cut short (an error path)."""
    dicom = shared_data / "dicom"
    cr = next((dicom / "pydicom_test_files" / "dicomdirtests" / "77654033" / "CR1").iterdir())
    root = tmp_path_factory.mktemp("phi")
    shutil.copy(cr, root / "cr_original.dcm")  # its real path holds the patient ID (77654033): printing a path is fine
    files = {"cr_original": root / "cr_original.dcm", "series": dicom / "pacsman_synthetic" / "dicomseries"}
    files["ct"] = with_phi(dicom / "pydicom_test_files" / "CT_small.dcm", root / "ct.dcm")
    files["cr"] = with_phi(cr, root / "cr.dcm")
    broken = with_phi(dicom / "pydicom_test_files" / "CT_small.dcm", root / "broken.dcm")
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) - 5000])  # PixelData shorter than Rows x Columns x 2
    files["broken"] = broken
    return files


@pytest.fixture
def leaks(phi_files, capsys, caplog):
    """check(*extra_texts): fails if a PHI value is in what was printed, logged or warned since the test began."""
    caplog.set_level(logging.DEBUG)
    dicoms = [p for k, p in phi_files.items() if k != "series"] + sorted(phi_files["series"].glob("*.dcm"))[:3]
    secrets = phi_values(dicoms)
    assert {"Doe^Archibald", "77654033", "PACSMAN1", "CHUV TML", "Quintavalle", "MRN-7730419", "19480317"} <= secrets
    caught = warnings.catch_warnings(record=True)
    recorded = caught.__enter__()
    warnings.simplefilter("always")

    def check(*extra_texts: str) -> str:
        out, err = capsys.readouterr()
        texts = [out, err, caplog.text, *(str(w.message) for w in recorded), *extra_texts]
        joined = "\n".join(texts)
        found = sorted(s for s in secrets if s in joined)
        assert not found, f"identifying values in the output: {found}\n{joined[-3000:]}"
        return joined

    yield check
    caught.__exit__(None, None, None)


def test_load_preview_and_deid_print_no_phi(phi_files, tmp_path, leaks):
    from openmedgemma.imaging import load_image, load_series, to_rgb

    messages = []
    for key in ("ct", "cr", "cr_original"):
        image = load_image(phi_files[key])
        to_rgb(image)
        messages += image.warnings
    series = load_series(phi_files["series"])
    messages += series.warnings
    with pytest.raises(OpenMedGemmaError) as err:
        to_rgb(load_image(phi_files["broken"]))
    messages.append(str(err.value))
    assert str(phi_files["broken"]) in messages[-1]  # the error names the file, not the patient
    for key in ("ct", "cr", "broken"):
        main(["preview", str(phi_files[key]), "--out", str(tmp_path / f"{key}.png")])
    main(["preview", str(phi_files["series"]), "--out", str(tmp_path / "series.png")])
    main(["preview", str(phi_files["ct"]), "--out", str(tmp_path / "w.png"), "--window", "0", "100", "200"])  # bad
    main(["deid", str(phi_files["cr"]), str(tmp_path / "clean.dcm")])
    main(["deid", str(phi_files["series"]), str(tmp_path / "clean_series")])
    burned = with_phi(phi_files["ct"], tmp_path / "burned" / "b.dcm", BurnedInAnnotation="YES")
    main(["deid", str(burned.parent), str(tmp_path / "clean_burned")])
    text = leaks(*messages)
    assert "broken.dcm" in text and "error" in text  # the error cases did run and say something


def test_ask_and_eval_print_and_write_no_phi(phi_files, tmp_path, leaks, no_network):
    assert main(["ask", "--model", str(NANO_GEMMA), "--image", str(phi_files["cr"]), "--max-new-tokens", "4", "Any?"]) == 0
    assert main(["ask", "--model", str(NANO_GEMMA), "--image", str(phi_files["broken"]), "Any?"]) == 2
    # a CheXpert-style folder whose images are the identifying DICOM files
    data = tmp_path / "data"
    base = data / "CheXpert-v1.0-small"
    rows = []
    for i, (key, label) in enumerate([("cr", "1.0"), ("cr_original", "0.0"), ("ct", "1.0")]):
        rel = f"CheXpert-v1.0-small/valid/patient{i:05d}/study1/view1_frontal.dcm"
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(phi_files[key], data / rel)
        rows.append([rel, "Frontal", label])
    with open(base / "valid.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["Path", "Frontal/Lateral", "Cardiomegaly"], *rows])
    out = tmp_path / "results"
    common = ["--data-dir", str(data), "--out", str(out), "--n-boot", "20", "--no-progress",
              "--task-option", "conditions=cardiomegaly"]  # fmt: skip
    assert main(["eval", "chexpert", "--model", str(NANO_GEMMA), *common]) == 0
    assert main(["eval", "chexpert-zeroshot", "--model", str(NANO_SIGLIP), *common]) == 0
    written = [p.read_text(encoding="utf-8", errors="replace") for p in out.rglob("*") if p.is_file() and
               p.suffix in (".json", ".jsonl", ".md", ".csv", ".txt")]  # fmt: skip
    assert len(written) >= 4
    leaks(*written)
    assert no_network.attempts == []


# ------------------------------------------------------------------ inputs are never modified


def test_inputs_are_unchanged_by_load_preview_deid_eval_and_train(phi_files, shared_data, tmp_path, no_network):
    """Also run under the network guard (tests/netguard.py): eval and train try no network either."""
    from openmedgemma.imaging import load_image, load_series, to_rgb
    from tests.train.helpers import run_config, to_toml

    inputs = [phi_files["ct"], phi_files["cr"], phi_files["cr_original"], phi_files["series"],
              shared_data / "medmnist", NANO_GEMMA, NANO_SIGLIP]  # fmt: skip
    before = {str(p): tree_digest(p) for p in inputs}
    to_rgb(load_image(phi_files["ct"]))
    to_rgb(load_image(phi_files["cr_original"]))
    to_rgb(load_series(phi_files["series"]))
    assert main(["preview", str(phi_files["series"]), "--out", str(tmp_path / "s.png")]) == 0
    assert main(["preview", str(phi_files["cr"]), "--out", str(tmp_path / "c.png")]) == 0
    assert main(["deid", str(phi_files["series"]), str(tmp_path / "clean")]) == 0
    common = ["--data-dir", str(shared_data), "--out", str(tmp_path / "res"), "--limit", "6", "--n-boot", "20",
              "--no-progress"]  # fmt: skip
    assert main(["eval", "pneumoniamnist", "--model", str(NANO_GEMMA), *common]) == 0
    assert main(["eval", "pneumoniamnist-zeroshot", "--model", str(NANO_SIGLIP), *common]) == 0
    cfg = run_config("sft", tmp_path / "run", NANO_GEMMA, shared_data,
                     [{"kind": "pneumonia_mnist", "path": "medmnist", "split": "train"}],
                     train={"steps": 2, "batch_size": 2, "checkpoint_every": 1})  # fmt: skip
    (tmp_path / "sft.toml").write_text(to_toml(cfg))
    assert main(["train", "sft", "--config", str(tmp_path / "sft.toml")]) == 0
    after = {str(p): tree_digest(p) for p in inputs}
    assert after == before
    assert no_network.attempts == []
