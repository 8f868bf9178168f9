"""How much memory and time an LRP run needs, before running it (the prototype's estimate_memory_requirements).

Everything is derived from the config (:func:`maskdino_lrp.load_config`) and the image size: the
model's input size (the test-time resize and padding), the tokens per encoder level (from the
strides), channels, layers, heads, levels, points, queries and classes. Nothing is hard-coded per
preset.

The formula
-----------
Sizes are counted in *elements*, multiplied by the bytes of the dtype (4 for float32, 8 for float64).
Notation: ``T`` encoder tokens (Σ over levels of h·w), ``D`` hidden channels (CONVS_DIM), ``F_e`` /
``F_d`` encoder / decoder FFN width, ``M`` heads, ``L`` feature levels, ``P`` sampling points, ``Q``
model queries, ``C`` classes, ``h4·w4`` the mask-feature map, ``Hp·Wp`` the padded input, ``K`` the
explained queries (targets), ``c`` the chunk size (targets per batched backward).

* **activations** ``A`` — what the LRP forward keeps for the backward, per part of the model
  (elements of the tensors it produces):

  - backbone: Σ over convolutions of their output (+ the stem's max-pool and every block's sum); for
    Swin, of its norms, linears, GELUs, attention products and residual sums (:func:`_swin_counts`);
  - pixel decoder, outside the encoder: input projections + GroupNorm ``2·T·D``, position encoding
    ``T·D``, per FPN level ``7·D·h·w`` (lateral, norm, upsampled, sum, output conv, norm, ReLU),
    mask features ``MASK_DIM·h4·w4``;
  - encoder, per layer: ``T·(10·D + 2·F_e + 6·M·L·P)`` (projections, residuals and norms; FFN;
    sampling offsets, logits, softmax, locations) + the gather indices of the bilinear sampler
    (``4·L·T·M·P`` int64 = ``8·L·T·M·P`` float32 elements);
  - decoder, token part: two-stage proposals ``T·(7·D + C + 4)`` + one value projection of the
    memory per layer ``T·D``;
  - decoder, query part, per layer: ``Q·(12·D + 2·F_d + 8·Q + 6·8·L·4)``;
  - mask logits: ``h4·w4·Q`` for the two-stage proposals and for the final layer.

  The held forward memory is ``α · A · bytes`` with ``α`` = :data:`ALPHA` (:data:`ALPHA_ENCODER` for
  the encoder's part, whose deformable attention keeps a sparse matrix, not the gathers; the engine's rules keep
  some inputs and outputs twice; measured, see below).

* **forward peak** — on top of the held activations, the largest transient: the bilinear sampler
  of one encoder layer (``4·L·P·T·D``: gathered corners, weighted terms, stacked samples) or the
  post-processing's mask resizing (bounded, see below).

* **backward** — a live chain of gradients between layers, ``β`` (:data:`BETA`) × the largest
  activation the backward crosses (the bilinear samples ``L·P·T·D`` when it goes through the
  encoder, the stem output when it reaches the pixels), plus, **per target** of a chunk, the
  gradients autograd returns at the requested stops (pixels ``3·Hp·Wp``; encoder_input ``T·D``;
  each encoder layer ``T·D``; memory ``T·D + D·h·w`` per FPN lateral; backbone Σ stage outputs;
  mask_features; query states ``Q·D`` per layer) and at the ledger leaves (positional encodings
  ``T·D``, reference embeddings ``2·Q·D`` per decoder layer).

* **recomputation** (``recompute=True``, :mod:`maskdino_lrp.lrp.recompute`) — the backbone blocks and
  encoder layers keep only their inputs (``h·w·C`` per block, ``T·D`` per layer, once each, not × α) and
  the rest of the backbone (stem or patch embedding, output norms) its activations; the backward adds
  the largest recomputed segment (α × one block's activations, or :data:`ALPHA_ENCODER` × one layer's
  plus the sampler's transient) to its chain, and each target's backward one more forward of the segments it crosses.

* **the process and the photo** — the interpreter with torch, numpy, PIL and this package
  (:data:`RUNTIME_BYTES`, + :data:`RENDER_BYTES` when PNGs are written), and the photo at its
  *original* size: :data:`IMAGE_BYTES_PER_PIXEL` per pixel for the copies held while it is explained,
  plus the post-processing's transient, which resizes mask logits to the photo a bounded group at a
  time (``model.masks.RESIZE_BUDGET_BYTES``).

* **total** = process + parameters + photo + held forward + max(forward transient, mask transient,
  chain + ``c`` × per target) + ``K`` × the reduced relevance kept per target (+ ``K·T·D`` per token stop
  with keep_channels): the peak resident size (``ru_maxrss``) of the whole process.

  The recommended chunk is the largest ``c ≤ K`` whose total stays within :data:`HEADROOM` of the
  budget (at least 1; ``fits`` says whether even ``c = 1`` does): the estimate is good to about ±25 %.
  On CPU the allocator keeps some freed gradient memory, so a long run of small chunks creeps above
  the figure.

* **time** — multiply-accumulate count of one forward (convolutions, linears, the sampler, the mask
  product) × 2 FLOP, divided by the machine's measured matmul throughput (a 0.1 s probe, or the
  ``gflops`` you give) and by an efficiency :data:`EFFICIENCY` (small convolutions and gathers run
  far below peak); the LRP forward costs :data:`LRP_FORWARD_FACTOR` forwards and each target's
  backward :data:`BACKWARD_FACTOR` forwards of the part it crosses. A rough figure (×/÷ 3).

``ALPHA``, ``BETA`` and the constants were measured with the default composite (K = 5, chunk 16,
stops pixels, encoder_input, memory) on ``tiny``, ``demo``, ``maskdino_r50_3s_coco`` and the
official-style 4-scale config (``benchmarks/maskdino_r50_4s.yaml``) at small and large inputs and on
3000×2000 photos: ``python benchmarks/estimate_vs_measured.py [--large]`` runs each case in its own
process and prints estimate, measured peak and their ratio. Measured / estimated (PNGs on), since the LRP
forward keeps convolutions' input shapes and ReLU masks only (``lrp.engine.compact_saves``; 1 thread): tiny
0.97 / 1.05 and demo 1.01 / 1.04 (128–160 px / 3000×2000 photos), 3-scale 1.04 at 320 px, 0.99 on a
3000×2000 photo at 320 px, 4-scale 1.00 at 320 px (the large cases were last measured before that change:
3-scale 1.02 at 800 px, 7.8 GB; 4-scale 1.07 at 512 px, 9.5 GB; the estimate is now 10–20 % lower there);
repeated runs of one case differ by up to ~10 % (allocator, load). With recomputation
(``benchmarks/swin_explain.py``: one detection to the pixels): Swin-T 1.13 at 320 px and 0.88 at 800 px
(10.4 GB), Swin-L 1.11 at 320 px and 1.20 at 512 px (7.3 GB); without it Swin-T at 320 px is 0.87.
The time factors were measured on ``tiny`` and ``maskdino_r50_3s_coco``; times depend on the machine's
load and thread count (the probe measures them as they are now).
"""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..model.config import get, load_config

