"""PNG overlays of relevance and the run's ``report.html``.

Figures use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch, no
display needed). Relevance is shown with a diverging colour map centred at zero ("bwr": red
positive, blue negative) with symmetric limits at the 99.5th percentile of |R|, and a colour bar.
Every file is written atomically (see :mod:`.export`).
"""
from __future__ import annotations

import html
import json
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from ..fileio import atomic_open, atomic_write_text
from .export import SUMMARY, token_relevance

log = logging.getLogger(__name__)

CMAP = "bwr"
PERCENTILE = 99.5
DPI = 100
MANIFEST = "manifest.json"
REPORT = "report.html"


def symmetric_limit(values: Any, percentile: float = PERCENTILE) -> float:
    """The colour limit ±L: the ``percentile`` of |values| (finite ones), never 0."""
    a = np.abs(np.asarray(values, dtype=np.float64))
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 1.0
    lim = float(np.percentile(a, percentile))
    if lim <= 0:
        lim = float(a.max())
    return lim if lim > 0 else 1.0


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    return path


def save_image(image: np.ndarray, path: str | os.PathLike) -> Path:
    """The input image as PNG (atomically)."""
    from PIL import Image

    with atomic_open(path, "wb") as f:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(f, format="PNG")
    return Path(path)


def _title(expl, k: int) -> str:
    det = expl.detections[k] if k < len(expl.detections) else {}
    q = int(expl.queries[k])
    parts = [f"query {q}", str(det.get("class", int(expl.labels[k])))]
    if det.get("score") is not None:
        parts.append(f"score {det['score']:.3f}")
    parts.append(f"{expl.target} = {float(expl.target_values[k]):.4g}")
    return " · ".join(parts)


def render_pixels(expl, k: int, path: str | os.PathLike, title: str | None = None) -> Path:
    """Pixel relevance of row ``k`` over the (grey) image, with the detection's box and mask outline."""
    from matplotlib.patches import Rectangle

    rel = expl.pixel_map(k).detach().double().cpu().numpy()
    image = np.asarray(expl.image)
    h, w = image.shape[:2]
    lim = symmetric_limit(rel)
    scale = 5.0 / max(h, w)
    fig = _figure(max(3.0, w * scale) + 1.2, max(3.0, h * scale) + 0.6)
    ax = fig.add_subplot(1, 1, 1)
    grey = image.astype(np.float64).mean(-1)
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    # opacity follows |R|: the image shows through where there is little relevance
    alpha = np.clip(np.abs(np.nan_to_num(rel)) / lim, 0.0, 1.0) * 0.85
    ax.imshow(rel, cmap=CMAP, vmin=-lim, vmax=lim, alpha=alpha, interpolation="nearest")
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    im = ScalarMappable(norm=Normalize(-lim, lim), cmap=CMAP)
    det = expl.detections[k] if k < len(expl.detections) else {}
    mask = det.get("mask")
    if mask is not None and np.asarray(mask).any() and np.asarray(mask).shape == (h, w):
        ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors=["gold"], linewidths=1.0)
    box = det.get("box")
    if box is not None and all(np.isfinite(box)):
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.2))
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    ax.set_title(title or _title(expl, k), fontsize=8)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cbar.set_label(f"pixel relevance (±{lim:.2g}: p{PERCENTILE:g} of |R|)", fontsize=7)
    cbar.ax.tick_params(labelsize=6)
    return _save(fig, Path(path))


