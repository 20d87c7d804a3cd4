"""What an evaluation shows: the lines `kdcache evaluate` prints, and its plots (confusion matrix, reliability
diagram, comparison of several models)."""

from pathlib import Path

import numpy as np

from kdcache.runtime import slug

METRICS, CONFUSION_PNG, COMPARISON_PNG = "metrics.json", "confusion_matrix.png", "comparison.png"


RELIABILITY_PNG = "reliability_diagram.png"


def _megabytes(result: dict) -> str:
    return f"{result['weights_bytes'] / 1e6:.1f}" if result["weights_bytes"] else "?"


def describe(report: dict) -> str:
    """The human summary: per-class figures for one model, a side-by-side table for several."""
    results = report["models"]
    lines = [f"{slug(report['dataset'])} / {report['split']} ({report['rows']} rows)"]
    lines += _one_model(report, results[0]) if len(results) == 1 else _several_models(report, results)
    return "\n".join(lines)


def _one_model(report: dict, result: dict) -> list[str]:
    """The summary's lines for one model: its figures, its speed, its agreement with the teacher, per class."""
    speed = result["speed"]
    lines = [
        f"  model       {result['model']} ({result['model_class']}, {result['parameters']:,} parameters, "
        f"{_megabytes(result)} MB on disk)",
        (
            f"  accuracy    {result['accuracy']:.4f}    macro-F1 {result['macro_f1']:.4f}    "
            f"ECE {result['expected_calibration_error']:.4f} ({len(result['calibration_bins'])} bins)"
            + (f", on the {result['labeled_rows']} rows with a label" if "labeled_rows" in result else "")
            if result["accuracy"] is not None
            else f"  accuracy    none: {result['no_accuracy']}"
        ),
        f"  speed       {speed['forward_images_per_second']:.1f} img/s forward, "
        f"{speed['end_to_end_images_per_second']:.1f} img/s with decoding and preprocessing "
        f"(batch {speed['batch_size']}, {speed['device']})",
    ]
    if "latency" in result:
        latency = result["latency"]
        lines.append(
            f"  latency     batch 1: {latency['batch_1_latency_ms_median']:.2f} ms median, "
            f"{latency['batch_1_latency_ms_p90']:.2f} ms p90; batch {latency['throughput_batch']}: "
            f"{latency['throughput_images_per_second']:.1f} img/s (CPU, {_threads(latency)})"
        )
    if "teacher_agreement" in result:
        agreement = result["teacher_agreement"]
        lines += _ensemble_lines(result) or [
            f"  teacher     top-1 agreement {agreement['top1_agreement']:.4f}, KL(teacher||model) "
            f"{agreement['kl_teacher_student']:.4f} nats at T=1, teacher accuracy "
            f"{_figure(agreement['teacher_accuracy'])} (cache {agreement['cache']})"
        ]
    if result["accuracy"] is None:
        lines.append(f"  written to {report['output']}/ ({METRICS})")
        return lines
    width = max(len(name) for name in result["per_class"])
    lines.append(f"  {'class':<{width}}  precision  recall      f1  support")
    for name, figures in result["per_class"].items():
        lines.append(
            f"  {name:<{width}}  {figures['precision']:9.4f}  {figures['recall']:6.4f}  "
            f"{figures['f1']:6.4f}  {figures['support']:7d}"
        )
    lines.append(f"  written to {report['output']}/ ({METRICS}, {CONFUSION_PNG}, {RELIABILITY_PNG})")
    return lines


