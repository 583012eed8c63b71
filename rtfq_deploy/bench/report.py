"""Pictures and tables of a selection: a Pareto plot (PNG) and a self-contained HTML report.

matplotlib (Agg backend, no display) is imported inside :func:`pareto_png` only, so
``rtfq-bench run`` on a device never needs it.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Mapping, Sequence

from rtfq_deploy.bench.select import FRONT_KEYS, Selection
from rtfq_deploy.fileio import is_number
from rtfq_deploy.formats import DEFAULT_RUNTIME

_SCALE = {"latency_p50_ms": (1.0, "latency p50 (ms)"), "peak_memory_bytes": (1e6, "peak memory (MB)"),
          "size_bytes": (1e6, "file size (MB)")}


def pareto_png(selection: Selection) -> bytes:
    """Accuracy against latency, peak memory and file size: every measured model, the
    Pareto front as a line, the chosen models ringed."""
    try:
        import matplotlib
    except ImportError:
        from rtfq_deploy.errors import RtfqError

        raise RtfqError("the report needs matplotlib (pip install matplotlib), or pass --no-report") from None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    scored = [e for e in selection.candidates if e.get("accuracy") is not None]
    chosen = {(str(c.entry["subnet"]), c.entry.get("runtime")) for c in selection.choices if c.met}
    fig = Figure(figsize=(5 * len(FRONT_KEYS), 4.2), dpi=100)
    for i, key in enumerate(FRONT_KEYS):
        ax = fig.add_subplot(1, len(FRONT_KEYS), i + 1)
        scale, label = _SCALE[key]
        ax.scatter([e[key] / scale for e in scored], [e["accuracy"] for e in scored], s=18, color="0.6",
                   label="measured")
        front = selection.fronts[key]
        ax.step([e[key] / scale for e in front], [e["accuracy"] for e in front], where="post", color="C0",
                marker="o", markersize=4, label="Pareto front")
        picked = [e for e in scored if (e["subnet"], e.get("runtime")) in chosen]
        ax.scatter([e[key] / scale for e in picked], [e["accuracy"] for e in picked], s=90, facecolors="none",
                   edgecolors="C3", linewidths=1.5, label="chosen")
        for e in picked:
            label_text = str(e["subnet"]) + (f" ({e['runtime']})" if len(selection.runtimes) > 1 else "")
            ax.annotate(label_text, (e[key] / scale, e["accuracy"]), fontsize=7, xytext=(4, -10),
                        textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{selection.device}: accuracy against cost")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def choice_rows(selection: Selection) -> list[dict[str, Any]]:
    rows = []
    for c in selection.choices:
        e = c.entry
        rows.append({"budget": str(c.budget), "runtime": e.get("runtime", DEFAULT_RUNTIME), "met": c.met,
                     "subnet": e["subnet"], "accuracy": e.get("accuracy"), "accuracy_source": e.get("accuracy_source"),
                     "agreement": e.get("agreement"), "stable": e.get("stable"),
                     "latency_p50_ms": e["latency_p50_ms"], "latency_p90_ms": e["latency_p90_ms"],
                     "peak_memory_bytes": e["peak_memory_bytes"], "size_bytes": e["size_bytes"], "macs": e["macs"],
                     "bitops": e["bitops"], "reason": c.reason})
    return rows


# Column headings carry the unit; the cells are plain numbers in it (MB = 10**6 bytes).
HEADINGS = {"accuracy": "top-1", "accuracy_source": "top-1 from", "agreement": "agrees with onnxruntime",
            "stable": "p50 stable", "latency_p50_ms": "latency p50 (ms)", "latency_p90_ms": "latency p90 (ms)",
            "peak_memory_bytes": "peak memory (MB)", "size_bytes": "file size (MB)", "macs": "GMACs",
            "bitops": "GBitOPs"}


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("met", "stable"):
        return "yes" if value else "NO"
    if not is_number(value):
        return str(value)
    if key in ("accuracy", "agreement"):
        return f"{value:.4f}"
    if key.startswith("latency"):
        return f"{value:.3f}"
    if key.endswith("bytes"):
        return f"{value / 1e6:.2f}"
    if key in ("macs", "bitops"):
        return f"{value / 1e9:.3f}"
    return str(value)


def html_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(HEADINGS.get(k, k))}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(k, r.get(k)))}</td>" for k in keys) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_report(selection: Selection, fingerprint: Mapping[str, Any], png: bytes) -> str:
    """One file with everything inline (the plot as a data URI): it can be mailed or archived."""
    cost_keys = ["subnet", "runtime", "accuracy", "accuracy_source", "agreement", "stable", "latency_p50_ms",
                 "latency_p90_ms", "peak_memory_bytes", "size_bytes", "macs",
                 "bitops"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>rtfq-bench select: {html.escape(selection.device)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#eee}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>Device {html.escape(selection.device)}</h1>",
        html_table([{"key": k, "value": v} for k, v in fingerprint.items()], ["key", "value"]),
        "<h2>Choice per budget</h2>",
        html_table(choice_rows(selection), ["budget", "met", *cost_keys, "reason"]),
        f"<img alt='Pareto plot' src='data:image/png;base64,{base64.b64encode(png).decode()}'>",
    ]
    for key, label in FRONT_KEYS.items():
        parts += [f"<h2>Pareto front: accuracy against {html.escape(label)}</h2>",
                  html_table(selection.fronts[key], cost_keys)]
    parts += ["<h2>Every measured model</h2>",
              html_table(sorted(selection.candidates, key=lambda e: e["latency_p50_ms"]), cost_keys)]
    if selection.skipped:
        parts += ["<h2>Left out</h2><ul>", *(f"<li>{html.escape(s)}</li>" for s in selection.skipped), "</ul>"]
    parts.append("</body></html>\n")
    return "".join(parts)
