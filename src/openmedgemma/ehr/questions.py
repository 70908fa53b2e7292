"""EHRQA-style questions generated from the records, with ground truth computed from the FHIR data.

Deterministic: the same records, seed and `per_category` give the same questions (each category of each
patient draws from its own `random.Random(f"{seed}:{patient}:{category}")`). Categories follow the MedGemma
report's EHRQA (the class-level / transitive condition questions need the SNOMED hierarchy, which is not
available offline, and are not generated):

| category | format | answer |
|---|---|---|
| condition_existence | yes/no | does a Condition with that display exist (negatives: other patients' conditions) |
| immunization_date | short (date) | the latest occurrence date of that vaccine |
| current_medication | multiple choice | an active MedicationRequest's medication (distractors never prescribed to the patient) |
| medication_ever | yes/no | was that medication ever requested |
| prescriber | short (name) | the requester of the medication on that date |
| prescription_date | short (date) | the first authoredOn of that medication |
| medication_for_condition | multiple choice | the medication whose reasonReference is that condition |
| observation_value | short (number, unit) | the latest value of that LOINC code |
| observation_at_event | short (number, unit) | the value of that LOINC code recorded at that encounter |

Each question carries `params` (codes, dates, references) and `evidence` (the `Type/id` that prove the
answer), so a reviewer, or a test, can re-derive the answer from the raw JSON.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from openmedgemma.ehr.fhir import concept_text, date_of, human_name, label_of
from openmedgemma.ehr.store import RecordStore
from openmedgemma.errors import DataError

CATEGORIES = (
    "condition_existence", "immunization_date", "current_medication", "medication_ever", "prescriber",
    "prescription_date", "medication_for_condition", "observation_value", "observation_at_event",
)  # fmt: skip
LETTERS = "ABCD"


@dataclass
class Question:
    id: str
    patient_id: str
    category: str
    format: str  # "yes_no", "multiple_choice", "short"
    answer_type: str  # "yes_no", "choice", "date", "name", "number"
    question: str
    answer: str  # yes/no, a letter, YYYY-MM-DD, a name, or a number
    options: dict[str, str] = field(default_factory=dict)
    unit: str = ""
    params: dict = field(default_factory=dict)
    evidence: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)


def _ref(resource: dict) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def _value(obs: dict) -> tuple[float, str] | None:
    q = obs.get("valueQuantity")
    if isinstance(q, dict) and isinstance(q.get("value"), (int, float)):
        return float(q["value"]), q.get("unit") or q.get("code") or ""
    return None


def _med(req: dict) -> str:
    return concept_text(req.get("medicationCodeableConcept")) or label_of(req)


def _requests(store: RecordStore, pid: str) -> list[dict]:
    """The patient's MedicationRequests, a `medicationReference` copied in as its Medication's code."""
    out = []
    for req in store.search(pid, "MedicationRequest"):
        ref = (req.get("medicationReference") or {}).get("reference")
        medication = store.read(ref) if ref and not req.get("medicationCodeableConcept") else None
        if medication and medication.get("code"):
            req = {**req, "medicationCodeableConcept": medication["code"]}
        out.append(req)
    return out


class _Pools:
    """What distractors are drawn from: every condition and medication display in the store."""

    def __init__(self, store: RecordStore, patients: list[str]):
        self.conditions: set[str] = set()
        self.medications: set[str] = set()
        for pid in patients:
            self.conditions |= {label_of(r) for r in store.search(pid, "Condition") if label_of(r)}
            self.medications |= {_med(r) for r in _requests(store, pid) if _med(r)}


def generate_questions(store: RecordStore, *, seed: int = 0, per_category: int = 2,
                       patients: list[str] | None = None) -> list[Question]:  # fmt: skip
    """Up to `per_category` questions per category per patient (fewer when the record lacks the data)."""
    if per_category < 1:
        raise DataError(f"per_category must be >= 1, got {per_category}")
    ids = patients or [p["id"] for p in store.patients()]
    if not ids:
        raise DataError(f"{store.source}: no patients in the records")
    pools = _Pools(store, [p["id"] for p in store.patients()])
    out: list[Question] = []
    for pid in ids:
        record = {t: store.search(pid, t) for t in ("Condition", "Immunization", "Observation", "Encounter")}
        record["MedicationRequest"] = _requests(store, pid)
        for category in CATEGORIES:
            rng = random.Random(f"{seed}:{pid}:{category}")
            made = GENERATORS[category](store, pid, record, pools, rng, per_category)
            for n, q in enumerate(made):
                q.id = f"{pid}:{category}:{n}"
                out.append(q)
    return out


def _choose(rng: random.Random, items: list, k: int) -> list:
    items = sorted(items, key=str)
    return rng.sample(items, min(k, len(items)))


def _yes_no(rng, pid, category, positives: list[tuple[str, list[str]]], negatives: list[str], template, k):
    """Half positives (with evidence), half negatives, alternating; deterministic."""
    pos, neg = _choose(rng, positives, k), _choose(rng, negatives, k)
    out = []
    for i in range(k):
        pick = (pos if i % 2 == 0 else neg) or (neg if i % 2 == 0 else pos)
        if not pick:
            break
        item = pick.pop(0)
        name, evidence = (item if isinstance(item, tuple) else (item, []))
        out.append(Question("", pid, category, "yes_no", "yes_no", template.format(name=name),
                            "yes" if evidence else "no", params={"display": name}, evidence=evidence))  # fmt: skip
    return out


def _condition_existence(store, pid, record, pools, rng, k):
    mine: dict[str, list[str]] = defaultdict(list)
    for r in record["Condition"]:
        mine[label_of(r)].append(_ref(r))
    negatives = sorted(pools.conditions - set(mine))
    return _yes_no(rng, pid, "condition_existence", list(mine.items()), negatives,
                   "Has the patient ever been diagnosed with {name}?", k)  # fmt: skip


def _medication_ever(store, pid, record, pools, rng, k):
    mine: dict[str, list[str]] = defaultdict(list)
    for r in record["MedicationRequest"]:
        mine[_med(r)].append(_ref(r))
    negatives = sorted(pools.medications - set(mine))
    return _yes_no(rng, pid, "medication_ever", list(mine.items()), negatives,
                   "Has the patient ever been prescribed {name}?", k)  # fmt: skip


def _immunization_date(store, pid, record, pools, rng, k):
    by_vaccine: dict[str, list[dict]] = defaultdict(list)
    for r in record["Immunization"]:
        if date_of(r):
            by_vaccine[label_of(r)].append(r)
    out = []
    for vaccine in _choose(rng, list(by_vaccine), k):
        latest = max(by_vaccine[vaccine], key=lambda r: date_of(r))
        out.append(Question("", pid, "immunization_date", "short", "date",
                            f"On what date did the patient last receive the vaccine {vaccine}?",
                            date_of(latest)[:10], params={"vaccine": vaccine}, evidence=[_ref(latest)]))  # fmt: skip
    return out


def _multiple_choice(rng, pid, category, question, correct, distractors, params, evidence):
    if len(distractors) < 3:
        return None
    options = [correct, *_choose(rng, distractors, 3)]
    rng.shuffle(options)
    letters = dict(zip(LETTERS, options))
    answer = next(letter for letter, text in letters.items() if text == correct)
    return Question("", pid, category, "multiple_choice", "choice", question, answer, options=letters,
                    params=params, evidence=evidence)  # fmt: skip


def _current_medication(store, pid, record, pools, rng, k):
    ever = {_med(r) for r in record["MedicationRequest"]}
    active: dict[str, list[str]] = defaultdict(list)
    for r in record["MedicationRequest"]:
        if r.get("status") == "active":
            active[_med(r)].append(_ref(r))
    out = []
    for med in _choose(rng, list(active), k):
        q = _multiple_choice(rng, pid, "current_medication",
                             "Which of these medications is the patient currently prescribed (an active prescription)?",
                             med, sorted(pools.medications - ever), {"medication": med}, active[med])  # fmt: skip
        out.extend([q] if q else [])
    return out


def _prescriber(store, pid, record, pools, rng, k):
    by_key: dict[tuple[str, str], set[str]] = defaultdict(set)
    refs: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in record["MedicationRequest"]:
        requester = (r.get("requester") or {}).get("reference", "")
        who = store.read(requester) if requester.startswith("Practitioner/") else None
        if who is not None and r.get("authoredOn"):
            key = (_med(r), r["authoredOn"][:10])
            by_key[key].add(human_name(who))
            refs[key] += [_ref(r), requester]
    unique = [key for key, names in by_key.items() if len(names) == 1]  # one prescriber that day: unambiguous
    out = []
    for med, day in _choose(rng, unique, k):
        [name] = by_key[(med, day)]
        out.append(Question("", pid, "prescriber", "short", "name",
                            f"Who prescribed {med} to the patient on {day}?", name,
                            params={"medication": med, "date": day}, evidence=refs[(med, day)]))  # fmt: skip
    return out


def _prescription_date(store, pid, record, pools, rng, k):
    first: dict[str, dict] = {}
    for r in record["MedicationRequest"]:
        if r.get("authoredOn") and (_med(r) not in first or r["authoredOn"] < first[_med(r)]["authoredOn"]):
            first[_med(r)] = r
    out = []
    for med in _choose(rng, list(first), k):
        r = first[med]
        out.append(Question("", pid, "prescription_date", "short", "date",
                            f"On what date was {med} first prescribed to the patient?", r["authoredOn"][:10],
                            params={"medication": med}, evidence=[_ref(r)]))  # fmt: skip
    return out


def _medication_for_condition(store, pid, record, pools, rng, k):
    for_condition: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in record["MedicationRequest"]:
        for reason in r.get("reasonReference") or []:
            cond = store.read(reason.get("reference", ""))
            if cond is not None and cond.get("resourceType") == "Condition":
                for_condition[label_of(cond)][_med(r)] += [_ref(r), _ref(cond)]
    out = []
    for condition in _choose(rng, list(for_condition), k):
        meds = for_condition[condition]
        correct = _choose(rng, list(meds), 1)[0]
        ever = {_med(r) for r in record["MedicationRequest"]}
        q = _multiple_choice(rng, pid, "medication_for_condition",
                             f"Which medication was prescribed to the patient for {condition}?", correct,
                             sorted(pools.medications - ever), {"condition": condition, "medication": correct},
                             meds[correct])  # fmt: skip
        out.extend([q] if q else [])
    return out


def _loinc(obs: dict) -> tuple[str, str] | None:
    for coding in (obs.get("code") or {}).get("coding") or []:
        if coding.get("system") == "http://loinc.org" and coding.get("code"):
            return coding["code"], coding.get("display") or concept_text(obs.get("code"))
    return None


def _observation_value(store, pid, record, pools, rng, k):
    by_code: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in record["Observation"]:
        if _loinc(r) and _value(r) and date_of(r):
            by_code[_loinc(r)].append(r)
    out = []
    for code, display in _choose(rng, list(by_code), k):
        rows = sorted(by_code[(code, display)], key=lambda r: (date_of(r), r["id"]))
        latest_date = date_of(rows[-1])
        if sum(date_of(r) == latest_date for r in rows) > 1:  # two values at the same instant: ambiguous
            continue
        value, unit = _value(rows[-1])
        out.append(Question("", pid, "observation_value", "short", "number",
                            f"What is the patient's most recent {display} value?", f"{value:.6g}", unit=unit,
                            params={"loinc": code, "date": latest_date[:10]}, evidence=[_ref(rows[-1])]))  # fmt: skip
    return out


def _observation_at_event(store, pid, record, pools, rng, k):
    encounters = {_ref(e): e for e in record["Encounter"]}
    by_pair: dict[tuple, list[dict]] = defaultdict(list)
    for r in record["Observation"]:
        enc = (r.get("encounter") or {}).get("reference", "")
        if _loinc(r) and _value(r) and enc in encounters:
            by_pair[(enc, *_loinc(r))].append(r)
    unique = [key for key, rows in by_pair.items() if len(rows) == 1]
    out = []
    for enc, code, display in _choose(rng, unique, k):
        [obs] = by_pair[(enc, code, display)]
        value, unit = _value(obs)
        encounter = encounters[enc]
        day, kind = (date_of(encounter) or "")[:10], label_of(encounter) or "encounter"
        out.append(Question("", pid, "observation_at_event", "short", "number",
                            f"What was the patient's {display} recorded at the encounter on {day} ({kind})?",
                            f"{value:.6g}", unit=unit, params={"loinc": code, "encounter": enc},
                            evidence=[_ref(obs), enc]))  # fmt: skip
    return out


GENERATORS = {
    "condition_existence": _condition_existence, "immunization_date": _immunization_date,
    "current_medication": _current_medication, "medication_ever": _medication_ever, "prescriber": _prescriber,
    "prescription_date": _prescription_date, "medication_for_condition": _medication_for_condition,
    "observation_value": _observation_value, "observation_at_event": _observation_at_event,
}  # fmt: skip


def write_questions(questions: list[Question], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for q in questions:
            fh.write(q.to_json() + "\n")


def read_questions(path: str | Path) -> list[Question]:
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"{path}: cannot read the question file ({err.strerror or err})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(Question(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as err:
            raise DataError(f"{path} line {number}: not an EHRQA question ({err})") from None
    return out
