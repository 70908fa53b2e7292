"""DICOMweb on the command line: `openmedgemma dicomweb studies|series`, and the --dicomweb options of
`ask`, `preview` and `deid`.

    openmedgemma dicomweb studies --dicomweb http://pacs:8042/dicom-web --patient P1 --modality CT
    openmedgemma ask --dicomweb http://pacs:8042/dicom-web --study 1.2.3 "Findings?"

Credentials come from the environment, never the command line (where any user's `ps` shows them):
OPENMEDGEMMA_DICOMWEB_TOKEN (a bearer token), or OPENMEDGEMMA_DICOMWEB_USER and
OPENMEDGEMMA_DICOMWEB_PASSWORD (basic authentication). Listings leave out patient IDs and names
unless --show-patient is given. Top-level imports stay light: this module is imported by `--help`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from openmedgemma.errors import ImageError, PacsError

TOKEN_ENV = "OPENMEDGEMMA_DICOMWEB_TOKEN"
USER_ENV, PASSWORD_ENV = "OPENMEDGEMMA_DICOMWEB_USER", "OPENMEDGEMMA_DICOMWEB_PASSWORD"
CREDENTIALS_HELP = (f"Credentials come from ${TOKEN_ENV} (bearer token), or ${USER_ENV} and ${PASSWORD_ENV} "
                    "(basic authentication). Patient IDs and names are printed only with --show-patient.")  # fmt: skip


def register(subparsers) -> None:
    web = subparsers.add_parser("dicomweb", help="list the studies and series of a DICOMweb store (a PACS)",
                                description="List what a DICOMweb store holds. " + CREDENTIALS_HELP)  # fmt: skip
    web.set_defaults(func=lambda args: web.print_help() or 1)
    commands = web.add_subparsers(dest="dicomweb_command", metavar="COMMAND")

    studies = commands.add_parser("studies", help="studies matching filters (QIDO-RS)")
    _add_connection(studies)
    studies.add_argument("--patient", metavar="ID", help="PatientID to match")
    studies.add_argument("--modality", help="a modality in the study (CT, MR, CR, SM...)")
    studies.add_argument("--date", metavar="YYYYMMDD[-YYYYMMDD]", help="StudyDate or a range of dates")
    studies.add_argument("--limit", type=int, default=100, metavar="N", help="at most N studies (default 100)")
    studies.add_argument("--show-patient", action="store_true", help="also print patient IDs and names")
    studies.add_argument("--json", action="store_true", help="one JSON object per line")
    studies.set_defaults(func=run_studies)

    series = commands.add_parser("series", help="the series of one study (QIDO-RS)")
    _add_connection(series)
    series.add_argument("--study", required=True, metavar="UID", help="StudyInstanceUID")
    series.add_argument("--modality", help="only series of this modality")
    series.add_argument("--json", action="store_true", help="one JSON object per line")
    series.set_defaults(func=run_series)


def _add_connection(parser, required: bool = True) -> None:
    parser.add_argument("--dicomweb", required=required, metavar="URL",
                        help=f"DICOMweb root (e.g. http://pacs:8042/dicom-web); credentials from ${TOKEN_ENV} "
                        f"or ${USER_ENV} / ${PASSWORD_ENV}")  # fmt: skip
    parser.add_argument("--dicomweb-timeout", type=float, default=30.0, metavar="S",
                        help="seconds to wait for the server to connect or send (default 30)")  # fmt: skip
    parser.add_argument("--dicomweb-cache", metavar="DIR",
                        help="keep retrieved instances in DIR (off by default; they hold identifying data in clear: "
                        "put DIR only where patient data may rest; delete it to forget)")  # fmt: skip
    parser.add_argument("--dicomweb-cache-size", type=float, default=2048, metavar="MB",
                        help="cap of the cache folder; least recently used instances go first (default 2048)")


def add_dicomweb_arguments(parser, *, slides: bool = True) -> None:
    """--dicomweb URL --study UID [--series UID] (+ the slide options) for ask / preview / deid."""
    group = parser.add_argument_group("DICOMweb (read from a PACS instead of local files)")
    _add_connection(group, required=False)
    group.add_argument("--study", metavar="UID", help="StudyInstanceUID on the --dicomweb store")
    group.add_argument("--series", metavar="UID", help="SeriesInstanceUID (needed when the study has several)")
    if slides:
        _add_once(group, "--magnification", type=float, default=10.0, metavar="X",
                  help="whole-slide images: magnification of the patches (default 10)")  # fmt: skip
        _add_once(group, "--max-patches", type=int, default=126, metavar="N",
                  help="whole-slide images: at most N patches (default 126)")  # fmt: skip


def _add_once(group, flag: str, **kwargs) -> None:
    """Another part of the CLI (a local --slide) may already offer the same option with the same meaning."""
    try:
        group.add_argument(flag, **kwargs)
    except argparse.ArgumentError:
        pass


def source_from_args(args):
    """The DicomWebSource the --dicomweb options name (credentials from the environment)."""
    from openmedgemma.imaging.dicomweb import DicomWebSource
    from openmedgemma.imaging.dicomweb_cache import InstanceCache

    cache = None
    if getattr(args, "dicomweb_cache", None):
        cache = InstanceCache(args.dicomweb_cache, max_bytes=int(args.dicomweb_cache_size * (1 << 20)))
    return DicomWebSource(args.dicomweb, token=os.environ.get(TOKEN_ENV) or None,
                          username=os.environ.get(USER_ENV) or None, password=os.environ.get(PASSWORD_ENV),
                          timeout=args.dicomweb_timeout, cache=cache)  # fmt: skip


def load_args_study(args):
    """The StudyInput (imaging.pacs) that --dicomweb / --study / --series name."""
    from openmedgemma.imaging.pacs import load_study

    _require_study(args)
    store = source_from_args(args)
    options = {}
    if hasattr(args, "magnification"):
        options = {"magnification": args.magnification, "max_patches": args.max_patches}
    return load_study(store, args.study, args.series, **options)


def _require_study(args) -> None:
    if args.study is None:
        raise PacsError("--dicomweb needs --study UID (list them with: openmedgemma dicomweb studies --dicomweb URL)")


def study_turn(args, question: str) -> dict:
    """The user turn of `ask --dicomweb`: the study's content items, then the question."""
    from openmedgemma.imaging.pacs import study_content

    if getattr(args, "image", None):
        raise ImageError("--image and --dicomweb cannot be combined: ask about local files or a study, not both")
    study = load_args_study(args)
    print(f"openmedgemma {args.command}: {study.label}: {_summary(study)}", file=sys.stderr)
    return {"role": "user", "content": study_content(study, question)}


