"""Training data: readers for the official dataset formats, image-caption pairs derived from QA, and the
mixture sampler.

Every reader returns a list of `Example`s (prompt -> answer, with optional images given as file paths or
uint8 arrays; decoding happens in the collator). Formats:

- `qa`: the user turn is the prompt (with the images), the model turn the answer; loss on the answer only.
- `dialogue` (VQA-RAD): several questions about one image in one conversation (`followups` after the first
  turn, see `openmedgemma.eval.dialogue`); loss on every answer.
- `caption`: an image and its text (SigLIP pairs; captioning in pretraining).
- `text`: plain text (pretraining on medical text).

No reader touches the network; a missing or malformed file is a `DataError` naming it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openmedgemma.errors import DataError
from openmedgemma.eval.dialogue import chain_dialogues
from openmedgemma.eval.prompts import MCQ_TEMPLATE, VQA_TEMPLATE, cxr_prompt, mcq_prompt, vqa_prompt

# The evaluation's prompts (the report's, spec §4), so that fine-tuning sees exactly what evaluation asks.
VQA_PROMPT = VQA_TEMPLATE
# The MCQ instruction with "{n}" for the number of options (examples are built by eval's `mcq_prompt`; this is
# its text for tokenizer corpora); the target is the final answer line it asks for.
MCQ_PROMPT = MCQ_TEMPLATE.replace("from the four options", "from the {n} options")
# PneumoniaMNIST as the report's CXR classification question; the target is the answer line it asks for.
PNEUMONIA_PROMPT = cxr_prompt("pneumonia")
PNEUMONIA_ANSWERS = ("Final Answer: no", "Final Answer: yes")
# Captions per class (normal, pneumonia), taken in turn by image index: several phrasings, so that a text tower
# learns what separates the classes ("no", "normal", "showing ...") rather than one fixed sentence.
PNEUMONIA_CAPTIONS = (
    ("A normal pediatric chest X-ray without pneumonia.", "Normal chest X-ray.", "No pneumonia.",
     "Clear lungs with no consolidation.", "A pediatric chest radiograph with no acute findings."),
    ("A pediatric chest X-ray showing pneumonia.", "Chest X-ray with pneumonia.", "Pneumonia.",
     "Lung consolidation consistent with pneumonia.", "A pediatric chest radiograph showing pneumonia."),
)  # fmt: skip

VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"
VQA_RAD_BALANCED = "vqa_rad_balanced_split.tsv"


@dataclass
class Example:
    """One training example. `images` hold file paths or uint8 arrays ([H, W] or [H, W, 3]); they belong to the
    first user turn. `followups`: later (question, answer) turns of the same conversation (chat training)."""

    prompt: str = ""
    answer: str = ""
    images: tuple = ()
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    followups: tuple[tuple[str, str], ...] = ()

    def texts(self) -> list[str]:
        """Every prompt and answer the example holds (what a tokenizer learns from)."""
        return [t for t in (self.prompt, self.answer, *(x for turn in self.followups for x in turn)) if t]


# ----------------------------------------------------------------------------- helpers


def _read_json(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not readable JSON: {err}") from None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not a JSON line: {err}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object")
            rows.append(row)
    return rows


def _need(row: dict, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")


def letter_options(options: dict[str, str] | Sequence[str]) -> dict[str, str]:
    if isinstance(options, dict):
        return {str(k): str(v) for k, v in options.items()}
    return {chr(ord("A") + i): str(v) for i, v in enumerate(options)}


def mcq_example(question: str, options, answer_letter: str, source: str, context: str | None = None,
                meta: dict | None = None) -> Example:
    """An MCQ as the report's prompt; the target is `Final Answer: (X)`."""
    options = letter_options(options)
    if answer_letter not in options:
        raise DataError(f"{source}: answer {answer_letter!r} is not one of the options {list(options)}")
    prompt = mcq_prompt(question, options, context or None)  # an empty context adds no context sentence
    meta = {"options": options, "answer_letter": answer_letter, "answer_text": options[answer_letter], **(meta or {})}
    return Example(prompt=prompt, answer=f"Final Answer: ({answer_letter})", source=source, meta=meta)


# ----------------------------------------------------------------------------- VQA-RAD