# measured factors (see the module docstring)
ALPHA = 3.15  # held forward bytes per counted activation element (× dtype size), outside the encoder
# ... inside the deformable encoder: its attention keeps one sparse sampling matrix instead of the counted
# gathers, its FFN's ReLU a one-byte mask (measured on the 3- and 4-scale configs; the old single ALPHA made the
# 4-scale estimate 1.4× too big)
ALPHA_ENCODER = 0.5
BETA = 1.0  # live chain of gradients during a backward, in units of the largest activation crossed
EFFICIENCY = 0.25  # achieved / matmul throughput for the model's mix of ops
LRP_FORWARD_FACTOR = 1.3  # an LRP forward (rules, ledger, graph) in plain forwards
BACKWARD_FACTOR = 0.6  # one target's batched backward in forwards of the part it crosses
# the process: interpreter, torch, numpy, PIL and this package (~230 MB), plus what building a model and one
# LRP forward cost beyond their tensors (~55 MB: modules, autograd nodes, the engine's records); measured
RUNTIME_BYTES = 285 * 2 ** 20
RENDER_BYTES = 35 * 2 ** 20  # matplotlib and its figures, when PNGs are written (measured)
IMAGE_BYTES_PER_PIXEL = 10  # copies of the photo held while it is explained (decoded, RGB, the explanation's)
RENDER_BYTES_PER_PIXEL = 14  # ... and while its PNGs are drawn (the photo resampled for the overlays)
HEADROOM = 0.85  # the chunk advice fills at most this share of a budget (the estimate is good to about ±25 %)
DECODER_POINTS = 4  # the official decoder layers always sample 4 points per level
DECODER_HEADS = 8  # ... with 8 heads

BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
STOPS = ("pixels", "backbone", "encoder_input", "encoder_layers", "memory", "mask_features", "query_init",
         "decoder_layers")
GB = 1024 ** 3


class EstimateError(ValueError):
    """An estimate request that cannot be answered (bad size, unknown stop or dtype)."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Shapes:
    """The model's sizes for one input image, from the config."""

    image_size: tuple[int, int]
    input_size: tuple[int, int]  # after the test-time resize
    padded_size: tuple[int, int]  # after padding to SIZE_DIVISIBILITY
    levels: list[dict]  # encoder levels: name, stride, height, width (transformer order)
    tokens: int
    hidden: int
    enc_layers: int
    enc_ffn: int
    heads: int
    points: int
    num_levels: int
    dec_layers: int
    dec_ffn: int
    queries: int
    classes: int
    mask_dim: int
    mask_size: tuple[int, int]
    fpn_levels: list[dict]  # name, stride, height, width, channels (input)
    backbone: list[dict]  # per stage: name, blocks, channels, bottleneck, stride, height, width
    stem: dict
    parameters: int


