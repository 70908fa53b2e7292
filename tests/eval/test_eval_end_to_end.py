"""Every chat task runs end to end through the runner, writing its result files.

Real data where the project has it (shared/data), official-format fixtures elsewhere. Expected
numbers are computed here from the raw files, independently of the harness's readers.
"""

import csv
import gzip
import json
from pathlib import Path

import pytest

import eval_fixtures as fx
from eval_scripted import ScriptedModel, conversation_images, conversation_text
from openmedgemma.eval import get_task, run_task

N_BOOT = 50
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_files(res: dict, n: int, *, predictions: bool = True) -> dict:
    """Result files exist and agree with the returned results; returns the JSON on disk."""
    files = {k: Path(v) for k, v in res["files"].items()}
    on_disk = json.loads(files["results"].read_text())
    assert on_disk["metrics"] == res["metrics"] and on_disk["counts"]["n"] == n
    assert files["results"].name == f"{res['task']}.json" and files["results"].parent.name == res["model"]
    scored = files["scored"].read_text().splitlines()
    assert len(scored) == n
    if predictions:
        lines = files["predictions"].read_text().splitlines()
        assert "header" in json.loads(lines[0]) and len(lines) == n + 1
        assert {json.loads(line)["id"] for line in lines[1:]} == {json.loads(s)["id"] for s in scored}
    summary = files["summary"].read_text()
    assert res["task"] in summary and "95% CI" in summary
    for note in res["notes"]:
        assert note in summary
    for plot in ("confusion", "roc"):
        if plot in files:
            assert files[plot].read_bytes()[:8] == PNG_MAGIC
    model_summary = (files["results"].parent / "summary.md").read_text()
    assert f"| {res['task']} |" in model_summary
    return on_disk


def always(text, name="constant"):
    return ScriptedModel(lambda conv: text, name)


def _jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.mark.parametrize(
    "name, options, source",
    [
        ("medqa", {}, "text_mcqa/medqa/test.jsonl"),
        ("medmcqa", {}, "text_mcqa/medmcqa/test.jsonl"),
        ("medxpertqa", {}, "text_mcqa/medxpertqa-r/test.jsonl"),
        ("mmlu-med", {}, "text_mcqa/mmlu/test.jsonl"),
        ("pubmedqa", {"format": "jsonl"}, "text_mcqa/pubmedqa/test.jsonl"),
    ],
)
def test_mcq_tasks_real_data(shared_data, tmp_path, name, options, source):
    n = 12
    golds = [r["answer_idx"] for r in _jsonl(shared_data / source)[:n]]
    res = run_task(
        get_task(name, shared_data, **options),
        always("Final Answer: (A)"),
        out_dir=tmp_path,
        limit=n,
        n_boot=N_BOOT,
        progress=False,
        batch_size=5,
    )
    check_files(res, n)
    assert res["metrics"]["accuracy"]["value"] == pytest.approx(golds.count("A") / n)
    assert res["published"]["accuracy"]["MedGemma 4B"] > 0
    assert "published MedGemma 4B" in Path(res["files"]["summary"]).read_text()


def test_pubmedqa_original_format(shared_data, tmp_path):
    truth = json.loads((shared_data / "pubmedqa/test_ground_truth.json").read_text())
    pqal = json.loads((shared_data / "pubmedqa/ori_pqal.json").read_text())
    first = list(truth)[:6]
    by_question = {pqal[p]["QUESTION"]: truth[p] for p in first}
    letter = {"yes": "A", "no": "B", "maybe": "C"}

    def oracle(conv):
        text = conversation_text(conv)
        assert (
            "Answer the following question given the context (reply with one of the options): Context: "
            in text
        )
        assert "from the three options" in text and "(C) maybe" in text
        question = text.split("Question: ", 1)[1].split("\n(A)", 1)[0]
        return f"Final Answer: ({letter[by_question[question]]})"

    res = run_task(
        get_task("pubmedqa", shared_data),
        ScriptedModel(oracle, "oracle"),
        out_dir=tmp_path,
        limit=6,
        n_boot=N_BOOT,
        progress=False,
    )
    check_files(res, 6)
    assert res["metrics"]["accuracy"]["value"] == 1.0


