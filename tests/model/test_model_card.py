"""models/README.md (the nano model card) against the committed checkpoints: the card's figures are read from
the card itself, so a retrained model and its updated card are checked together, and a card that drifts from
its models fails.

Checked: the parameter counts, the sha256 of each model.safetensors, and the PneumoniaMNIST zero-shot AUC of
nano MedSigLIP (all 624 test images, value and 95% bootstrap interval, recomputed the way the card says).
Not recomputed here (each costs minutes on 2 CPU cores, beyond a unit test's budget): the VQA-RAD and
PneumoniaMNIST generative figures (735 and 624 generations) and the linear probe (embeddings of the 3882
training images). `openmedgemma eval` recomputes them; the card names the commands.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CARD = ROOT / "models" / "README.md"
ESTIMATE = re.compile(r"(\d+(?:\.\d+)?) \[(\d+(?:\.\d+)?), (\d+(?:\.\d+)?)\]")


def card_text() -> str:
    return CARD.read_text(encoding="utf-8")


def table_row(prefix: str) -> list[str]:
    """The cells of the card's table row whose first cell starts with `prefix`."""
    for line in card_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(prefix):
            return cells
    raise AssertionError(f"{CARD}: no table row starting with {prefix!r}")


def card_estimate(row_prefix: str, metric: str) -> tuple[float, float, float]:
    """(value, low, high) stated for `metric` in the row starting with `row_prefix`."""
    cells = table_row(row_prefix)
    assert cells[1] == metric, cells
    found = ESTIMATE.fullmatch(cells[2])
    assert found, f"{CARD}: {cells[2]!r} is not 'value [low, high]'"
    return tuple(float(v) for v in found.groups())


@pytest.mark.parametrize("folder", ["medgemma-nano", "medsiglip-nano"])
def test_parameter_count_and_sha256_are_the_cards(folder):
    from openmedgemma import MedGemma, MedSigLIP

    cells = table_row(f"`{folder}/`")
    stated = int(cells[2].replace(",", ""))
    model = (MedGemma if folder == "medgemma-nano" else MedSigLIP).from_pretrained(ROOT / "models" / folder)
    assert sum(p.numel() for p in model.parameters()) == stated
    digest = re.search(rf"{folder} `([0-9a-f]{{64}})`", card_text().replace("\n", " "))
    assert digest, f"{CARD}: no sha256 for {folder}"
    actual = hashlib.sha256((ROOT / "models" / folder / "model.safetensors").read_bytes()).hexdigest()
    assert actual == digest.group(1), f"{folder}/model.safetensors changed but the card still names {digest.group(1)}"


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine a second OpenMP thread waiting for a descheduled sibling
    makes this 3-4x slower; the AUC is the same to every printed digit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_pneumoniamnist_zero_shot_auc_is_the_cards(shared_data, tmp_path, one_thread):
    from openmedgemma.eval import get_task, loaders, runner

    value, low, high = card_estimate("PneumoniaMNIST test, nano MedSigLIP zero-shot", "AUC")
    task = get_task("pneumoniamnist-zeroshot", shared_data)
    res = runner.run_task(task, loaders.load_embedder(str(ROOT / "models" / "medsiglip-nano")), out_dir=tmp_path,
                          progress=False)  # the card's command: default seed and bootstrap  # fmt: skip
    assert res["counts"]["n"] == 624
    got = res["metrics"]["auc"]
    print(f"card {value} [{low}, {high}], recomputed {got['value']:.4f} [{got['ci_low']:.4f}, {got['ci_high']:.4f}]")
    assert low <= got["value"] <= high  # within the card's interval ...
    assert got["value"] == pytest.approx(value, abs=0.0006)  # ... and the stated figure, to its 3 decimals
    assert [got["ci_low"], got["ci_high"]] == pytest.approx([low, high], abs=0.0006)
