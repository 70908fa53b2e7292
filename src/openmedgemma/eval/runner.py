"""Running a task against a model and writing the result files.

Layout under `out_dir` (default results/):

    <model>/<task>.json               metrics, CIs, counts, baselines, published numbers, protocol
    <model>/<task>/predictions.jsonl  raw answers, appended per batch (chat tasks; resumable)
    <model>/<task>/scored.jsonl       per-example parse and score (or per-image scores)
    <model>/<task>/summary.md         Markdown summary of this task
    <model>/<task>/confusion.png, roc.png
    <model>/summary.md                one table over every task of the model in this folder

`<task>` is the task name plus any non-default options (e.g. ``vqa-rad@split=official``).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

from openmedgemma.errors import ConfigError, OpenMedGemmaError

from . import plots, summary
from .metrics import DEFAULT_N_BOOT
from .predictions import PredictionStore
from .published import NOTES, published_for
from .tasks.base import Task, messages_digest

FORMAT_VERSION = 1


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@=,+-]+", "_", name).strip("._") or "model"


def result_paths(out_dir: Path | str, model_name: str, run_name: str) -> dict[str, Path]:
    model_dir = Path(out_dir) / safe_name(model_name)
    task_dir = model_dir / safe_name(run_name)
    return {
        "results": model_dir / f"{safe_name(run_name)}.json",
        "predictions": task_dir / "predictions.jsonl",
        "scored": task_dir / "scored.jsonl",
        "summary": task_dir / "summary.md",
        "confusion": task_dir / "confusion.png",
        "roc": task_dir / "roc.png",
        "model_summary": model_dir / "summary.md",
    }


def _check_model(task: Task, model: Any) -> None:
    needed = ("generate",) if task.kind == "chat" else ("embed_images", "embed_texts")
    missing = [m for m in needed if not callable(getattr(model, m, None))]
    if missing or not isinstance(getattr(model, "name", None), str):
        kind = "a ChatModel" if task.kind == "chat" else "an Embedder"
        raise ConfigError(
            f"task {task.name} needs {kind} (methods {list(needed)} and a name); "
            f"{type(model).__name__} lacks {missing or ['name']}"
        )


def generate_all(
    task: Task,
    model: Any,
    examples: list,
    store: PredictionStore,
    *,
    batch_size: int,
    max_new_tokens: int,
    seed: int,
    progress: bool,
) -> list[str]:
    """Answers for every example, reusing those already in `store`."""
    from tqdm import tqdm

    done = store.load()
    digests = {ex.id: messages_digest(ex.messages) for ex in examples}
    for ex in examples:
        if ex.id in done and done[ex.id].get("prompt_sha") != digests[ex.id]:
            raise ConfigError(
                f"{store.path}: the stored answer for id {ex.id} was given to a different prompt "
                "(data or prompt changed); delete the file to start over"
            )
    pending = [ex for ex in examples if ex.id not in done]
    bar = tqdm(
        total=len(examples),
        initial=len(examples) - len(pending),
        desc=task.run_name,
        unit="q",
        disable=not progress,
    )
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        outputs = task.generate(model, batch, max_new_tokens=max_new_tokens, seed=seed)
        if (
            not isinstance(outputs, list)
            or len(outputs) != len(batch)
            or not all(isinstance(o, str) or isinstance(o, dict) and isinstance(o.get("output"), str) for o in outputs)
        ):
            raise OpenMedGemmaError(
                f"model {model.name} returned {type(outputs).__name__} of length "
                f"{len(outputs) if hasattr(outputs, '__len__') else '?'} for a batch of {len(batch)}; "
                "expected a list of strings"
            )
        records = [
            {"id": ex.id, "prompt_sha": digests[ex.id], **(out if isinstance(out, dict) else {"output": out})}
            for ex, out in zip(batch, outputs)
        ]
        store.append(records)
        done.update((r["id"], r) for r in records)
        bar.update(len(batch))
    bar.close()
    return [done[ex.id]["output"] for ex in examples]


def run_task(
    task: Task,
    model: Any,
    *,
    out_dir: Path | str = "results",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    progress: bool = True,
) -> dict:
    """Evaluate `model` (a ChatModel, or an Embedder for embedding tasks) on `task`; write files."""
    _check_model(task, model)
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ConfigError("batch size and limit must be positive")
    paths = result_paths(out_dir, model.name, task.run_name)
    started = time.time()
    if task.kind == "embedding":
        scored = task.evaluate(
            model, limit=limit, seed=seed, batch_size=batch_size, n_boot=n_boot, progress=progress
        )
        baselines = task.baselines()
        generation = {}
    else:
        examples = task.load_examples()
        examples = examples[:limit] if limit else examples
        max_new_tokens = max_new_tokens or task.max_new_tokens
        header = {
            "format": FORMAT_VERSION,
            **task.config(),
            "model": model.name,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
        }
        outputs = generate_all(
            task,
            model,
            examples,
            PredictionStore(paths["predictions"], header),
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            seed=seed,
            progress=progress,
        )
        scored = task.score(examples, outputs, n_boot=n_boot, seed=seed)
        baselines = task.baselines(examples, n_boot=n_boot, seed=seed)
        generation = {
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy (the model's default)",
            "batch_size": batch_size,
        }
    results = {
        "task": task.run_name,
        "task_name": task.name,
        "kind": task.kind,
        "model": model.name,
        "options": task.config()["options"],
        "data_dir": str(task.data_dir),
        "data_info": task.data_info,
        "limit": limit,
        "seed": seed,
        **({"generation": generation} if generation else {}),
        "ci_method": f"percentile bootstrap, n_boot={n_boot}, seed={seed}",
        "primary_metric": task.primary_metric,
        "metrics": scored["metrics"],
        "breakdown": scored.get("breakdown", {}),
        "counts": scored["counts"],
        "confusion": scored.get("confusion", []),
        "baselines": baselines,
        "published": published_for(task.name),
        "published_note": NOTES.get(task.name, ""),
        "notes": task.notes(),
        "seconds": round(time.time() - started, 2),
    }
    write_outputs(paths, results, scored)
    return results


def json_safe(value):
    """NaN / infinity -> None (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_outputs(paths: dict[str, Path], results: dict, scored: dict) -> None:
    paths["summary"].parent.mkdir(parents=True, exist_ok=True)
    files = {"results": paths["results"], "summary": paths["summary"], "scored": paths["scored"]}
    if paths["predictions"].is_file():
        files["predictions"] = paths["predictions"]
    if results["confusion"]:
        files["confusion"] = plots.plot_confusions(results["confusion"], paths["confusion"])
    if scored.get("roc"):
        files["roc"] = plots.plot_rocs(scored["roc"], paths["roc"], f"{results['task']} - {results['model']}")
    results["files"] = {k: str(v) for k, v in files.items()}
    results.update(json_safe(results))
    with open(paths["scored"], "w", encoding="utf-8") as fh:
        for row in scored.get("per_example", []):
            fh.write(json.dumps(json_safe(row), ensure_ascii=False, allow_nan=False) + "\n")
    text = json.dumps(results, indent=2, ensure_ascii=False, allow_nan=False)
    paths["results"].write_text(text + "\n", encoding="utf-8")
    paths["summary"].write_text(summary.task_summary(results), encoding="utf-8")
    model_dir = paths["results"].parent
    everything = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(model_dir.glob("*.json"))]
    everything = [r for r in everything if isinstance(r, dict) and "metrics" in r and "task" in r]
    paths["model_summary"].write_text(summary.model_summary(everything), encoding="utf-8")
