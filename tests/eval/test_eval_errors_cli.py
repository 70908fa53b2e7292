"""One clear error per user mistake, and the `openmedgemma eval` command."""

import argparse
import json
import shutil

import numpy as np
import pytest

from eval_scripted import ScriptedModel
from openmedgemma.errors import ConfigError, DataError, OpenMedGemmaError
from openmedgemma.eval import cli, get_task, list_tasks, loaders


def test_unknown_task_and_option():
    with pytest.raises(ConfigError, match=r"unknown task 'medqa2' \(closest: medqa\b.*\); known tasks: .*medqa, .*vqa-rad"):
        get_task("medqa2", "/nowhere")
    with pytest.raises(
        ConfigError, match=r"task vqa-rad: unknown option\(s\) \['splitt'\]; allowed: part, split"
    ):
        get_task("vqa-rad", "/nowhere", splitt="official")
    with pytest.raises(ConfigError, match="option train_limit: expected an integer, got 'many'"):
        get_task("pneumoniamnist-linprobe", "/nowhere", train_limit="many")


@pytest.mark.parametrize(
    "name",
    [
        "medqa",
        "pubmedqa",
        "mmlu-med",
        "vqa-rad",
        "slake",
        "pneumoniamnist",
        "chexpert",
        "cxr14-nih",
        "mimic-cxr-report",
        "iu-xray-report",
    ],
)
def test_missing_data_folder(tmp_path, name):
    with pytest.raises(DataError, match=f"{name}: data folder {tmp_path / 'absent'} does not exist"):
        get_task(name, tmp_path / "absent").load_examples()


def test_folder_without_the_dataset(tmp_path):
    with pytest.raises(
        DataError, match=r"medqa: no data file found under .* \(looked for: text_mcqa/medqa/test.jsonl"
    ):
        get_task("medqa", tmp_path).load_examples()
    with pytest.raises(DataError, match=r"vqa-rad: no data file found under .*VQA_RAD Dataset Public.json"):
        get_task("vqa-rad", tmp_path).load_examples()


def test_wrong_formats(tmp_path, shared_data):
    bad = tmp_path / "medqa"
    bad.mkdir()
    (bad / "test.jsonl").write_text(
        '{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "A"}\n{oops\n'
    )
    with pytest.raises(DataError, match=r"medqa/test.jsonl: line 2 is not valid JSON"):
        get_task("medqa", tmp_path).load_examples()
    (bad / "test.jsonl").write_text('{"question": "q", "choices": ["x", "y"], "answer": 0}\n')
    with pytest.raises(
        DataError, match=r"test.jsonl: missing column\(s\)/field\(s\) \['options', 'answer_idx'\]"
    ):
        get_task("medqa", tmp_path).load_examples()
    (bad / "test.jsonl").write_text('{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "C"}\n')
    with pytest.raises(DataError, match=r"line 1: answer 'C' is not one of the options \['A', 'B'\]"):
        get_task("medqa", tmp_path).load_examples()

    np.savez(tmp_path / "pneumoniamnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(
        DataError, match=r"pneumoniamnist.npz: missing array\(s\) \['test_images', 'test_labels'\]"
    ):
        get_task("pneumoniamnist", tmp_path).load_examples()
    (tmp_path / "pneumoniamnist.npz").write_text("not a zip")
    with pytest.raises(DataError, match="pneumoniamnist.npz: not a readable .npz file"):
        get_task("pneumoniamnist", tmp_path).load_examples()

    vqa = tmp_path / "vqa_rad"
    vqa.mkdir()
    (vqa / "VQA_RAD Dataset Public.json").write_text('{"qid": 1}')
    with pytest.raises(
        DataError, match="VQA_RAD Dataset Public.json: expected a JSON list of question records"
    ):
        get_task("vqa-rad", tmp_path).load_examples()

    chexpert = tmp_path / "CheXpert-v1.0-small"
    chexpert.mkdir()
    (chexpert / "valid.csv").write_text(
        "Path,Atelectasis,Cardiomegaly,Consolidation,Edema,Pleural Effusion\n"
        "valid/p1/s1/view1_frontal.jpg,1.0,2.0,,0.0,0.0\n"
    )
    with pytest.raises(
        DataError, match=r"valid.csv: row 2, Cardiomegaly: label '2.0' is not 1, 0, -1 or blank"
    ):
        get_task("chexpert", tmp_path).load_examples()


def test_missing_images_are_one_clear_error(shared_data, tmp_path):
    with pytest.raises(DataError, match=r"cxr14-nih: 112118 of 112120 images are missing .*images=available"):
        get_task("cxr14-nih", shared_data).load_examples()
    folder = tmp_path / "vqa_rad"
    shutil.copytree(
        shared_data / "vqa_rad", folder, ignore=shutil.ignore_patterns("synpic54610.jpg", "*.xlsx", "*.xml")
    )
    with pytest.raises(DataError, match=r"vqa-rad: 1 image\(s\) missing from .*\['synpic54610.jpg'\]"):
        get_task("vqa-rad", tmp_path, split="official", part="train").load_examples()
    (tmp_path / "Slake1.0").mkdir()
    (tmp_path / "Slake1.0" / "test.json").write_text(
        json.dumps(
            [
                {
                    "qid": 1,
                    "img_name": "x/source.jpg",
                    "question": "q",
                    "answer": "a",
                    "answer_type": "OPEN",
                    "q_lang": "en",
                }
            ]
        )
    )
    with pytest.raises(
        DataError,
        match="SLAKE images are not redistributed here; give the folder with --task-option image_dir=PATH",
    ):
        get_task("slake", tmp_path).load_examples()


