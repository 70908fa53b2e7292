"""Runner: resuming, refusing foreign prediction files, batching, limits."""

import json
from pathlib import Path

import pytest

from eval_scripted import FailingAfter, RandomModel, ScriptedModel
from openmedgemma.errors import ConfigError, OpenMedGemmaError
from openmedgemma.eval import get_task, result_paths, run_task

N_BOOT = 100


def _comparable(res):
    return {k: res[k] for k in ("metrics", "counts", "breakdown", "baselines", "confusion")}


def test_resume_after_crash_gives_the_same_numbers(shared_data, tmp_path):
    task = get_task("medqa", shared_data)
    kwargs = dict(limit=23, batch_size=5, n_boot=N_BOOT, progress=False, seed=7)
    reference = run_task(
        task, RandomModel("ABCD", "Final Answer: ({})", seed=5, name="m"), out_dir=tmp_path / "a", **kwargs
    )

    crashing = FailingAfter(RandomModel("ABCD", "Final Answer: ({})", seed=5, name="m"), k=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_task(task, crashing, out_dir=tmp_path / "b", **kwargs)
    predictions = result_paths(tmp_path / "b", "m", "medqa")["predictions"]
    assert len(predictions.read_text().splitlines()) == 1 + 2 * 5  # header + two flushed batches
    assert not result_paths(tmp_path / "b", "m", "medqa")["results"].exists()

    # The restarted model continues the same random stream, as a real greedy model gives the same
    # answer to the same question: it must only be asked the 13 remaining questions.
    survivor = crashing.model
    resumed = run_task(task, survivor, out_dir=tmp_path / "b", **kwargs)
    assert survivor.seen == 23
    assert _comparable(resumed) == _comparable(reference)
    ids = [json.loads(line)["id"] for line in predictions.read_text().splitlines()[1:]]
    assert len(ids) == len(set(ids)) == 23


def test_interrupted_line_is_dropped_and_redone(shared_data, tmp_path):
    task = get_task("medqa", shared_data)
    model = ScriptedModel(lambda c: "Final Answer: (A)", "m")
    first = run_task(task, model, out_dir=tmp_path, limit=6, batch_size=3, n_boot=N_BOOT, progress=False)
    path = Path(first["files"]["predictions"])
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # cut mid-line
    model.seen = 0
    again = run_task(task, model, out_dir=tmp_path, limit=6, batch_size=3, n_boot=N_BOOT, progress=False)
    assert model.seen == 1 and _comparable(again) == _comparable(first)


def test_larger_limit_only_generates_the_new_examples(shared_data, tmp_path):
    task = get_task("vqa-rad", shared_data)
    model = ScriptedModel(lambda c: "yes", "m")
    run_task(task, model, out_dir=tmp_path, limit=10, batch_size=4, n_boot=N_BOOT, progress=False)
    assert (model.calls, model.seen) == (3, 10)
    res = run_task(task, model, out_dir=tmp_path, limit=25, batch_size=4, n_boot=N_BOOT, progress=False)
    assert model.seen == 25 and res["counts"]["n"] == 25


@pytest.mark.parametrize("change, field", [({"max_new_tokens": 77}, "max_new_tokens"), ({"seed": 1}, "seed")])
def test_refuses_predictions_from_another_config(shared_data, tmp_path, change, field):
    task = get_task("medqa", shared_data)
    model = ScriptedModel(lambda c: "Final Answer: (A)", "m")
    run_task(task, model, out_dir=tmp_path, limit=3, n_boot=N_BOOT, progress=False)
    with pytest.raises(ConfigError, match=rf"written by a different run \({field}: file has"):
        run_task(task, model, out_dir=tmp_path, limit=3, n_boot=N_BOOT, progress=False, **change)


def test_refuses_predictions_of_another_task_or_model(shared_data, tmp_path):
    model = ScriptedModel(lambda c: "Final Answer: (A)", "m")
    res = run_task(
        get_task("medmcqa", shared_data), model, out_dir=tmp_path, limit=3, n_boot=N_BOOT, progress=False
    )
    target = result_paths(tmp_path, "m", "medqa")["predictions"]
    target.parent.mkdir(parents=True)
    target.write_text(Path(res["files"]["predictions"]).read_text())
    with pytest.raises(ConfigError, match=r"task: file has 'medmcqa', this run has 'medqa'"):
        run_task(
            get_task("medqa", shared_data), model, out_dir=tmp_path, limit=3, n_boot=N_BOOT, progress=False
        )

    other = result_paths(tmp_path, "other", "medmcqa")["predictions"]
    other.parent.mkdir(parents=True)
    other.write_text(Path(res["files"]["predictions"]).read_text())
    with pytest.raises(ConfigError, match=r"model: file has 'm', this run has 'other'"):
        run_task(
            get_task("medmcqa", shared_data),
            ScriptedModel(lambda c: "x", "other"),
            out_dir=tmp_path,
            limit=3,
            n_boot=N_BOOT,
            progress=False,
        )


def test_refuses_answers_given_to_a_different_prompt(shared_data, tmp_path):
    task = get_task("medqa", shared_data)
    model = ScriptedModel(lambda c: "Final Answer: (A)", "m")
    res = run_task(task, model, out_dir=tmp_path, limit=3, n_boot=N_BOOT, progress=False)
    path = Path(res["files"]["predictions"])
    lines = path.read_text().splitlines()
    record = json.loads(lines[2])
    record["prompt_sha"] = "0" * 16
    path.write_text("\n".join(lines[:2] + [json.dumps(record)] + lines[3:]) + "\n")
    with pytest.raises(
        ConfigError, match=f"stored answer for id {record['id']} was given to a different prompt"
    ):
        run_task(task, model, out_dir=tmp_path, limit=3, n_boot=N_BOOT, progress=False)


def test_bad_model_output_and_wrong_model_kind(shared_data, tmp_path):
    task = get_task("medqa", shared_data)
    short = ScriptedModel(lambda c: "A", "m")
    short.generate = lambda batch, **kw: ["A"] * (len(batch) - 1)
    with pytest.raises(OpenMedGemmaError, match="expected a list of strings"):
        run_task(task, short, out_dir=tmp_path, limit=4, n_boot=N_BOOT, progress=False)

    class Embedderish:
        name = "siglip"

        def embed_images(self, images): ...

        def embed_texts(self, texts): ...

    with pytest.raises(ConfigError, match="task medqa needs a ChatModel"):
        run_task(task, Embedderish(), out_dir=tmp_path, limit=4, progress=False)
    with pytest.raises(ConfigError, match="task pneumoniamnist-zeroshot needs an Embedder"):
        run_task(get_task("pneumoniamnist-zeroshot", shared_data), short, out_dir=tmp_path, progress=False)


def test_outputs_content(shared_data, tmp_path):
    model = ScriptedModel(lambda c: "Reasoning...\nFinal Answer: (B)", "my/model v1")
    run_task(
        get_task("medqa", shared_data),
        model,
        out_dir=tmp_path,
        limit=40,
        n_boot=N_BOOT,
        progress=False,
        seed=3,
    )
    paths = result_paths(tmp_path, "my/model v1", "medqa")
    assert paths["results"] == tmp_path / "my_model_v1" / "medqa.json"
    on_disk = json.loads(paths["results"].read_text())
    assert on_disk["ci_method"] == f"percentile bootstrap, n_boot={N_BOOT}, seed=3"
    assert on_disk["generation"]["max_new_tokens"] == 1024 and on_disk["limit"] == 40
    assert on_disk["published"]["accuracy"] == {
        "MedGemma 4B": 64.4,
        "Gemma 3 4B": 50.7,
        "MedGemma 27B": 87.7,
        "Gemma 3 27B": 74.9,
    }
    majority = [k for k in on_disk["baselines"] if k.startswith("majority")]
    assert len(majority) == 1
    summary = paths["summary"].read_text()
    assert "| accuracy |" in summary and "64.4" in summary and majority[0] in summary
    scored = [json.loads(line) for line in paths["scored"].read_text().splitlines()]
    assert all(s["parsed"] == "B" for s in scored)
    assert sum(s["correct"] for s in scored) == on_disk["counts"]["correct"]
    assert on_disk["metrics"]["accuracy"]["value"] == on_disk["counts"]["correct"] / 40
    assert paths["confusion"].read_bytes()[:4] == b"\x89PNG"
    table = paths["model_summary"].read_text()
    assert "| medqa | 40 | accuracy |" in table and "| 64.4 | 50.7 | 87.7 | 74.9 |" in table
