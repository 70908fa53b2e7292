"""Which chest X-ray dataset, conditions, label policy and images a CXR task evaluates.

Label policy (options, stated in every result): `uncertain` (-1) is "exclude" (default: that
image is not asked about that condition), "positive" or "negative"; `missing` (blank = not
mentioned) is "negative" (default) or "exclude". Images: `images=all` (default) requires every
selected image to exist; `images=available` evaluates the labelled images present and records
how many were left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from openmedgemma.errors import DataError

from . import cxr_formats as cf

MIMIC_CHEXPERT_CONDITIONS = ("atelectasis", "cardiomegaly", "consolidation", "edema", "pleural effusion")
CXR14_CONDITIONS = ("lung opacity", "pneumothorax", "fracture")


class CxrDataset(NamedTuple):
    folders: tuple[str, ...]  # where the label file may be, relative to the data folder
    label_files: tuple[str, ...]  # label file names, in order of preference
    vocab: dict[str, str]  # condition as asked in the prompt -> label column
    default_conditions: tuple[str, ...]  # the report's list for this dataset


_CHEXPERT_VOCAB = {f.lower(): f for f in cf.CHEXPERT_FINDINGS}
DATASETS = {
    "mimic-cxr": CxrDataset(
        ("", "mimic-cxr-jpg/2.0.0", "mimic-cxr-jpg", "mimic-cxr"),
        cf.MIMIC_LABELS,
        _CHEXPERT_VOCAB,
        MIMIC_CHEXPERT_CONDITIONS,
    ),
    "chexpert": CxrDataset(
        ("", "CheXpert-v1.0-small", "CheXpert-v1.0", "chexpert"),
        ("test_labels.csv", "test.csv", "valid.csv"),
        _CHEXPERT_VOCAB,
        MIMIC_CHEXPERT_CONDITIONS,
    ),
    "cxr14": CxrDataset(
        ("", "cxr_samples", "ChestX-ray14", "nih"),
        cf.GOOGLE_FILES,
        {
            "lung opacity": "Airspace opacity",
            "airspace opacity": "Airspace opacity",
            "pneumothorax": "Pneumothorax",
            "fracture": "Fracture",
            "nodule or mass": "Nodule or mass",
        },
        CXR14_CONDITIONS,
    ),
    "cxr14-nih": CxrDataset(
        ("", "cxr_samples", "ChestX-ray14", "nih"),
        cf.NIH_FILES,
        {"pleural effusion": "Effusion", **{f.lower().replace("_", " "): f for f in cf.NIH_FINDINGS}},
        ("atelectasis", "cardiomegaly", "consolidation", "edema", "pleural effusion", "pneumothorax"),
    ),
}
CXR_OPTION_DEFAULTS = {
    "conditions": (),
    "uncertain": "exclude",
    "missing": "negative",
    "images": "all",
    "split": "test",
}


def all_conditions(dataset: str) -> tuple[str, ...]:
    """Every label column of a dataset, by its plain name (one name per column)."""
    vocab = DATASETS[dataset].vocab
    names: dict[str, str] = {}
    for name, column in vocab.items():
        names.setdefault(column, name)
    return tuple(n for c, n in names.items() if c != "No Finding")


def resolve_conditions(
    dataset: str, requested: tuple[str, ...], default: tuple[str, ...] = ()
) -> list[tuple[str, str]]:
    vocab = DATASETS[dataset].vocab
    names = [c.strip().lower() for c in (requested or default or DATASETS[dataset].default_conditions)]
    unknown = [c for c in names if c not in vocab]
    if unknown:
        raise DataError(f"{dataset}: condition(s) {unknown} not in these labels; known: {sorted(vocab)}")
    return [(c, vocab[c]) for c in names]


def read_dataset(dataset: str, data_dir: Path, columns: tuple[str, ...], split: str, task: str):
    path = cf.locate(data_dir, DATASETS[dataset].folders, DATASETS[dataset].label_files, task)
    if dataset == "cxr14-nih":
        return cf.read_nih(path, split)
    if dataset == "cxr14":
        return cf.read_google_nih(path, split)
    if dataset == "chexpert":
        return cf.read_chexpert(path, columns)
    return cf.read_mimic(path, columns, split)


def apply_image_policy(
    items: list[cf.LabelledImage], policy: str, task: str
) -> tuple[list[cf.LabelledImage], int]:
    if policy not in ("all", "available"):
        raise DataError(f"{task}: images must be all or available, got {policy!r}")
    present = [it for it in items if it.image.is_file()]
    missing = len(items) - len(present)
    if policy == "all" and missing:
        example = next(str(it.image) for it in items if not it.image.is_file())
        raise DataError(
            f"{task}: {missing} of {len(items)} images are missing (e.g. {example}); "
            "use --task-option images=available to evaluate the images present"
        )
    if not present:
        raise DataError(f"{task}: none of the {len(items)} labelled images was found")
    return present, missing


def label_under_policy(value: int | None, uncertain: str, missing: str) -> int | None:
    """1 / 0, or None when the image is not asked about the condition."""
    if value == cf.UNCERTAIN:
        return {"exclude": None, "positive": 1, "negative": 0}[uncertain]
    if value is cf.MISSING:
        return {"exclude": None, "negative": 0}[missing]
    return value


def check_policy(uncertain: str, missing: str, task: str) -> None:
    if uncertain not in ("exclude", "positive", "negative"):
        raise DataError(f"{task}: uncertain must be exclude, positive or negative, got {uncertain!r}")
    if missing not in ("exclude", "negative"):
        raise DataError(f"{task}: missing must be exclude or negative, got {missing!r}")


def load_cxr(task, dataset: str, *, split: str | None = None, default_conditions: tuple[str, ...] = ()):
    """(images, [(prompt name, column)], description of what was selected)."""
    opts = task.options
    check_policy(opts["uncertain"], opts["missing"], task.name)
    conditions = resolve_conditions(dataset, tuple(opts["conditions"]), default_conditions)
    split = split or opts["split"]
    items, split_used = read_dataset(
        dataset, task.data_dir, tuple(c for _, c in conditions), split, task.name
    )
    items, n_missing = apply_image_policy(items, opts["images"], task.name)
    selection = {
        "dataset": dataset,
        "split": split_used,
        "images": len(items),
        "images_left_out_missing": n_missing,
        "conditions": {name: column for name, column in conditions},
        "label_policy": {"uncertain (-1)": opts["uncertain"], "missing (blank)": opts["missing"]},
    }
    return items, conditions, selection
