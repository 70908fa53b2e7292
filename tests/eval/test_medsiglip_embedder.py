"""MedSigLIPEmbedder end to end against transformers' SiglipModel + SiglipProcessor.

A tiny random SiglipModel is written with `save_pretrained`, next to a trained spiece.model and the
tokenizer_config.json transformers writes for it: the official folder layout. The oracle pipeline
is what a transformers user runs: zero-pad to square, SiglipProcessor (PIL backend, bilinear as
`openmedgemma.imaging.to_pixel_values`; text `padding="max_length"` to the model's 16 positions,
`truncation=True`), `get_image_features` / `get_text_features(input_ids)` and L2 normalisation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from openmedgemma.eval import get_task, run_task
from openmedgemma.eval.embedder import MedSigLIPEmbedder
from openmedgemma.eval.loaders import load_embedder
from openmedgemma.eval.tasks.siglip_tasks import PNEUMONIA_PROMPTS
from openmedgemma.errors import OpenMedGemmaError, TokenizerError
from tests import tiny
from tests.tokenizer.test_siglip_tokenizer import train_spiece, write_tokenizer_folder

TEXTS = [
    "a chest x-ray showing pneumonia",
    "No pneumonia. Normal chest X-ray!",
    "  Right   LOWER lobe\tconsolidation  ",
    "façade — 肺",
    " ".join(["moderate pleural effusion"] * 10),  # longer than the 16 positions: truncated
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import sentencepiece
    import transformers

    root = tmp_path_factory.mktemp("medsiglip")
    train_spiece(root / "spiece.model")
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(root / "spiece.model")).get_piece_size()
    config = tiny.siglip_hf_config()
    config["text_config"].update(vocab_size=vocab, pad_token_id=1, eos_token_id=1)
    model = tiny.hf_model(config)
    with torch.no_grad():
        model.logit_scale.fill_(np.log(7.5))
    model.save_pretrained(root)
    write_tokenizer_folder(root, root / "spiece.model")
    assert isinstance(model, transformers.SiglipModel)
    return root


@pytest.fixture(scope="module")
def oracle(folder):
    import transformers
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    model = transformers.SiglipModel.from_pretrained(folder).eval()
    size = model.config.vision_config.image_size
    images = SiglipImageProcessorPil(size={"height": size, "width": size}, resample=Image.BILINEAR)
    processor = transformers.SiglipProcessor(images, transformers.AutoTokenizer.from_pretrained(folder))
    return model, processor


def pad_square(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    side = max(h, w)
    out = np.zeros((side, side, 3), dtype=np.uint8)
    out[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = rgb
    return out


def oracle_embeddings(oracle, images=None, texts=None):
    model, processor = oracle
    length = model.config.text_config.max_position_embeddings
    with torch.no_grad():
        if images is not None:
            px = processor(images=[pad_square(im) for im in images], return_tensors="pt")["pixel_values"]
            out = model.get_image_features(pixel_values=px).pooler_output
        else:
            ids = processor(text=texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            out = model.get_text_features(input_ids=ids["input_ids"]).pooler_output
    return torch.nn.functional.normalize(out, dim=-1).numpy()


def test_embeddings_equal_the_transformers_pipeline(folder, oracle, tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(28, 28, 3), (40, 23, 3), (17, 61, 3)]]
    png = tmp_path / "x.png"
    Image.fromarray(arrays[1]).save(png)
    gray = rng.integers(0, 256, (30, 30), dtype=np.uint8)
    inputs = [arrays[0], Image.fromarray(arrays[2]), str(png), gray]
    expected_inputs = [arrays[0], arrays[2], arrays[1], np.repeat(gray[..., None], 3, axis=2)]

    embedder = load_embedder(str(folder))
    assert isinstance(embedder, MedSigLIPEmbedder) and embedder.name == folder.name
    embedder.batch_size = 3  # two chunks of images, two of texts

    images = embedder.embed_images(inputs)
    texts = embedder.embed_texts(TEXTS)
    assert images.shape == (4, 24) and texts.shape == (len(TEXTS), 24) and images.dtype == np.float32
    np.testing.assert_allclose(images, oracle_embeddings(oracle, images=expected_inputs), atol=1e-5, rtol=0)
    np.testing.assert_allclose(texts, oracle_embeddings(oracle, texts=TEXTS), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-6)
    assert embedder.logit_scale == pytest.approx(7.5)
    assert embedder.tokenizer.max_length == 16  # the text tower's positions, from config.json
    assert not np.allclose(texts[0], texts[1])
    np.testing.assert_allclose(embedder.embed_texts(["no pneumonia normal chest xray"])[0], texts[1], atol=1e-6)


def test_pneumonia_zero_shot_runs_on_real_images(folder, oracle, shared_data, tmp_path):
    task = get_task("pneumoniamnist-zeroshot", shared_data)
    res = run_task(task, load_embedder(str(folder)), out_dir=tmp_path, limit=24, n_boot=20, progress=False)
    assert res["counts"]["n"] == 24 and 0.0 <= res["metrics"]["auc"]["value"] <= 1.0
    saved = json.loads(open(res["files"]["results"]).read())
    assert saved["task"] == "pneumoniamnist-zeroshot" and saved["model"] == folder.name

    # the scored probabilities are the report's zero-shot rule applied to the oracle's embeddings
    with np.load(shared_data / "medmnist/pneumoniamnist_28_varun19424.npz") as z:
        gray = z["test_images"][:24]
    images = oracle_embeddings(oracle, images=[np.repeat(g[..., None], 3, axis=2) for g in gray])
    centroids = []
    for cls in ("normal", "pneumonia"):
        mean = oracle_embeddings(oracle, texts=PNEUMONIA_PROMPTS[cls]).mean(axis=0)
        centroids.append(mean / np.linalg.norm(mean))
    logits = 7.5 * images @ np.stack(centroids).T
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    rows = [json.loads(line) for line in open(res["files"]["scored"])]
    scored = np.array([[r["pneumonia:normal"], r["pneumonia:pneumonia"]] for r in rows])
    np.testing.assert_allclose(scored, probs, atol=1e-5)


def test_folder_errors(folder, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(TokenizerError, match="no spiece.model"):
        load_embedder(str(tmp_path))
    (tmp_path / "spiece.model").write_bytes(b"\x00 corrupt")
    with pytest.raises(TokenizerError, match="spiece.model: not a valid SentencePiece model"):
        load_embedder(str(tmp_path))
    with pytest.raises(OpenMedGemmaError, match="no such file or folder"):
        load_embedder(str(tmp_path / "missing"))


def test_tokenizer_length_must_match_the_text_tower(folder):
    from openmedgemma import MedSigLIP
    from openmedgemma.tokenizer import SiglipTextTokenizer

    with pytest.raises(OpenMedGemmaError, match="pads to 64 tokens but the text tower has 16 positions"):
        MedSigLIPEmbedder(MedSigLIP.from_pretrained(folder), SiglipTextTokenizer.from_pretrained(folder, max_length=64))
