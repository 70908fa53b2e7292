"""`openmedgemma deid` and `openmedgemma preview` through openmedgemma.cli.main."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pydicom
from PIL import Image

from openmedgemma.cli import main
from openmedgemma.imaging import load_image, load_series, sample_slices, to_rgb

from .helpers import tree_digest


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_deid_folder_mirrors_the_tree_and_leaves_the_input_unchanged(dicom_dir, tmp_path, capsys):
    source = dicom_dir / "pacsman_synthetic"
    before = tree_digest(source)
    code, out, err = run(capsys, "deid", source, tmp_path / "clean")
    assert code == 0, err
    assert tree_digest(source) == before
    assert out.strip().splitlines()[-1] == f"deid: 128 file(s) de-identified, 5 skipped, 0 failed -> {tmp_path / 'clean'}"
    written = sorted(p.relative_to(tmp_path / "clean") for p in (tmp_path / "clean").rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(source) for p in (source / "dicomseries").glob("*.dcm"))
    clean = pydicom.dcmread(tmp_path / "clean" / "dicomseries" / "slice7.dcm")
    original = pydicom.dcmread(source / "dicomseries" / "slice7.dcm")
    assert clean.PatientName == "" and clean.PatientIdentityRemoved == "YES"
    assert clean.PixelData == original.PixelData
    np.testing.assert_array_equal(load_series(tmp_path / "clean").pixels, load_series(source / "dicomseries").pixels)


def test_deid_single_file_and_into_a_folder(ct_small, tmp_path, capsys):
    code, out, _ = run(capsys, "deid", ct_small, tmp_path / "ct.dcm")
    assert code == 0 and out.strip() == f"deid: 1 file de-identified -> {tmp_path / 'ct.dcm'}"
    (tmp_path / "outdir").mkdir()
    assert run(capsys, "deid", ct_small, tmp_path / "outdir")[0] == 0
    assert pydicom.dcmread(tmp_path / "outdir" / "CT_small.dcm").PatientID == "ANONYMIZED"


def test_deid_refuses_output_inside_or_equal_to_the_input(tmp_path, ct_small, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(ct_small, folder / "a.dcm")
    before = tree_digest(folder)
    code, out, err = run(capsys, "deid", folder, folder / "out")
    assert code == 2 and "inside the input folder" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "deid", folder, folder)
    assert code == 2 and "output is the input itself" in err
    code, _, err = run(capsys, "deid", folder / "a.dcm", folder / "a.dcm")
    assert code == 2 and "output is the input itself" in err
    assert tree_digest(folder) == before


def test_deid_burned_in_files_fail_unless_allowed(tmp_path, ct_small, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    ds = pydicom.dcmread(ct_small)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(folder / "burned.dcm")
    shutil.copy(ct_small, folder / "plain.dcm")
    code, out, err = run(capsys, "deid", folder, tmp_path / "out")
    assert code == 2
    assert "1 file(s) de-identified, 0 skipped, 1 failed" in out
    assert "burned.dcm: BurnedInAnnotation is YES" in err and err.strip().splitlines()[-1].startswith("openmedgemma deid: error:")
    code, out, _ = run(capsys, "deid", folder, tmp_path / "out2", "--allow-burned-in")
    assert code == 0 and "2 file(s) de-identified" in out


def test_deid_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    (tmp_path / "broken.dcm").write_bytes(b"")
    code, out, err = run(capsys, "deid", tmp_path / "broken.dcm", tmp_path / "x.dcm")
    assert code == 2 and out == ""
    assert err.strip() == f"openmedgemma deid: error: {tmp_path / 'broken.dcm'}: empty file (0 bytes)"
    assert not (tmp_path / "x.dcm").exists()


def test_preview_ct_writes_what_the_model_sees(ct_small, tmp_path, capsys):
    code, out, _ = run(capsys, "preview", ct_small, "--out", tmp_path / "ct.png")
    assert code == 0 and "128x128 RGB" in out
    written = np.array(Image.open(tmp_path / "ct.png"))
    np.testing.assert_array_equal(written, to_rgb(load_image(ct_small)))
    code, _, _ = run(capsys, "preview", ct_small, "--out", tmp_path / "v4.png", "--preset", "report-v4")
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "v4.png")), to_rgb(load_image(ct_small), "report-v4"))
    run(capsys, "preview", ct_small, "--out", tmp_path / "w.png", "--window", "-100", "100")
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "w.png")), to_rgb(load_image(ct_small), [(-100, 100)]))


def test_preview_series_contact_sheet_and_single_slice(pacsman_series, tmp_path, capsys):
    code, out, _ = run(capsys, "preview", pacsman_series, "--out", tmp_path / "sheet.png", "--no-labels")
    assert code == 0 and "contact sheet of 85 of 128 slices" in out
    sheet = np.array(Image.open(tmp_path / "sheet.png"))
    slices = to_rgb(sample_slices(load_series(pacsman_series)))
    assert sheet.shape == (9 * 128, 10 * 128, 3)  # ceil(sqrt(85)) = 10 columns, 9 rows
    for index in (0, 9, 10, 84):
        r, c = divmod(index, 10)
        np.testing.assert_array_equal(sheet[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128], slices[index])
    assert (sheet[8 * 128:, 5 * 128:] == 0).all()  # unused cells stay black
    code, out, _ = run(capsys, "preview", pacsman_series, "--out", tmp_path / "s40.png", "--slice", "40")
    assert code == 0 and "SLICE 40 of 85" in out
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "s40.png")), slices[39])


def test_preview_bad_file_is_one_line_and_status_2(tmp_path, capsys):
    (tmp_path / "junk.dcm").write_text("x" * 500)
    code, out, err = run(capsys, "preview", tmp_path / "junk.dcm", "--out", tmp_path / "p.png")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"openmedgemma preview: error: {tmp_path / 'junk.dcm'}: content does not match")
    assert not (tmp_path / "p.png").exists()
    code, _, err = run(capsys, "preview", tmp_path / "junk.dcm", "--out", tmp_path / "p.png", "--window", "1", "2", "3")
    assert code == 2 and "2 or 6 numbers" in err


def test_cli_import_stays_light():
    code = (
        "import sys; from openmedgemma.cli import build_parser; build_parser(); "
        "heavy = [m for m in ('torch', 'pydicom', 'nibabel', 'tiffslide') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr
