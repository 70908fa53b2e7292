"""`openmedgemma preview` and `openmedgemma deid`.

preview FILE|FOLDER --out PNG: writes the RGB image the model will see, before the resize to
    896, so windows can be checked. A 2-D image is written as is. A series folder, a zip of one, a
    multi-frame file or a NIfTI volume is sampled like the model input (at most --max-slices) and
    written as a contact sheet: slices in SLICE order, row by row, on a grid ceil(sqrt(n)) slices
    wide, at native resolution, each labelled as in the prompt; `--slice N` writes only SLICE N
    (1-based, as in the prompt) instead. `--slide FILE` (repeatable) previews the patches of a slide
    case instead, labelled SLIDE k PATCH n, each shown at --tile pixels (default 256).
deid IN OUT: de-identifies a DICOM file, or every DICOM file of a folder into a mirrored tree.
    Never writes into IN; refuses OUT equal to IN or inside it. Non-DICOM files are not copied. File and
    folder names that carry an identifier (a UID, the patient's name or ID, a date) are replaced by the new
    SOPInstanceUID / UID or a counter; `--mapping FILE` writes the old-to-new names and UIDs (it
    re-identifies: only when asked, never inside OUT).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from openmedgemma.errors import ImageError
from openmedgemma.imaging.pacs_cli import add_dicomweb_arguments


def register(subparsers) -> None:
    preview = subparsers.add_parser(
        "preview",
        help="write the RGB image MedGemma will see for a medical image, series or volume",
        description=__doc__.split("\n\n", 1)[1].split("deid IN OUT")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    preview.add_argument("source", metavar="FILE", nargs="?", help="image file, a folder holding one DICOM series, "
                         "or a zip of one (or --dicomweb below)")  # fmt: skip
    preview.add_argument("--out", required=True, metavar="PNG", help="PNG file to write")
    windows = preview.add_mutually_exclusive_group()
    windows.add_argument("--preset", help="CT window preset: medgemma (default) or report-v4")
    windows.add_argument(
        "--window", nargs="+", type=float, metavar="LOW HIGH",
        help="custom windows on modality values (HU for CT): 3 pairs for R G B, or 1 pair for gray",
    )
    preview.add_argument("--slice", type=int, metavar="N", help="write only SLICE N of a volume (1-based)")
    preview.add_argument("--modality", help="modality for formats without one (e.g. CT for a NIfTI in HU)")
    preview.add_argument("--series-uid", help="SeriesInstanceUID to use when a folder or zip mixes series")
    preview.add_argument("--max-slices", type=int, default=85, metavar="N", help="slices sampled (default 85)")
    preview.add_argument("--no-labels", action="store_true", help="contact sheet without the SLICE / PATCH labels")
    preview.add_argument("--slide", action="append", default=[], metavar="FILE",
                         help="whole-slide image of a case (repeatable): preview its patches")  # fmt: skip
    preview.add_argument("--magnification", type=float, default=10.0, metavar="X", help="slides: magnification")
    preview.add_argument("--max-patches", type=int, default=126, metavar="N", help="slides: patches in all")
    preview.add_argument("--patch-size", type=int, default=896, metavar="PX", help="slides: patch side (896)")
    preview.add_argument("--patch-seed", type=int, default=0, metavar="S", help="slides: subsample seed (0)")
    preview.add_argument("--tile", type=int, metavar="PX", help="side of each image in a contact sheet "
                         "(default: native for slices, 256 for patches)")  # fmt: skip
    add_dicomweb_arguments(preview)
    preview.set_defaults(func=run_preview)

    deid = subparsers.add_parser(
        "deid",
        help="de-identify DICOM files (PS3.15 Basic Application Level Confidentiality Profile)",
        description="De-identify a DICOM file or a folder tree into OUT (never modifies IN).",
    )
    deid.add_argument("source", metavar="IN", nargs="?", help="DICOM file or folder (none with --dicomweb)")
    deid.add_argument("target", metavar="OUT", nargs="?", help="output file or folder (must not be IN or inside IN)")
    deid.add_argument(
        "--allow-burned-in", action="store_true",
        help="also process files flagged BurnedInAnnotation=YES (their pixels may still show PHI)",
    )
    deid.add_argument(
        "--mapping", metavar="FILE",
        help="write the original -> new file names and UIDs to this CSV (it re-identifies the output: keep it apart)",
    )
    add_dicomweb_arguments(deid, slides=False)
    deid.set_defaults(func=run_deid)


def _windows(args) -> object:
    if args.window is None:
        return args.preset
    values = args.window
    if len(values) not in (2, 6):
        raise ImageError(f"--window takes 2 or 6 numbers (LOW HIGH per window), got {len(values)}")
    return [(values[i], values[i + 1]) for i in range(0, len(values), 2)]


def run_preview(args) -> int:
    from openmedgemma.imaging.inputs import slides_input, volume_input

    windows = _windows(args)  # argument errors before any reading
    if args.dicomweb:
        from openmedgemma.imaging.pacs_cli import run_preview_dicomweb

        return run_preview_dicomweb(args, windows)
    if (args.source is None) == (not args.slide):
        raise ImageError("preview takes one image / series / volume, or --slide FILE (repeatable), not both "
                         "(or --dicomweb URL --study UID)")  # fmt: skip
    if args.slide:
        if args.slice is not None:
            raise ImageError("--slice applies to a series or volume, not to slides")
        made = slides_input(args.slide, magnification=args.magnification, max_patches=args.max_patches,
                            patch_size=args.patch_size, seed=args.patch_seed)  # fmt: skip
        what = f"contact sheet of {len(made.images)} patches from {len(args.slide)} slide(s)"
        return _write_made(made, args, made.summary["source"], what, args.tile or 256)
    made = volume_input(args.source, preset=windows, max_slices=args.max_slices, series_uid=args.series_uid,
                        modality=args.modality)  # fmt: skip
    what = f"contact sheet of {len(made.images)} of {made.summary['total_slices']} slices"
    return _write_made(made, args, args.source, what, args.tile)


def _write_made(made, args, source, what: str, tile: int | None) -> int:
    """A 2-D image as it is, `--slice N` of a volume, or the labelled contact sheet of what the model sees."""
    from openmedgemma.imaging.inputs import contact_sheet as labelled_sheet

    for warning in made.warnings:
        print(f"openmedgemma preview: warning: {warning}", file=sys.stderr)
    if made.summary["kind"] == "image":
        if args.slice is not None:
            raise ImageError(f"{source}: --slice applies to a series or volume; this is one 2-D image")
        return save_preview(made.images[0], args.out, "image")
    if args.slice is not None:
        if not 1 <= args.slice <= len(made.images):
            raise ImageError(f"{source}: --slice {args.slice} is outside SLICE 1..{len(made.images)}")
        return save_preview(made.images[args.slice - 1], args.out, f"SLICE {args.slice} of {len(made.images)}")
    captions = [""] * len(made.images) if args.no_labels else made.captions
    return save_preview(labelled_sheet(made.images, captions, tile), args.out, what)


def write_preview(image, args, windows, source) -> int:
    """Write the PNG of `args.out` for a loaded image or volume (`--slice N`, else a contact sheet)."""
    from openmedgemma.imaging.inputs import volume_input

    made = volume_input(image, preset=windows, max_slices=getattr(args, "max_slices", 85))
    what = f"contact sheet of {len(made.images)} of {made.summary['total_slices']} slices"
    return _write_made(made, args, source, what, getattr(args, "tile", None))


def save_preview(rgb, out, what: str) -> int:
    import numpy as np
    from PIL import Image

    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(rgb)).save(out, format="PNG")
    except OSError as err:
        raise ImageError(f"{out}: cannot write the preview ({err.strerror or err})") from None
    print(f"preview: wrote {out} ({what}, {rgb.shape[1]}x{rgb.shape[0]} RGB)")
    return 0


def contact_sheet(slices):
    """[n, H, W, 3] -> one [rows*H, cols*W, 3] image, row-major, cols = ceil(sqrt(n)) (no labels; see
    imaging.inputs.contact_sheet for the labelled sheet of a prompt's images)."""
    import numpy as np

    count, height, width = slices.shape[:3]
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    sheet = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index, tile in enumerate(slices):
        r, c = divmod(index, columns)
        sheet[r * height:(r + 1) * height, c * width:(c + 1) * width] = tile
    return sheet


def run_deid(args) -> int:
    if args.dicomweb and args.mapping:
        raise ImageError("--mapping applies to a local IN file or folder; a --dicomweb copy is named by the new UIDs")
    if args.dicomweb:
        from openmedgemma.imaging.pacs_cli import run_deid_dicomweb

        return run_deid_dicomweb(args)
    if args.source is None or args.target is None:
        raise ImageError("deid needs IN and OUT (or --dicomweb URL --study UID OUT)")
    from tqdm import tqdm

    from openmedgemma.imaging.deid import UIDMapper
    from openmedgemma.imaging.deid_files import (
        DeidReport, check_mapping_location, check_output_location, deidentify_file, deidentify_tree, output_name,
        plan_tree, write_mapping,
    )  # fmt: skip

    source, target = Path(args.source), Path(args.target)
    mapping = Path(args.mapping) if args.mapping else None
    if not source.exists():
        raise ImageError(f"{source}: no such file or folder")
    mapper = UIDMapper()
    if source.is_file():
        if target.is_dir():
            target = target / output_name(source, mapper)
        check_output_location(source, target)
        if mapping:
            check_mapping_location(mapping, source, target)
        deidentify_file(source, target, mapper, allow_burned_in=args.allow_burned_in)
        if mapping:
            write_mapping(mapping, [(source, target)], source.parent, target.parent, mapper)
        print(f"deid: 1 file de-identified -> {target}")
        return 0
    check_output_location(source, target)
    if mapping:
        check_mapping_location(mapping, source, target)
    report = DeidReport()
    pairs = plan_tree(source, target, mapper)
    progress = tqdm(total=len(pairs), unit="file", desc="deid", file=sys.stderr, disable=None)
    for _ in deidentify_tree(pairs, mapper, report, allow_burned_in=args.allow_burned_in):
        progress.update(1)
    progress.close()
    if mapping:
        written = set(report.written)
        write_mapping(mapping, [(a, b) for a, b in pairs if b in written], source, target, mapper)
        print(f"deid: mapping of original to new names and UIDs -> {mapping} (it re-identifies the output)")
    for _, reason in report.failed:
        print(f"openmedgemma deid: failed: {reason}", file=sys.stderr)
    print(f"deid: {report.summary()} -> {target}")
    if report.failed:
        raise ImageError(f"{source}: {len(report.failed)} file(s) could not be de-identified (listed above)")
    return 0