def test_mmlu_csv_form_per_subject(shared_data, tmp_path):
    answers = {}  # question and its options as the prompt lists them -> letter (questions repeat)
    for path in (shared_data / "mmlu_medical_csv/test").glob("*_test.csv"):
        for row in csv.DictReader(open(path, encoding="utf-8")):
            block = row["question"] + "".join(f"\n({L}) {row[f'choice{i}']}" for i, L in enumerate("ABCD"))
            answers[block] = "ABCD"[int(row["answer"])]

    def oracle(conv):
        block = (
            conversation_text(conv).split("Question: ", 1)[1].rsplit(" Response (think step by step", 1)[0]
        )
        return f"Final Answer: ({answers[block]})"

    res = run_task(
        get_task("mmlu-med", shared_data, format="csv"),
        ScriptedModel(oracle, "oracle"),
        out_dir=tmp_path,
        n_boot=N_BOOT,
        progress=False,
        batch_size=256,
    )
    check_files(res, 1089)
    subjects = res["breakdown"]["by_subject"]
    assert {k: v["n"] for k, v in subjects.items()} == {
        "anatomy": 135,
        "clinical_knowledge": 265,
        "college_biology": 144,
        "college_medicine": 173,
        "medical_genetics": 100,
        "professional_medicine": 272,
    }
    assert res["metrics"]["accuracy"]["value"] == 1.0 and all(v["value"] == 1.0 for v in subjects.values())


def test_generic_mcq_on_real_files(shared_data, tmp_path):
    csv_path = shared_data / "mmlu_medical_csv/test/anatomy_test.csv"
    golds = [int(r["answer"]) for r in csv.DictReader(open(csv_path, encoding="utf-8"))][:10]
    task = get_task(
        "mcq",
        shared_data,
        file=str(csv_path),
        option_fields="choice0,choice1,choice2,choice3",
        answer_field="answer",
        answer_format="index0",
    )
    res = run_task(
        task, always("Final Answer: (B)", "b"), out_dir=tmp_path, limit=10, n_boot=N_BOOT, progress=False
    )
    check_files(res, 10)
    assert res["metrics"]["accuracy"]["value"] == pytest.approx(golds.count(1) / 10)

    five = _jsonl(shared_data / "text_mcqa/medqa_5options/test.jsonl")[:10]
    task = get_task("mcq", shared_data, file="text_mcqa/medqa_5options/test.jsonl")
    seen = []
    model = ScriptedModel(lambda c: seen.append(conversation_text(c)) or "Final Answer: (E)", "e")
    res = run_task(task, model, out_dir=tmp_path, limit=10, n_boot=N_BOOT, progress=False)
    assert res["metrics"]["accuracy"]["value"] == pytest.approx(
        [r["answer_idx"] for r in five].count("E") / 10
    )
    assert all("from the five options" in s and "\n(E) " in s for s in seen)


