"""`openmedgemma eval`: run evaluation tasks, or list them. Top-level imports stay light."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model on medical benchmarks (MedGemma report protocol)",
        description="Evaluate a model with the MedGemma report's prompts and metrics. Writes "
        "<out>/<model>/<task>.json, predictions.jsonl (resumable), Markdown summaries and plots.",
    )
    parser.add_argument("tasks", nargs="*", metavar="TASK", help="task names (see --list)")
    parser.add_argument("--list", action="store_true", help="list the tasks and their options")
    parser.add_argument("--model", help="model folder (chat model, or MedSigLIP for embedding tasks); default: the bundled nano "
        "MedGemma for chat tasks and nano MedSigLIP for embedding tasks; with --endpoint: the served model id")
    parser.add_argument("--endpoint", metavar="URL", help="evaluate the model behind an OpenAI-compatible server "
                        "(openmedgemma serve, vLLM, ...), e.g. http://127.0.0.1:8000/v1, instead of a local folder")
    parser.add_argument("--api-key", metavar="KEY", help="API key for --endpoint (default: $OPENAI_API_KEY)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight with --endpoint (default 8)")
    parser.add_argument("--data-dir", help="folder holding the datasets (e.g. shared/data)")
    parser.add_argument("--out", default="results", help="output folder (default: results/)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples")
    parser.add_argument("--seed", type=int, default=0, help="generation and bootstrap seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, help="override the task's answer length")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for CIs (default 1000)")
    parser.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="[TASK:]KEY=VALUE",
        help="task option, for every task or one TASK (repeatable); see --list",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_command)
    return parser


def _parse_options(items: list[str], tasks: list[str]) -> dict[str, dict[str, str]]:
    from openmedgemma.errors import ConfigError

    per_task: dict[str, dict[str, str]] = {t: {} for t in tasks}
    for item in items:
        head, sep, value = item.partition("=")
        target, _, key = head.rpartition(":")
        if not sep or not key.strip():
            raise ConfigError(f"--task-option {item!r}: expected KEY=VALUE or TASK:KEY=VALUE")
        if target and target not in per_task:
            raise ConfigError(f"--task-option {item!r}: task {target!r} is not among {tasks}")
        for name in [target] if target else tasks:
            per_task[name][key.strip()] = value.strip()
    return per_task


def _print_list() -> None:
    from openmedgemma.eval.tasks import list_tasks

    for info in list_tasks():
        print(f"{info['name']:<24} {info['kind']:<9} {info['description']}")
        if info["options"]:
            opts = ", ".join(
                f"{k}={','.join(v) if isinstance(v, tuple) else v!s}" for k, v in info["options"].items()
            )
            print(f"{'':<24} {'':<9} options: {opts}")


def run_command(args) -> int:
    from openmedgemma.errors import ConfigError

    if args.list:
        _print_list()
        return 0
    if not args.tasks:
        raise ConfigError("give at least one TASK, or --list to see them")
    from openmedgemma.eval.tasks import check_task_names

    check_task_names(args.tasks)  # a misspelt task is named before anything else is asked for
    if not args.data_dir:
        raise ConfigError("--data-dir is required to run tasks")

    from openmedgemma.bundled import model_or_nano
    from openmedgemma.eval import loaders, runner
    from openmedgemma.eval.summary import fmt_estimate
    from openmedgemma.eval.tasks import get_task

    options = _parse_options(args.task_option, args.tasks)
    tasks = [get_task(name, args.data_dir, **options[name]) for name in args.tasks]
    for task in tasks:  # check every data folder before spending time on a model
        if task.kind == "chat":
            task.load_examples()
        else:
            task.load_split(task.options["split"])
    models = {}
    for task in tasks:
        if task.kind not in models:
            if args.endpoint:
                models[task.kind] = loaders.load_endpoint(args.endpoint, task.kind, api_key=args.api_key,
                                                          model=args.model, concurrency=args.concurrency)
            else:
                loader = loaders.load_chat_model if task.kind == "chat" else loaders.load_embedder
                kind = "medgemma" if task.kind == "chat" else "medsiglip"
                models[task.kind] = loader(str(model_or_nano(args.model, kind, "openmedgemma eval")))
        res = runner.run_task(
            task,
            models[task.kind],
            out_dir=args.out,
            limit=args.limit,
            seed=args.seed,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            n_boot=args.n_boot,
            progress=not args.no_progress,
        )
        metric = res["primary_metric"]
        unparseable = res["counts"].get("unparseable")
        extra = f", unparseable {unparseable}" if unparseable is not None else ""
        print(
            f"{res['task']}: {metric} {fmt_estimate(metric, res['metrics'][metric])} "
            f"(n={res['counts']['n']}{extra}) -> {res['files']['results']}",
            file=sys.stdout,
        )
    return 0
