"""TOML configs: validation errors name the key, the file and the allowed values; the CLI."""

from __future__ import annotations

import argparse

import pytest

from openmedgemma.errors import ConfigError
from openmedgemma.train.cli import register
from openmedgemma.train.config import load_config
from tests.train.helpers import to_toml

BASE = {"stage": "sft", "model": {"path": "ckpt"}, "data": {"sources": [{"kind": "vqa_rad", "path": "vqa_rad"}]}}


def write(tmp_path, cfg: dict, name="run.toml"):
    path = tmp_path / name
    path.write_text(to_toml(cfg))
    return path


def with_(section: str, **values) -> dict:
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    cfg.setdefault(section, {}).update(values)
    return cfg


def test_a_valid_config_round_trips_into_dataclasses(tmp_path):
    cfg = load_config(write(tmp_path, with_("lora", enabled=True, r=8)), "sft")
    assert cfg.stage == "sft" and cfg.lora.r == 8 and cfg.lora.alpha == 16 and cfg.lora.dropout == 0.05
    assert cfg.data.sources[0].kind == "vqa_rad" and cfg.data.sources[0].split_scheme == "balanced"
    assert cfg.optim.betas == [0.9, 0.999]


@pytest.mark.parametrize("cfg,message", [
    (with_("optim", lr_max=1.0), r"run.toml: unknown key 'optim.lr_max'.*allowed in \[optim\]: lr, weight_decay"),
    (with_("optim", schedul="cosine"), r"unknown key 'optim.schedul' \(did you mean 'schedule'\?\)"),
    (with_("optim", schedule="cosin"), r"run.toml: optim.schedule = 'cosin' is not allowed; use one of 'constant', 'linear', 'cosine'"),
    (with_("optim", lr=-1.0), r"run.toml: optim.lr = -1.0: must be > 0"),
    (with_("train", steps="ten"), r"run.toml: train.steps must be an integer, got 'ten'"),
    (with_("train", progress=1), r"train.progress must be true or false"),
    (with_("lora", quantize="nf4"), r"lora.quantize = 'nf4' needs lora.enabled = true"),
    (with_("lora", parts=["decoder"]), r"lora.parts = \['decoder'\]: unknown part\(s\) \['decoder'\]; the sft model has language_model"),
    ({**BASE, "freeze": ["vision"]}, r"freeze = \['vision'\]: unknown part"),
    ({**BASE, "data": {"sources": [{"kind": "dicom", "path": "x"}]}}, r"data.sources\[0\].kind = 'dicom' is not allowed; use one of 'vqa_rad'"),
    ({**BASE, "data": {"sources": []}}, r"no data: add at least one \[\[data.sources\]\] table"),
    ({**BASE, "model": {}}, r"\[model\] needs exactly one of path"),
    ({**BASE, "stage": "rl", "rl": {"rewards": {"bleu": 1.0}}}, r"rl.rewards: unknown reward 'bleu'; built in: exact_match, mcq_letter"),
])  # fmt: skip
def test_bad_configs_give_one_clear_error(tmp_path, cfg, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, cfg), cfg["stage"])


def test_stage_from_the_command_line_must_agree_with_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"run.toml: stage = 'sft' but the command asks for 'rl'"):
        load_config(write(tmp_path, BASE), "rl")
    with pytest.raises(ConfigError, match=r"nope.toml: no such config file"):
        load_config(tmp_path / "nope.toml", "sft")
    (tmp_path / "broken.toml").write_text("stage = \n")
    with pytest.raises(ConfigError, match=r"broken.toml: not valid TOML"):
        load_config(tmp_path / "broken.toml", "sft")


def parser():
    p = argparse.ArgumentParser(prog="openmedgemma")
    register(p.add_subparsers(dest="command"))
    return p


def test_cli_parses_the_stages_and_checks_a_config(tmp_path, capsys):
    path = write(tmp_path, BASE)
    args = parser().parse_args(["train", "sft", "--config", str(path), "--resume", "runs/x", "--data-dir", "/d", "--check"])
    assert (args.stage, args.resume, args.data_dir) == ("sft", "runs/x", "/d")
    assert args.func(args) == 0
    assert "valid sft config" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "finetune", "--config", str(path)])


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    from openmedgemma.train.cli import main

    path = write(tmp_path, with_("optim", lr_max=1.0))
    assert main(["train", "sft", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown key 'optim.lr_max'" in err and str(path) in err


def test_the_example_configs_are_valid(capsys):
    from openmedgemma.train.cli import main
    from tests.conftest import REPO_ROOT

    configs = sorted((REPO_ROOT / "configs" / "train").glob("*.toml"))
    assert len(configs) >= 7
    for path in configs:
        stage = load_config(path).stage
        assert main(["train", stage, "--config", str(path), "--check"]) == 0, capsys.readouterr().err