def vqa_rad(root: str | Path, split: str = "train", scheme: str = "balanced") -> list[Example]:
    """VQA-RAD QA pairs: `scheme="official"` splits by phrase_type (train 1797 / test 451); `"balanced"` uses
    `vqa_rad_balanced_split.tsv` (train 785 / validation 728 / test 735, no image shared)."""
    root = Path(root)
    records = _read_json(root / VQA_RAD_JSON)
    if not isinstance(records, list):
        raise DataError(f"{root / VQA_RAD_JSON}: expected a JSON list of QA records")
    if scheme == "official":
        phrases = {"train": {"freeform", "para"}, "test": {"test_freeform", "test_para"}}
        if split not in phrases:
            raise DataError(f"{root}: VQA-RAD official split {split!r} does not exist; use train or test")
        keep = lambda r: r.get("phrase_type") in phrases[split]  # noqa: E731
    elif scheme == "balanced":
        chosen = _balanced_split(root / VQA_RAD_BALANCED, split)
        keep = lambda r: int(r["qid"]) in chosen  # noqa: E731
    else:
        raise DataError(f"unknown VQA-RAD split scheme {scheme!r}; use balanced or official")
    images = root / VQA_RAD_IMAGES
    out = []
    for i, r in enumerate(records):
        _need(r, ("qid", "image_name", "question", "answer", "answer_type"), f"{root / VQA_RAD_JSON} record {i}")
        if not keep(r):
            continue
        image = images / r["image_name"]
        if not image.is_file():
            raise DataError(f"{image}: image of VQA-RAD qid {r['qid']} not found")
        answer = str(r["answer"]).strip()
        out.append(Example(
            prompt=vqa_prompt(r["question"].strip()), answer=answer, images=(str(image),),
            source=f"vqa_rad:{split}",
            meta={"qid": int(r["qid"]), "question": r["question"].strip(), "answer_type": r["answer_type"].strip(),
                  "organ": str(r.get("image_organ", "")).strip(), "image_name": r["image_name"],
                  "linked": str(r.get("qid_linked_id", r["qid"]))},
        ))  # fmt: skip
    return out


