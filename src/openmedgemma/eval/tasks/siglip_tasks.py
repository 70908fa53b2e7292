"""MedSigLIP tasks: zero-shot and linear probe on PneumoniaMNIST, ChestX-ray14 and CheXpert.

Default zero-shot prompts are ours (the report does not list its prompts): see PNEUMONIA_PROMPTS
and `condition_prompts`; a JSON file can replace them (option prompts=PATH, {class: [prompts]}
or {condition: {"absent": [...], "present": [...]}}).
"""

from __future__ import annotations

import numpy as np

from openmedgemma.errors import DataError

from . import cxr_formats as cf
from . import cxr_sources
from .base import register
from .embedding import PROBE_OPTIONS, EmbeddingTask, ImageSet, Problem
from .medmnist import PNEUMONIA_CLASSES, gray_to_rgb, pneumonia_file, read_npz_split

PNEUMONIA_PROMPTS = {
    "normal": ["a chest x-ray with no pneumonia", "a normal chest x-ray", "no pneumonia"],
    "pneumonia": ["a chest x-ray showing pneumonia", "pneumonia", "a chest x-ray with pneumonia"],
}


def condition_prompts(condition: str) -> dict[str, list[str]]:
    return {
        "absent": [f"no {condition}", f"a chest x-ray with no {condition}"],
        "present": [condition, f"a chest x-ray showing {condition}"],
    }


class PneumoniaEmbedding(EmbeddingTask):
    option_defaults = {"split": "test", "file": "", "prompts": ""}

    def notes(self) -> list[str]:
        return super().notes() + ["Images: the 28x28 grayscale arrays copied to RGB (the embedder resizes)."]

    def load_split(self, split: str) -> ImageSet:
        path = pneumonia_file(self.data_dir, self.options["file"], self.name)
        images, labels = read_npz_split(path, split)
        problem = Problem("pneumonia", list(PNEUMONIA_CLASSES), labels.astype(int), PNEUMONIA_PROMPTS)
        return ImageSet(
            [f"{split}-{i}" for i in range(len(images))], [gray_to_rgb(im) for im in images], [problem]
        )


@register
class PneumoniaZeroShot(PneumoniaEmbedding):
    name, method = "pneumoniamnist-zeroshot", "zeroshot"
    description = "MedSigLIP zero-shot on PneumoniaMNIST (AUC)"


@register
class PneumoniaLinearProbe(PneumoniaEmbedding):
    name, method = "pneumoniamnist-linprobe", "linprobe"
    description = "MedSigLIP linear probe (logistic regression, SAGA) on PneumoniaMNIST (AUC)"
    option_defaults = {"split": "test", "file": "", **PROBE_OPTIONS}


class CxrEmbedding(EmbeddingTask):
    dataset: str
    option_defaults = {**cxr_sources.CXR_OPTION_DEFAULTS, "prompts": ""}

    def notes(self) -> list[str]:
        return super().notes() + [
            f"Label policy: uncertain (-1) -> {self.options['uncertain']}, "
            f"missing (blank) -> {self.options['missing']}."
        ]

    def load_split(self, split: str) -> ImageSet:
        items, conditions, info = cxr_sources.load_cxr(
            self, self.dataset, split=split, default_conditions=cxr_sources.all_conditions(self.dataset)
        )
        self.data_info[split] = info
        problems = []
        for name, column in conditions:
            labels = [
                cxr_sources.label_under_policy(
                    it.labels[column], self.options["uncertain"], self.options["missing"]
                )
                for it in items
            ]
            problems.append(
                Problem(
                    name,
                    ["absent", "present"],
                    np.array([-1 if v is None else v for v in labels]),
                    condition_prompts(name),
                )
            )
        return ImageSet([it.id for it in items], [str(it.image) for it in items], problems)


@register
class Cxr14NihZeroShot(CxrEmbedding):
    name, dataset, method = "cxr14-nih-zeroshot", "cxr14-nih", "zeroshot"
    description = "MedSigLIP zero-shot on ChestX-ray14 (NIH labels), AUC per finding"


@register
class Cxr14NihLinearProbe(CxrEmbedding):
    name, dataset, method = "cxr14-nih-linprobe", "cxr14-nih", "linprobe"
    description = "MedSigLIP linear probe on ChestX-ray14 (train_val_list.txt -> test_list.txt)"
    option_defaults = {**cxr_sources.CXR_OPTION_DEFAULTS, **PROBE_OPTIONS}

    def load_split(self, split: str) -> ImageSet:
        spec = cxr_sources.DATASETS[self.dataset]
        folder = cf.locate(self.data_dir, spec.folders, spec.label_files, self.name).parent
        lists = [folder / "train_val_list.txt", folder / "test_list.txt"]
        if split not in ("train", "test") or not all(p.is_file() for p in lists):
            raise DataError(
                f"{self.name}: a linear probe needs split train/test and the official "
                f"train_val_list.txt and test_list.txt in {folder}"
            )
        return super().load_split(split)


@register
class CheXpertZeroShot(CxrEmbedding):
    name, dataset, method = "chexpert-zeroshot", "chexpert", "zeroshot"
    description = "MedSigLIP zero-shot on CheXpert, AUC averaged over the 13 findings"
