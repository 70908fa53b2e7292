"""Evaluating an Embedder (MedSigLIP) on labelled image sets: zero-shot and linear probe.

- Zero-shot (report §4): each class's text embedding is the mean of its prompts' embeddings
  (re-normalised); cosine similarity with the image embedding, times the embedder's
  `logit_scale` (1 if it has none), softmax over the classes; one-vs-all ROC AUC per class.
  Multi-label CXR sets are one two-class problem per condition (present vs absent prompts).
- Linear probe: scikit-learn LogisticRegression(solver="saga", C, max_iter; random_state=seed) on
  the image embeddings of the train split (`train_limit` > 0: a seeded random subset of that
  size), evaluated on the test split (one model per condition for multi-label sets).
Reported AUC = mean over classes (multi-class; for two classes this equals the positive-class
AUC) or over conditions with both classes present in the test set (multi-label).
The registered tasks (PneumoniaMNIST, ChestX-ray14, CheXpert) are in `siglip_tasks.py`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from openmedgemma.errors import DataError, OpenMedGemmaError

from ..metrics import bootstrap_ci, estimate, mean_estimate, roc_auc
from .base import Task

PROBE_OPTIONS = {"train_split": "train", "train_limit": 0, "C": 1.0, "max_iter": 1000}


@dataclass
class Problem:
    """One classification problem: labels -1 (not evaluated), 0..K-1; prompts per class."""

    name: str
    classes: list[str]
    labels: np.ndarray
    prompts: dict[str, list[str]]


@dataclass
class ImageSet:
    ids: list[str]
    images: list[Any]
    problems: list[Problem]


def fast_auc(y: np.ndarray, scores: np.ndarray) -> float | None:
    """Mann-Whitney AUC with average ranks for ties (equals scikit-learn's roc_auc_score)."""
    n_pos = int(np.sum(y == 1))
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, position, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based rank shared by tied scores
    ranks = average_rank[position.reshape(-1)]
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def embed_batched(fn: Callable, items: list, batch_size: int, what: str, progress: bool) -> np.ndarray:
    from tqdm import tqdm

    chunks = []
    bar = tqdm(total=len(items), desc=what, unit="item", disable=not progress)
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        out = np.asarray(fn(batch), dtype=np.float64)
        if out.ndim != 2 or out.shape[0] != len(batch):
            raise OpenMedGemmaError(f"{what}: embedder returned shape {out.shape} for {len(batch)} inputs")
        chunks.append(out)
        bar.update(len(batch))
    bar.close()
    return np.concatenate(chunks) if chunks else np.zeros((0, 0))


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


class EmbeddingTask(Task, ABC):
    """A task an Embedder is evaluated on: `evaluate` embeds the images and scores them."""

    kind = "embedding"
    primary_metric = "auc"
    method: str  # "zeroshot" or "linprobe"

    def notes(self) -> list[str]:
        if self.method == "zeroshot":
            method = (
                "Zero-shot: class text embedding = mean of its prompts' embeddings (re-normalised); "
                "cosine similarity x the embedder's logit_scale (1 if none); softmax over classes; "
                "one-vs-all ROC AUC (scikit-learn). Default prompts are ours (the report does not "
                "list them); option prompts=FILE replaces them."
            )
        else:
            method = (
                "Linear probe: LogisticRegression(solver='saga', C={C}, max_iter={max_iter}, "
                "random_state=seed) on L2-normalised image embeddings of split '{train_split}' "
                "(train_limit={train_limit}, 0 = all, else a seeded random subset); ROC AUC on the "
                "test split."
            ).format(**self.options)
        return [
            method,
            "AUC = mean over classes (multi-class) or over conditions whose test labels have both "
            "classes (multi-label); conditions with a single class are listed as undefined.",
        ]

    @abstractmethod
    def load_split(self, split: str) -> ImageSet:
        """The labelled images of one split."""

    def _prompts(self, problem: Problem) -> dict[str, list[str]]:
        if not self.options.get("prompts"):
            return problem.prompts
        path = Path(self.options["prompts"])
        table = json.loads(path.read_text()) if path.is_file() else None
        if not isinstance(table, dict):
            raise DataError(f"{self.name}: prompts file {path} missing or not a JSON object")
        chosen = table if all(c in table for c in problem.classes) else table.get(problem.name, {})
        missing = [c for c in problem.classes if c not in chosen]
        if missing:
            raise DataError(f"{path}: no prompts for class(es) {missing} of {problem.name}")
        return {c: list(chosen[c]) for c in problem.classes}

    def evaluate(
        self, embedder, *, limit: int | None, seed: int, batch_size: int, n_boot: int, progress: bool
    ) -> dict:
        test = self.load_split(self.options["split"])
        if limit is not None:
            test = subset(test, np.arange(min(limit, len(test.ids))))
        test_emb = _normalise(
            embed_batched(embedder.embed_images, test.images, batch_size, f"{self.name}: images", progress)
        )
        if self.method == "zeroshot":
            scores = self._zero_shot(embedder, test, test_emb, batch_size)
        else:
            scores = self._linear_probe(embedder, test, test_emb, seed, batch_size, progress)
        return self._results(test, scores, n_boot, seed)

    def _zero_shot(self, embedder, test: ImageSet, emb: np.ndarray, batch_size: int) -> list[np.ndarray]:
        scale = float(getattr(embedder, "logit_scale", 1.0))
        out = []
        for problem in test.problems:
            prompts = self._prompts(problem)
            centroids = []
            for cls in problem.classes:
                text = _normalise(
                    embed_batched(embedder.embed_texts, prompts[cls], batch_size, "prompts", False)
                )
                centroids.append(_normalise(text.mean(axis=0)))
            logits = scale * emb @ np.stack(centroids).T
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            out.append(probs / probs.sum(axis=1, keepdims=True))
        return out

    def _linear_probe(self, embedder, test, test_emb, seed, batch_size, progress) -> list[np.ndarray]:
        from sklearn.linear_model import LogisticRegression

        train = self.load_split(self.options["train_split"])
        limit = self.options["train_limit"]
        if 0 < limit < len(train.ids):  # a seeded random subset: split files may be sorted by class
            train = subset(
                train, np.sort(np.random.default_rng(seed).choice(len(train.ids), limit, replace=False))
            )
        train_emb = _normalise(
            embed_batched(
                embedder.embed_images, train.images, batch_size, f"{self.name}: train images", progress
            )
        )
        out = []
        for tr, te in zip(train.problems, test.problems):
            keep = tr.labels >= 0
            if np.unique(tr.labels[keep]).size < 2:
                raise DataError(
                    f"{self.name}: {tr.name}: the train split has a single class; cannot fit a probe"
                )
            model = LogisticRegression(
                solver="saga", C=self.options["C"], max_iter=self.options["max_iter"], random_state=seed
            )
            model.fit(train_emb[keep], tr.labels[keep])
            probs = np.zeros((len(te.labels), len(te.classes)))
            probs[:, model.classes_] = model.predict_proba(test_emb)
            out.append(probs)
        self.data_info["train_images"] = len(train.ids)
        return out

    def _results(self, test: ImageSet, scores: list[np.ndarray], n_boot: int, seed: int) -> dict:
        from sklearn.metrics import roc_curve

        columns = []  # (problem, class index, evaluated mask, y one-vs-all, score) for every AUC
        for problem, probs in zip(test.problems, scores):
            classes = range(len(problem.classes)) if len(problem.classes) > 2 else [1]
            for k in classes:
                mask = problem.labels >= 0
                columns.append((problem, k, mask, (problem.labels == k).astype(int), probs[:, k]))
        per_class, rocs = {}, []
        for problem, k, mask, y, s in columns:
            auc = roc_auc(y[mask], s[mask])
            label = _class_label(test, problem, k)
            per_class[label] = auc
            if auc is not None:
                fpr, tpr, _ = roc_curve(y[mask], s[mask])
                rocs.append({"label": label, "fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": auc})
        defined = [v for v in per_class.values() if v is not None]
        if not defined:
            raise DataError(
                f"{self.name}: AUC undefined for every class (the test images have a single class)"
            )

        def mean_auc(idx):
            values = [fast_auc(y[idx][mask[idx]], s[idx][mask[idx]]) for _, _, mask, y, s in columns]
            values = [v for v in values if v is not None]
            return float(np.mean(values)) if values else None

        low, high, dropped = bootstrap_ci(mean_auc, len(test.ids), n_boot=n_boot, seed=seed)
        metrics = {
            "auc": estimate(float(np.mean(defined)), (low, high), len(test.ids), resamples_dropped=dropped)
        }
        if len(test.problems) == 1:
            problem, probs = test.problems[0], scores[0]
            mask = problem.labels >= 0
            accuracy = (probs.argmax(1) == problem.labels)[mask].astype(float)
            metrics["accuracy"] = mean_estimate(accuracy, n_boot=n_boot, seed=seed)
        undefined = [k for k, v in per_class.items() if v is None]
        return {
            "metrics": metrics,
            "breakdown": {"auc_by_class": per_class},
            "counts": {"n": len(test.ids), "classes_with_undefined_auc": undefined},
            "per_example": [
                {
                    "id": i,
                    **{
                        f"{p.name}:{c}": float(pr[j, k])
                        for p, pr in zip(test.problems, scores)
                        for k, c in enumerate(p.classes)
                    },
                }
                for j, i in enumerate(test.ids)
            ],
            "roc": rocs,
        }

    def baselines(self) -> dict:
        return {"constant score (chance)": {"auc": estimate(0.5, (np.nan, np.nan), 0)}}


def _class_label(images: ImageSet, problem: Problem, k: int) -> str:
    if len(images.problems) == 1:
        return problem.classes[k]
    return problem.name if len(problem.classes) == 2 else f"{problem.name}: {problem.classes[k]}"


def subset(images: ImageSet, idx: np.ndarray) -> ImageSet:
    return ImageSet(
        [images.ids[i] for i in idx],
        [images.images[i] for i in idx],
        [Problem(p.name, p.classes, p.labels[idx], p.prompts) for p in images.problems],
    )
