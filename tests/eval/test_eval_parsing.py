"""Answer parsing on realistic model outputs."""

import pytest

from openmedgemma.eval.parsing import free_text_answer, parse_choice, parse_yes_no, strip_thinking

OPTIONS4 = {
    "A": "Disclose the error to the patient and put it in the operative report",
    "B": "Tell the attending that he cannot fail to disclose this mistake",
    "C": "Report the physician to the ethics committee",
    "D": "Refuse to dictate the operative report",
}
OPTIONS10 = {letter: f"{60 + i} Gy" for i, letter in enumerate("ABCDEFGHIJ")}
PUBMED = {"A": "yes", "B": "no", "C": "maybe"}
EYE = {"A": "Open-angle glaucoma", "B": "Acute angle-closure glaucoma", "C": "Central retinal artery occlusion",
       "D": "Uveitis"}

CHOICE_CASES = [
    # (model output, options, expected letter or None)
    ("Final Answer: (B)", OPTIONS4, "B"),
    ("Final Answer: B", OPTIONS4, "B"),
    ("**Final Answer:** B.", OPTIONS4, "B"),
    ("**Final Answer**: (C)", OPTIONS4, "C"),
    ("Final Answer: **D**", OPTIONS4, "D"),
    ("final answer: (c)", OPTIONS4, "C"),
    ("FINAL ANSWER: A", OPTIONS4, "A"),
    ("The final answer is (D).", OPTIONS4, "D"),
    ("Final Answer:\n\n(A) Disclose the error to the patient", OPTIONS4, "A"),
    ("B", OPTIONS4, "B"),
    ("(C)", OPTIONS4, "C"),
    ("c.", OPTIONS4, "C"),
    ("**B**", OPTIONS4, "B"),
    ("B. Tell the attending that he cannot fail to disclose this mistake", OPTIONS4, "B"),
    ("The answer is not (A) but (C). Final Answer: (C)", OPTIONS4, "C"),
    ("Final Answer: (A)\nWait, let me reconsider. Final Answer: (D)", OPTIONS4, "D"),
    ("Final Answer: Report the physician to the ethics committee", OPTIONS4, "C"),
    ("Final Answer: refuse to dictate the operative report.", OPTIONS4, "D"),
    ("Tell the attending that he cannot fail to disclose this mistake", OPTIONS4, "B"),
    ("<unused94>thought\nMaybe (A)? Final Answer: (A) ... no.<unused95>Final Answer: (B)", OPTIONS4, "B"),
    ("<unused94>thought\nThe patient... Final Answer: (A)", OPTIONS4, None),  # thinking never ended
    (
        "Step 1: summarize. The best option is clearly (D) because... Final Answer: $\\boxed{D}$",
        OPTIONS4,
        "D",
    ),
    ("Final Answer: \\boxed{(C)}", OPTIONS4, "C"),
    ("The answer is (B).", OPTIONS4, "B"),
    ("The correct answer is: C", OPTIONS4, "C"),
    ("so the answer is (c)", OPTIONS4, "C"),
    ("The answer is a difficult one to call.", OPTIONS4, None),  # "a" is an article, not option A
    ("The answer is not (A) but (C).", OPTIONS4, None),  # two letters, no final answer: ambiguous
    ("Final Answer: (B) or (C)", OPTIONS4, None),  # two letters after Final Answer: ambiguous
    ("Final Answer: I cannot determine this.", OPTIONS4, None),
    ("I am not sure.", OPTIONS4, None),
    ("", OPTIONS4, None),
    ("Final Answer: (E)", OPTIONS4, None),  # not an option of a 4-option question
    ("Final Answer: (J)", OPTIONS10, "J"),
    ("Final Answer: I", OPTIONS10, "I"),
    ("Final Answer: I think it is (H)", OPTIONS10, "H"),
    ("Final Answer: 66 Gy", OPTIONS10, "G"),
    ("Final Answer: A patient like this needs (B)", OPTIONS4, "B"),
    ("Final Answer: (A) yes", PUBMED, "A"),
    ("Final Answer: maybe", PUBMED, "C"),
    ("Final Answer: no", PUBMED, "B"),
    ("Final Answer: No, the study does not support it", PUBMED, "B"),
    ("Final Answer: not enough evidence", PUBMED, None),  # "not" is not the option "no"
    ("Final Answer: Option C", OPTIONS4, "C"),
    ("Final Answer: C) Report the physician", OPTIONS4, "C"),
    ("Considering everything...\n\nFinal Answer: (a)", OPTIONS4, "A"),
    # no letter, no Final Answer line: the one option the last sentence names in full (issue 16)
    ("The answer is Acute angle-closure glaucoma.", EYE, "B"),
    ("Raised intraocular pressure and a mid-dilated pupil suggest an acute attack. The most likely diagnosis "
     "is acute angle-closure glaucoma.", EYE, "B"),
    ("Glaucoma fits best.\nSo: open-angle glaucoma", EYE, "A"),  # "glaucoma" is only part of the named option
    ("Open-angle glaucoma is possible. The answer is acute angle-closure glaucoma", EYE, "B"),  # last sentence
    ("It is either open-angle glaucoma or acute angle-closure glaucoma.", EYE, None),  # two named: ambiguous
    ("The answer is not acute angle-closure glaucoma.", EYE, None),  # negated
    ("Acute angle-closure glaucoma is unlikely here; I would say uveitis.", EYE, None),  # two named
    ("This is a hard case that needs more history.", EYE, None),
    # "answer is (X)" without a final-answer line: the last statement wins (the model corrected itself)
    ("At first glance the answer is (A), the usual choice. On reflection the effusion matters, so the answer is (C).",
     OPTIONS4, "C"),
    ("The answer is B. Re-reading the stem, the answer is D", OPTIONS4, "D"),
    # standalone capitals in the final-answer line: "A"/"I" + a lower-case word are English, the letter comes later
    ("Final Answer: A careful reading favours C", OPTIONS4, "C"),
    ("Final Answer: I would choose D", OPTIONS10, "D"),
    ("Final Answer: A", OPTIONS4, "A"),  # "A" alone is the letter
    ("Final Answer: A, because the dose is lowest", OPTIONS10, "A"),  # not followed by a lower-case word
]


