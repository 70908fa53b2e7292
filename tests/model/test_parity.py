"""Parity with transformers in fp32 on CPU, weights always going through real files."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from openmedgemma import MedGemma, MedSigLIP
from tests import tiny

TOL = dict(atol=3e-5, rtol=3e-5)


def hf_logits(model, input_ids, pixel_values=None):
    kwargs = {}
    if pixel_values is not None:
        kwargs = dict(pixel_values=pixel_values, token_type_ids=(input_ids == tiny.IMAGE).long())
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def ours_logits(model, input_ids, pixel_values=None):
    with torch.no_grad():
        return model(input_ids, pixel_values=pixel_values)


def test_text_decoder_longer_than_window_roundtrip(tmp_path):
    hf = tiny.hf_model(tiny.gemma_text_hf_config())
    ids = torch.randint(3, tiny.VOCAB, (2, 5 * tiny.WINDOW), generator=torch.Generator().manual_seed(3))
    ref = hf_logits(hf, ids)
    hf.save_pretrained(tmp_path / "hf")
    ours = MedGemma.from_pretrained(tmp_path / "hf")
    assert not ours.config.is_multimodal
    torch.testing.assert_close(ours_logits(ours, ids), ref, **TOL)

    ours.save_pretrained(tmp_path / "ours")
    back = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(hf_logits(back, ids), ref, **TOL)


@pytest.mark.parametrize("n_images", [1, 2])
def test_multimodal_images_interleaved_with_text(tmp_path, n_images):
    hf = tiny.hf_model(tiny.gemma_mm_hf_config())
    ids, px = tiny.image_prompt(n_images), tiny.pixels(n_images)
    assert ids.shape[1] > tiny.WINDOW * 3  # image blocks straddle sliding windows
    ref = hf_logits(hf, ids, px)
    hf.save_pretrained(tmp_path / "hf")
    ours = MedGemma.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(ours_logits(ours, ids, px), ref, **TOL)


def test_image_tokens_attend_bidirectionally():
    """The first soft token of an image depends on the image's later patches (not causal)."""
    model = _our_random_mm_model()
    ids, px = tiny.image_prompt(1), tiny.pixels(1)
    first_soft = int((ids[0] == tiny.IMAGE).nonzero()[0])
    feats = model.image_features(px)
    changed = feats.clone()
    changed[:, -1] += 1.0  # only the last soft token's feature
    with torch.no_grad():
        a = model(ids, image_features=feats)[0, first_soft]
        b = model(ids, image_features=changed)[0, first_soft]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("layout", ["original", "transformers"])
def test_our_save_loads_in_transformers_both_layouts(tmp_path, layout):
    hf = tiny.hf_model(tiny.gemma_mm_hf_config())
    ids, px = tiny.image_prompt(2), tiny.pixels(2)
    hf.save_pretrained(tmp_path / "hf")
    ours = MedGemma.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours", layout=layout)
    names = load_file(tmp_path / "ours" / "model.safetensors").keys()
    prefix = "language_model.model." if layout == "original" else "model.language_model."
    assert any(n.startswith(prefix) for n in names) and "lm_head.weight" not in names
    back = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(hf_logits(back, ids, px), hf_logits(hf, ids, px), **TOL)


