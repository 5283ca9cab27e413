"""Markdown tables, target checks and Altair charts from the raw numbers of
:mod:`experiments.fashion_mnist` (its ``results.json``). Pure functions: a results dict in, a
string or a chart out; no torch.

A *run* is one record ``{"stage", "seed", "method", "n", "kept", "accuracy_before",
"accuracy", ...}``: layer ``stage`` ("conv1" or "conv2") kept at ``n`` kernels by ``method``
("proposal:<strategy>", "magnitude", "random", or "unreduced" for the control that keeps every
kernel), retrained with seed ``seed``; accuracies in [0, 1] on the test set, before and after the
frozen retraining.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import altair as alt

__all__ = [
    "METHOD_LABELS",
    "checks_table",
    "fig8_check",
    "fig8_table",
    "method_label",
    "pipeline_table",
    "selection_chart",
    "selection_table",
    "summarize",
    "target_checks",
]

Run = Mapping[str, Any]

#: Readable names of the selection methods.
METHOD_LABELS = {
    "magnitude": "L1 magnitude (torch-pruning)",
    "random": "random",
    "unreduced": "unreduced (all kernels)",
}


def method_label(method: str) -> str:
    """"proposal:paper" -> "proposal (paper)"; other methods from :data:`METHOD_LABELS`."""
    if method.startswith("proposal:"):
        return f"proposal ({method.split(':', 1)[1]})"
    return METHOD_LABELS.get(method, method)


def summarize(runs: Iterable[Run], key: str = "accuracy") -> dict[tuple[str, str, int], dict[str,
                                                                                             Any]]:
    """Per (stage, method, n): mean, sample standard deviation, min, max and count of ``key``."""
    groups: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in runs:
        if r.get(key) is not None:
            groups[(str(r["stage"]), str(r["method"]), int(r["n"]))].append(float(r[key]))
    out = {}
    for k, values in groups.items():
        out[k] = {
            "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
            "count": len(values),
        }
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _count(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _cell(s: Mapping[str, Any] | None, bold: bool = False) -> str:
    if s is None:
        return "–"
    text = f"{_pct(s['mean'])} ± {_pct(s['sd'])}"
    if s["count"] < 2:
        text = f"{_pct(s['mean'])} (1 seed)"
    return f"**{text}**" if bold else text


def _methods(runs: Sequence[Run], stage: str) -> list[str]:
    found = {str(r["method"]) for r in runs if r["stage"] == stage and r["method"] != "unreduced"}
    proposals = sorted(m for m in found if m.startswith("proposal:"))
    return proposals + [m for m in ("magnitude", "random") if m in found] + sorted(
        found - set(proposals) - {"magnitude", "random"})


def selection_table(results: Mapping[str, Any], stage: str, key: str = "accuracy") -> str:
    """Markdown: one row per kernel count, one column per method, test accuracy (%) as mean ±
    sample sd over seeds; the best mean of each row in bold; first row the unreduced control."""
    runs = [r for r in results["runs"] if r["stage"] == stage]
    methods = _methods(runs, stage)
    s = summarize(runs, key)
    k = int(results["stages"][stage]["kernels"])
    header = "| kept of " + str(k) + " | " + " | ".join(method_label(m) for m in methods) + " |"
    lines = [header, "|---:|" + "---:|" * len(methods)]
    control = s.get((stage, "unreduced", k))
    if control is not None:
        lines.append(f"| {k} (unreduced) | " + " | ".join(_cell(control) for _ in methods) + " |")
    counts = sorted({int(r["n"]) for r in runs if r["method"] != "unreduced"}, reverse=True)
    for n in counts:
        cells = [s.get((stage, m, n)) for m in methods]
        best = max((c["mean"] for c in cells if c is not None), default=math.nan)
        lines.append(f"| {n} | " + " | ".join(
            _cell(c, bold=c is not None and c["mean"] == best) for c in cells) + " |")
    return "\n".join(lines)


def pipeline_table(results: Mapping[str, Any], strategy: str) -> str:
    """Markdown: the paper's sequence (Sec. V-A) with one proposal strategy: the trained model,
    conv1 reduced, then conv2 reduced (from conv1 at ``stage2_from`` kernels), with parameter
    counts and test accuracy before and after the frozen retraining epoch."""
    method = f"proposal:{strategy}"
    after = summarize(results["runs"], "accuracy")
    before = summarize(results["runs"], "accuracy_before")
    k1 = int(results["stages"]["conv1"]["kernels"])
    k2 = int(results["stages"]["conv2"]["kernels"]) if "conv2" in results["stages"] else k1
    from_n = int(results["config"]["stage2_from"])
    params = results.get("parameters", {})
    lines = [
        "| step | conv1 kernels | conv2 kernels | parameters | test acc. before retraining (%) "
        "| test acc. after 1 frozen epoch (%) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| trained model ({results['config']['epochs']} epochs) | {k1} | {k2} | "
        f"{_count(params.get(f'{k1}x{k2}'))} | – | {_pct(results['base']['accuracy'])} |",
    ]
    for stage, fixed in (("conv1", None), ("conv2", from_n)):
        counts = sorted({int(r["n"]) for r in results["runs"]
                         if r["stage"] == stage and r["method"] == method}, reverse=True)
        for n in counts:
            a, b = after.get((stage, method, n)), before.get((stage, method, n))
            c1, c2 = (n, k2) if stage == "conv1" else (fixed, n)
            step = (f"conv1 → {n}" if stage == "conv1"
                    else f"conv1 → {fixed}, then conv2 → {n}")
            lines.append(f"| {step} | {c1} | {c2} | {_count(params.get(f'{c1}x{c2}'))} | "
                         f"{_cell(b)} | {_cell(a)} |")
    return "\n".join(lines)


def fig8_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Markdown for the kernel selectivity experiment (Fig. 8): one row per class."""
    lines = [
        "| class | selective kernels | not selective | acc. all kernels (%) | "
        "only selective (%) | only not selective (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['class']} | {r['selective']} | {r['not_selective']} | "
            f"{_pct(r['accuracy_all'])} | {_pct(r['accuracy_selective'])} | "
            f"{_pct(r['accuracy_not_selective'])} |"
        )
    if records:
        mean = {k: statistics.fmean(float(r[k]) for r in records)
                for k in ("accuracy_all", "accuracy_selective", "accuracy_not_selective")}
        lines.append(f"| **mean over classes** | | | {_pct(mean['accuracy_all'])} | "
                     f"{_pct(mean['accuracy_selective'])} | "
                     f"{_pct(mean['accuracy_not_selective'])} |")
    return "\n".join(lines)


