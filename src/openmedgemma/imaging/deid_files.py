"""De-identify DICOM files and folder trees, never writing into the input.

A folder's tree is mirrored into the output. Only DICOM files are written: other files are
skipped rather than copied (they may hold identifying information too), and DICOMDIR indexes
are skipped (their records hold names and the old UIDs; rebuild the index from the output).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from openmedgemma.errors import ImageError
from openmedgemma.imaging.deid import UIDMapper, deidentify
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


def plan_tree(source: Path, target: Path) -> list[tuple[Path, Path]]:
    """(input file, output file) pairs mirroring `source` under `target`."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    return [(path, target / path.relative_to(source)) for path in files]


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
