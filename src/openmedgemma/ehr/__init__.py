"""openmedgemma.ehr: FHIR R4 records for MedGemma, and the EHR navigator.

    from openmedgemma.ehr import Navigator, open_store
    store = open_store("records.sqlite")          # or bundle files / folders, or a FHIR server URL
    result = Navigator(chat_model, store).ask(patient_id, "Which medications is the patient on?")
    result.answer, result.citations, result.trace

Where a FHIR bundle becomes a citation: bundles.py (reading, references) -> sqlite.py / rest.py (stores,
store.py the interface) -> tools.py (condensed, citable tool results) -> prompts.py + agent.py (the
navigator) ; questions.py generates EHRQA-style questions with ground truth (the `ehrqa` eval task).
Names are imported lazily; nothing here imports torch.
"""

from openmedgemma.lazy import lazy_exports

_EXPORTS = {
    "Navigator": "openmedgemma.ehr.agent",
    "NavigatorResult": "openmedgemma.ehr.agent",
    "RecordStore": "openmedgemma.ehr.store",
    "open_store": "openmedgemma.ehr.store",
    "SQLiteStore": "openmedgemma.ehr.sqlite",
    "build_index": "openmedgemma.ehr.sqlite",
    "RestStore": "openmedgemma.ehr.rest",
    "Tools": "openmedgemma.ehr.tools",
    "generate_questions": "openmedgemma.ehr.questions",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
