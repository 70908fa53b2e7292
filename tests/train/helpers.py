"""Helpers for the training tests: tiny checkpoints with a tokenizer trained on the real data, TOML writing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from openmedgemma.config import from_hf_config
from openmedgemma.tokenizer import Tokenizer, build_tokenizer
from tests import tiny

TOKENIZER_VOCAB = 640


def corpus(data: Path) -> list[str]:
    """Text the tiny tokenizer is trained on: VQA-RAD questions and answers, prompts, MCQ and PubMedQA text."""
    from openmedgemma.eval.prompts import PUBMEDQA_CONTEXT
    from openmedgemma.train import data as D

    texts = [D.VQA_PROMPT.format(question=""), D.MCQ_PROMPT, PUBMEDQA_CONTEXT, D.PNEUMONIA_PROMPT, *D.PNEUMONIA_CAPTIONS[0], *D.PNEUMONIA_CAPTIONS[1],
             "Final Answer: (A) (B) (C) (D) yes no maybe"]  # fmt: skip
    records = json.loads((data / "vqa_rad" / D.VQA_RAD_JSON).read_text())
    texts += [f"{r['question']} {r['answer']}" for r in records]
    texts += [ex.prompt for ex in D.pubmedqa(data / "pubmedqa", "train")[:100]]
    return texts


def write_tokenizer(folder: Path, data: Path) -> Path:
    return build_tokenizer(folder, "compact", corpus(data), vocab_size=TOKENIZER_VOCAB)


def medgemma_hf_config(tok: Tokenizer, layers: int = 2, multimodal: bool = True) -> dict:
    text = tiny.gemma_text_hf_config(vocab_size=tok.vocab_size, num_hidden_layers=layers, sliding_window=64,
                                     pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
    if not multimodal:
        return text
    text.pop("architectures")
    cfg = tiny.gemma_mm_hf_config()
    cfg.update(text_config=text, boi_token_index=tok.boi_id, eoi_token_index=tok.eoi_id,
               image_token_index=tok.image_token_id)
    return cfg


def write_medgemma(folder: Path, tok_dir: Path, layers: int = 2, multimodal: bool = True, seed: int = 0) -> Path:
    """A randomly initialised tiny MedGemma checkpoint folder with the tokenizer files next to it."""
    from openmedgemma import MedGemma
    from openmedgemma.train.modeling import init_weights
    from openmedgemma.train.stages import TOKENIZER_FILES

    tok = Tokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    model = MedGemma(from_hf_config(medgemma_hf_config(tok, layers, multimodal)))
    init_weights(model, 0.02)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            (folder / name).write_bytes((tok_dir / name).read_bytes())
    return folder


SIGLIP_VOCAB = 400


def write_medsiglip(folder: Path, data: Path, seed: int = 0) -> Path:
    """A tiny random MedSigLIP (32 text positions) with a spiece.model trained on the corpus."""
    from openmedgemma import MedSigLIP
    from openmedgemma.tokenizer import build_siglip_tokenizer
    from openmedgemma.train.modeling import init_weights

    build_siglip_tokenizer(folder, corpus(data), SIGLIP_VOCAB, max_length=32)
    cfg = tiny.siglip_hf_config()
    cfg["text_config"].update(vocab_size=SIGLIP_VOCAB, max_position_embeddings=32, pad_token_id=1)
    torch.manual_seed(seed)
    model = MedSigLIP(from_hf_config(cfg))
    init_weights(model, 0.02)
    model.save_pretrained(folder)
    return folder


def to_toml(data: dict) -> str:
    """A TOML document for a nested dict of str / int / float / bool / lists / tables / lists of tables."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(v)
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(type(v))

    lines: list[str] = []

    def table(prefix: str, d: dict):
        scalars = {k: v for k, v in d.items() if not _is_table(v) and not _is_table_list(v)}
        for k, v in scalars.items():
            lines.append(f"{k} = {value(v)}")
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else k
            if _is_table(v):
                lines.append(f"\n[{name}]")
                table(name, v)
            elif _is_table_list(v):
                for item in v:
                    lines.append(f"\n[[{name}]]")
                    table(name, item)

    table("", data)
    return "\n".join(lines) + "\n"


def _is_table(v) -> bool:
    return isinstance(v, dict)


def _is_table_list(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def run_config(stage: str, out: Path, model_dir: Path, data_dir: Path, sources: list[dict], **sections) -> dict:
    """A config dict for a short CPU run (progress bar off); `sections` update the config's tables."""
    cfg = {
        "stage": stage, "seed": 0, "output_dir": str(out), "model": {"path": str(model_dir)},
        "data": {"data_dir": str(data_dir), "max_length": 256, "sources": sources},
        "optim": {"lr": 3e-3, "schedule": "constant", "max_grad_norm": 1.0},
        "train": {"steps": 20, "batch_size": 8, "progress": False},
    }  # fmt: skip
    for name, values in sections.items():
        cfg.setdefault(name, {})
        if isinstance(values, dict):
            cfg[name].update(values)
        else:
            cfg[name] = values
    return cfg


def train(cfg: dict, **kwargs) -> dict:
    from openmedgemma.train.config import config_from_dict
    from openmedgemma.train.loop import Trainer

    return Trainer(config_from_dict(cfg), **kwargs).run()


def losses(summary: dict, key: str = "loss") -> list[float]:
    return [h[key] for h in summary["history"]]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def text_length_reward(completion: str, example) -> float:
    """A reward that varies between random completions (unlike exact match from an untrained model): RL tests
    name it as "tests.train.helpers:text_length_reward" to make the policy move from the first step."""
    return float(len(completion))