def test_generic_mcq_afrimed_and_medbullets_layouts(tmp_path):
    afrimed = tmp_path / "afrimed.csv"
    with open(afrimed, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["sample_id", "question_type", "question", "answer_options", "correct_answer", "specialty"]
        )
        w.writerow(
            [
                "q1",
                "mcq",
                "Most common cause of malaria?",
                json.dumps(
                    {
                        "option1": "P. vivax",
                        "option2": "P. falciparum",
                        "option3": "P. ovale",
                        "option4": "P. malariae",
                        "option5": "",
                    }
                ),
                "option2",
                "Infectious Disease",
            ]
        )
        w.writerow(["q2", "saq", "Explain sickle cell disease.", "", "", "Hematology"])
        w.writerow(
            [
                "q3",
                "mcq",
                "First-line drug for uncomplicated malaria?",
                json.dumps(
                    {
                        "option1": "Chloroquine",
                        "option2": "Quinine",
                        "option3": "Artemether-lumefantrine",
                        "option4": "Primaquine",
                        "option5": "Doxycycline",
                    }
                ),
                "option3",
                "Infectious Disease",
            ]
        )
    task = get_task(
        "mcq",
        tmp_path,
        file=str(afrimed),
        options_field="answer_options",
        answer_field="correct_answer",
        answer_format="key",
        id_field="sample_id",
        subject_field="specialty",
        where="question_type=mcq",
    )
    examples = task.load_examples()
    assert [e.id for e in examples] == ["q1", "q3"] and [e.target for e in examples] == ["B", "C"]
    assert "from the four options" in conversation_text(examples[0].messages)  # empty option5 dropped
    assert "from the five options" in conversation_text(examples[1].messages)
    res = run_task(task, always("Final Answer: (C)"), out_dir=tmp_path / "out", n_boot=N_BOOT, progress=False)
    check_files(res, 2)
    assert res["metrics"]["accuracy"]["value"] == 0.5

    medbullets = tmp_path / "medbullets_op5.csv"
    with open(medbullets, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "answer", "answer_idx", "opa", "opb", "opc", "opd", "ope", "explanation"])
        w.writerow(
            [
                "A 45-year-old man ...",
                "Aspirin",
                "D",
                "Heparin",
                "Warfarin",
                "Clopidogrel",
                "Aspirin",
                "tPA",
                "...",
            ]
        )
    task = get_task(
        "mcq", tmp_path, file=str(medbullets), option_fields="opa,opb,opc,opd,ope", answer_field="answer_idx"
    )
    (example,) = task.load_examples()
    assert example.target == "D" and example.meta["options"]["D"] == "Aspirin"


@pytest.fixture(scope="module")
def vqa_rad_table(shared_data):
    rows = json.loads((shared_data / "vqa_rad/VQA_RAD Dataset Public.json").read_text(encoding="utf-8"))
    return {
        (r["image_name"], r["question"].strip()): (str(r["answer"]).strip(), r["phrase_type"]) for r in rows
    }


def test_vqa_rad_official_split(shared_data, tmp_path, vqa_rad_table):
    def oracle(conv):
        (image,) = conversation_images(conv)
        answer, phrase = vqa_rad_table[(Path(image).name, conversation_text(conv).split("question: ", 1)[1])]
        assert phrase in ("test_freeform", "test_para")
        return f"Final Answer: {answer}"

    task = get_task("vqa-rad", shared_data, split="official")
    assert len(task.load_examples()) == 451
    res = run_task(
        task, ScriptedModel(oracle, "oracle"), out_dir=tmp_path, limit=20, n_boot=N_BOOT, progress=False
    )
    check_files(res, 20)
    assert res["task"] == "vqa-rad@split=official"
    assert res["metrics"]["token_f1"]["value"] == 1.0 and res["metrics"]["closed_accuracy"]["value"] == 1.0


def test_vqa_rad_balanced_split_parts(shared_data):
    table = list(csv.DictReader(open(shared_data / "vqa_rad/vqa_rad_balanced_split.tsv"), delimiter="\t"))
    for part in ("train", "validation", "test"):
        ids = {e.id for e in get_task("vqa-rad", shared_data, part=part).load_examples()}
        assert ids == {r["QID_unique"] for r in table if r["SPLIT_BALANCED"] == part}


def test_pneumoniamnist_few(shared_data, tmp_path):
    res = run_task(
        get_task("pneumoniamnist", shared_data),
        always("Final Answer: Yes"),
        out_dir=tmp_path,
        limit=10,
        n_boot=N_BOOT,
        progress=False,
    )
    check_files(res, 10)
    assert res["metrics"]["accuracy"]["value"] == res["counts"]["positives"] / 10


def _nih_labels(shared_data):
    with gzip.open(shared_data / "cxr_samples/Data_Entry_2017_v2020.csv.gz", "rt") as fh:
        return {r["Image Index"]: set(r["Finding Labels"].split("|")) for r in csv.DictReader(fh)}


def _condition(conv):
    return conversation_text(conv).split("Is there ", 1)[1].split(" in this image?", 1)[0]