def render_tokens(expl, stop: str, k: int, path: str | os.PathLike, title: str | None = None) -> Path:
    """Token relevance of row ``k`` at a token stop, one panel per level, one shared symmetric scale."""
    tokens = token_relevance(expl)
    if stop not in tokens:
        raise KeyError(f"no token relevance for stop {stop!r}; token stops: {', '.join(tokens) or 'none'}")
    row = tokens[stop][k].detach().double().cpu().numpy()
    lim = symmetric_limit(row)
    n = max(1, len(expl.levels))
    fig = _figure(2.4 * n + 0.9, 2.9)
    axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
    im = None
    for ax, lv in zip(axes, expl.levels):
        m = row[lv.start: lv.start + lv.size].reshape(lv.height, lv.width)
        im = ax.imshow(m, cmap=CMAP, vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(f"{lv.name} ({lv.height}×{lv.width}) Σ={m.sum():.3g}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"{stop} tokens · {_title(expl, k)}", fontsize=8)
    if im is not None:
        cbar = fig.colorbar(im, ax=axes, fraction=0.046, pad=0.03)
        cbar.set_label(f"token relevance (±{lim:.2g})", fontsize=7)
        cbar.ax.tick_params(labelsize=6)
    return _save(fig, Path(path))


# ----------------------------------------------------------------------------- report.html
def _href(rel: str | Path) -> str:
    return quote(Path(rel).as_posix())


def _link(rel: str, text: str) -> str:
    return f'<a href="{html.escape(_href(rel))}">{html.escape(text)}</a>'


def _num(v: Any, fmt: str = ".3g") -> str:
    if v is None:
        return "–"
    try:
        return format(float(v), fmt)
    except (TypeError, ValueError):
        return html.escape(str(v))


def find_summaries(run_dir: str | os.PathLike) -> list[Path]:
    """``summary.json`` files of a run folder (one per image folder), sorted."""
    run_dir = Path(run_dir)
    found = []
    for root, dirs, files in os.walk(run_dir):
        dirs.sort()
        if SUMMARY in files:
            found.append(Path(root) / SUMMARY)
    return sorted(found)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.8em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:0.85em}th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#b00020;font-weight:bold}.thumb img{max-width:180px;max-height:180px}
.settings td{border:none;padding:1px 8px 1px 0}
"""


def write_report(run_dir: str | os.PathLike, title: str | None = None, max_residual: float | None = None) -> Path:
    """Write ``run_dir/report.html``: settings, failed images, and per image a table of its queries
    (thumbnail, class, score, target, conservation error per cut, links to every file). Links are
    relative, so the folder can be moved and the report opened from disk without a server."""
    from .validate import DEFAULT_MAX_RESIDUAL

    run_dir = Path(run_dir)
    limit = DEFAULT_MAX_RESIDUAL if max_residual is None else max_residual
    manifest = {}
    if (run_dir / MANIFEST).is_file():
        try:
            manifest = json.loads((run_dir / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s: %s", run_dir / MANIFEST, exc)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title or 'maskdino-lrp report')}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title or 'maskdino-lrp report')}</h1>"]
    settings = manifest.get("settings", {})
    if settings:
        parts.append('<table class="settings">')
        for key, value in settings.items():
            parts.append(f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(json.dumps(value))}</td></tr>")
        parts.append("</table>")
    images = manifest.get("images", {})
    failed = {name: rec for name, rec in images.items() if rec.get("status") == "failed"}
    summaries = find_summaries(run_dir)
    parts.append(f"<p>{len(summaries)} image(s) explained" + (f", {len(failed)} failed" if failed else "") + ".</p>")
    if failed:
        parts.append("<h2>Failed images</h2><table><tr><th>image</th><th>source</th><th>error</th></tr>")
        for name, rec in sorted(failed.items()):
            parts.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(rec.get('source', '')))}</td>"
                         f"<td class=\"bad\">{html.escape(str(rec.get('error', '')))}</td></tr>")
        parts.append("</table>")
    for summary_path in summaries:
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError) as exc:
            parts.append(f"<h2>{html.escape(str(summary_path.parent.name))}</h2>"
                         f"<p class=\"bad\">unreadable summary: {html.escape(str(exc))}</p>")
            continue
        folder = summary_path.parent.relative_to(run_dir)
        rel = lambda name: (folder / name).as_posix()
        cuts = list(dict.fromkeys(cut for q in summary.get("queries", []) for cut in q.get("conservation", {})))
        name = summary.get("image", folder.as_posix())
        parts.append(f"<h2>{html.escape(str(name))}</h2>")
        info = [f"source {html.escape(str(summary.get('source') or '–'))}",
                f"target {html.escape(str(summary.get('target')))}",
                f"composite {html.escape(str(summary.get('composite')))}",
                f"{summary.get('num_queries', 0)} quer{'y' if summary.get('num_queries') == 1 else 'ies'}",
                _link(rel(SUMMARY), "summary.json")]
        if (summary_path.parent / "image.png").is_file():
            info.append(_link(rel("image.png"), "image"))
        parts.append("<p>" + " · ".join(info) + "</p>")
        if not summary.get("queries"):
            parts.append("<p>No query selected for this image.</p>")
            continue
        head = "".join(f"<th>rel. error ({html.escape(c)})</th>" for c in cuts)
        parts.append(f"<table><tr><th>heatmap</th><th>query</th><th>class</th><th>score</th><th>target</th>{head}"
                     "<th>files</th></tr>")
        for q in summary["queries"]:
            files = q.get("files", {})
            thumb = files.get("pixels_png") or next(iter(files.get("tokens_png", {}).values()), None)
            thumb_html = (f'<a href="{html.escape(_href(rel(thumb)))}"><img src="{html.escape(_href(rel(thumb)))}" '
                          f'alt="query {q.get("query")}"></a>') if thumb else "–"
            errs = ""
            for c in cuts:
                v = q.get("conservation", {}).get(c)
                bad = v is None or not (float(v) <= limit)
                errs += f'<td class="num{" bad" if bad else ""}">{_num(v, ".2e")}</td>'
            links = []
            for key, value in files.items():
                if isinstance(value, dict):
                    links.extend(_link(rel(v), v) for v in value.values())
                elif value:
                    links.append(_link(rel(value), value))
            parts.append(
                f'<tr><td class="thumb">{thumb_html}</td><td class="num">{html.escape(str(q.get("query")))}</td>'
                f"<td>{html.escape(str(q.get('class')))}</td><td class=\"num\">{_num(q.get('score'))}</td>"
                f"<td class=\"num\">{_num(q.get('target_value'), '.4g')}</td>{errs}<td>{'<br>'.join(links)}</td></tr>")
        parts.append("</table>")
    parts.append(f"<p><small>Conservation error: |residual| / |target| at each complete cut; "
                 f"values above {limit:g} are marked.</small></p></body></html>")
    return atomic_write_text(run_dir / REPORT, "\n".join(parts) + "\n")