def _balanced_split(tsv: Path, split: str) -> set[int]:
    if not tsv.is_file():
        raise DataError(f"{tsv}: no such file (the balanced split of VQA-RAD)")
    with open(tsv, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "QID_unique" not in rows[0] or "SPLIT_BALANCED" not in rows[0]:
        raise DataError(f"{tsv}: expected the columns QID_unique and SPLIT_BALANCED")
    splits = sorted({r["SPLIT_BALANCED"] for r in rows})
    if split not in splits:
        raise DataError(f"{tsv}: VQA-RAD balanced split {split!r} does not exist; use one of {', '.join(splits)}")
    return {int(r["QID_unique"]) for r in rows if r["SPLIT_BALANCED"] == split}


def captions_from_qa(examples: Sequence[Example], source: str = "") -> list[Example]:
    """One image-caption pair per image, the caption written from that image's QA pairs.

    The report generated SLAKE's pretraining captions from its QA pairs; ours is a fixed template (no model):
    "{Organ} image. {question} {answer}. ..." in question order, so it is reproducible.
    """
    by_image: dict[str, list[Example]] = {}
    for ex in examples:
        if len(ex.images) != 1 or not isinstance(ex.images[0], str):
            raise DataError(f"{ex.source}: captions need exactly one image file per QA pair")
        by_image.setdefault(ex.images[0], []).append(ex)
    out = []
    for image, qas in by_image.items():
        organ = qas[0].meta.get("organ", "")
        parts = [f"{organ.capitalize()} image." if organ else "Radiology image."]
        for qa in qas:
            question = qa.meta.get("question", qa.prompt).strip()
            parts.append(f"{question} {qa.answer.strip().rstrip('.')}.")
        out.append(Example(answer=" ".join(parts), images=(image,), source=source or qas[0].source + ":captions",
                           meta={"image": image, "pairs": len(qas)}))  # fmt: skip
    return out


def dialogues_from_qa(examples: Sequence[Example], source: str = "") -> list[Example]:
    """VQA-RAD QA pairs chained into conversations about one image (`chain_dialogues`): the first turn is the
    image with the report's VQA prompt, each follow-up the bare question."""
    out = []
    for chain in chain_dialogues(examples, lambda ex: ex.images, lambda ex: ex.meta.get("linked", ex.meta.get("qid"))):
        first = chain[0]
        out.append(Example(prompt=first.prompt, answer=first.answer, images=first.images,
                           source=source or first.source + ":dialogue",
                           meta={"qids": [ex.meta.get("qid") for ex in chain], "image_name": first.meta.get("image_name")},
                           followups=tuple((ex.meta["question"], ex.answer) for ex in chain[1:])))  # fmt: skip
    return out


# ----------------------------------------------------------------------------- PneumoniaMNIST


def pneumonia_mnist(path: str | Path, split: str = "train", fmt: str = "qa") -> list[Example]:
    """PneumoniaMNIST npz (`{split}_images` [N, 28, 28] uint8, `{split}_labels` [N, 1]; 0 normal, 1 pneumonia)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("pneumoniamnist*.npz")) or sorted(path.glob("*.npz"))
        if len(found) != 1:
            raise DataError(f"{path}: expected one PneumoniaMNIST .npz file in the folder, found {len(found)}")
        path = found[0]
    if not path.is_file():
        raise DataError(f"{path}: no such file (PneumoniaMNIST npz)")
    try:
        data = np.load(path)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable npz file: {err}") from None
    splits = sorted(k[: -len("_images")] for k in data.files if k.endswith("_images"))
    if split not in splits:
        raise DataError(f"{path}: split {split!r} not found; it holds {', '.join(splits)}")
    images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"{path}: {split}_images must be uint8 [N, H, W] with one label each")
    out = []
    for i, (image, label) in enumerate(zip(images, labels)):
        label = int(label)
        if fmt == "caption":
            captions = PNEUMONIA_CAPTIONS[label]
            ex = Example(answer=captions[i % len(captions)], images=(image,))
        elif fmt == "qa":
            ex = Example(prompt=PNEUMONIA_PROMPT, answer=PNEUMONIA_ANSWERS[label], images=(image,))
        else:
            raise DataError(f"{path}: PneumoniaMNIST has images; use format qa or caption, not {fmt!r}")
        # every caption of a class is a positive for every image of that class (SigLIP's duplicate_positives)
        ex.source, ex.meta = f"pneumonia_mnist:{split}", {"index": i, "label": label, "caption_group": f"pneumonia:{label}"}
        out.append(ex)
    return out


# ----------------------------------------------------------------------------- multiple choice


def mcq(path: str | Path, split: str = "train", fmt: str = "qa") -> list[Example]:
    """MCQ sets: a JSONL file `{question, options{A..}, answer_idx, ...}` (MedQA, MedMCQA, MMLU, ...), a folder
    holding `{split}.jsonl`, an MMLU-style CSV (`question,choice0..3,answer` with answer an index), or a folder
    of them (`{split}/*_{split}.csv` or `*_{split}.csv`)."""
    path = Path(path)
    if path.is_dir():
        jsonl = path / f"{split}.jsonl"
        csvs = sorted((path / split).glob(f"*_{split}.csv")) or sorted(path.glob(f"*_{split}.csv"))
        if jsonl.is_file():
            files = [jsonl]
        elif csvs:
            files = csvs
        else:
            raise DataError(f"{path}: no {split}.jsonl and no *_{split}.csv files for split {split!r}")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path}: no such file or folder")
    out = []
    for file in files:
        rows = _mcq_csv(file) if file.suffix == ".csv" else _mcq_jsonl(file)
        for n, (question, options, letter, context, meta) in enumerate(rows):
            source = f"mcq:{file.stem}"
            if fmt == "text":
                ex = Example(answer=f"{question}\n{options[letter]}", source=source, meta=meta)
            elif fmt == "qa":
                ex = mcq_example(question, options, letter, source, context, meta)
            else:
                raise DataError(f"{file}: MCQ data has no images; use format qa or text, not {fmt!r}")
            out.append(ex)
    return out


def _mcq_jsonl(file: Path):
    for n, row in enumerate(_read_jsonl(file), 1):
        where = f"{file}:{n}"
        _need(row, ("question", "options"), where)
        options = letter_options(row["options"])
        letter = row.get("answer_idx")
        if letter is None and "answer" in row:
            letter = next((k for k, v in options.items() if v == row["answer"]), None)
        if letter not in options:
            raise DataError(f"{where}: answer_idx {letter!r} is not one of the options {list(options)}")
        yield row["question"], options, letter, row.get("context"), {"id": row.get("realidx", n)}


def _mcq_csv(file: Path):
    with open(file, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DataError(f"{file}: empty CSV")
    header = [h.strip().lower() for h in rows[0]]
    if header[0] != "question" or header[-1] != "answer":
        raise DataError(f"{file}: expected the header question,choice0,...,answer (MMLU CSV with a header row)")
    for n, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise DataError(f"{file}:{n}: {len(row)} columns, the header has {len(header)}")
        options = letter_options(row[1:-1])
        try:
            letter = chr(ord("A") + int(row[-1]))
        except ValueError:
            raise DataError(f"{file}:{n}: answer {row[-1]!r} must be an option index (0-based)") from None
        if letter not in options:
            raise DataError(f"{file}:{n}: answer index {row[-1]} is out of range for {len(options)} options")
        yield row[0], options, letter, None, {"id": f"{file.stem}:{n}"}


# ----------------------------------------------------------------------------- PubMedQA


def pubmedqa(root: str | Path, split: str = "train", fmt: str = "qa") -> list[Example]:
    """PubMedQA PQA-L `ori_pqal.json`; test = the PMIDs of `test_ground_truth.json` (500), train = the others.
    qa: the MCQ with options (A) yes (B) no (C) maybe; text: the abstract and its long answer."""
    root = Path(root)
    file = root / "ori_pqal.json" if root.is_dir() else root
    data = _read_json(file)
    truth = _read_json(file.parent / "test_ground_truth.json")
    if not isinstance(data, dict) or not isinstance(truth, dict):
        raise DataError(f"{file}: expected a JSON object keyed by PMID")
    if split not in ("train", "test"):
        raise DataError(f"{file}: PubMedQA split {split!r} does not exist; use train or test")
    out = []
    letters = {"yes": "A", "no": "B", "maybe": "C"}
    for pmid, r in data.items():
        if (pmid in truth) != (split == "test"):
            continue
        _need(r, ("QUESTION", "CONTEXTS", "final_decision"), f"{file} PMID {pmid}")
        context = " ".join(r["CONTEXTS"])
        meta = {"id": pmid, "long_answer": r.get("LONG_ANSWER", "")}
        if fmt == "text":
            out.append(Example(answer=f"{r['QUESTION']}\n{context}\n{r.get('LONG_ANSWER', '')}".strip(),
                               source=f"pubmedqa:{split}", meta=meta))  # fmt: skip
        elif fmt == "qa":
            decision = r["final_decision"]
            if decision not in letters:
                raise DataError(f"{file} PMID {pmid}: final_decision {decision!r} is not yes, no or maybe")
            out.append(mcq_example(r["QUESTION"], {"A": "yes", "B": "no", "C": "maybe"}, letters[decision],
                                   f"pubmedqa:{split}", context, meta))  # fmt: skip
        else:
            raise DataError(f"{file}: PubMedQA has no images; use format qa or text, not {fmt!r}")
    return out


# ----------------------------------------------------------------------------- user folders


def image_text(path: str | Path, fmt: str = "caption") -> list[Example]:
    """A user JSONL of `{"image": "relative/or/absolute/path", "text": "..."}` lines (optionally `"prompt"`,
    which makes the line a QA pair: prompt -> text). Image paths resolve against the JSONL's folder."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.jsonl"))
        if len(found) != 1:
            raise DataError(f"{path}: expected exactly one .jsonl file in the folder, found {len(found)}")
        path = found[0]
    out = []
    for n, row in enumerate(_read_jsonl(path), 1):
        where = f"{path}:{n}"
        _need(row, ("text",), where)
        images = row.get("image", row.get("images", []))
        images = [images] if isinstance(images, str) else list(images)
        resolved = []
        for image in images:
            p = Path(image) if Path(image).is_absolute() else path.parent / image
            if not p.is_file():
                raise DataError(f"{where}: image {image!r} not found (looked at {p})")
            resolved.append(str(p))
        if fmt == "qa" and "prompt" not in row:
            raise DataError(f"{where}: format qa needs a 'prompt' field next to 'text'")
        prompt = row.get("prompt", "") if fmt == "qa" else ""
        if fmt == "caption" and len(resolved) != 1:
            raise DataError(f"{where}: format caption needs exactly one image, got {len(resolved)}")
        out.append(Example(prompt=prompt, answer=str(row["text"]), images=tuple(resolved), source=f"image_text:{path.stem}",
                           meta={"line": n}))  # fmt: skip
    return out


# ----------------------------------------------------------------------------- from config


def source_args(s, data_dir: str | Path | None) -> tuple:
    """`load_source`'s arguments for a configured source (a `SourceSection`): a relative path resolves against
    `data_dir` (None: the working directory)."""
    path = Path(s.path).expanduser()
    if not path.is_absolute() and data_dir is not None:
        path = Path(data_dir).expanduser() / path
    return s.kind, path, s.split, s.format, s.split_scheme, s.limit


def load_source(kind: str, path: str | Path, split: str = "train", fmt: str = "qa", scheme: str = "balanced",
                limit: int = 0) -> list:
    """The examples of one configured source (see `SourceSection`)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (data source kind {kind!r})")
    if kind == "vqa_rad":
        examples = vqa_rad(path, split, scheme)
        if fmt == "caption":
            examples = captions_from_qa(examples)
        elif fmt == "dialogue":
            examples = dialogues_from_qa(examples)
        elif fmt != "qa":
            raise DataError(f"{path}: VQA-RAD has images; use format qa, dialogue or caption, not {fmt!r}")
    elif kind == "pneumonia_mnist":
        examples = pneumonia_mnist(path, split, fmt)
    elif kind == "mcq":
        examples = mcq(path, split, fmt)
    elif kind == "pubmedqa":
        examples = pubmedqa(path, split, fmt)
    elif kind == "image_text":
        examples = image_text(path, fmt)
    elif kind == "teacher_store":
        from openmedgemma.train.distill import TeacherStore

        examples = TeacherStore(path)
    else:
        raise DataError(f"unknown data source kind {kind!r}")
    if limit:
        examples = examples[:limit] if isinstance(examples, list) else examples.head(limit)
    if len(examples) == 0:
        raise DataError(f"{path}: data source {kind}:{split} holds no examples")
    return examples


# ----------------------------------------------------------------------------- mixture


class MixtureSampler:
    """Draws (source, index) pairs from several sources in proportion to their weights.

    Sources are interleaved by smooth weighted round-robin: each draw goes to the source furthest behind its
    share, so after n draws source s has been drawn within one of n * w_s / sum(w) times (exact proportions,
    no randomness in the choice). Within a source, each epoch visits every example once in an order shuffled
    by (seed, source, epoch). The whole position is the per-source draw counts (`state_dict`), so a resumed
    run continues with exactly the examples the interrupted one would have seen.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int = 0):
        if not sizes or len(sizes) != len(weights):
            raise ValueError("give one weight per source")
        if any(n < 1 for n in sizes) or any(w <= 0 for w in weights):
            raise ValueError("every source needs examples and a positive weight")
        self.sizes = list(sizes)
        total = float(sum(weights))
        self.shares = [w / total for w in weights]
        self.seed = seed
        self.counts = [0] * len(sizes)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def drawn(self) -> int:
        return sum(self.counts)

    def _order(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.sizes):
                self._perms.clear()
            rng = np.random.Generator(np.random.PCG64([self.seed, source, epoch]))
            self._perms[key] = rng.permutation(self.sizes[source])
        return self._perms[key]

    def next(self) -> tuple[int, int]:
        n = self.drawn + 1
        source = max(range(len(self.sizes)), key=lambda s: (n * self.shares[s] - self.counts[s], -s))
        c = self.counts[source]
        self.counts[source] += 1
        epoch, offset = divmod(c, self.sizes[source])
        return source, int(self._order(source, epoch)[offset])

    def take(self, n: int) -> list[tuple[int, int]]:
        return [self.next() for _ in range(n)]

    def state_dict(self) -> dict:
        return {"counts": list(self.counts), "sizes": list(self.sizes), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["sizes"] != self.sizes or state["seed"] != self.seed:
            raise DataError(
                f"the data mixture changed since the checkpoint (source sizes {state['sizes']} -> {self.sizes}, "
                f"seed {state['seed']} -> {self.seed}); resume with the same data and seed"
            )
        self.counts = list(state["counts"])