def test_cxr14_nih_real_images(shared_data, tmp_path):
    labels = _nih_labels(shared_data)
    column = {"pleural effusion": "Effusion"}

    def oracle(conv):
        (image,) = conversation_images(conv)
        cond = _condition(conv)
        present = column.get(cond, cond.capitalize()) in labels[Path(image).name]
        return "The image shows...\nFinal Answer: " + ("Yes" if present else "No")

    task = get_task("cxr14-nih", shared_data, images="available")
    res = run_task(task, ScriptedModel(oracle, "oracle"), out_dir=tmp_path, n_boot=N_BOOT, progress=False)
    check_files(res, 12)
    assert res["data_info"]["images"] == 2 and res["data_info"]["images_left_out_missing"] == len(labels) - 2
    by_cond = res["breakdown"]["by_condition"]
    assert by_cond["cardiomegaly"]["positives"] == 1 and by_cond["cardiomegaly"]["f1"] == 1.0
    assert by_cond["edema"]["f1"] is None  # no positive reference, no "yes": undefined, left out
    assert res["metrics"]["macro_f1"]["value"] == 1.0 and res["metrics"]["accuracy"]["value"] == 1.0


def test_cxr14_google_labels(shared_data, tmp_path):
    folder, names = fx.write_google_cxr14(
        tmp_path,
        shared_data / "cxr_samples",
        shared_data / "cxr_samples/google2019_nih-chest-xray-labels.csv.gz",
    )
    with gzip.open(folder / "google2019_nih-chest-xray-labels.csv.gz", "rt") as fh:
        truth = {r["Image Index"]: r for r in csv.DictReader(fh)}
    column = {"lung opacity": "Airspace opacity", "pneumothorax": "Pneumothorax", "fracture": "Fracture"}
    model = ScriptedModel(
        lambda c: (
            "Final Answer: "
            + ("yes" if truth[Path(conversation_images(c)[0]).name][column[_condition(c)]] == "YES" else "no")
        ),
        "oracle",
    )
    res = run_task(
        get_task("cxr14", folder, images="available"),
        model,
        out_dir=tmp_path / "out",
        n_boot=N_BOOT,
        progress=False,
    )
    check_files(res, 6)
    scored_ids = [json.loads(line)["id"] for line in open(res["files"]["scored"])]
    assert sorted({i.split("::")[0] for i in scored_ids}) == sorted(names)
    assert res["metrics"]["accuracy"]["value"] == 1.0
    assert set(res["breakdown"]["by_condition"]) == {"lung opacity", "pneumothorax", "fracture"}
    assert res["published"]["macro_f1"]["MedGemma 4B"] == 50.1


def test_chexpert_label_policy(shared_data, tmp_path):
    root = tmp_path / "data"
    fx.write_chexpert(root, shared_data / "cxr_samples")
    res = run_task(
        get_task("chexpert", root),
        always("Final Answer: Yes"),
        out_dir=tmp_path,
        n_boot=N_BOOT,
        progress=False,
    )
    check_files(res, 13)  # 3 frontal images x 5 conditions - 2 uncertain (excluded); blanks are negatives
    info = res["data_info"]
    assert info["images"] == 3 and info["questions_excluded_by_label_policy"] == {
        "pleural effusion": 1,
        "edema": 1,
    }
    by = res["breakdown"]["by_condition"]
    # blank -> negative: consolidation has p1 blank (neg), p2 0, p3 0 -> no positive
    assert by["consolidation"]["positives"] == 0 and by["consolidation"]["negatives"] == 3
    assert by["cardiomegaly"]["positives"] == 2 and by["atelectasis"]["positives"] == 1
    # always yes: F1 per condition = 2P/(P + N_total): cardio 2*2/(2+3)=0.8, atelectasis 2/(1+3)=0.5,
    # consolidation 0, edema 0 (2 asked, 0 pos), effusion 2*1/(1+2)=2/3
    assert res["metrics"]["macro_f1"]["value"] == pytest.approx((0.8 + 0.5 + 0 + 0 + 2 / 3) / 5)

    res = run_task(
        get_task("chexpert", root, uncertain="positive", missing="exclude"),
        always("Final Answer: No"),
        out_dir=tmp_path,
        n_boot=N_BOOT,
        progress=False,
    )
    assert res["counts"]["n"] == 13 and res["data_info"]["questions_excluded_by_label_policy"] == {
        "consolidation": 1,
        "atelectasis": 1,
    }


