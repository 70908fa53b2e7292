"""MedSigLIP-style tasks (zero-shot, linear probe) with scripted embedders on real data.

- The oracle embedder knows each image's label (looked up by pixel hash in tables built here from
  the raw files) and reads a prompt's meaning from its words: AUC must be exactly 1.
- The random embedder gives unrelated vectors: AUC within 0.08 of 0.5 (n=624: sd ~0.023).
- The pixel embedder is a fixed random projection of the pixels: a linear probe must learn from
  it (AUC > 0.75; a pixel-space probe on PneumoniaMNIST reaches ~0.86) while zero-shot cannot.
"""

import csv
import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval_scripted import pixel_key
from openmedgemma.errors import DataError
from openmedgemma.eval import get_task, run_task

N_BOOT = 100


def _unit(x):
    x = np.asarray(x, dtype=float)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class OracleEmbedder:
    """Image -> +e_c for present conditions, -e_c for absent ones; text: "no X"/"normal" -> -e_X."""

    name = "oracle-embedder"
    logit_scale = 10.0

    def __init__(self, labels_by_pixels, conditions):
        self.labels, self.conditions = labels_by_pixels, list(conditions)

    def _image(self, image):
        present = self.labels[pixel_key(image)]
        return [1.0 if c in present else -1.0 for c in self.conditions]

    def _text(self, text):
        text = text.lower()
        vec = np.zeros(len(self.conditions))
        for i, c in enumerate(self.conditions):
            if c in text:
                vec[i] = -1.0 if (" no " in f" {text} " or "normal" in text) else 1.0
        if "normal" in text and not vec.any():
            vec[:] = -1.0
        return vec

    def embed_images(self, images):
        return _unit([self._image(im) for im in images])

    def embed_texts(self, texts):
        return _unit([self._text(t) for t in texts])


class RandomEmbedder:
    name = "random-embedder"

    def __init__(self, seed=0, dim=32):
        self.rng, self.dim = np.random.default_rng(seed), dim

    def embed_images(self, images):
        return _unit(self.rng.normal(size=(len(images), self.dim)))

    def embed_texts(self, texts):
        seeds = [int(hashlib.sha1(t.encode()).hexdigest()[:8], 16) for t in texts]  # stable across runs
        return _unit([np.random.default_rng(s).normal(size=self.dim) for s in seeds])


class PixelEmbedder:
    name = "pixel-projection"

    def __init__(self, side=28, dim=64):
        self.side = side
        self.projection = np.random.default_rng(0).normal(size=(side * side, dim))

    def _pixels(self, image):
        if isinstance(image, (str, Path)):
            image = np.asarray(Image.open(image).convert("L").resize((self.side, self.side)))
        image = np.asarray(image)
        return (image[..., 0] if image.ndim == 3 else image).reshape(-1) / 255.0

    def embed_images(self, images):
        return _unit(np.stack([self._pixels(im) for im in images]) @ self.projection)

    def embed_texts(self, texts):
        return _unit(np.ones((len(texts), self.projection.shape[1])))


@pytest.fixture(scope="module")
def pneumonia_npz(shared_data):
    with np.load(shared_data / "medmnist/pneumoniamnist_28_varun19424.npz") as z:
        return {k: z[k] for k in z.files}


def test_pneumonia_zero_shot_oracle_and_random(shared_data, tmp_path, pneumonia_npz):
    labels = {
        pixel_key(im): {"pneumonia"} if lab else set()
        for im, lab in zip(pneumonia_npz["test_images"], pneumonia_npz["test_labels"][:, 0])
    }
    task = get_task("pneumoniamnist-zeroshot", shared_data)
    res = run_task(
        task, OracleEmbedder(labels, ["pneumonia"]), out_dir=tmp_path, n_boot=N_BOOT, progress=False
    )
    assert res["counts"]["n"] == 624
    assert res["metrics"]["auc"]["value"] == 1.0 and res["metrics"]["accuracy"]["value"] == 1.0
    files = res["files"]
    assert Path(files["roc"]).read_bytes()[:4] == b"\x89PNG" and "predictions" not in files
    assert len(Path(files["scored"]).read_text().splitlines()) == 624
    summary = Path(files["summary"]).read_text()
    assert "Default prompts are ours" in summary and all(note in summary for note in res["notes"])

    res = run_task(task, RandomEmbedder(seed=1), out_dir=tmp_path, n_boot=N_BOOT, progress=False)
    auc = res["metrics"]["auc"]
    assert abs(auc["value"] - 0.5) < 0.08 and auc["ci_low"] < auc["value"] < auc["ci_high"]


