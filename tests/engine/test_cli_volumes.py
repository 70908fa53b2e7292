"""`openmedgemma ask` / `chat` / `preview` end to end with the bundled nano model on a DICOM series folder,
a zip of it and a case of two pyramidal TIFF slides written here; the bad inputs of issue 15, one line each."""

from __future__ import annotations

import json
import shutil
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from openmedgemma.cli import main
from openmedgemma.engine.cli import SLIDES_INSTRUCTION, VOLUME_INSTRUCTION
from openmedgemma.imaging.inputs import slides_input, volume_input
from openmedgemma.tokenizer import Tokenizer
from tests.engine.test_volumes import NANO
from tests.imaging.test_inputs import tissue_slide


@pytest.fixture(scope="module")
def series_zip(pacsman_series, tmp_path_factory):
    path = tmp_path_factory.mktemp("zip") / "series.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(pacsman_series.iterdir()):
            archive.write(file, file.name)
    return path


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    return (tissue_slide(folder / "a.tif", (0, 0, 1024, 768)), tissue_slide(folder / "b.tif", (256, 256, 512, 512)))


def ask_json(capsys, *argv) -> dict:
    code = main(["ask", *map(str, argv), "--max-new-tokens", "4", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def prompt_length(content: list[dict]) -> int:
    return len(Tokenizer.from_pretrained(NANO).encode_chat([{"role": "user", "content": content}], image_seq_length=16))


def test_ask_series_folder_and_zip(pacsman_series, series_zip, capsys):
    folder = ask_json(capsys, "--image", pacsman_series, "--max-slices", "12", "Which slices show the phantom?")
    [summary] = folder["inputs"]
    assert summary["kind"] == "volume" and summary["slices"] == 12 and summary["total_slices"] == 128
    assert summary["modality"] == "MR" and summary["preset"] is None
    # the exact layout: instruction, 12 x (image, "SLICE n"), then the question
    items = volume_input(pacsman_series, max_slices=12).content
    question = {"type": "text", "text": "Which slices show the phantom?"}
    expected = [{"type": "text", "text": VOLUME_INSTRUCTION}, *items, question]
    assert folder["prompt_tokens"] == prompt_length(expected)
    zipped = ask_json(capsys, "--image", series_zip, "--max-slices", "12", "Which slices show the phantom?")
    assert zipped["inputs"][0]["slice_indices"] == summary["slice_indices"]
    assert (zipped["answer"], zipped["prompt_tokens"]) == (folder["answer"], folder["prompt_tokens"])


def test_ask_two_slides(two_slides, capsys):
    out = ask_json(capsys, "--slide", two_slides[0], "--slide", two_slides[1], "--magnification", "20",
                   "--patch-size", "128", "--max-patches", "13", "Grade the tumour.")  # fmt: skip
    [summary] = out["inputs"]
    assert summary["kind"] == "slides" and summary["patches"] == 13
    assert [s["patches"] for s in summary["slides"]] == [12, 1]
    items = slides_input(list(two_slides), magnification=20, patch_size=128, max_patches=13).content
    expected = [{"type": "text", "text": SLIDES_INSTRUCTION}, *items, {"type": "text", "text": "Grade the tumour."}]
    assert out["prompt_tokens"] == prompt_length(expected)


def test_chat_attaches_a_volume(pacsman_series, monkeypatch, capsys):
    lines = iter([f"/image {pacsman_series}\n", "What is this?\n", "/quit\n"])
    monkeypatch.setattr(sys, "stdin", type("Lines", (), {"isatty": lambda self: False,
                                                         "readline": lambda self: next(lines, "")})())  # fmt: skip
    assert main(["chat", "--max-slices", "5", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "image attached" in captured.err and len(captured.out.splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    (["--max-slices", "85"], "85 slices make a prompt of 2,"),  # nano's context is 2048 tokens
    (["--series-uid", "1.2.3"], "no series with SeriesInstanceUID 1.2.3"),
])  # fmt: skip
def test_series_errors_are_one_line(pacsman_series, extra, message, capsys):
    assert main(["ask", "--image", str(pacsman_series), *extra, "Q?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (the nano notice may come first, once per process)
    assert err.startswith(f"openmedgemma ask: error: {pacsman_series}: ") and message in err
    if "slices make" in message:  # the number it names fits
        fit = err.split("at most ")[1].split(" slices fit (set max_slices / --max-slices to ")[0]
        assert main(["ask", "--image", str(pacsman_series), "--max-slices", fit, "--max-new-tokens", "1", "Q?"]) == 0


def test_folder_with_two_series_names_them(pacsman_series, shared_data, tmp_path, capsys):
    shutil.copytree(pacsman_series, tmp_path / "mr")
    shutil.copy(shared_data / "dicom" / "pydicom_test_files" / "CT_small.dcm", tmp_path / "ct.dcm")
    assert main(["ask", "--image", str(tmp_path), "Q?"]) == 2
    err = capsys.readouterr().err
    assert "files from 2 series mixed" in err and "128 file(s)" in err and "1 file(s)" in err


def test_slide_errors_are_one_line(tmp_path, two_slides, capsys):
    blank = tissue_slide(tmp_path / "glass.tif", (0, 0, 0, 0))
    assert main(["ask", "--slide", str(two_slides[0]), "--slide", str(blank), "--magnification", "20",
                 "--patch-size", "128", "Q?"]) == 2  # fmt: skip
    assert "glass.tif: no tissue found" in capsys.readouterr().err
    assert main(["ask", "--slide", str(tmp_path / "none.svs"), "Q?"]) == 2
    assert "none.svs: slide file not found" in capsys.readouterr().err


def test_preview_labels_slices_and_patches(pacsman_series, series_zip, two_slides, tmp_path, capsys):
    assert main(["preview", str(series_zip), "--max-slices", "6", "--out", str(tmp_path / "v.png")]) == 0
    assert "contact sheet of 6 of 128 slices" in capsys.readouterr().out
    sheet = np.array(Image.open(tmp_path / "v.png"))
    images = volume_input(pacsman_series, max_slices=6).images
    assert sheet.shape == (2 * 128, 3 * 128, 3)
    assert not np.array_equal(sheet[:12, :50], images[0][:12, :50])  # "SLICE 1" drawn on the first tile
    np.testing.assert_array_equal(sheet[64:128, :128], images[0][64:])
    argv = ["preview", "--slide", str(two_slides[0]), "--slide", str(two_slides[1]), "--magnification", "20",
            "--patch-size", "128", "--max-patches", "5", "--tile", "64", "--out", str(tmp_path / "s.png")]  # fmt: skip
    assert main(argv) == 0
    assert "contact sheet of 5 patches from 2 slide(s)" in capsys.readouterr().out
    assert np.array(Image.open(tmp_path / "s.png")).shape == (2 * 64, 3 * 64, 3)
    assert main(["preview", "--out", str(tmp_path / "x.png")]) == 2
    assert "not both" in capsys.readouterr().err
