"""`openmedgemma train nano`: the whole recipe (tokenizers, siglip, pretrain, sft, rl) on the real data, with
every stage cut to 2 steps, is deterministic under a seed and writes two folders both libraries load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from openmedgemma import MedGemma, MedSigLIP
from openmedgemma.config import from_hf_config, get_config, read_hf_config
from openmedgemma.errors import ConfigError
from openmedgemma.tokenizer import Tokenizer
from openmedgemma.train import cli as train_cli
from openmedgemma.train.nano import RECIPE_STAGES, default_recipe_dir, load_recipe, run_nano


def test_recipe_files_validate_and_chain_the_stages(shared_data, tmp_path):
    configs = load_recipe(default_recipe_dir(), shared_data, tmp_path, seed=3)
    assert list(configs) == list(RECIPE_STAGES)
    assert configs["siglip"].model.config == "medsiglip-nano"
    assert configs["pretrain"].model.path == str(tmp_path / "init")
    assert configs["sft"].model.path == str(tmp_path / "pretrain" / "final")
    assert configs["rl"].model.path == str(tmp_path / "sft" / "final")
    assert all(c.seed == 3 and c.output_dir == str(tmp_path / s) for s, c in configs.items())
    assert all(c.freeze == ["vision_tower"] for s, c in configs.items() if s != "siglip")
    # the held-out splits never feed training (nor the tokenizers, which learn from these sources only)
    assert all(src.split == "train" for c in configs.values() for src in c.data.sources)


def test_nano_recipe_end_to_end_is_deterministic(shared_data, tmp_path):
    a = run_nano(shared_data, tmp_path / "a", max_steps=2, log=lambda *_: None)
    b = run_nano(shared_data, tmp_path / "b", max_steps=2, log=lambda *_: None)
    for kind in ("medgemma", "medsiglip"):
        wa, wb = load_file(f"{a['outputs'][kind]}/model.safetensors"), load_file(f"{b['outputs'][kind]}/model.safetensors")
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{kind}: two runs with one seed differ"
    summary = json.loads((tmp_path / "a" / "nano_summary.json").read_text())
    assert set(summary["stages"]) == {"tokenizers", *RECIPE_STAGES}
    assert all(summary["stages"][s]["steps"] == 2 for s in RECIPE_STAGES)

    medgemma, medsiglip = MedGemma.from_pretrained(a["outputs"]["medgemma"]), MedSigLIP.from_pretrained(a["outputs"]["medsiglip"])
    assert from_hf_config(read_hf_config(a["outputs"]["medgemma"])) == get_config("nano")
    # the recipe writes the token ids its spiece.model really has (no CLIP defaults a loader would fill in)
    siglip_text = json.loads((Path(a["outputs"]["medsiglip"]) / "config.json").read_text())["text_config"]
    assert (siglip_text["bos_token_id"], siglip_text["eos_token_id"], siglip_text["pad_token_id"]) == (None, 1, 1)
    generation = json.loads((Path(a["outputs"]["medgemma"]) / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, Tokenizer.from_pretrained(a["outputs"]["medgemma"]).end_of_turn_id]
    # nano MedGemma sees through the trained MedSigLIP tower, which the later stages kept frozen
    tower = medsiglip.vision_model.state_dict()
    for name, value in medgemma.vision_tower.vision_model.state_dict().items():
        assert torch.equal(value, tower[name]), name
    c = run_nano(shared_data, tmp_path / "c", seed=1, max_steps=2, log=lambda *_: None)
    wc = load_file(f"{c['outputs']['medsiglip']}/model.safetensors")
    assert not all(torch.equal(wc[k], wa[k]) for k in wc)  # the seed matters


def test_nano_refuses_to_overwrite_and_names_bad_inputs(shared_data, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        run_nano(shared_data, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="no such data folder"):
        run_nano(tmp_path / "missing", tmp_path / "x")
    with pytest.raises(ConfigError, match="needs siglip.toml"):
        run_nano(shared_data, tmp_path / "y", recipe_dir=tmp_path)
    assert train_cli.main(["train", "nano", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "z")]) == 2
    assert "no such data folder" in capsys.readouterr().err