def _summary(study) -> str:
    if study.kind == "volume":
        return f"{study.volume.frames}-slice {study.volume.modality} volume"
    if study.kind == "slide":
        return f"{len(study.patches.patches)} patches at {study.patches.magnification:g}x"
    return f"{len(study.images)} image(s)"


# ---------------------------------------------------------------------- commands


def run_studies(args) -> int:
    store = source_from_args(args)
    found = store.studies(patient_id=args.patient, modality=args.modality, date=args.date, limit=args.limit)
    for study in found:
        row = {"study_uid": study.study_uid, "date": study.date, "modalities": list(study.modalities),
               "series": study.series_count, "instances": study.instance_count,
               "description": study.description}  # fmt: skip
        if args.show_patient:
            row.update(patient_id=study.patient_id, patient_name=study.patient_name)
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            print("\t".join(_cell(row[k]) for k in row))
    print(f"dicomweb: {len(found)} stud{'y' if len(found) == 1 else 'ies'} on {store.url}", file=sys.stderr)
    return 0


def run_series(args) -> int:
    store = source_from_args(args)
    found = store.series(args.study, modality=args.modality)
    for series in found:
        row = {"series_uid": series.series_uid, "modality": series.modality, "number": series.number,
               "instances": series.instance_count, "description": series.description}  # fmt: skip
        print(json.dumps(row, ensure_ascii=False) if args.json else "\t".join(_cell(v) for v in row.values()))
    print(f"dicomweb: {len(found)} series in study {args.study}", file=sys.stderr)
    return 0


