"""PNG overlays of relevance and the run's ``report.html``.

Figures use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch, no
display needed). Relevance is shown with a diverging colour map centred at zero ("bwr": red
positive, blue negative) with symmetric limits at the 99.5th percentile of |R|, and a colour bar.
Every file is written atomically (see :mod:`.export`).

Sizes are bounded by the model input, never by the photo: the pixel relevance is drawn from the
model-input-resolution map (``relevance["pixels"]``), the photo is downsampled to at most
:data:`OVERLAY_MAX_SIDE` px for the overlay and :data:`IMAGE_MAX_SIDE` px for ``image.png``, and a
detection's mask (RLE) is decoded one at a time, at the display size.
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
from .export import SUMMARY, compact_mask, token_relevance

log = logging.getLogger(__name__)

CMAP = "bwr"
PERCENTILE = 99.5
DPI = 100
MANIFEST = "manifest.json"
REPORT = "report.html"
IMAGE_MAX_SIDE = 2048  # image.png: the input photo, downsampled to this longest side
OVERLAY_MAX_SIDE = 1024  # arrays drawn into an overlay (the figure itself is ~700 px)
FIGURE_INCHES = 6.0  # longest side of an overlay's image panel
PADDING_COLOUR = "0.35"


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


def display_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) scaled down (never up) so that the longest side is at most ``max_side``."""
    scale = min(1.0, float(max_side) / max(height, width, 1))
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An RGB uint8 image at ``size`` (h, w) (PIL, antialiased when shrinking); as it is if the size matches."""
    from PIL import Image

    image = np.asarray(image, dtype=np.uint8)
    if tuple(image.shape[:2]) == tuple(size):
        return image
    pil = Image.fromarray(image)
    return np.asarray(pil.resize((int(size[1]), int(size[0])), Image.BILINEAR, reducing_gap=2.0))


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 2-D map resampled (bilinear, values kept, not rescaled) to ``size`` (h, w), for display only."""
    import torch

    values = np.asarray(values, dtype=np.float64)
    if tuple(values.shape) == tuple(size):
        return values
    t = torch.from_numpy(np.ascontiguousarray(values))[None, None]
    return torch.nn.functional.interpolate(t, size=tuple(int(s) for s in size), mode="bilinear",
                                           align_corners=False, antialias=values.shape[0] > size[0])[0, 0].numpy()


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_open(path, "wb") as f:
        # "tight": titles, colour-bar labels and legends are never cut off at the figure's edge
        fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.08)
    return path


def save_image(image: np.ndarray, path: str | os.PathLike, max_side: int | None = None) -> Path:
    """The input image as PNG (atomically), downsampled to a longest side of ``max_side`` px if given."""
    from PIL import Image

    image = np.asarray(image, dtype=np.uint8)
    if max_side is not None:
        image = resize_image(image, display_size(*image.shape[:2], max_side))
    with atomic_open(path, "wb") as f:
        Image.fromarray(image).save(f, format="PNG")
    return Path(path)


def _title(expl, k: int) -> str:
    det = expl.detections[k] if k < len(expl.detections) else {}
    q = int(expl.queries[k])
    parts = [f"query {q}", str(det.get("class", int(expl.labels[k])))]
    if det.get("score") is not None:
        parts.append(f"score {det['score']:.3f}")
    parts.append(f"{expl.target} = {float(expl.target_values[k]):.4g}")
    return " · ".join(parts)


def box_marks(target: str, box: Any) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """The line segments ((x, y), (x, y)) that mark what a box target explains on the box x0 y0 x1 y1.

    An edge (``box:x1`` …) is that side of the box; a centre (``box:cx``, ``refine:cx…``) a line through the
    centre across the box; a size (``box:w``, ``refine:w…``) the line spanning it through the centre. Other
    targets (and ``box``, the sum) mark nothing beyond the box itself.
    """
    parts = str(target).split(":")
    if len(parts) < 2 or parts[0] not in ("box", "refine") or box is None or not all(np.isfinite(box)):
        return []
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    marks = {"x1": ((x0, y0), (x0, y1)), "x2": ((x1, y0), (x1, y1)), "y1": ((x0, y0), (x1, y0)),
             "y2": ((x0, y1), (x1, y1)), "cx": ((cx, y0), (cx, y1)), "cy": ((x0, cy), (x1, cy)),
             "w": ((x0, cy), (x1, cy)), "h": ((cx, y0), (cx, y1))}
    return [marks[parts[1]]] if parts[1] in marks else []


