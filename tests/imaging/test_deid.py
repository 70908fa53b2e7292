"""De-identification of the sample files: PHI gone, UIDs remapped consistently, pixels intact."""

from __future__ import annotations

import copy
import io
import re

import numpy as np
import pydicom
import pytest

from openmedgemma.errors import ImageError
from openmedgemma.imaging import UIDMapper, deidentify, load_image, load_series
from openmedgemma.imaging.deid import METHOD, profile_action
from openmedgemma.imaging.deid_files import deidentify_file

# Identifying attributes, chosen here from PS3.15 Table E.1-1 independently of the code.
PHI_KEYWORDS = [
    "PatientName", "PatientID", "PatientBirthDate", "PatientAge", "PatientWeight", "PatientSize",
    "PatientAddress", "OtherPatientIDs", "InstitutionName", "InstitutionAddress",
    "ReferringPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName", "StationName",
    "AccessionNumber", "StudyID", "DeviceSerialNumber", "StudyDate", "SeriesDate",
    "AcquisitionDate", "ContentDate", "InstanceCreationDate", "StudyTime", "SeriesTime",
    "AcquisitionTime", "ContentTime", "InstanceCreationTime", "ImageComments",
]
UID_KEYWORDS = [
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
    "InstanceCreatorUID",
]


@pytest.fixture(scope="module")
def sample_files(dicom_dir):
    tests = dicom_dir / "pydicom_test_files"
    return [
        tests / "CT_small.dcm",
        tests / "MR_small.dcm",
        dicom_dir / "pacsman_synthetic" / "dicomseries" / "slice64.dcm",
        next(p for p in (tests / "dicomdirtests" / "77654033" / "CR1").iterdir()),
        tests / "dicomdirtests" / "TINY_ALPHA" / "PT000000" / "ST000000" / "SE000000" / "IM00000J",
    ]


def phi_strings(ds) -> set[str]:
    """Every identifying value of the original, nested sequences included (>= 4 characters)."""
    found = set()

    def visit(dataset):
        for elem in dataset:
            if elem.VR == "SQ":
                for item in elem.value:
                    visit(item)
            elif elem.keyword in PHI_KEYWORDS + UID_KEYWORDS or elem.tag.is_private:
                values = elem.value if elem.VM > 1 else [elem.value]
                for value in values:
                    text = str(value).strip()
                    numeric = re.fullmatch(r"[-+]?\d*\.?\d+", text) and elem.VR not in ("DA", "TM", "DT", "UI")
                    dummy = text in ("000000", "19000101", "ANONYMIZED")  # same as a replacement value
                    if len(text) >= 4 and text != "None" and not numeric and not dummy:  # 1.000000 is not PHI
                        found.add(text)

    visit(ds)
    return found


def header_bytes(ds) -> bytes:
    """The written file without its pixel data (pixel bytes could match any short string)."""
    header = copy.deepcopy(ds)
    if "PixelData" in header:
        del header.PixelData
    buffer = io.BytesIO()
    header.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_every_phi_value_of_the_sample_files_is_gone(sample_files, tmp_path):
    mapper = UIDMapper()
    for path in sample_files:
        original = pydicom.dcmread(path)
        secrets_ = phi_strings(original)
        assert secrets_, f"{path} should carry identifying values"
        out = deidentify_file(path, tmp_path / path.name, mapper)
        clean = pydicom.dcmread(out)
        written = header_bytes(clean)
        remaining = {str(v).strip() for elem in clean.iterall() for v in (elem.value if elem.VM > 1 else [elem.value])}
        # exact values anywhere (nested too); long values also as raw bytes anywhere in the header
        # (short ones may legitimately be part of kept values: MR_small's InstitutionName
        # "TOSHIBA" is inside its Manufacturer "TOSHIBA_MEC", which the profile keeps)
        leaked = [s for s in secrets_ if s in remaining or (len(s) >= 8 and s.encode("latin-1", "ignore") in written)]
        assert not leaked, f"{path.name}: {leaked}"
        assert not any(elem.tag.is_private for elem in clean.iterall())
        for keyword in PHI_KEYWORDS:
            if keyword in clean:
                assert str(clean[keyword].value) in ("", "ANONYMIZED", "19000101", "000000", "000Y", "0", "None")
        assert clean.PatientIdentityRemoved == "YES" and clean.DeidentificationMethod == METHOD
        assert clean.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert clean.SOPClassUID == original.SOPClassUID and clean.Modality == original.Modality
        if "PixelData" in original:
            assert clean.PixelData == original.PixelData
            np.testing.assert_array_equal(load_image(out).pixels, load_image(path).pixels)