def _cell(value) -> str:
    if isinstance(value, list):
        return ",".join(value) or "-"
    return "-" if value in (None, "") else str(value).replace("\t", " ")


def run_preview_dicomweb(args, windows) -> int:
    """`preview --dicomweb`: a volume as from a folder; images or slide patches as a contact sheet."""
    import numpy as np

    from openmedgemma.imaging.cli import contact_sheet, save_preview, write_preview
    from openmedgemma.imaging.pixel_values import pad_to_square
    from openmedgemma.imaging.windowing import to_rgb

    study = load_args_study(args)
    if study.kind == "volume":
        return write_preview(study.volume, args, windows, study.label)
    if study.kind == "images" and len(study.images) == 1:
        return write_preview(study.images[0], args, windows, study.label)
    if study.kind == "slide":
        tiles, noun = list(study.patches.patches), "patch"
    else:
        tiles, noun = [to_rgb(image, windows) for image in study.images], "image"
    if args.slice is not None:
        if not 1 <= args.slice <= len(tiles):
            raise ImageError(f"{study.label}: --slice {args.slice} is outside {noun} 1..{len(tiles)}")
        rgb = tiles[args.slice - 1]
        return save_preview(rgb, args.out, f"{noun} {args.slice} of {len(tiles)}")
    side = max(max(tile.shape[:2]) for tile in tiles)  # images of a study may differ in size: pad, centred
    squares = np.stack([_pad_to(pad_to_square(tile), side) for tile in tiles])
    return save_preview(contact_sheet(squares), args.out, f"contact sheet of {len(tiles)} {noun}(s)")


def _pad_to(square, side: int):
    import numpy as np

    extra = side - square.shape[0]
    before = extra // 2
    return np.pad(square, [(before, extra - before), (before, extra - before), (0, 0)])


def run_deid_dicomweb(args) -> int:
    """`deid --dicomweb URL --study UID OUT`: a de-identified local copy, OUT/<new series UID>/<new SOP UID>.dcm."""
    from openmedgemma.imaging.deid import UIDMapper
    from openmedgemma.imaging.deid_files import deidentify_to
    from openmedgemma.imaging.dicom_io import read_dataset

    if args.source is None or args.target is not None:
        raise ImageError("deid --dicomweb takes one OUT folder (deid --dicomweb URL --study UID OUT)")
    _require_study(args)
    target = Path(args.source)
    if target.exists() and not target.is_dir():
        raise ImageError(f"{target}: exists and is not a folder")
    store = source_from_args(args)
    series = store.series(args.study)
    if args.series is not None:
        series = [s for s in series if s.series_uid == args.series]
        if not series:
            raise PacsError(f"{store.url}/studies/{args.study}/series/{args.series}: no such series in the study")
    mapper, written = UIDMapper(), 0
    for item in series:
        for name, data in store.series_members(args.study, item.series_uid):
            try:
                ds = read_dataset(data)
            except ImageError as err:  # read_dataset calls bytes "<bytes>": name the instance's URL path
                raise ImageError(str(err).replace("<bytes>", name, 1)) from None
            sop = str(ds.get("SOPInstanceUID", "") or f"{written + 1}")
            out = target / mapper(item.series_uid) / f"{mapper(sop)}.dcm"
            deidentify_to(ds, name, out, mapper, allow_burned_in=args.allow_burned_in)
            written += 1
    print(f"deid: {written} instance(s) of {len(series)} series de-identified -> {target}")
    return 0
