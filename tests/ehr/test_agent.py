"""The navigator and the ehrqa task with scripted models: protocol-following scripted agent 100%, oracle 100%
in record mode, a random answerer near chance; parsing, retries, context parts, native tools."""

from __future__ import annotations

import json

import pytest

from openmedgemma.ehr.agent import Navigator
from openmedgemma.ehr.questions import CATEGORIES
from openmedgemma.ehr.parsing import ReplyError, citations, parse_tool_call, parse_type_list
from openmedgemma.errors import ConfigError, RecordError
from openmedgemma.eval import get_task, run_task

from .scripted import OracleModel, RandomModel, ScriptedNavigatorModel


@pytest.fixture(scope="module")
def agent_task(shared_data, index_path):
    return get_task("ehrqa", shared_data, context="agent", per_category="1", records=str(index_path))


def test_scripted_agent_scores_100_percent(agent_task, tmp_path):
    model = ScriptedNavigatorModel()
    result = run_task(agent_task, model, out_dir=tmp_path, n_boot=50, progress=False)
    assert result["counts"]["n"] > 150
    assert result["metrics"]["accuracy"]["value"] == 1.0, result["breakdown"]["by_category"]
    assert set(result["breakdown"]["by_category"]) == set(CATEGORIES)
    rows = [json.loads(line) for line in open(result["files"]["predictions"]).readlines()[1:]]
    assert not any(row["unverified_citations"] for row in rows)
    uncited = [row["id"] for row in rows if not row["citations"]]
    assert all(row["output"].endswith("Final Answer: no") for row in rows if row["id"] in uncited)  # nothing to cite
    steps = {e["step"] for row in rows for e in row["trace"]}
    assert {"tool", "select_types", "tool_call", "summarize", "answer"} <= steps
    tools_used = {e["name"] for row in rows for e in row["trace"] if e["step"] == "tool"}
    assert tools_used == {"get_patient_manifest", "get_patient_fhir_resource", "get_patient_demographics"}
    assert not any("error" in e for row in rows for e in row["trace"])
    assert result["published"]["accuracy"]["MedGemma 27B"] == 86.3
    assert "majority per category" in result["baselines"]


def test_record_mode_oracle_100_and_random_near_chance(shared_data, index_path, tmp_path):
    task = get_task("ehrqa", shared_data, context="record", records=str(index_path))
    examples = task.load_examples()
    assert "Observation:" in examples[0].messages[0]["content"]  # the condensed record is in the prompt
    oracle = run_task(task, OracleModel(examples), out_dir=tmp_path, n_boot=50, progress=False)
    assert oracle["metrics"]["accuracy"]["value"] == 1.0
    rnd = run_task(task, RandomModel(), out_dir=tmp_path, n_boot=200, progress=False)
    by_format = {k: v["value"] for k, v in rnd["breakdown"]["by_format"].items()}
    assert abs(by_format["yes_no"] - 0.5) < 0.15 and abs(by_format["multiple_choice"] - 0.25) < 0.2
    assert by_format["short"] < 0.05
    chance = (2 * 0.5 + 2 * 0.25) / 9  # 2 yes/no and 2 multiple-choice categories of 9
    assert abs(rnd["metrics"]["accuracy"]["value"] - chance) < 0.08
    majority = rnd["baselines"]["majority per category"]["accuracy"]["value"]
    assert 0.1 < majority < 0.5


def test_small_context_summarises_in_parts(store):
    pid = store.patients()[0]["id"]
    obs = [o for o in store.search(pid, "Observation") if "valueQuantity" in o]
    question = f"What is the patient's most recent {obs[-1]['code']['coding'][0]['display']} value?"
    model = ScriptedNavigatorModel()
    full = Navigator(model, store, context_tokens=100_000).ask(pid, question, answer_format="\nFinal Answer")
    small = Navigator(model, store, context_tokens=700, max_new_tokens=64).ask(pid, question, answer_format="\nFinal Answer")
    parts = [e for e in small.trace if e["step"] == "summarize"]
    assert len(parts) > 1 and "(part 1 of" in json.dumps(small.trace) or len(parts) > len(small.summaries)
    assert any(e["step"] == "merge" for e in small.trace)
    assert all(e["prompt_tokens"] <= 700 - 64 for e in parts)
    assert small.answer == full.answer  # the same facts reach the answer, in parts
    notes = " ".join(e.get("note", "") for e in small.trace)  # what did not fit is said, never cut silently
    assert "manifest's codes do not fit" in notes and "codes left out of the prompt" in notes
    assert full.citations and set(full.citations) <= set(full.evidence)


class FlakyModel(ScriptedNavigatorModel):
    """Answers the first structured prompt with prose, then follows the protocol (or never does)."""

    def __init__(self, always=False):
        super().__init__()
        self.always, self.failed = always, set()

    def reply(self, prompt):
        structured = "Which resource types hold" in prompt or "with the tool get_patient_fhir_resource" in prompt
        key = prompt.split("\n\nYour previous reply")[0]
        if structured and (self.always or key not in self.failed):
            self.failed.add(key)
            return "I think the record is interesting."
        return super().reply(prompt)


