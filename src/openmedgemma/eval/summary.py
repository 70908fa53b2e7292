"""Markdown summaries: one per task run and one per model folder, with the published numbers
(report v4) and the majority / prior baselines beside ours."""

from __future__ import annotations

from .published import NOTES, PERCENT_METRICS


def fmt_value(metric: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if "auc" in metric else f"{100 * value:.1f}"


def fmt_estimate(metric: str, est: dict | None) -> str:
    if not est or est.get("value") is None:
        return "n/a"
    text = fmt_value(metric, est["value"])
    if est.get("ci_low") is not None:
        text += f" [{fmt_value(metric, est['ci_low'])}, {fmt_value(metric, est['ci_high'])}]"
    return text


def _published_cell(metric: str, value: float) -> str:
    return f"{value:.1f}" if metric in PERCENT_METRICS else f"{value:.3f}"


def task_summary(results: dict) -> str:
    metrics, published = results["metrics"], results.get("published", {})
    lines = [
        f"# {results['task']} - {results['model']}",
        "",
        f"{results['counts']['n']} examples; 95% CI: {results['ci_method']}. "
        "Accuracy / F1 in %, AUC as a fraction.",
        "",
    ]
    baselines = results.get("baselines", {})
    pub_models = list(dict.fromkeys(m for values in published.values() for m in values))
    header = ["metric", "ours [95% CI]"] + list(baselines) + [f"published {m}" for m in pub_models]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric in list(metrics) + [m for m in published if m not in metrics]:
        row = [metric, fmt_estimate(metric, metrics.get(metric)) if metric in metrics else "not computed"]
        row += [fmt_value(metric, (b.get(metric) or {}).get("value")) for b in baselines.values()]
        row += [
            _published_cell(metric, published[metric][m]) if m in published.get(metric, {}) else "-"
            for m in pub_models
        ]
        lines.append("| " + " | ".join(row) + " |")
    counts = results["counts"]
    if "unparseable" in counts:
        lines += ["", f"Unparseable answers (counted as wrong): {counts['unparseable']} of {counts['n']}."]
    if results.get("published_note"):
        lines += ["", f"Published numbers: {results['published_note']}."]
    for name, table in results.get("breakdown", {}).items():
        lines += ["", f"## {name.replace('_', ' ')}", "", "| key | value |", "|---|---|"]
        for key, value in table.items():
            lines.append(f"| {key} | {_breakdown_cell(value)} |")
    if results.get("data_info"):
        lines += ["", "## data", ""] + [f"- {k}: {v}" for k, v in results["data_info"].items()]
    lines += ["", "## protocol", ""] + [f"- {note}" for note in results.get("notes", [])]
    return "\n".join(lines) + "\n"


def _breakdown_cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict) and "value" in value:
        return fmt_estimate("accuracy", value) + f" (n={value['n']})"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_breakdown_cell(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def model_summary(all_results: list[dict]) -> str:
    """One table over every task run of a model."""
    if not all_results:
        return ""
    model = all_results[0]["model"]
    cols = ["MedGemma 4B", "Gemma 3 4B", "MedGemma 27B", "Gemma 3 27B"]
    lines = [
        f"# Evaluation summary - {model}",
        "",
        "Ours with 95% bootstrap CI; baseline = the best constant answer (majority / prior); "
        "published = MedGemma report v4. Accuracy / F1 in %, AUC as a fraction.",
        "",
        "| task | n | metric | ours [95% CI] | unparseable | baseline | " + " | ".join(cols) + " | note |",
        "|" + "---|" * (7 + len(cols)),
    ]
    for res in sorted(all_results, key=lambda r: r["task"]):
        shown = [res["primary_metric"]] + [m for m in res.get("published", {}) if m != res["primary_metric"]]
        for metric in shown:
            est = res["metrics"].get(metric)
            base = [
                b[metric]["value"]
                for b in res.get("baselines", {}).values()
                if metric in b and b[metric]["value"] is not None
            ]
            pub = res.get("published", {}).get(metric, {})
            row = [
                res["task"],
                str(res["counts"]["n"]),
                metric,
                fmt_estimate(metric, est) if est else "not computed",
                str(res["counts"].get("unparseable", "-")),
                fmt_value(metric, max(base)) if base else "-",
                *[_published_cell(metric, pub[c]) if c in pub else "-" for c in cols],
                "; ".join(
                    [NOTES.get(res["task_name"], "")] * bool(NOTES.get(res["task_name"]))
                    + [
                        f"published {k}: {_published_cell(metric, v)}"
                        for k, v in pub.items()
                        if k not in cols
                    ]
                ),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
