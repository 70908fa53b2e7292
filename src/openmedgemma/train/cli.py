"""`openmedgemma train {siglip,pretrain,sft,distill,rl} --config FILE.toml [--resume DIR] [--data-dir DIR]`.

Top-level imports stay light (no torch): the config is validated before anything heavy is imported.
Multi-process: `torchrun --standalone --nproc_per_node N -m openmedgemma.train.cli train sft --config FILE.toml`
(or, the same, `-m openmedgemma.cli train ...`).
"""

from __future__ import annotations

import argparse

STAGE_HELP = {
    "siglip": "tune MedSigLIP on image-caption pairs (sigmoid loss)",
    "pretrain": "continue pretraining MedGemma on captions and medical text",
    "sft": "supervised fine-tuning on QA pairs (loss on the answer only; LoRA / QLoRA optional)",
    "distill": "distil from stored sparse teacher logits",
    "rl": "GRPO with verifiable rewards",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train or fine-tune MedGemma / MedSigLIP",
                                   description="Train one stage of the MedGemma recipe from a TOML config.")
    stages = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, text in STAGE_HELP.items():
        p = stages.add_parser(name, help=text, description=text)
        p.add_argument("--config", required=True, metavar="FILE.toml", help="the run's TOML config")
        p.add_argument("--resume", metavar="DIR", help="continue the run in DIR (its newest checkpoint) or a checkpoint folder")
        p.add_argument("--data-dir", metavar="DIR", help="root for relative data paths (overrides data.data_dir)")
        p.add_argument("--check", action="store_true", help="validate the config and exit")
        p.set_defaults(func=run)
    p = stages.add_parser("teacher-store", help="write the sparse teacher logits the distill stage trains on",
                          description="Run a teacher MedGemma over the (text) data sources of an sft config and store "
                          "k teacher probabilities per answer token (the 1.5 report: 256, sampled by probability).")
    p.add_argument("--teacher", required=True, metavar="DIR", help="teacher checkpoint folder (with its tokenizer.json)")
    p.add_argument("--config", required=True, metavar="FILE.toml", help="an sft config: its data sources are the text")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder for the store")
    p.add_argument("--k", type=int, default=256, help="teacher ids kept per token (default 256)")
    p.add_argument("--selection", choices=["sample", "topk"], default="sample")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", metavar="DIR", help="root for relative data paths (overrides data.data_dir)")
    p.set_defaults(func=teacher_store)
    p = stages.add_parser("nano", help="train the nano reference models from scratch (the whole recipe, ~13 min on 2 CPUs)",
                          description="Run the MedGemma recipe in miniature on the shared data: tokenizers, nano "
                          "MedSigLIP (siglip), then nano MedGemma (pretrain, sft, rl). The stage configs are "
                          "configs/nano/*.toml. Writes OUT/medgemma-nano and OUT/medsiglip-nano.")
    p.add_argument("--data-dir", required=True, metavar="DIR", help="the shared data folder (vqa_rad/, medmnist/, pubmedqa/)")
    p.add_argument("--out", default="runs/nano", metavar="DIR", help="new folder for the run (default runs/nano)")
    p.add_argument("--recipe", metavar="DIR", help="folder of the stage configs (default: the checkout's configs/nano)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--max-steps", type=int, default=0, metavar="N", help="cap every stage at N steps (a quick trial run)")
    p.set_defaults(func=nano)
    parser.set_defaults(func=lambda args: (parser.print_help(), 1)[1])


def nano(args: argparse.Namespace) -> int:
    import torch

    from openmedgemma.errors import ConfigError
    from openmedgemma.train.nano import run_nano

    if args.max_steps < 0 or args.threads < 0:
        raise ConfigError("--max-steps and --threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = run_nano(args.data_dir, args.out, args.recipe, seed=args.seed, max_steps=args.max_steps)
    print(f"nano MedGemma: {summary['outputs']['medgemma']}")
    print(f"nano MedSigLIP: {summary['outputs']['medsiglip']}")
    print(f"total: {summary['seconds'] / 60:.1f} min")
    return 0


def run(args: argparse.Namespace) -> int:
    from openmedgemma.train.config import load_config

    overrides = {"data.data_dir": args.data_dir} if args.data_dir else None
    cfg = load_config(args.config, args.stage, overrides)
    if args.check:
        print(f"{args.config}: valid {cfg.stage} config ({len(cfg.data.sources)} data source(s), {cfg.train.steps} steps)")
        return 0
    from openmedgemma.train.loop import Trainer

    summary = Trainer(cfg, resume=args.resume).run()
    for kind, path in summary["outputs"].items():
        print(f"{kind}: {path}")
    return 0


def teacher_store(args: argparse.Namespace) -> int:
    from openmedgemma.errors import ConfigError
    from openmedgemma.train.config import load_config

    if args.k < 1:
        raise ConfigError(f"--k must be >= 1, got {args.k}")
    overrides = {"data.data_dir": args.data_dir} if args.data_dir else None
    cfg = load_config(args.config, "sft", overrides)
    import torch

    from openmedgemma.model.medgemma import MedGemma
    from openmedgemma.tokenizer import Tokenizer
    from openmedgemma.train.collate import LMCollator
    from openmedgemma.train.data import load_source, source_args
    from openmedgemma.train.distill import write_teacher_store

    tok = Tokenizer.from_pretrained(args.teacher)
    teacher = MedGemma.from_pretrained(args.teacher, dtype=cfg.model.dtype, device=args.device)
    examples = [ex for s in cfg.data.sources for ex in load_source(*source_args(s, cfg.data.data_dir or "."))]
    collator = LMCollator(tok, mode="chat", max_length=cfg.data.max_length, multimodal=False)
    with torch.inference_mode():
        out = write_teacher_store(args.out, teacher, collator, examples, k=args.k, selection=args.selection,
                                  batch_size=args.batch_size, seed=cfg.seed, device=args.device, progress=True)
    print(f"teacher store: {out} ({len(examples)} sequences)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The root `openmedgemma` command (it registers these sub-commands): `python -m openmedgemma.train.cli` as
    torchrun launches it, and the tests."""
    from openmedgemma.cli import main as root_main

    return root_main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