def test_unparseable_step_is_retried_once_then_reported(store):
    pid = store.patients()[1]["id"]
    result = Navigator(FlakyModel(), store).ask(pid, "Has the patient ever been diagnosed with Asthma?")
    retried = [e for e in result.trace if e.get("retry")]
    assert retried and not any("error" in e for e in retried)  # the second try parsed
    result = Navigator(FlakyModel(always=True), store).ask(pid, "Has the patient ever been diagnosed with Asthma?")
    failed = [e for e in result.trace if "failed twice" in e.get("error", "")]
    assert {e["step"] for e in failed} == {"select_types", "tool_call"}
    assert set(result.summaries) == set(store.types(pid))  # the default: every type, unfiltered


class ToolsModel(ScriptedNavigatorModel):
    """Has `complete` like the endpoint adapter: answers the retrieval step with a native tool call."""

    def __init__(self, refuse=False, flaky=False):
        super().__init__()
        self.refuse, self.flaky, self.native = refuse, flaky, 0

    def complete(self, messages, *, tools=None, tool_choice=None, max_tokens=256, temperature=0.0, seed=None):
        if self.refuse:
            raise RuntimeError("tools are not supported")
        assert tools[0]["function"]["name"] == "get_patient_fhir_resource"
        self.native += 1
        if self.flaky and "Your previous reply" not in messages[0]["content"]:
            return {"role": "assistant", "content": "Let me think about which codes matter."}
        text = self.tool_call(messages[0]["content"])
        if text == "{}":
            return {"role": "assistant", "content": "{}"}
        args = parse_tool_call(text, "get_patient_fhir_resource")
        call = {"id": "c1", "type": "function", "function": {"name": "get_patient_fhir_resource", "arguments": json.dumps(args)}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}


def test_native_tools_and_fallback_to_json(store):
    pid = store.patients()[2]["id"]
    question = "Has the patient ever been diagnosed with Asthma?"
    model = ToolsModel()
    result = Navigator(model, store).ask(pid, question)
    assert model.native > 0 and list(result.summaries) == ["Condition"]
    assert any(e.get("native") for e in result.trace)
    result = Navigator(ToolsModel(flaky=True), store).ask(pid, question)
    assert list(result.summaries) == ["Condition"]
    assert [e.get("retry", False) for e in result.trace if e.get("native")][-2:] == [False, True]
    result = Navigator(ToolsModel(refuse=True), store).ask(pid, question)
    assert any("did not accept tools" in e.get("note", "") for e in result.trace)
    assert list(result.summaries) == ["Condition"]


def test_reply_parsing():
    types = ["Condition", "Observation"]
    assert parse_type_list('<unused94>thought\n["x"]<unused95>```json\n["Condition"]\n```', types) == ["Condition"]
    assert parse_type_list('Relevant: {"types": ["Observation", "Condition"]}', types) == ["Observation", "Condition"]
    with pytest.raises(ReplyError, match="not resource types"):
        parse_type_list('["Claim"]', types)
    with pytest.raises(ReplyError, match="no JSON"):
        parse_type_list("Condition", types)
    name = "get_patient_fhir_resource"
    assert parse_tool_call('{"name": "%s", "arguments": {"fhir_resource": "Condition"}}' % name, name) == {"fhir_resource": "Condition"}
    assert parse_tool_call('[get_patient_fhir_resource(fhir_resource="Observation", filter_code="1,2")]', name) == {
        "fhir_resource": "Observation", "filter_code": "1,2"}
    assert parse_tool_call("```\n{}\n```", name) is None
    with pytest.raises(ReplyError):
        parse_tool_call('{"name": "other", "arguments": {}}', name)
    assert citations("see [Condition/abc-1] and Observation/x.2, [Condition/abc-1]") == ["Condition/abc-1", "Observation/x.2"]


def test_bad_arguments(store):
    with pytest.raises(RecordError, match="no patient"):
        Navigator(ScriptedNavigatorModel(), store).ask("nobody", "anything?")
    with pytest.raises(ConfigError, match="unknown resource types"):
        Navigator(ScriptedNavigatorModel(), store).ask(store.patients()[0]["id"], "x", types=["Claim"])
    with pytest.raises(ConfigError, match="not a chat model"):
        Navigator(object(), store)
    with pytest.raises(ConfigError, match="context must be record or agent"):
        get_task("ehrqa", "/nonexistent", context="both")


def test_tool_argument_errors_are_results_not_exceptions(store):
    from openmedgemma.ehr.tools import Tools

    tools, pid = Tools(store), store.patients()[0]["id"]
    assert tools.call("get_patient_fhir_resource", {"patient_id": pid, "fhir_resource": "Claim"}).error
    bad_date = tools.call("get_patient_fhir_resource", {"patient_id": pid, "fhir_resource": "Condition",
                                                        "date_from": "last year"})  # fmt: skip
    assert "is not a date" in bad_date.text
    assert "unknown tool" in tools.call("drop_table", {}).text
    assert "bad arguments" in tools.call("get_patient_manifest", {"patient": pid}).text
    assert "no patient" in tools.call("get_patient_demographics", {"patient_id": "nobody"}).text
    ok = tools.call("get_patient_fhir_resource", {"patient_id": pid, "fhir_resource": "Condition", "date_to": "2017"})
    assert ok.error is None and all(store.read(r)["onsetDateTime"][:4] <= "2017" for r in ok.refs)
