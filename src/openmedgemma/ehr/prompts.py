"""Every prompt the EHR navigator sends, in pipeline order (after Google's EHR navigator notebook).

1. SELECT_TYPES: question + record manifest -> a JSON list of the relevant resource types.
2. TOOL_CALL (one per type): -> one `get_patient_fhir_resource` call with the codes (and dates) worth
   fetching, or `{}` to skip the type. With a server that supports OpenAI `tools`, the same text is sent
   with the tool's schema (TOOL_CALL_NATIVE_SUFFIX) instead of the JSON protocol (TOOL_CALL_JSON_SUFFIX).
3. SUMMARIZE (one per type, or per part of a type when its resources exceed the context): -> the facts
   relevant to the question, with dates and `[Type/id]` references. The model is told not to answer, so a
   summary stays a list of facts. MERGE condenses several part-summaries of one type the same way.
4. ANSWER: question + demographics (the demographics tool) + the summaries -> the answer, keeping the references; `answer_format` (from the
   caller, e.g. EHRQA's "Final Answer: X" rule) is appended.

`RETRY` is appended to a step's prompt when its first answer could not be parsed (once).
Each template is a `str.format` string; the fields are named in the template itself.
"""

SELECT_TYPES = """You are a clinical assistant reading the FHIR record of patient {patient_id}.

Question: {question}

Here is the manifest of the record: each FHIR resource type, then its codes with display name, code system, count and date range.
{manifest}

Which resource types hold the information needed to answer the question? Think silently if needed.
Reply with a JSON list of resource type names from the manifest only, e.g. ["Condition", "MedicationRequest"]."""

TOOL_CALL = """You are a clinical assistant reading the FHIR record of patient {patient_id}.

Question: {question}

The record holds these {fhir_resource} codes (code, display, system, count, dates):
{codes}

Fetch the {fhir_resource} resources needed to answer the question with the tool get_patient_fhir_resource(patient_id, fhir_resource, filter_code, date_from, date_to): filter_code is a comma-separated list of codes from the list above (empty for all of them); the dates (YYYY-MM-DD, inclusive) are optional."""

TOOL_CALL_JSON_SUFFIX = """
Reply with exactly one JSON object and nothing else:
{{"name": "get_patient_fhir_resource", "arguments": {{"patient_id": "{patient_id}", "fhir_resource": "{fhir_resource}", "filter_code": "CODE1,CODE2"}}}}
or {{}} if no {fhir_resource} resource is relevant."""

TOOL_CALL_NATIVE_SUFFIX = """
Call the tool once, or reply {{}} without a call if no {fhir_resource} resource is relevant."""

SUMMARIZE = """You are a clinical assistant reading the FHIR record of patient {patient_id}.

Question: {question}

Here are {fhir_resource} resources from the record{part}, one per line, each starting with its reference:
{resources}

List only the facts in these resources that are relevant to the question, one per line, each with its date and the reference of the resource it comes from in square brackets, e.g. [{fhir_resource}/id]. You are not authorised to answer the question: list facts only. If nothing is relevant, reply: nothing relevant."""

MERGE = """You are a clinical assistant reading the FHIR record of patient {patient_id}.

Question: {question}

Here are notes taken from parts of the patient's {fhir_resource} resources:
{resources}

Merge them into one list of the facts relevant to the question, one per line, keeping each fact's date and its [Type/id] reference. You are not authorised to answer the question: list facts only. If nothing is relevant, reply: nothing relevant."""

ANSWER = """You are a clinical assistant. Answer a question about patient {patient_id} from facts taken from the patient's FHIR record.

Question: {question}

The patient: {demographics}

Facts from the record, by resource type:
{summaries}

Answer the question from these facts only. Cite the reference of each fact you use in square brackets, e.g. [Condition/id]. If the facts do not answer the question, say so.{answer_format}"""

RETRY = """

Your previous reply could not be read: {problem}. Reply again, in exactly the format asked."""
