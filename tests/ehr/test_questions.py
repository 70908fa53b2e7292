"""The EHRQA question generator: every category on the shared bundles, each answer re-derived here from the
raw JSON (plain dicts and fullUrls, none of the store's code), deterministic, JSONL round trip."""

from __future__ import annotations

from collections import Counter

import pytest

from openmedgemma.ehr.questions import CATEGORIES, generate_questions, read_questions, write_questions


@pytest.fixture(scope="module")
def questions(store):
    return generate_questions(store, seed=0, per_category=2)


def _text(concept):
    return concept.get("text") or concept["coding"][0].get("display")


def _latest_value(observations):
    row = max(observations, key=lambda r: r["effectiveDateTime"])
    return row["valueQuantity"]["value"], row["valueQuantity"]["unit"]


def derive(q, raw) -> str:
    """The answer to `q` from the raw bundles."""
    pid, p = q.patient_id, q.params
    meds = raw.of(pid, "MedicationRequest")
    if q.category == "condition_existence":
        return "yes" if any(_text(c["code"]) == p["display"] for c in raw.of(pid, "Condition")) else "no"
    if q.category == "medication_ever":
        return "yes" if any(_text(m["medicationCodeableConcept"]) == p["display"] for m in meds) else "no"
    if q.category == "immunization_date":
        dates = [i["occurrenceDateTime"][:10] for i in raw.of(pid, "Immunization") if _text(i["vaccineCode"]) == p["vaccine"]]
        return max(dates)
    if q.category == "current_medication":
        active = {_text(m["medicationCodeableConcept"]) for m in meds if m["status"] == "active"}
        [letter] = [k for k, v in q.options.items() if v in active]
        return letter
    if q.category == "prescriber":
        [who] = {tuple(raw.follow(m["requester"]["reference"])["name"][0]["given"])
                 + (raw.follow(m["requester"]["reference"])["name"][0]["family"],) for m in meds
                 if _text(m["medicationCodeableConcept"]) == p["medication"] and m["authoredOn"][:10] == p["date"]}
        return " ".join(who)
    if q.category == "prescription_date":
        return min(m["authoredOn"][:10] for m in meds if _text(m["medicationCodeableConcept"]) == p["medication"])
    if q.category == "medication_for_condition":
        right = {_text(m["medicationCodeableConcept"]) for m in meds for reason in m.get("reasonReference", [])
                 if _text(raw.follow(reason["reference"])["code"]) == p["condition"]}
        [letter] = [k for k, v in q.options.items() if v in right]
        return letter
    loinc = [o for o in raw.of(pid, "Observation") if o["code"]["coding"][0]["code"] == p["loinc"] and "valueQuantity" in o]
    if q.category == "observation_value":
        value, unit = _latest_value(loinc)
        assert unit == q.unit
        return f"{value:.6g}"
    if q.category == "observation_at_event":
        enc = p["encounter"].split("/")[1]
        [obs] = [o for o in loinc if raw.follow(o["encounter"]["reference"])["id"] == enc]
        assert obs["valueQuantity"]["unit"] == q.unit
        return f"{obs['valueQuantity']['value']:.6g}"
    raise AssertionError(q.category)


def test_every_category_on_the_shared_bundles(questions):
    counts = Counter(q.category for q in questions)
    assert set(counts) == set(CATEGORIES), counts
    assert len({q.id for q in questions}) == len(questions)
    formats = Counter(q.format for q in questions)
    assert set(formats) == {"yes_no", "multiple_choice", "short"}
    yes_no = Counter(q.answer for q in questions if q.format == "yes_no")
    assert abs(yes_no["yes"] - yes_no["no"]) <= 0.2 * sum(yes_no.values())  # balanced


def test_each_answer_re_derived_from_the_raw_json(questions, raw):
    for q in questions:
        expected = derive(q, raw)
        if q.category == "prescriber":
            assert q.answer.endswith(expected), (q.id, q.answer, expected)
        else:
            assert q.answer == expected, (q.id, q.answer, expected)
        for ref in q.evidence:
            rtype, rid = ref.split("/")
            assert (rtype, rid) in raw.resources


def test_multiple_choice_distractors_are_never_the_patients(questions, raw):
    for q in questions:
        if q.format == "multiple_choice":
            assert len(set(q.options.values())) == 4
            ever = {_text(m["medicationCodeableConcept"]) for m in raw.of(q.patient_id, "MedicationRequest")}
            assert sum(v in ever for v in q.options.values()) == 1, q.id


def test_deterministic_and_seeded(store, questions, tmp_path):
    again = generate_questions(store, seed=0, per_category=2)
    assert [q.to_json() for q in again] == [q.to_json() for q in questions]
    other = generate_questions(store, seed=1, per_category=2)
    assert [q.to_json() for q in other] != [q.to_json() for q in questions]
    path = tmp_path / "q.jsonl"
    write_questions(questions, path)
    assert [q.to_json() for q in read_questions(path)] == [q.to_json() for q in questions]


def test_ehrqa_task_writes_and_reuses_a_question_set(shared_data, index_path, tmp_path):
    from openmedgemma.eval import get_task

    path = tmp_path / "set.jsonl"
    first = get_task("ehrqa", shared_data, records=str(index_path), write_questions=str(path)).load_examples()
    again = get_task("ehrqa", shared_data, records=str(index_path), questions=str(path)).load_examples()
    assert [(e.id, e.target, e.messages) for e in again] == [(e.id, e.target, e.messages) for e in first]
    path.write_text('{"id": "x"}\n')
    with pytest.raises(Exception, match="line 1: not an EHRQA question"):
        get_task("ehrqa", shared_data, records=str(index_path), questions=str(path)).load_examples()