def _resize(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    scale = short / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _count_parameters(cfg: Mapping[str, Any]) -> int:
    """Parameters and buffers of the model built on the meta device (no memory, no weights); cached per config."""
    return _count_parameters_json(json.dumps(cfg, sort_keys=True, default=str))


@functools.lru_cache(maxsize=16)
def _count_parameters_json(cfg_json: str) -> int:
    import torch

    from ..model.maskdino import MaskDINO

    with torch.device("meta"):
        model = MaskDINO(json.loads(cfg_json))
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def model_shapes(config: str | Path | Mapping[str, Any], image_size: int | Sequence[int],
                 overrides: Mapping[str, Any] | None = None, count_parameters: bool = True) -> Shapes:
    """Sizes of every part of the model for an input image of ``image_size`` (an int: square; or (h, w))."""
    cfg = load_config(config, overrides)
    if isinstance(image_size, (int, float)):
        h = w = int(image_size)
    else:
        if len(image_size) != 2:
            raise EstimateError(f"image size must be one int or (height, width), got {image_size!r}")
        h, w = (int(v) for v in image_size)
    if h <= 0 or w <= 0:
        raise EstimateError(f"image size must be positive, got {h}×{w}")
    rh, rw = _resize(h, w, int(get(cfg, "INPUT.MIN_SIZE_TEST")), int(get(cfg, "INPUT.MAX_SIZE_TEST")))
    d = int(get(cfg, "MODEL.MaskDINO.SIZE_DIVISIBILITY"))
    hp, wp = (_ceil_div(rh, d) * d, _ceil_div(rw, d) * d) if d > 1 else (rh, rw)

    r = get(cfg, "MODEL.RESNETS")
    depth = int(r["DEPTH"])
    basic = depth < 50
    stem_ch = int(r["STEM_OUT_CHANNELS"])
    stem = {"channels": stem_ch, "height": _ceil_div(hp, 2), "width": _ceil_div(wp, 2),
            "pooled": (_ceil_div(hp, 4), _ceil_div(wp, 4))}
    out_features = list(r["OUT_FEATURES"])
    num_stages = max(int(n[-1]) - 1 for n in out_features if n.startswith("res"))
    cout = int(r["RES2_OUT_CHANNELS"])
    bottleneck = int(r["NUM_GROUPS"]) * int(r["WIDTH_PER_GROUP"])
    stride = 4
    stages = []
    for idx in range(num_stages):
        name = f"res{idx + 2}"
        dilation = int(r["RES5_DILATION"]) if name == "res5" else 1
        if idx > 0 and not (name == "res5" and dilation == 2):
            stride *= 2
        stages.append({"name": name, "blocks": BLOCKS_PER_STAGE[depth][idx], "channels": cout,
                       "bottleneck": None if basic else bottleneck, "stride": stride,
                       "height": _ceil_div(hp, stride), "width": _ceil_div(wp, stride)})
        cout *= 2
        bottleneck *= 2
    if get(cfg, "MODEL.BACKBONE.NAME") == "D2SwinTransformer":  # (the RESNETS section then holds defaults)
        stages, stem = _swin_stages(cfg, hp, wp)
    by_name = {s["name"]: s for s in stages}

    head = get(cfg, "MODEL.SEM_SEG_HEAD")
    mdino = get(cfg, "MODEL.MaskDINO")
    in_features = [f for f in head["IN_FEATURES"] if f in by_name]
    t_features = sorted((f for f in head["DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES"] if f in by_name),
                        key=lambda f: -by_name[f]["stride"])  # high2low: lowest resolution first
    if head.get("FEATURE_ORDER", "high2low") == "low2high":
        t_features = t_features[::-1]
    levels = [{"name": f"stride{by_name[f]['stride']}", "stride": by_name[f]["stride"],
               "height": by_name[f]["height"], "width": by_name[f]["width"]} for f in t_features]
    total_levels = int(head["TOTAL_NUM_FEATURE_LEVELS"])
    coarsest = max(levels, key=lambda lv: lv["stride"]) if levels else None
    extra = []
    if coarsest is not None:
        eh, ew, es = coarsest["height"], coarsest["width"], coarsest["stride"]
        for _ in range(total_levels - len(levels)):
            eh, ew, es = _ceil_div(eh, 2), _ceil_div(ew, 2), es * 2
            extra.append({"name": f"stride{es}", "stride": es, "height": eh, "width": ew})
    levels = (levels + extra) if head.get("FEATURE_ORDER", "high2low") == "low2high" else (extra[::-1] + levels)
    tokens = sum(lv["height"] * lv["width"] for lv in levels)
    common = int(head["COMMON_STRIDE"])
    min_t_stride = min(by_name[f]["stride"] for f in t_features) if t_features else common
    n_fpn = max(int(math.log2(min_t_stride) - math.log2(common)), 1)
    fpn_feats = sorted(in_features, key=lambda f: by_name[f]["stride"])[:n_fpn]
    fpn = [{"name": f, "stride": by_name[f]["stride"], "height": by_name[f]["height"], "width": by_name[f]["width"],
            "channels": by_name[f]["channels"]} for f in fpn_feats]
    finest = min(fpn, key=lambda f: f["stride"]) if fpn else {"height": _ceil_div(hp, 4), "width": _ceil_div(wp, 4)}
    return Shapes(
        image_size=(h, w), input_size=(rh, rw), padded_size=(hp, wp), levels=levels, tokens=tokens,
        hidden=int(head["CONVS_DIM"]), enc_layers=int(head["TRANSFORMER_ENC_LAYERS"]),
        enc_ffn=int(head["DIM_FEEDFORWARD"]), heads=int(mdino["NHEADS"]), points=4, num_levels=total_levels,
        dec_layers=int(mdino["DEC_LAYERS"]), dec_ffn=int(mdino["DIM_FEEDFORWARD"]),
        queries=int(mdino["NUM_OBJECT_QUERIES"]), classes=int(head["NUM_CLASSES"]), mask_dim=int(head["MASK_DIM"]),
        mask_size=(finest["height"], finest["width"]), fpn_levels=fpn, backbone=stages, stem=stem,
        parameters=_count_parameters(cfg) if count_parameters else 0,
    )


def _swin_stages(cfg: Mapping[str, Any], hp: int, wp: int) -> tuple[list[dict], dict]:
    """The Swin backbone's stages (patch 4, each patch merging halves the map, rounding up) and, as ``stem``,
    its patch embedding."""
    sw = get(cfg, "MODEL.SWIN")
    embed = int(sw["EMBED_DIM"])
    stages = []
    for i, (blocks, heads) in enumerate(zip(sw["DEPTHS"], sw["NUM_HEADS"])):
        stride = 4 * 2 ** i
        stages.append({"name": f"res{i + 2}", "blocks": int(blocks), "channels": embed * 2 ** i, "bottleneck": None,
                       "stride": stride, "height": _ceil_div(hp, stride), "width": _ceil_div(wp, stride),
                       "window": int(sw["WINDOW_SIZE"]), "heads": int(heads), "mlp_ratio": float(sw["MLP_RATIO"])})
    size = (_ceil_div(hp, 4), _ceil_div(wp, 4))
    return stages, {"channels": embed, "height": size[0], "width": size[1], "pooled": size}


def _swin_counts(s: Shapes) -> tuple[int, int, int]:
    """(activation elements, multiply-accumulates, largest activation) of the Swin backbone.

    A block on an h×w map (C channels, MLP width r·C) padded to Hp×Wp windows of N tokens, nH heads:
    norm, linear, GELU outputs and residual sums ``h·w·(5·C + 2·r·C)``, q/k/v, attention·v and projection
    ``5·C·Hp·Wp``, logits and probabilities ``2·nH·N·Hp·Wp``; ``Hp·Wp·(4·C² + 2·N·C) + 2·r·C²·h·w``
    multiply-accumulates. Patch embedding (conv, norm) ``2·C·h·w`` and ``48·C·h·w`` MACs; an output norm
    ``C·h·w`` per stage; patch merging ``1.5·C·h·w`` and ``2·C²·h·w`` MACs (h·w before merging).
    """
    st = s.stem
    acts = 2 * st["channels"] * st["height"] * st["width"]
    macs = 48 * st["channels"] * st["height"] * st["width"]
    largest = 0
    for i, stage in enumerate(s.backbone):
        c, ws, hw = stage["channels"], stage["window"], stage["height"] * stage["width"]
        hwp = _ceil_div(stage["height"], ws) * ws * _ceil_div(stage["width"], ws) * ws
        n, hidden = ws * ws, int(c * stage["mlp_ratio"])
        acts += stage["blocks"] * (hw * (5 * c + 2 * hidden) + hwp * (5 * c + 2 * stage["heads"] * n)) + c * hw
        macs += stage["blocks"] * (hwp * (4 * c * c + 2 * n * c) + 2 * hidden * c * hw)
        largest = max(largest, stage["heads"] * n * hwp, hidden * hw)
        if i < 3:
            acts += 3 * c * hw // 2
            macs += 2 * c * c * hw
    return acts, macs, largest


# ----------------------------------------------------------------------------- element counts
def _backbone_counts(s: Shapes) -> tuple[int, int, int]:
    """(activation elements, multiply-accumulates, largest activation) of the ResNet (or the Swin backbone)."""
    if s.backbone and "window" in s.backbone[0]:
        return _swin_counts(s)
    st = s.stem
    hw2 = st["height"] * st["width"]
    hw4 = st["pooled"][0] * st["pooled"][1]
    acts = st["channels"] * hw2 + st["channels"] * hw4
    macs = 3 * 49 * st["channels"] * hw2
    largest = st["channels"] * hw2
    cin = st["channels"]
    for stage in s.backbone:
        hw = stage["height"] * stage["width"]
        c = stage["channels"]
        for b in range(stage["blocks"]):
            if stage["bottleneck"] is None:  # basic: 3x3, 3x3
                acts += 3 * c * hw
                macs += 9 * cin * c * hw + 9 * c * c * hw
            else:  # bottleneck: 1x1, 3x3, 1x1
                cb = stage["bottleneck"]
                acts += 2 * cb * hw + 2 * c * hw
                macs += cin * cb * hw + 9 * cb * cb * hw + cb * c * hw
            if b == 0 and cin != c:
                acts += c * hw
                macs += cin * c * hw
            largest = max(largest, c * hw)
            cin = c
    return acts, macs, largest


def _segment_counts(s: Shapes) -> dict[str, int]:
    """With recomputation, in elements: ``kept`` the backbone's activations outside its blocks (× α),
    ``inputs`` the blocks' and encoder layers' inputs (× 1), ``block`` the largest block (patch merging included)
    and ``layer`` one encoder layer (their activations, rebuilt one at a time in the backward)."""
    t, d = s.tokens, s.hidden
    st = s.stem
    blocks: list[tuple[int, int]] = []  # (input elements, activation elements) per block
    if s.backbone and "window" in s.backbone[0]:  # Swin: patch embedding and output norms stay
        kept = 2 * st["channels"] * st["height"] * st["width"] + sum(g["channels"] * g["height"] * g["width"]
                                                                   for g in s.backbone)
        for i, stage in enumerate(s.backbone):
            c, ws, hw = stage["channels"], stage["window"], stage["height"] * stage["width"]
            hwp = _ceil_div(stage["height"], ws) * ws * _ceil_div(stage["width"], ws) * ws
            hidden = int(c * stage["mlp_ratio"])
            acts = hw * (5 * c + 2 * hidden) + hwp * (5 * c + 2 * stage["heads"] * ws * ws)
            blocks += [(c * hw, acts)] * stage["blocks"] + ([(c * hw, 3 * c * hw // 2)] if i < 3 else [])
    else:  # ResNet: the stem stays
        kept = st["channels"] * (st["height"] * st["width"] + st["pooled"][0] * st["pooled"][1])
        cin, hw_in = st["channels"], st["pooled"][0] * st["pooled"][1]
        for stage in s.backbone:
            c, hw, cb = stage["channels"], stage["height"] * stage["width"], stage["bottleneck"]
            for b in range(stage["blocks"]):
                acts = 3 * c * hw if cb is None else 2 * cb * hw + 2 * c * hw
                blocks.append((cin * hw_in, acts + (c * hw if b == 0 and cin != c else 0)))
                cin, hw_in = c, hw
    layer = t * (10 * d + 2 * s.enc_ffn + 6 * s.heads * s.num_levels * s.points) \
        + 8 * s.num_levels * t * s.heads * s.points
    encoder_inputs = (s.enc_layers + 1) * t * d if s.enc_layers else 0
    return {"kept": kept, "inputs": sum(i for i, _ in blocks), "encoder_inputs": encoder_inputs,
            "block": max((a for _, a in blocks), default=0), "layer": layer if s.enc_layers else 0}


def _head_counts(s: Shapes) -> dict[str, int]:
    t, d, q = s.tokens, s.hidden, s.queries
    mlp = s.num_levels * s.points
    mask_hw = s.mask_size[0] * s.mask_size[1]
    fpn_hw = sum(f["height"] * f["width"] for f in s.fpn_levels)
    out = {}
    out["pixel_decoder"] = 3 * t * d + 7 * d * fpn_hw + s.mask_dim * mask_hw
    out["encoder"] = s.enc_layers * (t * (10 * d + 2 * s.enc_ffn + 6 * s.heads * mlp) + 8 * s.num_levels * t * s.heads * s.points)
    dec_mlp = s.num_levels * DECODER_POINTS
    out["decoder_tokens"] = t * (7 * d + s.classes + 4) + s.dec_layers * t * d
    out["decoder_queries"] = s.dec_layers * q * (12 * d + 2 * s.dec_ffn + 8 * q + 6 * DECODER_HEADS * dec_mlp)
    out["masks"] = 2 * q * mask_hw
    # multiply-accumulates
    backbone_in = {lv["name"]: lv for lv in s.levels}
    chans = {st["stride"]: st["channels"] for st in s.backbone}
    macs = sum(chans.get(lv["stride"], d) * d * lv["height"] * lv["width"] for lv in backbone_in.values())
    macs += sum(f["channels"] * d * f["height"] * f["width"] + 9 * d * d * f["height"] * f["width"] for f in s.fpn_levels)
    macs += d * s.mask_dim * mask_hw
    enc_macs = s.enc_layers * t * (2 * d * d + d * s.heads * mlp * 3 + 2 * d * s.enc_ffn + 4 * mlp * d)
    dec_macs = t * d * (3 * d + s.classes) + s.dec_layers * (
        t * d * d + q * (4 * d * d + 2 * d * s.dec_ffn + d * DECODER_HEADS * dec_mlp * 3 + 4 * dec_mlp * d) + 2 * q * q * d)
    mask_macs = 2 * q * s.mask_dim * mask_hw
    out["macs_pixel_decoder"] = macs
    out["macs_encoder"] = enc_macs
    out["macs_decoder"] = dec_macs + mask_macs
    out["sampler"] = 4 * mlp * t * d if s.enc_layers else 0
    return out


def _stop_elements(s: Shapes, stops: Sequence[str]) -> int:
    t, d, q = s.tokens, s.hidden, s.queries
    hp, wp = s.padded_size
    fpn_hw = sum(f["height"] * f["width"] for f in s.fpn_levels)
    per = {
        "pixels": 3 * hp * wp,
        "backbone": sum(st["channels"] * st["height"] * st["width"] for st in s.backbone),
        "encoder_input": t * d,
        "encoder_layers": s.enc_layers * t * d,
        "memory": t * d + d * fpn_hw,
        "mask_features": s.mask_dim * s.mask_size[0] * s.mask_size[1],
        "query_init": q * d,
        "decoder_layers": s.dec_layers * q * d,
    }
    return sum(per[stop] for stop in stops)


def _reduced_elements(s: Shapes, stops: Sequence[str]) -> int:
    """Relevance kept per target after summing channels."""
    hp, wp = s.input_size
    t, q = s.tokens, s.queries
    per = {
        "pixels": hp * wp,
        "backbone": sum(st["height"] * st["width"] for st in s.backbone),
        "encoder_input": t,
        "encoder_layers": s.enc_layers * t,
        "memory": t + sum(f["height"] * f["width"] for f in s.fpn_levels),
        "mask_features": s.mask_size[0] * s.mask_size[1],
        "query_init": q,
        "decoder_layers": s.dec_layers * q,
    }
    return sum(per[stop] for stop in stops)


# ----------------------------------------------------------------------------- the estimate
@dataclass
class Estimate:
    """Memory (bytes) and time (seconds) an LRP run needs; :meth:`table` prints it."""

    config: str
    shapes: Shapes
    targets: int  # K explained queries
    chunk_size: int
    dtype: str
    stops: tuple[str, ...]
    parameter_bytes: int
    runtime_bytes: int  # the process itself (interpreter, libraries; + matplotlib when PNGs are written)
    image_bytes: int  # the photo's copies at its original size
    mask_transient_bytes: int  # post-processing: mask logits resized to the photo (bounded)
    forward_bytes: int  # activations held for the backward
    forward_transient_bytes: int
    backward_chain_bytes: int
    per_target_bytes: int
    result_bytes_per_target: int
    total_bytes: int  # for K targets with chunk_size
    memory_budget_bytes: int | None
    recommended_chunk: int
    fits: bool
    forward_gflop: float
    throughput_gflops: float
    seconds_forward: float  # the LRP forward
    seconds_per_target: float
    seconds_total: float
    breakdown: dict[str, int] = field(default_factory=dict)  # activation elements per part
    recompute: bool = False  # segments recomputed in the backward (forward_bytes then holds their inputs only)
    recompute_bytes: int = 0  # the largest segment's activations, rebuilt during the backward

    def total_for(self, chunk: int) -> int:
        """Total bytes for K targets with a given chunk size."""
        chunk = max(1, min(int(chunk), self.targets))
        return (self.runtime_bytes + self.parameter_bytes + self.image_bytes + self.forward_bytes
                + max(self.forward_transient_bytes, self.mask_transient_bytes,
                      self.backward_chain_bytes + self.recompute_bytes + chunk * self.per_target_bytes)
                + self.targets * self.result_bytes_per_target)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["total_gb"] = self.total_bytes / GB
        return out

    def table(self) -> str:
        s = self.shapes
        gb = lambda b: f"{b / GB:.3f} GB" if b >= 0.1 * GB else f"{b / 2 ** 20:.1f} MB"
        lines = [
            f"config            {self.config}",
            f"image             {s.image_size[1]}×{s.image_size[0]} → model input {s.input_size[1]}×{s.input_size[0]} "
            f"(padded {s.padded_size[1]}×{s.padded_size[0]}), dtype {self.dtype}",
            f"encoder tokens    {s.tokens:,} = " + " + ".join(f"{lv['height']}×{lv['width']} ({lv['name']})" for lv in s.levels),
            f"model             {s.enc_layers} encoder / {s.dec_layers} decoder layers, {s.queries} queries, "
            f"{s.hidden} channels, {s.heads} heads × {s.num_levels} levels × {s.points} points, {s.parameters:,} parameters",
            f"targets           K = {self.targets}, chunk {self.chunk_size}, stops {', '.join(self.stops)}",
            "",
            f"process           {gb(self.runtime_bytes)} (interpreter and libraries)",
            f"parameters        {gb(self.parameter_bytes)}",
            f"photo             {gb(self.image_bytes)} (+ {gb(self.mask_transient_bytes)} resizing masks to it)",
            f"forward (held)    {gb(self.forward_bytes)}"
            + (f" (segments recomputed: + {gb(self.recompute_bytes)} in the backward)" if self.recompute else ""),
            f"forward transient {gb(self.forward_transient_bytes)}",
            f"backward          {gb(self.backward_chain_bytes)} + per target {gb(self.per_target_bytes)} "
            f"(+ {gb(self.result_bytes_per_target)} kept)",
            f"total             {gb(self.total_bytes)} for {self.targets} targets in chunks of {self.chunk_size}",
        ]
        if self.memory_budget_bytes is not None:
            lines.append(f"budget            {gb(self.memory_budget_bytes)}: recommended chunk size {self.recommended_chunk}"
                         f" (total {gb(self.total_for(self.recommended_chunk))}, at most {HEADROOM:.0%} of the budget)"
                         + ("" if self.fits else " (does NOT fit even one target at a time)"))
        else:
            lines.append(f"recommended chunk {self.recommended_chunk}")
        lines += [
            "",
            f"time (rough, ×/÷3) forward {self.seconds_forward:.2f} s + {self.targets} × {self.seconds_per_target:.2f} s "
            f"= {self.seconds_total:.1f} s  ({self.forward_gflop:.1f} GFLOP per forward at ~{self.throughput_gflops:.0f} GFLOP/s)",
        ]
        return "\n".join(lines)


def _mask_budget() -> int:
    """Bytes the post-processing's mask resizing may take at once (model.masks), two buffers of it."""
    try:
        from ..model.masks import RESIZE_BUDGET_BYTES
    except ImportError:
        RESIZE_BUDGET_BYTES = 64 * 2 ** 20
    return int(RESIZE_BUDGET_BYTES)


def measure_throughput(seconds: float = 0.1) -> float:
    """GFLOP/s of a float32 matmul on this machine with torch's current thread count (a short probe)."""
    import torch

    a = torch.randn(256, 256)
    b = torch.randn(256, 256)
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while True:
        a @ b
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return 2 * 256 ** 3 * n / elapsed / 1e9


def estimate(config: str | Path | Mapping[str, Any], image_size: int | Sequence[int], queries: int,
             memory_budget_gb: float | None = None, chunk_size: int | None = None,
             stops: Sequence[str] | str = ("pixels", "encoder_input", "memory"), dtype: str = "float32",
             keep_channels: bool = False, overrides: Mapping[str, Any] | None = None,
             gflops: float | None = None, parameters: int | None = None,
             formats: Sequence[str] = ("csv", "npz", "png"), recompute: bool = False) -> Estimate:
    """Memory and time for explaining ``queries`` targets of one ``image_size`` image (see the module docstring).

    ``chunk_size`` defaults to the recommended one for ``memory_budget_gb`` (or to all targets at once
    when no budget is given); ``gflops`` is the machine's matmul throughput (measured when None);
    ``parameters`` the model's parameter + buffer count (counted on the meta device when None);
    ``formats`` the outputs written (PNGs load matplotlib); ``recompute`` models ``LRP(recompute=True)``. The total is the peak resident size of the
    whole process (``ru_maxrss``), the interpreter and libraries included; the recommended chunk keeps it
    within :data:`HEADROOM` of the budget.
    """
    if isinstance(stops, str):
        stops = [p.strip() for p in stops.split(",") if p.strip()]
    bad = [p for p in stops if p not in STOPS]
    if bad:
        raise EstimateError(f"unknown stop {bad[0]!r}; stops: {', '.join(STOPS)}")
    if dtype not in DTYPE_BYTES:
        raise EstimateError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    k = int(queries)
    if k < 1:
        raise EstimateError(f"queries must be at least 1, got {queries!r}")
    if memory_budget_gb is not None and memory_budget_gb <= 0:
        raise EstimateError(f"memory budget must be positive, got {memory_budget_gb!r} GB")
    s = model_shapes(config, image_size, overrides, count_parameters=parameters is None)
    if parameters is not None:
        s.parameters = int(parameters)
    nbytes = DTYPE_BYTES[dtype]
    bb_acts, bb_macs, bb_largest = _backbone_counts(s)
    head = _head_counts(s)
    breakdown = {"backbone": bb_acts, "pixel_decoder": head["pixel_decoder"], "encoder": head["encoder"],
                 "decoder_tokens": head["decoder_tokens"], "decoder_queries": head["decoder_queries"],
                 "masks": head["masks"]}
    forward_bytes = int((ALPHA * (sum(breakdown.values()) - breakdown["encoder"])
                         + ALPHA_ENCODER * breakdown["encoder"]) * nbytes)
    reaches_pixels = any(p in stops for p in ("pixels", "backbone"))
    reaches_encoder = reaches_pixels or any(p in stops for p in ("encoder_input", "encoder_layers"))
    recompute_bytes = 0
    if recompute:
        seg = _segment_counts(s)
        rest = sum(breakdown.values()) - breakdown["backbone"] - breakdown["encoder"]
        forward_bytes = int((ALPHA * (rest + seg["kept"]) + seg["inputs"] + seg["encoder_inputs"]) * nbytes)
        # a recomputed encoder layer's forward has its sampler's transient on top (measured: without it the
        # 320 px Swin cases come out 1.23-1.28x the estimate)
        recompute_bytes = int(max(ALPHA * seg["block"] * reaches_pixels,
                                  (ALPHA_ENCODER * seg["layer"] + head["sampler"]) * reaches_encoder) * nbytes)
    hp, wp = s.padded_size
    transient = head["sampler"] * nbytes  # the post-processing's masks: mask_transient below
    # the live gradient chain: the largest activation on the way down to the deepest stop
    chain = s.queries * s.hidden
    if reaches_encoder and s.enc_layers:
        chain = max(chain, s.num_levels * s.points * s.tokens * s.hidden)
    if reaches_pixels:
        chain = max(chain, bb_largest)
    ledger = s.tokens * s.hidden + 2 * s.dec_layers * s.queries * s.hidden
    per_target = int((_stop_elements(s, stops) + ledger) * nbytes)
    chain_bytes = int(BETA * chain * nbytes)
    kept = _reduced_elements(s, stops)
    if keep_channels:
        kept += s.hidden * (s.tokens * (("encoder_input" in stops) + s.enc_layers * ("encoder_layers" in stops))
                            + s.queries * (("query_init" in stops) + s.dec_layers * ("decoder_layers" in stops)))
    result_bytes = kept * nbytes
    parameter_bytes = s.parameters * nbytes
    runtime = RUNTIME_BYTES + (RENDER_BYTES if "png" in formats else 0)
    oh, ow = s.image_size
    image_bytes = (IMAGE_BYTES_PER_PIXEL + (RENDER_BYTES_PER_PIXEL if "png" in formats else 0)) * oh * ow
    # post-processing resizes mask logits to the photo a bounded group at a time (model.masks)
    mask_transient = min(_mask_budget(), 2 * 4 * oh * ow * min(k, s.queries))
    fixed = runtime + parameter_bytes + image_bytes + forward_bytes + k * result_bytes

    def total(c: int) -> int:
        return fixed + max(transient, mask_transient, chain_bytes + recompute_bytes + c * per_target)

    budget = int(memory_budget_gb * GB) if memory_budget_gb is not None else None
    if budget is None:
        recommended, fits = k, True
    else:
        usable = int(budget * HEADROOM)
        fits = total(1) <= usable
        recommended = 1
        if fits:
            free = usable - fixed - chain_bytes - recompute_bytes
            recommended = max(1, min(k, free // max(per_target, 1)))
    chunk = int(chunk_size) if chunk_size else recommended
    chunk = max(1, min(chunk, k))

    macs_forward = bb_macs + head["macs_pixel_decoder"] + head["macs_encoder"] + head["macs_decoder"]
    gflop = 2 * macs_forward / 1e9
    throughput = gflops if gflops else measure_throughput()
    seconds_forward = gflop / (throughput * EFFICIENCY)
    crossed = macs_forward if reaches_pixels else (
        macs_forward - bb_macs if reaches_encoder else head["macs_decoder"] + head["macs_pixel_decoder"])
    seconds_target = BACKWARD_FACTOR * 2 * crossed / 1e9 / (throughput * EFFICIENCY)
    if recompute:  # each backward pass runs the forward of the segments it crosses once more
        rebuilt = bb_macs * reaches_pixels + head["macs_encoder"] * reaches_encoder
        seconds_target += LRP_FORWARD_FACTOR * 2 * rebuilt / 1e9 / (throughput * EFFICIENCY)
    lrp_forward = LRP_FORWARD_FACTOR * seconds_forward
    name = config if isinstance(config, (str, Path)) else "<dict>"
    return Estimate(
        config=str(name), shapes=s, targets=k, chunk_size=chunk, dtype=dtype, stops=tuple(stops),
        parameter_bytes=parameter_bytes, runtime_bytes=runtime, image_bytes=image_bytes,
        mask_transient_bytes=mask_transient, forward_bytes=forward_bytes, forward_transient_bytes=transient,
        backward_chain_bytes=chain_bytes, per_target_bytes=per_target, result_bytes_per_target=result_bytes, total_bytes=total(chunk),
        memory_budget_bytes=budget, recommended_chunk=int(recommended), fits=fits, forward_gflop=gflop,
        throughput_gflops=throughput, seconds_forward=lrp_forward, seconds_per_target=seconds_target,
        seconds_total=lrp_forward + k * seconds_target, breakdown=breakdown, recompute=recompute,
        recompute_bytes=recompute_bytes,
    )