def target_checks(results: Mapping[str, Any], strategy: str) -> list[dict[str, Any]]:
    """The issue's targets, measured: one record each with ``target``, ``measured`` (text) and
    ``met`` (bool, or None when the runs it needs are missing)."""
    s = summarize(results["runs"])
    method = f"proposal:{strategy}"
    checks: list[dict[str, Any]] = []
    base = float(results["base"]["accuracy"])
    five = s.get(("conv1", method, 5))
    checks.append({
        "target": f"conv1 kept at 5: <= 0.5 pp below the unreduced model ({method_label(method)})",
        "measured": "not run" if five is None else
        f"{_pct(five['mean'])}% vs {_pct(base)}% ({100 * (five['mean'] - base):+.2f} pp)",
        "met": None if five is None else bool(base - five["mean"] <= 0.005),
    })
    for stage in results["stages"]:
        for n in (4, 3):
            ours = s.get((stage, method, n))
            peers = {m: s.get((stage, m, n)) for m in ("magnitude", "random")}
            if ours is None or any(p is None for p in peers.values()):
                checks.append({"target": f"{stage} at {n}: proposal mean >= magnitude and random",
                               "measured": "not run", "met": None})
                continue
            text = ", ".join(f"{m} {_pct(p['mean'])}" for m, p in peers.items() if p is not None)
            checks.append({
                "target": f"{stage} at {n}: proposal mean >= magnitude and random",
                "measured": f"proposal {_pct(ours['mean'])}, {text}",
                "met": all(ours["mean"] >= p["mean"] for p in peers.values() if p is not None),
            })
    fig8 = results.get("fig8")
    if fig8:
        checks.append(fig8_check(fig8))
    return checks