# transformers 5.23 writes: language_model.model.*, vision_tower.* (no vision_model.), multi_modal_projector.*
LAYOUTS = {
    # Google's released files (and transformers 4.50)
    "original": {"language_model.model.": "language_model.model.", "vision_tower.": "vision_tower.vision_model.",
                 "multi_modal_projector.": "multi_modal_projector."},
    # transformers >= 4.52 in-memory names, as some re-uploaded checkpoints store them
    "transformers": {"language_model.model.": "model.language_model.", "vision_tower.": "model.vision_tower.vision_model.",
                     "multi_modal_projector.": "model.multi_modal_projector."},
    "transformers5": {"language_model.model.": "model.language_model.", "vision_tower.": "model.vision_tower.",
                      "multi_modal_projector.": "model.multi_modal_projector."},
}  # fmt: skip


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_we_load_every_name_layout(tmp_path, layout):
    hf = tiny.hf_model(tiny.gemma_mm_hf_config())
    ids, px = tiny.image_prompt(1), tiny.pixels(1)
    hf.save_pretrained(tmp_path / "hf")
    renamed = {}
    for name, t in load_file(tmp_path / "hf" / "model.safetensors").items():
        old = next(p for p in LAYOUTS[layout] if name.startswith(p))
        renamed[LAYOUTS[layout][old] + name[len(old) :]] = t
    if layout != "original":  # these files may carry the tied head explicitly
        renamed["lm_head.weight"] = renamed["model.language_model.embed_tokens.weight"].clone()
    (tmp_path / "x").mkdir()
    save_file(renamed, tmp_path / "x" / "model.safetensors")
    (tmp_path / "x" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    ours = MedGemma.from_pretrained(tmp_path / "x")
    torch.testing.assert_close(ours_logits(ours, ids, px), hf_logits(hf, ids, px), **TOL)


def test_sharded_checkpoints_both_directions(tmp_path):
    hf = tiny.hf_model(tiny.gemma_mm_hf_config())
    ids, px = tiny.image_prompt(1), tiny.pixels(1)
    ref = hf_logits(hf, ids, px)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours = MedGemma.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(ours_logits(ours, ids, px), ref, **TOL)

    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=100_000)
    shards = sorted(p.name for p in (tmp_path / "ours").glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    back = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(hf_logits(back, ids, px), ref, **TOL)
    again = MedGemma.from_pretrained(tmp_path / "ours")
    torch.testing.assert_close(ours_logits(again, ids, px), ref, **TOL)


def test_medsiglip_features_and_logits(tmp_path):
    hf = tiny.hf_model(tiny.siglip_hf_config())
    px = tiny.pixels(3, size=28)
    ids = torch.randint(0, tiny.VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))
    hf.save_pretrained(tmp_path / "hf")
    ours = MedSigLIP.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px)
        torch.testing.assert_close(ours.get_image_features(px), hf.get_image_features(pixel_values=px).pooler_output, **TOL)
        torch.testing.assert_close(ours.get_text_features(ids), hf.get_text_features(input_ids=ids).pooler_output, **TOL)
        out = ours(ids, px)
    assert out.logits_per_image.shape == (3, 4)
    torch.testing.assert_close(out.logits_per_image, ref.logits_per_image, **TOL)

    ours.save_pretrained(tmp_path / "ours")
    back = transformers.SiglipModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, pixel_values=px).logits_per_image, ref.logits_per_image, **TOL)


def test_left_padded_batch_equals_single_rows():
    model = _our_random_mm_model()
    a, b = tiny.image_prompt(1, seed=1), tiny.image_prompt(0, seed=2)
    px = tiny.pixels(1)
    pad = a.shape[1] - b.shape[1]
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    with torch.no_grad():
        both = model(batch, pixel_values=px, attention_mask=mask)
        torch.testing.assert_close(both[0], model(a, pixel_values=px)[0], **TOL)
        torch.testing.assert_close(both[1, pad:], model(b)[0], **TOL)


def test_bfloat16_runs_and_tracks_fp32(tmp_path):
    hf = tiny.hf_model(tiny.gemma_mm_hf_config())
    hf.save_pretrained(tmp_path / "hf")
    ids, px = tiny.image_prompt(1), tiny.pixels(1)
    fp32 = ours_logits(MedGemma.from_pretrained(tmp_path / "hf"), ids, px)
    bf16_model = MedGemma.from_pretrained(tmp_path / "hf", dtype="bfloat16")
    assert bf16_model.dtype == torch.bfloat16
    bf16 = ours_logits(bf16_model, ids, px)
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    with torch.no_grad():
        ref = hf.to(torch.bfloat16)(input_ids=ids, pixel_values=px.bfloat16(), token_type_ids=(ids == tiny.IMAGE).long()).logits
    # bf16 has ~3 significant digits: compare to transformers in bf16 loosely, and to fp32 by ranking
    torch.testing.assert_close(bf16.float(), ref.float(), atol=0.15, rtol=0.05)
    assert (bf16.float().argmax(-1) == fp32.argmax(-1)).float().mean() > 0.8


def _our_random_mm_model() -> MedGemma:
    from openmedgemma.config import from_hf_config

    model = MedGemma(from_hf_config(tiny.gemma_mm_hf_config()))
    tiny.randomize(model)
    return model.eval()