def render_pixels(expl, k: int, path: str | os.PathLike, title: str | None = None) -> Path:
    """Pixel relevance of row ``k`` over the (grey) image, with the detection's box and mask outline; for a
    box target the explained edge, centre or size is marked (:func:`box_marks`).

    The relevance is the model-input-resolution map (``relevance["pixels"][k]``, values per input
    pixel); photo, map and mask are drawn at most :data:`OVERLAY_MAX_SIDE` px on the longest side, in
    the photo's pixel coordinates (so boxes need no rescaling).
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    rel = expl.relevance["pixels"][k].detach().double().cpu().numpy()
    image = np.asarray(expl.image)
    h, w = image.shape[:2]
    dh, dw = display_size(h, w, OVERLAY_MAX_SIDE)
    lim = symmetric_limit(rel)
    scale = FIGURE_INCHES / max(h, w)
    fig = _figure(max(3.0, w * scale) + 1.2, max(3.0, h * scale) + 0.6)
    ax = fig.add_subplot(1, 1, 1)
    extent = (0, w, h, 0)  # photo pixel coordinates, whatever the arrays' sizes
    grey = resize_image(image, (dh, dw)).astype(np.float32).mean(-1)
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="antialiased", extent=extent)
    del grey
    shown = resize_map(rel, (dh, dw))
    # opacity follows |R|: the image shows through where there is little relevance
    alpha = np.clip(np.abs(np.nan_to_num(shown)) / lim, 0.0, 1.0) * 0.85
    ax.imshow(shown, cmap=CMAP, vmin=-lim, vmax=lim, alpha=alpha, interpolation="antialiased", extent=extent)
    del shown, alpha
    im = ScalarMappable(norm=Normalize(-lim, lim), cmap=CMAP)
    det = expl.detections[k] if k < len(expl.detections) else {}
    mask = compact_mask(det.get("mask"))
    if mask is not None and mask.size == (h, w) and mask.any():
        small = mask.resized((dh, dw)).astype(np.float32)
        xs = (np.arange(dw) + 0.5) * (w / dw)
        ys = (np.arange(dh) + 0.5) * (h / dh)
        ax.contour(xs, ys, small, levels=[0.5], colors=["gold"], linewidths=1.0)
    box = det.get("box")
    if box is not None and all(np.isfinite(box)):
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.2))
        for (ax0, ay0), (ax1, ay1) in box_marks(expl.target, box):
            ax.plot([ax0, ax1], [ay0, ay1], color="magenta", linewidth=2.5, solid_capstyle="butt",
                    marker={"cx": "o", "cy": "o", "w": "|", "h": "_"}.get(expl.target.split(":")[1], ""), markersize=6)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.set_title(title or _title(expl, k), fontsize=9)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cbar.set_label(f"relevance per input pixel ({rel.shape[0]}×{rel.shape[1]}); ±{lim:.2g} = p{PERCENTILE:g} of |R|",
                   fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    return _save(fig, Path(path))


def _padding_patches(ax, lv, input_size) -> bool:
    """Hatch the part of a level's token map that lies in the zero padding (beyond the resized image);
    True if there is any. Token (y, x) covers input pixels [y·s, (y+1)·s) at stride s."""
    from matplotlib.patches import Rectangle

    if not input_size:
        return False
    rh, rw = (float(v) for v in input_size)
    edge_x, edge_y = rw / lv.stride - 0.5, rh / lv.stride - 0.5  # the image's edge in token coordinates
    right, bottom = lv.width - 0.5, lv.height - 0.5
    found = False
    style = dict(facecolor="none", edgecolor=PADDING_COLOUR, hatch="////", linewidth=0.0)
    if edge_x < right - 1e-9:
        ax.add_patch(Rectangle((edge_x, -0.5), right - edge_x, lv.height, **style))
        ax.axvline(edge_x, color=PADDING_COLOUR, linewidth=0.8)
        found = True
    if edge_y < bottom - 1e-9:
        ax.add_patch(Rectangle((-0.5, edge_y), lv.width, bottom - edge_y, **style))
        ax.axhline(edge_y, color=PADDING_COLOUR, linewidth=0.8)
        found = True
    return found


def render_tokens(expl, stop: str, k: int, path: str | os.PathLike, title: str | None = None) -> Path:
    """Token relevance of row ``k`` at a token stop, one panel per level, one shared symmetric scale.

    Tokens over the zero padding (beyond the resized image, up to the size divisibility) are hatched.
    """
    from matplotlib.patches import Patch

    tokens = token_relevance(expl)
    if stop not in tokens:
        raise KeyError(f"no token relevance for stop {stop!r}; token stops: {', '.join(tokens) or 'none'}")
    row = tokens[stop][k].detach().double().cpu().numpy()
    lim = symmetric_limit(row)
    n = max(1, len(expl.levels))
    fig = _figure(2.6 * n + 1.0, 3.2)
    axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
    im = None
    padded = False
    for ax, lv in zip(axes, expl.levels):
        m = row[lv.start: lv.start + lv.size].reshape(lv.height, lv.width)
        im = ax.imshow(m, cmap=CMAP, vmin=-lim, vmax=lim, interpolation="nearest")
        padded |= _padding_patches(ax, lv, getattr(expl, "input_size", None))
        ax.set_xlim(-0.5, lv.width - 0.5)
        ax.set_ylim(lv.height - 0.5, -0.5)
        ax.set_title(f"{lv.name} ({lv.height}×{lv.width}) Σ={m.sum():.3g}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"{stop} tokens · {_title(expl, k)}", fontsize=9)
    if im is not None:
        cbar = fig.colorbar(im, ax=axes, fraction=0.046, pad=0.03)
        cbar.set_label(f"token relevance (±{lim:.2g})", fontsize=8)
        cbar.ax.tick_params(labelsize=7)
    if padded:
        fig.legend(handles=[Patch(facecolor="none", edgecolor=PADDING_COLOUR, hatch="////",
                                  label="padding: outside the image (zero input)")],
                   loc="lower center", fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
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
.bad{color:#b00020;font-weight:bold}.banner{border:2px solid #b00020;padding:8px;background:#fdecee}
td.ok{color:#1b5e20;background:#e8f5e9}td.bad{background:#fdecee}
.thumb img{width:340px;max-width:40vw;height:auto;border:1px solid #ccc;cursor:zoom-in}
.settings td{border:none;padding:1px 8px 1px 0}
.legend{font-size:0.85em}.swatch{display:inline-block;width:1.1em;height:1.1em;vertical-align:middle;border:1px solid #999;margin:0 4px 0 10px}
.swatch.ok{background:#e8f5e9}.swatch.bad{background:#fdecee}
.lightbox{display:none;position:fixed;inset:0;z-index:10;background:rgba(0,0,0,.85);align-items:center;justify-content:center;flex-direction:column}
.lightbox:target{display:flex}.lightbox img{max-width:96vw;max-height:88vh;background:#fff;cursor:zoom-out}
.lightbox p{color:#eee;margin:6px}.lightbox a{color:#9cf}
"""