@pytest.mark.parametrize("output, options, expected", CHOICE_CASES)
def test_parse_choice(output, options, expected):
    assert parse_choice(output, options) == expected


def test_corpus_is_large_and_varied():
    assert len(CHOICE_CASES) >= 30
    assert sum(expected is None for _, _, expected in CHOICE_CASES) >= 6


YES_NO_CASES = [
    ("Final Answer: Yes", "yes"),
    ("Final Answer: no", "no"),
    ("**Final Answer:** No.", "no"),
    ("The heart is enlarged.\nFinal Answer: YES", "yes"),
    ("Final Answer: Yes\n... on reflection, Final Answer: No", "no"),
    ("Yes, there is cardiomegaly.", "yes"),
    ("No.", "no"),
    ("Final Answer: X", None),
    ("There is no cardiomegaly.", None),  # no definitive first word: unparseable, not "no"
    ("Final Answer: Cardiomegaly is present", None),
    ("Final Answer: nope", None),
    ("<unused94>thought\nIs it yes? <unused95>Final Answer: No", "no"),
    ("<unused94>thought\nYes it is", None),
]


@pytest.mark.parametrize("output, expected", YES_NO_CASES)
def test_parse_yes_no(output, expected):
    assert parse_yes_no(output) == expected


def test_strip_thinking_and_free_text():
    assert strip_thinking("<unused94>thought\nhmm<unused95> Pleural effusion ") == "Pleural effusion"
    assert strip_thinking("hidden<unused95>shown") == "shown"
    assert free_text_answer("Looking at the image...\nFinal Answer: Left lung") == "Left lung"
    assert free_text_answer("  right kidney\n") == "right kidney"
