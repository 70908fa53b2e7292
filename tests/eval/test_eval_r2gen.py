"""Report generation from R2Gen's annotation.json (IU X-ray and MIMIC-CXR), as copies of it really differ:
the standard {"train", "val", "test"} keys, other key spellings, entries filed under the wrong key (their own
`split` field wins) and a bare list. Images are the two real NIH PNGs / JPGs from the shared data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import eval_fixtures as fx
from eval_scripted import ScriptedModel, conversation_images
from openmedgemma.errors import DataError
from openmedgemma.eval import get_task, run_task

REPORTS = {  # id -> (split, report, source image)
    "CXR1_1_IM-0001": ("train", "The heart is enlarged. No pneumothorax.", fx.CARDIO),
    "CXR2_1_IM-0002": ("val", "The lungs are clear. No pleural effusion.", fx.NORMAL),
    "CXR3_1_IM-0003": ("test", "The cardiac silhouette is enlarged. Cardiomegaly.", fx.CARDIO),
    "CXR4_1_IM-0004": ("test", "No acute cardiopulmonary abnormality.", fx.NORMAL),
}


def entry(uid, split, report, image_path, **extra):
    return {"id": uid, "report": report, "image_path": image_path, "split": split, **extra}


def write_iu(root: Path, cxr: Path, layout: str = "standard") -> Path:
    folder = root / "iu_xray"
    entries = []
    for uid, (split, report, src) in REPORTS.items():
        paths = [f"{uid}/0.png", f"{uid}/1.png"]  # frontal then lateral, as R2Gen lists them
        for p in paths:
            fx._copy_image(cxr / src, folder / "images" / p)
        entries.append(entry(uid, split, report, paths))
    if layout == "standard":
        data = {s: [e for e in entries if e["split"] == s] for s in ("train", "val", "test")}
    elif layout == "odd keys":  # "training" / "validation", one test entry filed under "validation"
        data = {"version": "1.0", "training": [entries[0]], "validation": [entries[1], entries[2]], "test": [entries[3]]}
    else:  # a bare list: each entry carries its split
        data = entries
    (folder / "annotation.json").write_text(json.dumps(data), encoding="utf-8")
    return folder


def references(task) -> dict[str, str]:
    return {Path(conversation_images(e.messages)[0]).parent.name: e.target for e in task.load_examples()}


@pytest.mark.parametrize("layout", ["standard", "odd keys", "bare list"])
def test_iu_xray_annotation_json_test_split_by_default(shared_data, tmp_path, layout):
    folder = write_iu(tmp_path / "data", shared_data / "cxr_samples", layout)
    task = get_task("iu-xray-report", folder)
    expected = {uid: report for uid, (split, report, _) in REPORTS.items() if split == "test"}
    assert references(task) == expected
    [image] = conversation_images(task.load_examples()[0].messages)
    assert Path(image).name == "0.png" and Path(image).is_file()  # the first listed image, under images/
    assert references(get_task("iu-xray-report", folder, split="val")) == {"CXR2_1_IM-0002": REPORTS["CXR2_1_IM-0002"][1]}
    echo = ScriptedModel(lambda c: expected[Path(conversation_images(c)[0]).parent.name], "echo")
    res = run_task(task, echo, out_dir=tmp_path, n_boot=20, progress=False)
    assert res["counts"]["n"] == 2 and res["metrics"]["rouge_l"]["value"] == 1.0


def test_mimic_cxr_annotation_json(shared_data, tmp_path):
    folder = tmp_path / "mimic_cxr"
    entries = []
    for n, (uid, (split, report, src)) in enumerate(REPORTS.items()):
        path = f"p10/p1000003{n}/s5000000{n}/{uid.lower()}.jpg"
        fx._copy_image(shared_data / "cxr_samples" / src, folder / "images" / path)
        entries.append(entry(f"dicom-{n}", "validate" if split == "val" else split, report, [path],
                             study_id=50000000 + n, subject_id=10000030 + n))  # fmt: skip
    (folder / "annotation.json").write_text(json.dumps({"train": entries[:1], "val": entries[1:2], "test": entries[2:]}))
    task = get_task("mimic-cxr-report", tmp_path)
    assert sorted(e.id for e in task.load_examples()) == ["dicom-2", "dicom-3"]
    assert [e.id for e in get_task("mimic-cxr-report", tmp_path, split="validate").load_examples()] == ["dicom-1"]


def test_bad_annotation_json_names_the_file_and_entry(shared_data, tmp_path):
    folder = write_iu(tmp_path / "data", shared_data / "cxr_samples")
    path = folder / "annotation.json"
    data = json.loads(path.read_text())
    del data["test"][1]["report"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotation.json: test\[1\]: missing .*'report'"):
        get_task("iu-xray-report", folder).load_examples()
    data["test"][1].update(report="x", split="holdout")
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"test\[1\]: split 'holdout' is not train, val or test"):
        get_task("iu-xray-report", folder).load_examples()
    path.write_text("{not json")
    with pytest.raises(DataError, match="annotation.json: not readable JSON"):
        get_task("iu-xray-report", folder).load_examples()
    with pytest.raises(DataError, match="split must be train, val or test"):
        get_task("iu-xray-report", folder, split="all").load_examples()