def _several_models(report: dict, results: list[dict]) -> list[str]:
    """The summary's lines for several models: one row each, side by side."""
    lines = []
    agreement = all("teacher_agreement" in result for result in results)
    timed = all("latency" in result for result in results)
    header = ["model", "params", "MB", "accuracy", "macro-F1", "ECE", "img/s fwd", "img/s e2e"] + (
        ["agree", "KL"] if agreement else []
    )
    header += ["ms b1", "ms p90", f"img/s b{results[0]['latency']['throughput_batch']}"] if timed else []
    table = [header]
    for result in results:
        row = [
            result["name"],
            f"{result['parameters'] / 1e6:.2f}M",
            _megabytes(result),
            _figure(result["accuracy"]),
            _figure(result.get("macro_f1")),
            _figure(result.get("expected_calibration_error")),
            f"{result['speed']['forward_images_per_second']:.1f}",
            f"{result['speed']['end_to_end_images_per_second']:.1f}",
        ]
        if agreement:
            row += [
                f"{result['teacher_agreement']['top1_agreement']:.4f}",
                f"{result['teacher_agreement']['kl_teacher_student']:.4f}",
            ]
        if timed:
            latency = result["latency"]
            row += [
                f"{latency['batch_1_latency_ms_median']:.2f}",
                f"{latency['batch_1_latency_ms_p90']:.2f}",
                f"{latency['throughput_images_per_second']:.1f}",
            ]
        table.append(row)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append(
            "  "
            + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        )
    if results[0]["accuracy"] is None:
        lines.append(f"  accuracy: none: {results[0]['no_accuracy']}")
    if timed:
        lines.append(
            "  ms b1, ms p90: batch-1 latency, median and p90 of 100 runs; img/s b"
            f"{results[0]['latency']['throughput_batch']}: throughput; the model alone, on the CPU, "
            f"{_threads(results[0]['latency'])}"
        )
    if agreement:
        lines.append("  agree: top-1 agreement with the cached teacher, KL: KL(teacher||model) at T=1 in nats")
        if all("teacher_agreements" in result for result in results):
            lines.append("  (the teacher is the ensemble of the caches; with each teacher alone:)")
            lines += [line for result in results for line in _ensemble_lines(result, result["name"] + ": ")]
    lines.append(f"  written to {report['output']}/ ({METRICS}, {COMPARISON_PNG}, one folder per model)")
    return lines


def _threads(latency: dict) -> str:
    return f"{latency['threads']} thread{'s' if latency['threads'] > 1 else ''}"


def _figure(value) -> str:
    """A figure of the report, or a dash where a split without labels has none."""
    return "-" if value is None else f"{value:.4f}"


def _ensemble_lines(result: dict, prefix: str = "") -> list[str]:
    """One line per teacher of an ensemble, then the ensemble's; none for a lone cache."""
    if "teacher_agreements" not in result:
        return []
    ensemble = result["teacher_agreement"]
    entries = [(f"teacher {i + 1}", entry, entry["cache"]) for i, entry in enumerate(result["teacher_agreements"])]
    weights = ", ".join(f"{weight:.3g}" for weight in ensemble["teacher_weights"])
    entries.append(("ensemble", ensemble, f"probabilities averaged at T=1, weights {weights}"))
    return [
        f"  {prefix}{label:<10}  top-1 agreement {entry['top1_agreement']:.4f}, KL(teacher||model) "
        f"{entry['kl_teacher_student']:.4f} nats at T=1, teacher accuracy {_figure(entry['teacher_accuracy'])} ({where})"
        for label, entry, where in entries
    ]


