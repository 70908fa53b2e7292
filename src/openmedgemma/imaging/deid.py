"""DICOM de-identification: the PS3.15 Basic Application Level Confidentiality Profile.

The attribute table (PS3.15 Table E.1-1, edition 2026c) comes from the `dicom-anonymizer`
package; the actions are applied here. Compound actions take the choice that keeps any IOD
conformant without knowing each attribute's Type: Z/D, X/D, X/Z/D -> D (dummy value),
X/Z -> Z (empty), X/Z/U* -> U (UIDs remapped, sequences kept and their UIDs remapped).
Rules apply at every nesting level. Also: all private attributes, group lengths and trailing
padding are removed; UIDs are remapped by a `UIDMapper` shared across the files of a run
(consistent within the run, salted so originals cannot be recovered by hashing guesses);
Patient Identity Removed = YES, De-identification Method (+ code 113100) are set.
Pixel data is never touched: burned-in text is not detected, so a file flagged
BurnedInAnnotation = YES is refused unless the caller accepts that risk explicitly.
"""

from __future__ import annotations

import copy
import hashlib
import secrets
import warnings
from functools import lru_cache

from openmedgemma.errors import ImageError

PROFILE_EDITION = "2026c"
METHOD = f"PS3.15 Basic Profile {PROFILE_EDITION} (openmedgemma)"  # LO: at most 64 characters
_COMPOUND = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U",
    "Z_D_TAGS": "D", "X_Z_TAGS": "Z", "X_D_TAGS": "D", "X_Z_D_TAGS": "D", "X_Z_U_STAR_TAGS": "U",
}
_TEXT_DUMMY = "ANONYMIZED"
_DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y", "DS": "0", "IS": "0"}
_TEXT_VRS = {"PN", "LO", "SH", "LT", "ST", "UT", "UC", "CS", "AE"}
_BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}
_FILE_META_REMOVED = (0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102)
_STANDARD_UID_ROOT = "1.2.840.10008."


class UIDMapper:
    """Replaces UIDs consistently within one run: the same input UID always gets the same
    "2.25.<128-bit>" UID from a mapper; a new mapper (new random salt) gives new ones.
    Standard DICOM UIDs (SOP classes, transfer syntaxes: root 1.2.840.10008) are kept."""

    def __init__(self, salt: bytes | None = None):
        self._salt = salt if salt is not None else secrets.token_bytes(32)
        self._mapping: dict[str, str] = {}

    def __call__(self, uid: str) -> str:
        uid = str(uid).strip().rstrip("\x00")
        if not uid or uid.startswith(_STANDARD_UID_ROOT):
            return uid
        if uid not in self._mapping:
            digest = hashlib.sha256(self._salt + uid.encode("ascii", "replace")).digest()[:16]
            self._mapping[uid] = "2.25." + str(int.from_bytes(digest, "big"))
        return self._mapping[uid]

    def __len__(self) -> int:
        return len(self._mapping)

    def items(self) -> list[tuple[str, str]]:
        """(original, new) UID pairs replaced so far, in the order first seen."""
        return list(self._mapping.items())


@lru_cache(maxsize=1)
def _profile() -> tuple[dict[int, str], list[tuple[int, int, str]]]:
    """(exact tag -> action, [(value, mask, action)] for repeating groups), PS3.15 Table E.1-1."""
    from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table

    exact: dict[int, str] = {}
    masked: list[tuple[int, int, str]] = []
    for group_name, action in _COMPOUND.items():
        for entry in getattr(table, group_name):
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            else:  # (group, element, group mask, element mask): repeating groups 50xx / 60xx
                value = (entry[0] << 16) | entry[1]
                mask = (entry[2] << 16) | entry[3]
                masked.append((value, mask, action))
    return exact, masked


def profile_action(tag: int) -> str:
    """The (resolved) Basic Profile action for a tag: "D", "Z", "X", "U" or "K" (keep)."""
    exact, masked = _profile()
    if tag in exact:
        return exact[tag]
    for value, mask, action in masked:
        if tag & mask == value:
            return action
    return "K"


def deidentify(dataset, mapper: UIDMapper | None = None, *, allow_burned_in: bool = False, source: str = "<dataset>"):
    """A de-identified copy of a pydicom Dataset (the input is left unchanged).

    Raises ImageError for BurnedInAnnotation = YES unless `allow_burned_in` (the profile only
    cleans the header: text burned into the pixels would stay readable)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    burned = str(dataset.get("BurnedInAnnotation", "") or "").strip().upper()
    if burned == "YES" and not allow_burned_in:
        raise ImageError(
            f"{source}: BurnedInAnnotation is YES: patient information is burned into the pixels, "
            "which header de-identification cannot remove; refused (override only after checking "
            "or masking the pixels: allow_burned_in=True / --allow-burned-in)"
        )
    mapper = mapper if mapper is not None else UIDMapper()
    ds = copy.deepcopy(dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom value-validation chatter on dummy values
        ds.remove_private_tags()
        _apply(ds, mapper)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = [code]
    ds.LongitudinalTemporalInformationModified = "REMOVED"
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        for tag in _FILE_META_REMOVED:
            if tag in meta:
                del meta[tag]
        if "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if "MediaStorageSOPInstanceUID" in meta and "SOPInstanceUID" not in ds:
            meta.MediaStorageSOPInstanceUID = mapper(meta.MediaStorageSOPInstanceUID)
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "OPENMEDGEMMA"
    return ds


def _apply(ds, mapper: UIDMapper, *, map_all_uids: bool = False) -> None:
    for elem in list(ds):
        tag = int(elem.tag)
        if (tag & 0xFFFF == 0 and tag >> 16 != 0x0002) or tag == 0xFFFCFFFC:
            del ds[elem.tag]  # group lengths (now wrong) and trailing padding
            continue
        action = profile_action(tag)
        if action == "X":
            del ds[elem.tag]
            continue
        if action == "Z" or (action == "D" and elem.VR == "SQ"):
            elem.value = _empty(elem.VR)
            continue
        if action == "D":
            elem.value = _dummy(elem, mapper)
        elif elem.VR == "UI" and (action == "U" or map_all_uids):
            elem.value = _map_uids(elem.value, mapper)
        if elem.VR == "SQ":
            for item in elem.value:
                _apply(item, mapper, map_all_uids=map_all_uids or action == "U")


def _empty(vr: str):
    if vr == "SQ":
        return []
    if vr in _BINARY_VRS:
        return b""
    return "" if vr in _TEXT_VRS or vr in _DUMMY or vr in ("UI", "UR") else None


def _dummy(elem, mapper: UIDMapper):
    vr = elem.VR
    if vr == "UI":
        return _map_uids(elem.value, mapper)
    if vr in _TEXT_VRS:
        return _TEXT_DUMMY
    if vr in _DUMMY:
        return _DUMMY[vr]
    if vr in _BINARY_VRS:
        return b""
    if vr in ("US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT"):
        return 0
    return _empty(vr)


def _map_uids(value, mapper: UIDMapper):
    if value is None or value == "":
        return value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [mapper(v) for v in value]
    return mapper(value)