def _conservation_legend(limit: float) -> str:
    return ('<p class="legend"><b>Conservation</b> (rel. error = |residual| / |target| at a complete cut of the '
            'graph, where all relevance must arrive):'
            f'<span class="swatch ok"></span>≤ {limit:g}: conserved within the limit'
            f'<span class="swatch bad"></span>&gt; {limit:g} or missing: relevance was lost or created '
            '(see the ledger in qNNN_meta.json). Click a heatmap to enlarge it.</p>')


def write_report(run_dir: str | os.PathLike, title: str | None = None, max_residual: float | None = None) -> Path:
    """Write ``run_dir/report.html``: settings, failed images, and per image a table of its queries
    (thumbnail, class, score, target, conservation error per cut, links to every file). Links are
    relative, so the folder can be moved and the report opened from disk without a server.

    A thumbnail opens enlarged in the page (a CSS ``:target`` overlay, no script); conservation cells
    are green within ``max_residual`` and red above it or when missing (a legend says so)."""
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
    banner_at, random_weights = len(parts), []  # a run on random weights gets a banner here (filled below)
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
    if summaries:
        parts.append(_conservation_legend(limit))
    lightboxes: list[str] = []
    for summary_path in summaries:
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError) as exc:
            parts.append(f"<h2>{html.escape(str(summary_path.parent.name))}</h2>"
                         f"<p class=\"bad\">unreadable summary: {html.escape(str(exc))}</p>")
            continue
        if summary.get("random_weights") or summary.get("partial_load"):
            random_weights.append(summary)
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
            thumb_html = "–"
            if thumb:
                view = f"view-{len(lightboxes) + 1}"
                src = html.escape(_href(rel(thumb)))
                alt = html.escape(f"{name}: query {q.get('query')} ({q.get('class')})")
                thumb_html = (f'<a href="#{view}" title="click to enlarge"><img src="{src}" alt="{alt}"></a>'
                              f'<br><small><a href="{src}">open {html.escape(Path(thumb).name)}</a></small>')
                lightboxes.append(f'<div class="lightbox" id="{view}"><a href="#_"><img src="{src}" alt="{alt}"></a>'
                                  f'<p>{alt} · <a href="#_">close</a> · <a href="{src}">open the file</a></p></div>')
            errs = ""
            for c in cuts:
                v = q.get("conservation", {}).get(c)
                bad = v is None or not (float(v) <= limit)
                errs += f'<td class="num {"bad" if bad else "ok"}">{_num(v, ".2e")}</td>'
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
    if random_weights:
        partial = [x["partial_load"] for x in random_weights if x.get("partial_load")]
        what = ("RANDOM WEIGHTS: no checkpoint was loaded; these explanations describe an untrained model and say "
                "nothing about a trained one" if any(x.get("random_weights") for x in random_weights)
                else f"PARTIAL CHECKPOINT LOAD (the rest of the model keeps random weights): {partial[0]}")
        parts.insert(banner_at, f'<p class="bad banner" id="random-weights-banner">{html.escape(what)} '
                     f"({len(random_weights)} of {len(summaries)} image(s)).</p>")
    parts.append(f"<p><small>Conservation error: |residual| / |target| at each complete cut; "
                 f"values above {limit:g} are marked.</small></p>")
    parts.extend(lightboxes)
    parts.append("</body></html>")
    return atomic_write_text(run_dir / REPORT, "\n".join(parts) + "\n")