def fig8_check(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The Fig. 8 target on one model's records: met when keeping only the selective kernels
    changes the class accuracy by more than -2 pp on average over classes, and keeping only the
    non-selective ones by less than -10 pp (and less than the selective ones)."""
    d_sel = statistics.fmean(r["accuracy_selective"] - r["accuracy_all"] for r in records)
    d_not = statistics.fmean(r["accuracy_not_selective"] - r["accuracy_all"] for r in records)
    worst_sel = min(r["accuracy_selective"] - r["accuracy_all"] for r in records)
    return {
        "target": "Fig. 8: only selective kernels keep class accuracy; only non-selective "
                  "ones drop it clearly",
        "measured": f"mean change: only selective {100 * d_sel:+.2f} pp (worst class "
                    f"{100 * worst_sel:+.2f} pp), only not selective {100 * d_not:+.2f} pp",
        "met": bool(d_sel > -0.02 and d_not < -0.10 and d_not < d_sel),
        "change_selective": d_sel,
        "change_not_selective": d_not,
    }


def checks_table(checks: Sequence[Mapping[str, Any]]) -> str:
    """Markdown for :func:`target_checks`."""
    verdict = {True: "met", False: "**not met**", None: "not measured"}
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {c['target']} | {c['measured']} | {verdict[c['met']]} |" for c in checks]
    return "\n".join(lines)


def selection_chart(results: Mapping[str, Any], key: str = "accuracy") -> alt.FacetChart:
    """Test accuracy against kernels kept, one line per method (mean over seeds, bars min to
    max; methods side by side around each count), one panel per reduced layer; the dashed rule
    is the unreduced control (all kernels, the same retraining)."""
    s = summarize(results["runs"], key)
    methods = sorted({m for (_, m, _) in s if m != "unreduced"})
    offset = {m: 0.12 * (i - (len(methods) - 1) / 2) for i, m in enumerate(methods)}
    rows = [
        {"layer": stage, "method": method_label(method), "kept": n, "x": n + offset[method],
         "mean": v["mean"], "min": v["min"], "max": v["max"], "seeds": v["count"]}
        for (stage, method, n), v in s.items() if method != "unreduced"
    ]
    rules = [{"layer": stage, "rule": v["mean"], "what": "unreduced, same retraining"}
             for (stage, method, _), v in s.items() if method == "unreduced"]
    labels = [method_label(m) for m in methods]
    color = alt.Color("method:N", sort=labels, title="selection")
    x = alt.X("x:Q", title="kernels kept", scale=alt.Scale(zero=False, nice=False, padding=14),
              axis=alt.Axis(tickMinStep=1, format="d"))
    y = alt.Y("mean:Q", title="test accuracy", scale=alt.Scale(zero=False),
              axis=alt.Axis(format="%"))
    valid = alt.Chart().transform_filter("isValid(datum.method)")
    lines = valid.mark_line(point=True).encode(
        x=x, y=y, color=color,
        tooltip=["layer:N", "method:N", "kept:Q", alt.Tooltip("mean:Q", format=".2%"),
                 alt.Tooltip("min:Q", format=".2%"), alt.Tooltip("max:Q", format=".2%"),
                 "seeds:Q"],
    )
    bars = valid.mark_errorbar(ticks=True).encode(
        x=x, y=alt.Y("min:Q", title="test accuracy"), y2="max:Q", color=color)
    layers: list[Any] = [bars, lines]
    if rules:
        layers.append(alt.Chart().transform_filter("isValid(datum.rule)").mark_rule(
            strokeDash=[4, 3], color="black").encode(
            y=alt.Y("rule:Q"), tooltip=["what:N", alt.Tooltip("rule:Q", format=".2%")]))
    return alt.layer(*layers, data=alt.Data(values=rows + rules)).properties(
        width=320, height=260
    ).facet(column=alt.Column("layer:N", title="reduced layer")).resolve_scale(
        y="independent"
    ).properties(title="Test accuracy after one frozen retraining epoch (mean; bars: min-max "
                       "over seeds; dashed: unreduced control)")
