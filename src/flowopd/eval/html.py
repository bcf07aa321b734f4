"""The pipeline report: table.json, reward-curve plots and a self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from flowopd.eval.report import write_json

COLUMNS = ("toy-geneval", "toy-ocr", "toy-quality")


def table_rows(
    results: dict[str, dict[str, dict[str, float]]], columns: Sequence[str]
) -> list[dict]:
    """``[{"model": name, col: overall, ..., "average": mean, "se": {...}}]`` from
    {model: metrics.json}.

    ``average`` is the mean over the columns present for that model; ``se`` holds each
    column's standard error (metrics.json's ``overall_se``, where given) and the average's,
    ``sqrt(sum se_c^2) / k`` (the columns are scored on independent images).
    """
    from flowopd.eval.stats import diff_se

    rows = []
    for model, metrics in results.items():
        row: dict = {"model": model}
        vals, ses = [], {}
        for col in columns:
            v = metrics.get(col, {}).get("overall")
            row[col] = None if v is None else round(float(v), 4)
            if v is not None:
                vals.append(float(v))
                if metrics[col].get("overall_se") is not None:
                    ses[col] = round(float(metrics[col]["overall_se"]), 4)
        row["average"] = round(sum(vals) / len(vals), 4) if vals else None
        if ses:
            if len(ses) == len(vals):
                ses["average"] = round(diff_se(*ses.values()) / len(vals), 4)
            row["se"] = ses
        rows.append(row)
    return rows


def plot_curves(
    path: str | Path,
    curves: dict[str, list[tuple[float, float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
) -> None:
    """Line plot of named (x, y) series to a PNG (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", ms=2.5, lw=1.2, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def write_html(
    path: str | Path,
    title: str,
    rows: list[dict],
    columns: Sequence[str],
    images: dict[str, Path],
    notes: str = "",
) -> None:
    """A self-contained page (images inlined as base64): the table, plots and grids."""
    cols = ["model", *columns, "average"]
    best = {}
    for c in [*columns, "average"]:
        vals = [r[c] for r in rows if r.get(c) is not None]
        best[c] = max(vals) if vals else None
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if c == "model":
                cells.append(f"<td>{html.escape(str(v))}</td>")
            elif v is None:
                cells.append("<td>–</td>")
            else:
                b = " class=best" if v == best.get(c) else ""
                err = (r.get("se") or {}).get(c)  # standard error (of the mean over seeds)
                txt = f"{v:.3f}" if err is None else f"{v:.3f} &plusmn; {err:.3f}"
                cells.append(f"<td{b}>{txt}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    figs = "".join(
        f"<figure>{_img(p)}<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, p in images.items()
        if p.is_file()
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
td:first-child{{text-align:left}}.best{{font-weight:bold;background:#e8f5e9}}
figure{{display:inline-block;margin:8px;vertical-align:top}}img{{max-width:520px}}
pre{{background:#f6f6f6;padding:8px}}</style></head><body>
<h1>{html.escape(title)}</h1><table><tr>{head}</tr>{"".join(body)}</table>
<pre>{html.escape(notes)}</pre>{figs}</body></html>"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)


def write_table(path: str | Path, rows: list[dict]) -> None:
    write_json(path, rows)


def read_log(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