def test_uids_are_remapped_consistently_within_a_run(pacsman_series, tmp_path):
    mapper = UIDMapper()
    files = sorted(pacsman_series.glob("slice1?.dcm"))
    outputs = [deidentify_file(f, tmp_path / "run1" / f.name, mapper) for f in files]
    clean = [pydicom.dcmread(f) for f in outputs]
    original = [pydicom.dcmread(f) for f in files]
    assert len({ds.StudyInstanceUID for ds in clean}) == 1 and len({ds.SeriesInstanceUID for ds in clean}) == 1
    assert len({ds.SOPInstanceUID for ds in clean}) == len(files)
    for before, after in zip(original, clean):
        for keyword in UID_KEYWORDS:
            if keyword in before:
                assert after[keyword].value != before[keyword].value
                assert re.fullmatch(r"2\.25\.[1-9]\d*", after[keyword].value) and len(after[keyword].value) <= 64
        assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
        assert after.SOPClassUID == before.SOPClassUID  # standard UIDs are kept
    # the de-identified series still loads, in the same order, with the same pixels
    np.testing.assert_array_equal(load_series(tmp_path / "run1").pixels, load_series(files).pixels)
    other = deidentify_file(files[0], tmp_path / "run2" / files[0].name, UIDMapper())
    assert pydicom.dcmread(other).StudyInstanceUID != clean[0].StudyInstanceUID


def test_input_dataset_is_not_modified(ct_small):
    ds = pydicom.dcmread(ct_small)
    before = copy.deepcopy(ds)
    deidentify(ds)
    assert ds == before and ds.PatientName == "CompressedSamples^CT1"


def test_burned_in_annotation_is_refused_unless_allowed(ct_small):
    ds = pydicom.dcmread(ct_small)
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(ImageError, match=r"CT_small.dcm: BurnedInAnnotation is YES: patient information is burned into the pixels"):
        deidentify(ds, source=str(ct_small))
    assert deidentify(ds, allow_burned_in=True).PatientIdentityRemoved == "YES"


def test_profile_actions_follow_table_e1_1():
    def tag(keyword):
        return pydicom.datadict.tag_for_keyword(keyword)

    assert profile_action(tag("PatientName")) == "Z"
    assert profile_action(tag("SOPInstanceUID")) == "U"
    assert profile_action(tag("OtherPatientIDsSequence")) == "X"
    assert profile_action(tag("InstitutionName")) == "D"  # X/Z/D, kept conformant as a dummy
    assert profile_action(0x60023000) == "X" and profile_action(0x50040010) == "X"  # overlays, curves
    assert profile_action(tag("Modality")) == "K" and profile_action(tag("PixelData")) == "K"
    assert len(METHOD) <= 64  # LO


def test_mapper_keeps_standard_uids_and_is_salted():
    mapper = UIDMapper(salt=b"fixed")
    assert mapper("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"
    assert mapper("1.2.3.4") == mapper("1.2.3.4") == UIDMapper(salt=b"fixed")("1.2.3.4")
    assert UIDMapper(salt=b"other")("1.2.3.4") != mapper("1.2.3.4") and len(mapper) == 1


def test_raw_data_set_is_written_as_a_proper_file(ct_small, tmp_path):
    ds = pydicom.dcmread(ct_small)
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(tmp_path / "raw.dcm", ds, implicit_vr=True, little_endian=True)
    out = deidentify_file(tmp_path / "raw.dcm", tmp_path / "clean" / "raw.dcm", UIDMapper())
    assert out.read_bytes()[128:132] == b"DICM"
    clean = pydicom.dcmread(out)
    assert clean.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    assert clean.PatientName == "" and clean.PixelData == ds.PixelData