def test_mimic_cxr_splits_views_and_labels(shared_data, tmp_path):
    fx.write_mimic(tmp_path / "data", shared_data / "cxr_samples")
    task = get_task("mimic-cxr", tmp_path / "data")
    examples = task.load_examples()
    assert {e.meta["group"] for e in examples} == {"d1-frontal", "d2-frontal"}  # lateral and train left out
    targets = {e.id: e.target for e in examples}
    assert (
        targets["d1-frontal::cardiomegaly"] == 1 and "d1-frontal::edema" not in targets
    )  # uncertain excluded
    assert targets["d1-frontal::pleural effusion"] == 0 and targets["d2-frontal::atelectasis"] == 1
    res = run_task(
        task,
        ScriptedModel(
            lambda c: (
                "Final Answer: "
                + ("yes" if targets[f"{Path(conversation_images(c)[0]).stem}::{_condition(c)}"] else "no")
            ),
            "oracle",
        ),
        out_dir=tmp_path,
        n_boot=N_BOOT,
        progress=False,
    )
    check_files(res, 9)
    assert res["metrics"]["macro_f1"]["value"] == 1.0
    assert "Med-Gemini" in Path(res["files"]["summary"]).read_text()


def test_slake_official_format(shared_data, tmp_path):
    images = fx.write_slake(tmp_path / "data", shared_data / "cxr_samples")
    answers = {(r["img_name"], r["question"]): r["answer"] for r in fx.SLAKE_RECORDS}

    def oracle(conv):
        (image,) = conversation_images(conv)
        rel = Path(image).relative_to(images).as_posix()
        return answers[(rel, conversation_text(conv).split("question: ", 1)[1])]

    task = get_task("slake", tmp_path / "data", image_dir=str(images))
    res = run_task(task, ScriptedModel(oracle, "oracle"), out_dir=tmp_path, n_boot=N_BOOT, progress=False)
    check_files(res, 4)  # the Chinese question is left out
    assert res["counts"]["closed"] == 3 and res["metrics"]["token_f1"]["value"] == 1.0
    assert res["published"]["token_f1"]["MedGemma 4B"] == 72.3


@pytest.mark.parametrize(
    "writer, name",
    [
        (fx.write_iu_csv, "iu-xray-report"),
        (fx.write_iu_xml, "iu-xray-report"),
        (fx.write_mimic, "mimic-cxr-report"),
    ],
)
def test_report_generation(shared_data, tmp_path, writer, name):
    folder = writer(tmp_path / "data", shared_data / "cxr_samples")
    task = get_task(name, folder)
    examples = task.load_examples()
    references = {Path(conversation_images(e.messages)[0]).name: e.target for e in examples}
    if name == "mimic-cxr-report":
        assert references == {
            "d1-frontal.jpg": "The heart is enlarged. There is no pneumothorax.\n"
            "Cardiomegaly without pneumothorax.",
            "d2-frontal.jpg": "Left basilar atelectasis. No pleural effusion.\nAtelectasis.",
        }
    else:
        assert sorted(references.values()) == sorted(fx.reference_text(f, i) for _, f, i, _ in fx.IU_REPORTS)
    echo = ScriptedModel(lambda c: references[Path(conversation_images(c)[0]).name], "echo")
    res = run_task(task, echo, out_dir=tmp_path, n_boot=N_BOOT, progress=False)
    check_files(res, len(examples))
    assert res["metrics"]["rouge_l"]["value"] == 1.0 and res["metrics"]["finding_f1"]["value"] == 1.0
    assert res["metrics"]["bleu4"]["value"] == pytest.approx(1.0)
    assert "RadGraph F1" in Path(res["files"]["summary"]).read_text() and "NOT computed" in " ".join(
        res["notes"]
    )
    normal = always("No acute cardiopulmonary process. No pleural effusion or pneumothorax.", "normal")
    res = run_task(task, normal, out_dir=tmp_path, n_boot=N_BOOT, progress=False)
    assert res["metrics"]["finding_f1"]["value"] == 0.0 and res["metrics"]["rouge_l"]["value"] < 0.6
