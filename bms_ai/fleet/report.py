"""The fleet loop's HTML report: one self-contained page (plots embedded as PNG) from plain dicts and tables.

The lead feeds it from the pipeline; every section is optional and appears only when its input is given:

- ``soh``: ``[{"vehicle": str, "cell_type": str, "soh": float | [per cell]}]`` -> fleet SOH histogram per cell type;
- ``gate``: the ``gate.json`` record of ``bms_ai.fleet.gate`` -> before/after SOC RMSE per vehicle class and
  per vehicle, with Coulomb counting from the true start alongside, and the verdict with its reasons;
- ``alarms``: ``[{"vehicle": str, "kind": str, "level": str, "score": float?}]`` (fault monitor events,
  fleet-relative anomaly ranking) -> counts per kind and level, the top of the ranking;
- ``labels``: ``[{"vehicle": str, "rmse": float, "coverage": float?, "errors": [...]?, "sigmas": [...]?}]``
  (pseudo-labels against simulator truth) -> RMSE per vehicle and |error| against claimed sigma.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path


def _png(fig) -> str:
    """The figure as an embedded <img> (base64 PNG), closed afterwards."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def _table(head: list[str], rows: list[list]) -> str:
    """An HTML table of already formatted cells (escaped here)."""
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * float(x):.2f}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _soh_plot(by_type: dict[str, list[float]]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(list(by_type.values()), bins=20, stacked=True, label=list(by_type))
    ax.set_xlabel("SOH (capacity / design)")
    ax.set_ylabel("cells")
    ax.legend(fontsize=8)
    return _png(fig)


def soh_section(soh: list[dict], plots: bool = True) -> str:
    """Histogram of every cell's SOH, one colour per cell type."""
    by_type: dict[str, list[float]] = {}
    for row in soh:
        vals = row["soh"] if isinstance(row["soh"], list | tuple) else [row["soh"]]
        by_type.setdefault(str(row.get("cell_type", "")), []).extend(float(v) for v in vals)
    rows = [[ct, len(v), f"{min(v):.3f}", f"{sum(v) / len(v):.3f}", f"{max(v):.3f}"] for ct, v in by_type.items()]
    return ("<h2>Fleet SOH</h2>" + (_soh_plot(by_type) if plots else "")
            + _table(["cell type", "cells", "min", "mean", "max"], rows))


METHODS = ("current", "candidate", "cc_oracle")


def _gate_plot(classes: dict) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(classes)
    for k, m in enumerate(METHODS):
        ax.bar([i + 0.27 * (k - 1) for i in range(len(names))],
               [100 * (classes[c][m] or {}).get("rmse", 0.0) for c in names], 0.27, label=m)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("SOC RMSE (points)")
    ax.legend(fontsize=8)
    return _png(fig)


def gate_section(gate: dict, plots: bool = True) -> str:
    """Before (current models) / after (candidate) SOC RMSE per class and per vehicle, and the verdict."""
    classes = gate["summary"]["classes"]
    methods = METHODS
    verdict = "accepted" if gate["accepted"] else "refused: " + "; ".join(gate["reasons"])
    cls_rows = [[c, m, _pct((v or {}).get("rmse")), _pct((v or {}).get("p95")), _pct((v or {}).get("max"))]
                for c, by in classes.items() for m, v in by.items()]
    veh = [[v["drive"], v["cell_type"], v["class"], f"{v['hours']:.1f}",
            *(_pct((v.get(m) or {}).get("rmse")) for m in methods)] for v in gate["vehicles"]]
    return (f"<h2>SOC error before / after (gate: {html.escape(verdict)})</h2>" + (_gate_plot(classes) if plots else "")
            + _table(["class", "models", "RMSE %", "p95 %", "max %"], cls_rows)
            + "<h3>Per vehicle (RMSE %)</h3>"
            + _table(["drive", "cell type", "class", "h", *methods], veh))


def _alarms_plot(counts: dict[str, int]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(list(counts), list(counts.values()))
    ax.set_xlabel("alarms")
    return _png(fig)


def alarms_section(alarms: list[dict], top: int = 15, plots: bool = True) -> str:
    """Alarm counts per kind and level; the highest anomaly scores."""
    counts: dict[str, int] = {}
    for a in alarms:
        counts[str(a.get("kind", "?"))] = counts.get(str(a.get("kind", "?")), 0) + 1
    ranked = sorted((a for a in alarms if a.get("score") is not None), key=lambda a: -float(a["score"]))[:top]
    rows = [[a.get("vehicle", ""), a.get("kind", ""), a.get("level", ""), f"{float(a['score']):.3g}"] for a in ranked]
    levels: dict[tuple[str, str], int] = {}
    for a in alarms:
        key = (str(a.get("kind", "?")), str(a.get("level", "")))
        levels[key] = levels.get(key, 0) + 1
    return ("<h2>Alarms</h2>" + (_alarms_plot(counts) if plots else "")
            + _table(["kind", "level", "count"], [[k, lv, n] for (k, lv), n in sorted(levels.items())])
            + ("<h3>Anomaly ranking (top)</h3>" + _table(["vehicle", "kind", "level", "score"], rows) if rows else ""))


def _labels_plot(labels: list[dict]) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].bar(range(len(labels)), [100 * float(r["rmse"]) for r in labels])
    axes[0].set_xticks(range(len(labels)), [str(r["vehicle"])[:10] for r in labels], rotation=60, fontsize=7)
    axes[0].set_ylabel("label RMSE (points)")
    pairs = [(abs(float(e)), float(s)) for r in labels for e, s in zip(r.get("errors", []), r.get("sigmas", []))]
    if pairs:
        err, sig = zip(*pairs)
        axes[1].scatter([100 * s for s in sig], [100 * e for e in err], s=3, alpha=0.4)
        lim = 100 * max(max(sig), max(err))
        axes[1].plot([0, lim], [0, 2 * lim], "k--", lw=0.8, label="2 sigma")
        axes[1].set_xlabel("claimed sigma (points)")
        axes[1].set_ylabel("|label - truth| (points)")
        axes[1].legend(fontsize=8)
    else:
        axes[1].set_axis_off()
    return _png(fig)


def labels_section(labels: list[dict], plots: bool = True) -> str:
    """Pseudo-label RMSE per vehicle against truth, and |error| against the claimed sigma where given."""
    rows = [[r["vehicle"], _pct(r["rmse"]), "-" if r.get("coverage") is None else f"{float(r['coverage']):.2f}"]
            for r in labels]
    return ("<h2>Pseudo-label quality vs truth</h2>" + (_labels_plot(labels) if plots else "")
            + _table(["vehicle", "RMSE %", "coverage (|err| <= 2 sigma)"], rows))


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
         "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}")


def write_report(out: str | Path, *, soh: list[dict] | None = None, gate: dict | None = None,
                 alarms: list[dict] | None = None, labels: list[dict] | None = None,
                 title: str = "Fleet learning report", plots: bool = True, extra_html: str = "") -> Path:
    """Write ``index.html`` into ``out`` (created) with the sections whose inputs are given; returns its path.

    ``plots`` False writes the tables only (no matplotlib); ``extra_html`` (trusted, ours) goes at the end.
    """
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if soh:
        parts.append(soh_section(soh, plots))
    if gate:
        parts.append(gate_section(gate, plots))
    if alarms:
        parts.append(alarms_section(alarms, plots=plots))
    if labels:
        parts.append(labels_section(labels, plots))
    if extra_html:
        parts.append(extra_html)
    if len(parts) == 1:
        parts.append("<p>No inputs given.</p>")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    return path