def test_pneumonia_linear_probe_learns_from_pixels(shared_data, tmp_path):
    task = get_task("pneumoniamnist-linprobe", shared_data, train_limit="1500")
    res = run_task(task, PixelEmbedder(), out_dir=tmp_path, n_boot=N_BOOT, progress=False)
    assert res["metrics"]["auc"]["value"] > 0.75
    assert (
        res["data_info"]["train_images"] == 1500 and res["task"] == "pneumoniamnist-linprobe@train_limit=1500"
    )
    zero = run_task(
        get_task("pneumoniamnist-zeroshot", shared_data),
        PixelEmbedder(),
        out_dir=tmp_path,
        n_boot=N_BOOT,
        progress=False,
    )
    assert zero["metrics"]["auc"]["value"] == 0.5  # identical text embeddings: no information

    res = run_task(task, RandomEmbedder(seed=2), out_dir=tmp_path / "r", n_boot=N_BOOT, progress=False)
    assert abs(res["metrics"]["auc"]["value"] - 0.5) < 0.08


def _nih(shared_data):
    with gzip.open(shared_data / "cxr_samples/Data_Entry_2017_v2020.csv.gz", "rt") as fh:
        return {r["Image Index"]: r["Finding Labels"] for r in csv.DictReader(fh)}


def test_cxr14_nih_zero_shot_on_the_real_images(shared_data, tmp_path):
    nih = _nih(shared_data)
    conditions = ["cardiomegaly", "effusion", "pneumothorax"]
    labels = {
        pixel_key(shared_data / "cxr_samples" / name): {f.lower() for f in nih[name].split("|")}
        for name in ("00000001_000.png", "00027426_000.png")
    }
    task = get_task("cxr14-nih-zeroshot", shared_data, images="available", conditions=",".join(conditions))
    res = run_task(task, OracleEmbedder(labels, conditions), out_dir=tmp_path, n_boot=N_BOOT, progress=False)
    assert res["counts"]["n"] == 2
    assert res["breakdown"]["auc_by_class"] == {"cardiomegaly": 1.0, "effusion": None, "pneumothorax": None}
    assert res["counts"]["classes_with_undefined_auc"] == ["effusion", "pneumothorax"]
    assert res["metrics"]["auc"]["value"] == 1.0


def _write_nih_fixture(root: Path, n: int = 40) -> dict:
    """NIH-format folder: synthetic 28x28 images, Data_Entry CSV, train/test lists.
    Cardiomegaly images carry a bright central block (so pixels carry the label)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows, names = [], []
    for i in range(n):
        name = f"{i:08d}_000.png"
        cardio, effusion = i % 2 == 0, i % 3 == 0
        pixels = rng.integers(0, 120, (28, 28)).astype(np.uint8)
        if cardio:
            pixels[8:20, 8:20] = 250
        Image.fromarray(pixels).save(root / "images" / name)
        found = [f for f, on in (("Cardiomegaly", cardio), ("Effusion", effusion)) if on] or ["No Finding"]
        rows.append([name, "|".join(found), 0, i, 50, "M", "PA", 28, 28, 0.1, 0.1])
        names.append(name)
    header = [
        "Image Index",
        "Finding Labels",
        "Follow-up #",
        "Patient ID",
        "Patient Age",
        "Patient Gender",
        "View Position",
        "OriginalImage[Width",
        "Height]",
        "OriginalImagePixelSpacing[x",
        "y]",
    ]
    with gzip.open(root / "Data_Entry_2017_v2020.csv.gz", "wt", newline="") as fh:
        csv.writer(fh).writerows([header] + rows)
    (root / "train_val_list.txt").write_text("\n".join(names[: n * 3 // 4]) + "\n")
    (root / "test_list.txt").write_text("\n".join(names[n * 3 // 4 :]) + "\n")
    return {name: row[1] for name, row in zip(names, rows)}


def test_cxr14_nih_linear_probe_fixture(tmp_path):
    _write_nih_fixture(tmp_path / "nih")
    task = get_task("cxr14-nih-linprobe", tmp_path / "nih", conditions="cardiomegaly,pleural effusion")
    res = run_task(task, PixelEmbedder(), out_dir=tmp_path, n_boot=N_BOOT, progress=False)
    assert res["counts"]["n"] == 10 and res["data_info"]["train_images"] == 30
    assert res["breakdown"]["auc_by_class"]["cardiomegaly"] == 1.0  # the block is linearly separable
    assert res["data_info"]["test"]["split"] == "test_list.txt"

    (tmp_path / "nih" / "test_list.txt").unlink()
    with pytest.raises(
        DataError, match="needs split train/test and the official train_val_list.txt and test_list.txt"
    ):
        run_task(task, PixelEmbedder(), out_dir=tmp_path, progress=False)


def test_chexpert_zero_shot_fixture(shared_data, tmp_path):
    import eval_fixtures as fx

    fx.write_chexpert(tmp_path / "data", shared_data / "cxr_samples")
    task = get_task("chexpert-zeroshot", tmp_path / "data")
    res = run_task(task, RandomEmbedder(), out_dir=tmp_path, n_boot=20, progress=False)
    assert res["counts"]["n"] == 3
    assert len(res["breakdown"]["auc_by_class"]) == 13  # all findings but "No Finding"
    assert res["published"]["auc"]["MedSigLIP-448"] == 0.844
