"""Prompt templates, verbatim from the MedGemma report (spec §4) where the report gives one.

Choices of ours (also written into every result file through the tasks' notes):
- MCQ: {Q} is the question followed by one line per option, "(A) text". The report's text says
  "from the four options"; for a set with N != 4 options the word "four" is replaced by the
  number of options in words (e.g. "ten" for MedXpertQA, "three" for PubMedQA); nothing else
  changes. When the question already lists its options ("Answer Choices: (A) ..." as in
  MedXpertQA), they are not listed a second time.
- PubMedQA: the report's added sentence and the context go right before "Question:".
- Report generation: the report does not publish its prompt; REPORT_PROMPT is ours.
"""

from __future__ import annotations

MCQ_TEMPLATE = (
    "Instructions: The following are multiple choice questions about medical knowledge. Solve "
    "them in a step-by-step fashion, starting by summarizing the available information. Output "
    "a single option from the four options as the final answer. {context}Question: {question} "
    'Response (think step by step and then end with "Final Answer:" followed by *only* the '
    "letter corresponding to the correct answer enclosed in parentheses)"
)
PUBMEDQA_CONTEXT = (
    "Answer the following question given the context (reply with one of the options): Context: {context} "
)
CXR_CLASSIFICATION_TEMPLATE = (
    "Is there {condition} in this image? You may write out your argument before stating your "
    "final very short, definitive, and concise answer (if possible, a single word or the letter "
    'corresponding to your answer choice) X in the format "Final Answer: X":'
)
VQA_TEMPLATE = (
    "Given this radiology image, which can be a frontal chest X-ray, a single slice head or "
    "abdominal CT or MR image, provide a very short, definitive, and concise answer (if "
    "possible, a single word) to the following question: {question}"
)
REPORT_PROMPT = "Write the findings and impression sections of the radiology report for this chest X-ray."

_NUMBER_WORDS = {
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
    9: "nine",
    10: "ten",
    11: "eleven",
    12: "twelve",
}


def mcq_prompt(question: str, options: dict[str, str], context: str | None = None) -> str:
    if "Answer Choices:" in question:
        body = question
    else:
        body = question + "".join(f"\n({letter}) {text}" for letter, text in options.items())
    text = MCQ_TEMPLATE.format(
        question=body,
        context=PUBMEDQA_CONTEXT.format(context=context) if context is not None else "",
    )
    n = len(options)
    if n != 4:
        text = text.replace("from the four options", f"from the {_NUMBER_WORDS.get(n, str(n))} options")
    return text


def cxr_prompt(condition: str) -> str:
    return CXR_CLASSIFICATION_TEMPLATE.format(condition=condition)


def vqa_prompt(question: str) -> str:
    return VQA_TEMPLATE.format(question=question)