def plot_confusion(result: dict, path: Path) -> None:
    """Counts in each cell, colour by the share of the true label's rows, so that small classes stay readable."""
    from matplotlib.figure import Figure

    names, counts = result["label_names"], np.asarray(result["confusion_matrix"])
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(16.0, max(4.5, 0.55 * len(names) + 3))
    figure = Figure(figsize=(side + 1.2, side), dpi=120, layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 60:
        axes.set_xticks(range(len(names)), names, rotation=35, ha="right", rotation_mode="anchor")
        axes.set_yticks(range(len(names)), [f"{name} ({total})" for name, total in zip(names, counts.sum(axis=1))])
    if len(names) <= 30:
        for (row, column), count in np.ndenumerate(counts):
            axes.text(
                column,
                row,
                f"{count}",
                ha="center",
                va="center",
                color="white" if share[row, column] > 0.6 else "black",
            )
    axes.set_xlabel("predicted label")
    axes.set_ylabel("true label (rows)")
    axes.set_title(
        f"{result['name']} on {slug(result['dataset'])} {result['split']}\n"
        f"accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}",
        fontsize=10,
    )
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true label's rows")
    figure.savefig(path)


def plot_reliability(result: dict, path: Path) -> None:
    """Accuracy against mean confidence in each confidence bin, beside the diagonal of a calibrated model; a bar
    below the diagonal is overconfidence. The bins' share of the rows underneath, as ECE weighs them."""
    from matplotlib.figure import Figure

    table = result["calibration_bins"]
    lower, width = np.array([b["lower"] for b in table]), np.array([b["upper"] - b["lower"] for b in table])
    accuracy = np.array([b["accuracy"] if b["count"] else 0.0 for b in table])
    confidence = np.array([b["confidence"] if b["count"] else np.nan for b in table])
    share = np.array([b["count"] for b in table]) / max(1, sum(b["count"] for b in table))
    figure = Figure(figsize=(5.2, 6.2), dpi=120, layout="constrained")
    top, bottom = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.bar(lower, accuracy, width, align="edge", edgecolor="black", linewidth=0.5, label="accuracy")
    top.plot(confidence, accuracy, "o", color="tab:red", markersize=3, label="mean confidence of the bin")
    top.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(fontsize=8, loc="upper left", frameon=False)
    top.set_title(
        f"{result['name']} on {slug(result['dataset'])} {result['split']}\n"
        f"ECE {result['expected_calibration_error']:.4f} ({len(table)} bins)",
        fontsize=10,
    )
    bottom.bar(lower, share, width, align="edge", color="tab:gray")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (max softmax)")
    bottom.set_ylabel("share of rows")
    figure.savefig(path)


def plot_comparison(results: list[dict], path: Path, title: str) -> None:
    """Quality (accuracy, macro-F1, agreement with the teacher), size and speed of each model, side by side."""
    from matplotlib.figure import Figure

    names = [result["name"] for result in results]
    quality = {}
    if results[0]["accuracy"] is not None:  # a split without labels: agreement with the teacher alone
        quality = {"accuracy": [r["accuracy"] for r in results], "macro-F1": [r["macro_f1"] for r in results]}
    if all("teacher_agreement" in r for r in results):
        quality["top-1 agreement with teacher"] = [r["teacher_agreement"]["top1_agreement"] for r in results]
    figure = Figure(figsize=(max(10.0, 3.0 * len(results) + 4), 4.6), dpi=120, layout="constrained")
    left, middle, right = figure.subplots(1, 3, width_ratios=[2.2, 1, 1])
    positions, width = np.arange(len(results)), 0.8 / len(quality)
    for k, (label, values) in enumerate(quality.items()):
        bars = left.bar(positions + (k - (len(quality) - 1) / 2) * width, values, width, label=label)
        left.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    left.set_ylim(0, 1.22)  # room for the legend above the bars of a perfect model
    left.set_yticks(np.linspace(0, 1, 6))
    left.set_title("quality (higher is better)", fontsize=10)
    left.legend(fontsize=8, loc="upper center", ncols=len(quality), frameon=False)
    panels = [
        (middle, [r["parameters"] / 1e6 for r in results], "parameters (millions)", "{:.2f}".format),
        (
            right,
            [r["speed"]["forward_images_per_second"] for r in results],
            f"images/s, forward (batch {results[0]['speed']['batch_size']}, {results[0]['speed']['device']})",
            lambda value: f"{value:.0f}" if value >= 100 else f"{value:.1f}",
        ),
    ]
    for axes, values, label, fmt in panels:
        bars = axes.bar(positions, values, 0.6, color="tab:gray")
        axes.bar_label(bars, fmt=fmt, fontsize=8, padding=1)
        axes.set_title(label, fontsize=10)
        axes.margins(y=0.15)
    for axes in (left, middle, right):
        axes.set_xticks(positions, names, rotation=20, ha="right", rotation_mode="anchor", fontsize=8)
        axes.spines[["top", "right"]].set_visible(False)
    figure.suptitle(title)
    figure.savefig(path)
