"""Scripted chat models for the EHR tests: they follow the navigator's protocol and answer only from what the
tools returned (the condensed resource lines), so a perfect score shows that the pipeline carries every
needed fact to the answer step. Also an oracle and a random answerer for the record mode."""

from __future__ import annotations

import json
import random
import re

from openmedgemma.eval.tasks.base import prompt_text


def _display(concept: str) -> str:
    """'Display [LOINC 123]' -> 'Display' (the display may itself hold brackets)."""
    return concept.rsplit(" [", 1)[0] if concept.endswith("]") else concept


def _question(prompt: str) -> str:
    return re.search(r"^Question: (.*(?:\n[A-D]\. .*)*)", prompt, re.M).group(1)


class ScriptedNavigatorModel:
    """Follows the JSON protocol (with a thinking block and code fences, or a Python-style call, to exercise
    the parser) and computes the answer from the facts in the summaries."""

    name = "scripted-navigator"

    def __init__(self):
        self.calls = 0

    def generate(self, batch, *, max_new_tokens, seed):
        self.calls += len(batch)
        return [self.reply(prompt_text(messages)) for messages in batch]

    def reply(self, prompt: str) -> str:
        if "Which resource types hold" in prompt:
            types = re.findall(r"^([A-Z][A-Za-z]+) \(\d+", prompt, re.M)
            return "<unused94>thought\nall of them<unused95>```json\n" + json.dumps(types) + "\n```"
        if "with the tool get_patient_fhir_resource" in prompt:
            return self.tool_call(prompt)
        if "You are not authorised to answer" in prompt:  # summarise / merge: pass the facts through
            lines = [ln for ln in prompt.splitlines() if ln.startswith('{"ref"')]
            return "\n".join(lines) or "nothing relevant"
        if "Facts from the record" in prompt:
            return self.answer(prompt)
        raise AssertionError("unexpected prompt: " + prompt[:200])

    def tool_call(self, prompt: str) -> str:
        rtype = re.search(r"The record holds these (\w+) codes", prompt).group(1)
        pid = re.search(r"record of patient (\S+)\.", prompt).group(1)
        q = _question(prompt)
        needed = {
            "Condition": "diagnosed with" in q,
            "Immunization": "vaccine" in q,
            "MedicationRequest": "prescribed" in q,
            "Observation": "value" in q or "recorded at the encounter" in q,
        }
        if not needed.get(rtype):
            return "{}"
        if rtype == "Observation":  # codes whose display the question names (a Python-style call)
            codes = [m.group(1) for m in re.finditer(r"^(\S+) (.+?) \[LOINC\] x", prompt, re.M) if f" {m.group(2)} " in q]
            return f'[get_patient_fhir_resource(patient_id="{pid}", fhir_resource="Observation", filter_code="{",".join(codes)}")]'
        call = {"name": "get_patient_fhir_resource", "arguments": {"patient_id": pid, "fhir_resource": rtype}}
        return "Sure.\n" + json.dumps(call)

    def answer(self, prompt: str) -> str:
        q = _question(prompt)
        facts = [json.loads(ln) for ln in prompt.splitlines() if ln.startswith('{"ref"')]
        options = dict(re.findall(r"^([A-D])\. (.*)$", q, re.M))
        of = lambda rtype: [f for f in facts if f["ref"].startswith(rtype + "/")]  # noqa: E731
        meds = of("MedicationRequest")
        med = lambda f: _display(f["medicationCodeableConcept"])  # noqa: E731
        if m := re.match(r"Has the patient ever been diagnosed with (.*)\?", q):
            hits = [f for f in of("Condition") if _display(f["code"]) == m.group(1)]
            return self.final("yes" if hits else "no", hits)
        if m := re.match(r"Has the patient ever been prescribed (.*)\?", q):
            hits = [f for f in meds if med(f) == m.group(1)]
            return self.final("yes" if hits else "no", hits)
        if m := re.match(r"On what date did the patient last receive the vaccine (.*)\?", q):
            hit = max((f for f in of("Immunization") if _display(f["vaccineCode"]) == m.group(1)),
                      key=lambda f: f["occurrenceDateTime"])
            return self.final(hit["occurrenceDateTime"][:10], [hit])
        if q.startswith("Which of these medications is the patient currently prescribed"):
            hits = [f for f in meds if f["status"] == "active" and med(f) in options.values()]
            return self.final(next(k for k, v in options.items() if v == med(hits[0])), hits[:1])
        if m := re.match(r"Who prescribed (.*) to the patient on (\S+)\?", q):
            hit = next(f for f in meds if med(f) == m.group(1) and f["authoredOn"][:10] == m.group(2))
            return self.final(re.search(r"\((.*)\)$", hit["requester"]).group(1), [hit])
        if m := re.match(r"On what date was (.*) first prescribed to the patient\?", q):
            hit = min((f for f in meds if med(f) == m.group(1)), key=lambda f: f["authoredOn"])
            return self.final(hit["authoredOn"][:10], [hit])
        if m := re.match(r"Which medication was prescribed to the patient for (.*)\?", q):
            hits = [f for f in meds if any(r.endswith(f"({m.group(1)})") for r in f.get("reasonReference", []))
                    and med(f) in options.values()]  # fmt: skip
            return self.final(next(k for k, v in options.items() if v == med(hits[0])), hits[:1])
        if m := re.match(r"What is the patient's most recent (.*) value\?", q):
            hit = max((f for f in of("Observation") if _display(f["code"]) == m.group(1)),
                      key=lambda f: f["effectiveDateTime"])
            return self.final(hit["valueQuantity"], [hit])
        if m := re.match(r"What was the patient's (.*) recorded at the encounter on (\S+) \((.*)\)\?", q):
            hit = next(f for f in of("Observation") if _display(f["code"]) == m.group(1)
                       and f["encounter"].endswith(f"({m.group(3)}, {m.group(2)})"))
            return self.final(hit["valueQuantity"], [hit])
        raise AssertionError("unexpected question: " + q)

    @staticmethod
    def final(answer: str, facts: list[dict]) -> str:
        cited = " ".join(f"[{f['ref']}]" for f in facts)
        return f"From the record {cited}.\nFinal Answer: {answer}"


class OracleModel:
    """Answers each prompt with its gold answer (looked up by prompt)."""

    name = "oracle"

    def __init__(self, examples):
        self.gold = {prompt_text(ex.messages): ex.target for ex in examples}

    def generate(self, batch, *, max_new_tokens, seed):
        return [f"Final Answer: {self.gold[prompt_text(m)]}" for m in batch]


class RandomModel:
    """A random answer of the asked kind: yes/no, a letter, a date, a number, a name."""

    name = "random"

    def __init__(self, seed=0):
        self.rng = random.Random(seed)

    def generate(self, batch, *, max_new_tokens, seed):
        out = []
        for messages in batch:
            text = prompt_text(messages)
            if '"Final Answer: yes"' in text:
                out.append("Final Answer: " + self.rng.choice(["yes", "no"]))
            elif "letter of your choice" in text:
                out.append("Final Answer: " + self.rng.choice("ABCD"))
            elif "the date as" in text:
                out.append(f"Final Answer: {self.rng.randint(1990, 2020)}-{self.rng.randint(1, 12):02d}-{self.rng.randint(1, 28):02d}")
            elif "value and its unit" in text:
                out.append(f"Final Answer: {self.rng.uniform(0, 200):.1f}")
            else:
                out.append("Final Answer: Dr. Random Person")
        return out
