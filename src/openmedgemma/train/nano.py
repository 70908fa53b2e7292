"""`openmedgemma train nano`: the MedGemma recipe in miniature, from nothing to the two shipped checkpoints.

    openmedgemma train nano --data-dir ../shared/data --out runs/nano

1. tokenizers, trained on the text of the recipe's own training sources (never a test split): a compact
   Gemma-style `tokenizer.json` (4096 ids, the Gemma special tokens, the official chat template) and a
   SigLIP `spiece.model` (1024 pieces);
2. `siglip.toml`: nano MedSigLIP from scratch, sigmoid loss on VQA-RAD and PneumoniaMNIST image-caption pairs;
3. a fresh nano MedGemma whose vision tower is the stage-2 tower (the report's order: encoder first);
4. `pretrain.toml`, `sft.toml`, `rl.toml`: the Trainer's stages, each starting from the previous one's model.

The recipe's TOML files live in `configs/nano/`; this module only fills in what links the stages (model
paths, tokenizers, output folders, the seed). Everything is seeded: the same data, seed and thread count
give the same weights. Writes `<out>/medgemma-nano` and `<out>/medsiglip-nano` (HF layout, loadable by
transformers) and `<out>/nano_summary.json` (timings and final losses of each stage).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from openmedgemma.config import get_config
from openmedgemma.errors import ConfigError
from openmedgemma.train.config import TrainConfig, load_config

RECIPE_STAGES = ("siglip", "pretrain", "sft", "rl")
# the tokenizers fill the nano models' vocabularies
GEMMA_VOCAB = get_config("nano").text.vocab_size
SIGLIP_VOCAB = get_config("medsiglip-nano").text.vocab_size
NANO_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "spiece.model")  # fmt: skip
# What transformers' AutoProcessor needs beside the tokenizer: the image processors of the official folders,
# at the nano input size (resize to size x size, bilinear, x/255, (x - 0.5) / 0.5).
_IMAGE_PROCESSOR = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2,
                    "rescale_factor": 1 / 255}  # fmt: skip


def default_recipe_dir() -> Path:
    """configs/nano of the source checkout this package runs from (else of the working directory)."""
    repo = Path(__file__).resolve().parents[3] / "configs" / "nano"
    return repo if repo.is_dir() else Path("configs/nano")


def load_recipe(recipe_dir: Path, data_dir: Path, out: Path, seed: int, max_steps: int = 0) -> dict[str, TrainConfig]:
    """The four stage configs, validated, with the links between the stages filled in."""
    recipe_dir = Path(recipe_dir)
    missing = [s for s in RECIPE_STAGES if not (recipe_dir / f"{s}.toml").is_file()]
    if missing:
        raise ConfigError(f"{recipe_dir}: the nano recipe needs {', '.join(f'{s}.toml' for s in missing)}")
    previous = {"pretrain": out / "init", "sft": out / "pretrain" / "final", "rl": out / "sft" / "final"}
    configs = {}
    for stage in RECIPE_STAGES:
        overrides = {"data.data_dir": str(data_dir), "output_dir": str(out / stage), "seed": seed,
                     "train.progress": True}  # fmt: skip
        if stage == "siglip":
            overrides["model.tokenizer"] = str(out / "tokenizers" / "siglip")
        else:
            overrides["model.path"] = str(previous[stage])
        cfg = load_config(recipe_dir / f"{stage}.toml", stage, overrides)
        if max_steps:
            cfg.train.steps = min(cfg.train.steps, max_steps)
        configs[stage] = cfg
    return configs


def training_texts(*configs: TrainConfig) -> list[str]:
    """The distinct prompts and answers of these stages' training sources (the tokenizers learn from nothing
    else), sorted; a source several stages share is read once."""
    from openmedgemma.train.data import load_source, source_args

    texts, seen = set(), set()
    for cfg in configs:
        for s in cfg.data.sources:
            key = source_args(s, cfg.data.data_dir)
            if key not in seen:
                seen.add(key)
                texts.update(t for ex in load_source(*key) for t in ex.texts())
    return sorted(texts)


def build_tokenizers(configs: dict[str, TrainConfig], out: Path) -> tuple[Path, Path]:
    from openmedgemma.tokenizer import build_siglip_tokenizer, build_tokenizer

    gemma_texts = training_texts(configs["pretrain"], configs["sft"], configs["rl"])
    siglip_texts = training_texts(configs["siglip"]) + gemma_texts
    gemma = build_tokenizer(out / "tokenizers" / "gemma", layout="compact", texts=gemma_texts, vocab_size=GEMMA_VOCAB)
    siglip = build_siglip_tokenizer(out / "tokenizers" / "siglip", siglip_texts, SIGLIP_VOCAB,
                                    max_length=configs["siglip"].siglip.text_length)  # fmt: skip
    return gemma, siglip


def init_medgemma(siglip_dir: Path, tokenizer_dir: Path, folder: Path, seed: int, std: float = 0.02) -> Path:
    """A fresh nano MedGemma (decoder and projector random under `seed`) carrying the trained SigLIP vision tower."""
    import torch

    from openmedgemma.model.medgemma import MedGemma
    from openmedgemma.model.medsiglip import MedSigLIP
    from openmedgemma.train.modeling import init_weights

    torch.manual_seed(seed)
    model = MedGemma(get_config("nano"))
    init_weights(model, std)
    siglip = MedSigLIP.from_pretrained(siglip_dir)
    tower = model.vision_tower.vision_model
    source = siglip.vision_model.state_dict()
    missing = [k for k in tower.state_dict() if k not in source]
    if missing:
        raise ConfigError(f"{siglip_dir}: the MedSigLIP vision tower lacks {missing[:3]}; is it a medsiglip-nano model?")
    tower.load_state_dict({k: source[k] for k in tower.state_dict()}, strict=True)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tokenizer_dir / name, folder / name)
    return folder


def export(src: Path, dst: Path) -> Path:
    """Copy a stage's final model folder (weights, config, tokenizer files) to `dst` and add the processor files."""
    from openmedgemma.config import MedGemmaConfig, from_hf_config, read_hf_config
    from openmedgemma.tokenizer import CHAT_TEMPLATE, Tokenizer

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in NANO_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    config = from_hf_config(read_hf_config(dst))
    size = {"height": config.vision.image_size, "width": config.vision.image_size}
    if isinstance(config, MedGemmaConfig):
        n = config.mm_tokens_per_image
        image = {**_IMAGE_PROCESSOR, "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
                 "do_pan_and_scan": None, "image_seq_length": n, "size": size}  # fmt: skip
        _write_json(dst / "processor_config.json", {"image_seq_length": n, "processor_class": "Gemma3Processor"})
        _write_json(dst / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
        _write_json(dst / "generation_config.json", generation_config(config, Tokenizer.from_pretrained(dst)))
    else:
        image = {**_IMAGE_PROCESSOR, "image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
                 "size": size}  # fmt: skip
    _write_json(dst / "preprocessor_config.json", image)
    return dst


def generation_config(config, tok) -> dict:
    """What transformers' `generate` reads beside config.json: as in the official -it folders, a turn ends
    generation (`<end_of_turn>` as well as `<eos>`); without it generation would run on to max_new_tokens."""
    text = config.text
    eos = list(text.eos_token_id) if isinstance(text.eos_token_id, (list, tuple)) else [text.eos_token_id]
    eos += [tok.end_of_turn_id] if tok.end_of_turn_id not in eos else []
    return {"bos_token_id": text.bos_token_id, "eos_token_id": eos, "pad_token_id": text.pad_token_id}


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def run_nano(data_dir: str | Path, out: str | Path = "runs/nano", recipe_dir: str | Path | None = None, seed: int = 0,
             max_steps: int = 0, log=print) -> dict:
    """Run the whole recipe; returns the summary also written to `<out>/nano_summary.json`."""
    from openmedgemma.train.loop import Trainer

    data_dir, out = Path(data_dir).expanduser(), Path(out).expanduser()
    if not data_dir.is_dir():
        raise ConfigError(f"{data_dir}: no such data folder (the shared data: vqa_rad/, medmnist/, pubmedqa/)")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: already exists and is not empty; choose a new --out folder (nothing is overwritten)")
    configs = load_recipe(Path(recipe_dir) if recipe_dir else default_recipe_dir(), data_dir, out, seed, max_steps)
    summary: dict = {"seed": seed, "data_dir": str(data_dir), "stages": {}}
    start = time.perf_counter()

    t0 = time.perf_counter()
    gemma_tok, siglip_tok = build_tokenizers(configs, out)
    summary["stages"]["tokenizers"] = {"seconds": round(time.perf_counter() - t0, 1)}
    log(f"tokenizers: {gemma_tok} ({GEMMA_VOCAB} ids), {siglip_tok} ({SIGLIP_VOCAB} pieces)")

    for stage in RECIPE_STAGES:
        if stage == "pretrain":
            init_medgemma(out / "siglip" / "final", gemma_tok, out / "init", seed)
        t0 = time.perf_counter()
        result = Trainer(configs[stage]).run()
        losses = [h["loss"] for h in result["history"] if "loss" in h]
        record = {"seconds": round(time.perf_counter() - t0, 1), "steps": configs[stage].train.steps,
                  "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}  # fmt: skip
        if stage == "rl":
            rewards = [h["reward"] for h in result["history"] if "reward" in h]
            record.update(first_reward=rewards[0] if rewards else None, last_reward=rewards[-1] if rewards else None)
        summary["stages"][stage] = record
        log(f"{stage}: {record}")

    summary["outputs"] = {"medsiglip": str(export(out / "siglip" / "final", out / "medsiglip-nano")),
                          "medgemma": str(export(out / "rl" / "final", out / "medgemma-nano"))}  # fmt: skip
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (out / "nano_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
