"""De-identify DICOM files and folder trees, never writing into the input.

A folder's tree is mirrored into the output, except that a file or folder name carrying an identifier of
the files is replaced (`deid_names`). Only DICOM files are written: other files are
skipped rather than copied (they may hold identifying information too), and DICOMDIR indexes
are skipped (their records hold names and the old UIDs; rebuild the index from the output).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from openmedgemma.errors import ImageError
from openmedgemma.imaging.deid import UIDMapper, deidentify
from openmedgemma.imaging.deid_names import plan_names
from openmedgemma.imaging.dicom_io import fill_transfer_syntax, is_dicomdir, read_dataset, short_reason
from openmedgemma.imaging.sniff import sniff_format


@dataclass
class DeidReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.written)} file(s) de-identified, {len(self.skipped)} skipped, "
            f"{len(self.failed)} failed"
        )


def check_output_location(source: Path, target: Path) -> None:
    """Refuse an output equal to the input or inside an input folder."""
    src, dst = source.resolve(), target.resolve()
    if dst == src:
        raise ImageError(f"{target}: output is the input itself; choose another output")
    if src.is_dir() and (src in dst.parents):
        raise ImageError(f"{target}: output is inside the input folder {source}; choose a folder outside it")


def check_mapping_location(mapping: Path, source: Path, target: Path) -> None:
    """The mapping re-identifies the output: refuse it inside the output (it would travel with the data), inside
    or equal to the input (never written into), or over an existing file."""
    path = mapping.resolve()
    for place, what in ((target.resolve(), "output"), (source.resolve(), "input")):
        if path == place or place in path.parents:
            raise ImageError(f"{mapping}: the mapping file must not be inside the {what} ({place}); it re-identifies "
                             "the de-identified files, so keep it apart from them")  # fmt: skip
    if path.exists():
        raise ImageError(f"{mapping}: already exists; choose a new mapping file (nothing is overwritten)")


def deidentify_file(source: Path, target: Path, mapper: UIDMapper, *, allow_burned_in: bool = False) -> Path:
    """Write a de-identified copy of one DICOM file to `target` (parents created)."""
    if sniff_format(source) != "dicom":
        raise ImageError(f"{source}: not a DICOM file")
    return deidentify_to(read_dataset(source), str(source), target, mapper, allow_burned_in=allow_burned_in)


def deidentify_to(ds, name: str, target: Path, mapper: UIDMapper, *, allow_burned_in: bool = False) -> Path:
    """Write a de-identified copy of a data set read from `name` (a file, or bytes from a store) to `target`."""
    if is_dicomdir(ds):
        raise ImageError(f"{name}: a DICOMDIR index, not an instance; rebuild it from the de-identified files")
    try:
        fill_transfer_syntax(ds)  # a raw data set (no file meta) is written as a proper file
        clean = deidentify(ds, mapper, allow_burned_in=allow_burned_in, source=name)
    except ImageError:
        raise
    except Exception as err:  # malformed elements surface while walking the data set
        raise ImageError(f"{name}: corrupt DICOM, cannot de-identify ({short_reason(err)})") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        clean.save_as(target, enforce_file_format=True)
    except Exception as err:
        target.unlink(missing_ok=True)
        raise ImageError(f"{name}: de-identified data set cannot be written to {target} ({short_reason(err)})") from None
    return target


def plan_tree(source: Path, target: Path, mapper: UIDMapper) -> list[tuple[Path, Path]]:
    """(input file, output file) pairs mirroring `source` under `target`; names that carry an identifier of
    the files (a UID, the patient's name or ID, a date...) are replaced (see `deid_names`)."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    return plan_names(source, target, files, mapper)


def output_name(source: Path, mapper: UIDMapper) -> str:
    """The name for one de-identified file written into a folder: its own, unless that identifies it."""
    return plan_names(source.parent, Path(), [source], mapper)[0][1].name


def write_mapping(path: Path, pairs: list[tuple[Path, Path]], source: Path, target: Path, mapper: UIDMapper) -> None:
    """The old-to-new file names and UIDs as CSV (kind, original, deidentified). It re-identifies the
    output, so it is written only when asked, and never inside the output."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["kind", "original", "deidentified"])
        for old, new in pairs:
            out.writerow(["file", old.relative_to(source).as_posix(), new.relative_to(target).as_posix()])
        for old, new in mapper.items():
            out.writerow(["uid", old, new])


def deidentify_tree(
    pairs: list[tuple[Path, Path]],
    mapper: UIDMapper,
    report: DeidReport,
    *,
    allow_burned_in: bool = False,
) -> Iterator[Path]:
    """De-identify each pair, recording results in `report`; yields each input as it is done."""
    for source, target in pairs:
        try:
            kind = sniff_format(source)
        except ImageError as err:
            report.skipped.append((source, str(err)))
            yield source
            continue
        if kind != "dicom":
            report.skipped.append((source, f"{source}: {kind.upper()} file, not DICOM (not copied)"))
            yield source
            continue
        try:
            report.written.append(deidentify_file(source, target, mapper, allow_burned_in=allow_burned_in))
        except ImageError as err:
            bucket = report.skipped if "DICOMDIR" in str(err) else report.failed
            bucket.append((source, str(err)))
        yield source