def _parser():
    parser = argparse.ArgumentParser(prog="openmedgemma")
    subparsers = parser.add_subparsers(dest="command")
    cli.register(subparsers)
    return parser


def test_cli_list(capsys):
    args = _parser().parse_args(["eval", "--list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for info in list_tasks():
        assert info["name"] in out
    assert len(list_tasks()) == 22  # the report's 20, ehrqa and vqa-rad-dialogue (nano's multi-turn score)


def test_cli_errors(shared_data, tmp_path, monkeypatch):
    parser = _parser()
    args = parser.parse_args(["eval", "nonsense-task", "--model", "m", "--data-dir", str(shared_data)])
    with pytest.raises(ConfigError, match="unknown task 'nonsense-task'"):
        args.func(args)
    args = parser.parse_args(["eval", "medqa", "--model", "m"])
    with pytest.raises(ConfigError, match="--data-dir is required"):
        args.func(args)
    # an unknown task is named (with the closest names) before --data-dir is asked for
    args = parser.parse_args(["eval", "nosuchtask"])
    with pytest.raises(ConfigError, match=r"^unknown task 'nosuchtask'; known tasks: .*medqa"):
        args.func(args)
    args = parser.parse_args(["eval", "pubmedq", "vqa_rad", "medqa"])
    with pytest.raises(ConfigError, match=r"^unknown tasks 'pubmedq' \(closest: pubmedqa\b[^)]*\); 'vqa_rad' \(closest: vqa-rad"):
        args.func(args)
    monkeypatch.setenv("OPENMEDGEMMA_MODELS", str(tmp_path / "no-models"))  # no --model: the nano model, missing here
    args = parser.parse_args(["eval", "medqa", "--data-dir", str(shared_data)])
    with pytest.raises(ConfigError, match="no --model given and the bundled nano model is not at .*no-models"):
        args.func(args)
    args = parser.parse_args(["eval", "medqa", "--model", "m", "--data-dir", str(tmp_path / "none")])
    with pytest.raises(DataError, match="medqa: data folder .* does not exist"):
        args.func(args)
    args = parser.parse_args(["eval", "medqa", "--model", "/models/medgemma", "--data-dir", str(shared_data)])
    with pytest.raises(
        OpenMedGemmaError,
        match="/models/medgemma: no such file or folder",
    ):
        args.func(args)
    args = parser.parse_args(
        ["eval", "vqa-rad", "--model", "m", "--data-dir", str(shared_data), "--task-option", "medqa:file=x"]
    )
    with pytest.raises(ConfigError, match="task 'medqa' is not among"):
        args.func(args)


def test_cli_runs_tasks_with_a_plugged_in_model(shared_data, tmp_path, monkeypatch, capsys):
    loaded = []

    def fake_loader(path):
        loaded.append(path)
        return ScriptedModel(
            lambda conv: "Final Answer: (A)" if "multiple choice" in str(conv) else "no", "fake"
        )

    monkeypatch.setattr(loaders, "load_chat_model", fake_loader)
    args = _parser().parse_args(
        [
            "eval",
            "medqa",
            "vqa-rad",
            "--model",
            "/models/x",
            "--data-dir",
            str(shared_data),
            "--out",
            str(tmp_path),
            "--limit",
            "7",
            "--seed",
            "3",
            "--batch-size",
            "2",
            "--n-boot",
            "30",
            "--no-progress",
            "--task-option",
            "vqa-rad:split=official",
        ]
    )
    assert args.func(args) == 0
    assert loaded == ["/models/x"]  # one model for both tasks
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("medqa: accuracy ") and "(n=7, unparseable 0)" in out[0]
    assert out[1].startswith("vqa-rad@split=official: token_f1 ")
    results = json.loads((tmp_path / "fake" / "vqa-rad@split=official.json").read_text())
    assert (
        results["seed"] == 3
        and results["counts"]["n"] == 7
        and results["ci_method"].endswith("n_boot=30, seed=3")
    )
    assert (tmp_path / "fake" / "summary.md").read_text().count("| medqa |") == 1


def test_through_the_main_entry_point(shared_data, tmp_path, monkeypatch, capsys):
    import openmedgemma.cli as main_cli

    monkeypatch.setattr(main_cli, "COMMAND_MODULES", ["openmedgemma.eval.cli"])
    assert main_cli.main(["eval", "--list"]) == 0
    assert "vqa-rad" in capsys.readouterr().out
    assert main_cli.main(["eval", "medqa", "--model", "m", "--data-dir", str(tmp_path / "gone")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("openmedgemma eval: error: medqa: data folder")
