"""The comparison report: ``report.md`` (accuracy and cost tables), PNG plots, and ``report.json`` behind them.

Accuracy: the cases of all compared folds pooled per trainer (each validation case belongs to one fold), per label or
region and metric the mean and standard deviation over the cases where the metric is defined (NaN cases, see
``nnunet_ext.evaluation.metrics``, are left out and counted). Cost: ``nnunet_ext.evaluation.cost``'s numbers with
ratios to ``nnUNetTrainer``. Plots: ``metrics.png`` (one panel per metric: a bar per trainer and label at the mean,
the cases as points) and ``dice_vs_step_time.png`` (mean foreground Dice against the median training-step time).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from nnunet_ext.evaluation.cost import COST_ROWS, cost_table
from nnunet_ext.evaluation.metrics import METRICS

FIGURES = ("metrics.png", "dice_vs_step_time.png")


def collect(summaries: Dict[str, Dict[int, str]]) -> dict:
    """Per trainer: the per-case rows of every fold and the table ``label -> metric -> mean/std/n/nan``."""
    per_case, table = {}, {}
    for trainer, folds in summaries.items():
        rows = []
        for fold, path in folds.items():
            for case in json.loads(Path(path).read_text())["metric_per_case"]:
                name = Path(case["prediction_file"]).name
                rows += [{"case": name, "fold": int(fold), "label": label, **{m: values[m] for m in METRICS}}
                         for label, values in case["metrics"].items()]
        per_case[trainer] = rows
        table[trainer] = {}
        for label in dict.fromkeys(r["label"] for r in rows):
            table[trainer][label] = {}
            for metric in METRICS:
                values = np.array([r[metric] for r in rows if r["label"] == label], dtype=float)
                finite = values[~np.isnan(values)]
                table[trainer][label][metric] = {
                    "mean": float(finite.mean()) if finite.size else None,
                    "std": float(finite.std()) if finite.size else None,
                    "n": int(finite.size), "nan": int(values.size - finite.size)}
    return {"per_case": per_case, "accuracy": table}


def foreground_dice(accuracy: dict, trainer: str) -> Optional[float]:
    means = [v["Dice"]["mean"] for v in accuracy[trainer].values() if v["Dice"]["mean"] is not None]
    return float(np.mean(means)) if means else None


def _cell(entry: dict) -> str:
    if entry["mean"] is None:
        return f"n/a ({entry['nan']} NaN)"
    text = f"{entry['mean']:.4f} ± {entry['std']:.4f}"
    return text + (f" ({entry['nan']} NaN)" if entry["nan"] else "")


def markdown(settings: dict, data: dict, cost: Optional[dict]) -> str:
    accuracy = data["accuracy"]
    lines = [f"# Comparison on {settings['dataset']} ({settings['configuration']})", "",
             f"Trainers {', '.join(settings['trainers'])}; plans {settings['plans']}; folds "
             f"{', '.join(map(str, settings['folds']))}; {settings['cases']} cases; prediction on {settings['device']}"
             f"{' without' if settings['disable_tta'] else ' with'} test-time mirroring.", "",
             "## Accuracy", "",
             "Mean ± standard deviation over the cases (all folds pooled); distances (HD95, ASSD) in mm, RVD signed "
             "as a fraction. A metric is NaN where it is undefined (e.g. HD95 with an empty mask); those cases are "
             "left out of the mean and counted in brackets.", "",
             "| trainer | label | cases | " + " | ".join(METRICS) + " |", "|---" * (3 + len(METRICS)) + "|"]
    for trainer, labels in accuracy.items():
        for label, metrics in labels.items():
            cases = metrics["Dice"]["n"] + metrics["Dice"]["nan"]
            lines.append(f"| {trainer} | {label} | {cases} | " + " | ".join(_cell(metrics[m]) for m in METRICS) + " |")
    lines += ["", "![metrics](metrics.png)", ""]
    lines += ["## Cost", ""]
    if cost is None:
        lines += ["Not measured (`--no-cost`).", ""]
    else:
        s = cost["settings"]
        lines += [f"Each network built from the plan ({s['configuration']}, patch {s['patch']}, batch {s['batch']}, "
                  f"{s['input_channels']} input channel(s), {s['num_classes']} outputs) on {s['device']}, each in a "
                  f"fresh process, in one run; ratios to nnU-Net's default network (`nnUNetTrainer`). Step time: "
                  f"median of {s['repeats']} forward+backward passes; throughput: batch-1 sliding-window patches.", "",
                  "| network | " + " | ".join(title for title, _, _ in COST_ROWS) + " |",
                  "|---" * (1 + len(COST_ROWS)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cost_table(cost["results"])]
        lines += ["", "![Dice against step time](dice_vs_step_time.png)", ""]
    return "\n".join(lines)


def plot_metrics(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    accuracy, per_case = data["accuracy"], data["per_case"]
    trainers = list(accuracy)
    labels = list(dict.fromkeys(label for t in trainers for label in accuracy[t]))
    columns = 4
    fig, axes = plt.subplots(math.ceil(len(METRICS) / columns), columns, figsize=(4 * columns, 7), squeeze=False)
    width = 0.8 / len(trainers)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes.flat, METRICS):
        for t, trainer in enumerate(trainers):
            for position, label in enumerate(labels):
                x = position - 0.4 + width * (t + 0.5)
                entry = accuracy[trainer].get(label, {}).get(metric)
                if entry and entry["mean"] is not None:
                    ax.bar(x, entry["mean"], width * 0.9, color=colours[t % len(colours)], alpha=0.6,
                           label=trainer if position == 0 else None)
                values = [r[metric] for r in per_case[trainer] if r["label"] == label and not math.isnan(r[metric])]
                ax.scatter(x + rng.uniform(-width / 4, width / 4, len(values)), values, s=12, color="black", zorder=3)
        ax.set_xticks(range(len(labels)), [f"label {label}" for label in labels])
        ax.set_title(metric + (" (mm)" if metric in ("HD95", "ASSD") else ""))
        ax.axhline(0, color="grey", linewidth=0.5)
    for ax in list(axes.flat)[len(METRICS):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    list(axes.flat)[-1].legend(handles, names, loc="center", title="bars: mean; points: cases")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_dice_vs_step_time(data: dict, cost: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for trainer in data["accuracy"]:
        dice = foreground_dice(data["accuracy"], trainer)
        step = cost["results"][trainer]["step_s"]
        if dice is not None:
            ax.scatter(step, dice, s=40)
            ax.annotate(trainer, (step, dice), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(f"median training-step time (s, {cost['settings']['device']}, batch {cost['settings']['batch']})")
    ax.set_ylabel("mean foreground Dice")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _replace_all(staged: List[tuple]) -> None:
    for tmp, final in staged:
        os.replace(tmp, final)


def write_report(output, settings: dict, summaries: Dict[str, Dict[int, str]], cost: Optional[dict]) -> Path:
    """Write ``report.md``, ``report.json`` and the PNGs into ``output`` (each file complete or absent)."""
    output = Path(output)
    data = collect(summaries)
    staged = []

    def stage(name: str) -> Path:
        tmp = output / f".{name}.tmp{Path(name).suffix}"
        staged.append((tmp, output / name))
        return tmp

    plot_metrics(data, stage("metrics.png"))
    figures = ["metrics.png"]
    if cost is not None:
        plot_dice_vs_step_time(data, cost, stage("dice_vs_step_time.png"))
        figures.append("dice_vs_step_time.png")
    report = {"settings": settings, "summaries": summaries, **data, "cost": cost, "figures": figures,
              "foreground_dice": {t: foreground_dice(data["accuracy"], t) for t in data["accuracy"]}}
    stage("report.json").write_text(json.dumps(report, indent=2, sort_keys=False))
    stage("report.md").write_text(markdown(settings, data, cost))
    _replace_all(staged)
    return output / "report.md"
