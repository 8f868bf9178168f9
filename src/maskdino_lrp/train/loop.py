"""Training loop for a small MaskDINO on the synthetic shapes data.

* MaskDINO's losses (:mod:`.losses`) on every decoder layer and the encoder proposals, plus
  denoising queries when the config's ``MODEL.MaskDINO.DN`` is "seg" or "standard" (:mod:`.denoising`);
* AdamW (no weight decay on norms, biases and embeddings), linear warm-up then cosine or step decay,
  gradient-norm clipping;
* deterministic given the seed: the batch of step ``s`` is samples ``s*B … s*B+B-1`` of the shapes
  dataset ``seed`` (fresh images every step) or, with ``train_images``, a seeded per-epoch
  permutation of a fixed set; the torch RNG is seeded once and saved in every checkpoint;
* a tqdm progress bar with the loss, a JSON-lines metrics log, checkpoints written atomically
  (temporary file + ``os.replace``) every ``ckpt_every`` steps, resumed automatically from
  ``out_dir/last.pt`` (model, optimiser, step, RNG states);
* at the end, the weights exported as fp16 safetensors next to the full config as YAML.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import yaml

from ..data.coco import evaluate_detections
from ..data.shapes import ShapesConfig, generate_sample, sample_to_target
from ..model.config import get, load_config
from .denoising import training_forward
from .losses import SetCriterion, build_criterion

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in each checkpoint and in the training record)."""

    preset: str = "demo"  # preset name or YAML path of the model config
    overrides: dict = field(default_factory=dict)  # dotted official keys → values
    out_dir: str = "runs/demo"
    seed: int = 0  # training data seed and torch seed
    steps: int = 6000
    batch_size: int = 8
    lr: float = 2e-4
    backbone_lr_mult: float = 1.0
    weight_decay: float = 0.05
    warmup_steps: int = 200
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio), "step" (×0.1 at 80 % and 93 %) or "constant"
    min_lr_ratio: float = 0.01
    clip_grad_norm: float = 1.0  # 0 disables clipping
    ckpt_every: int = 200
    log_every: int = 20
    image_size: int = 160  # shapes images (square); keep INPUT.MIN/MAX_SIZE_TEST equal to it
    train_images: int = 0  # 0: a fresh image for every sample; N: cycle over images 0..N-1
    num_points: int = 0  # mask loss / matching points; 0 = dense at the mask-prediction resolution
    threads: int = 2
    class_prior: float = 0.01  # initial class probability (focal-loss prior bias, as DINO); 0 = keep the init
    fast_deform_attn: bool = True  # grid_sample deformable-attention core while training (same maths)
    backbone_norm: str = "BN"  # norm trained in the backbone when the config has FrozenBN ("" = as configured)
    val_every: int = 0  # 0 disables periodic validation
    val_seed: int = 777  # validation images (never the final evaluation seed)
    val_images: int = 50
    export: str = ""  # safetensors path written at the end ("" = out_dir/model.safetensors)

    def shapes_config(self) -> ShapesConfig:
        return ShapesConfig(image_size=self.image_size)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def batch_indices(cfg: TrainConfig, step: int) -> list[int]:
    """Dataset indices of the batch of ``step`` (a pure function of the config and step)."""
    b = cfg.batch_size
    flat = range(step * b, step * b + b)
    if not cfg.train_images:
        return list(flat)
    out = []
    for k in flat:
        epoch, pos = divmod(k, cfg.train_images)
        perm = np.random.default_rng([cfg.seed, 1, epoch]).permutation(cfg.train_images)
        out.append(int(perm[pos]))
    return out


def make_batch(cfg: TrainConfig, step: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """(B, 3, H, W) uint8 images and per-image targets (labels, boxes cxcywh normalised, masks) of ``step``."""
    shapes = cfg.shapes_config()
    items = [sample_to_target(generate_sample(cfg.seed, i, shapes)) for i in batch_indices(cfg, step)]
    images = torch.stack([it["image"] for it in items])
    targets = [{"labels": it["labels"], "boxes": it["boxes"], "masks": it["masks"]} for it in items]
    return images, targets


def model_inputs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (B, 3, H, W) → the normalised, padded network input (channel order as the config wants)."""
    x = images.float()
    if getattr(model, "input_format", "RGB") == "BGR":
        x = x.flip(1)
    return model.normalize_and_pad(x)


def pad_targets(targets: Sequence[Mapping[str, torch.Tensor]], padded: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    """Zero-pad target masks to the padded input size (boxes stay normalised by the unpadded size)."""
    out = []
    for t in targets:
        m = t["masks"]
        h, w = m.shape[-2:]
        if (h, w) != tuple(padded):
            m = torch.nn.functional.pad(m, (0, padded[1] - w, 0, padded[0] - h))
        out.append({**t, "masks": m})
    return out


# ----------------------------------------------------------------------------------------------
# Fast deformable-attention core for training
# ----------------------------------------------------------------------------------------------


def grid_sample_deform_attn_core(value: torch.Tensor, spatial_shapes, level_start_index,
                                 sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """The deformable-attention core with ``F.grid_sample`` (as the official PyTorch fallback).

    Same result as :func:`maskdino_lrp.model.deform_attn.ms_deform_attn_core` (bilinear, zero padding,
    ``align_corners=False``), several times faster forward + backward on CPU; used while training.
    value (N, ΣHW, M, D), sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P).
    """
    n, _, m, d = value.shape
    _, len_q, _, levels, points, _ = sampling_locations.shape
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N*M, Lq, P, 2)
        sampled.append(torch.nn.functional.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                                       align_corners=False))  # (N*M, D, Lq, P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, len_q, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, len_q)
    return out.transpose(1, 2).contiguous()


@contextlib.contextmanager
def fast_deform_attn(enabled: bool = True):
    """Within the block, ``MSDeformAttn`` uses :func:`grid_sample_deform_attn_core` (training speed)."""
    from ..model import deform_attn

    if not enabled:
        yield
        return
    original = deform_attn.ms_deform_attn_core
    deform_attn.ms_deform_attn_core = grid_sample_deform_attn_core
    try:
        yield
    finally:
        deform_attn.ms_deform_attn_core = original


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay for 1-d parameters (norms, biases) and embeddings; shared tensors once."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        no_decay = p.ndim <= 1 or isinstance(_module_of(model, name), torch.nn.Embedding)
        lr_mult = cfg.backbone_lr_mult if name.startswith("backbone.") else 1.0
        groups.setdefault((lr_mult, 0.0 if no_decay else cfg.weight_decay), []).append(p)
    param_groups = [{"params": ps, "lr": cfg.lr * m, "lr_mult": m, "weight_decay": wd}
                    for (m, wd), ps in sorted(groups.items())]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)


def _module_of(model: torch.nn.Module, param_name: str) -> torch.nn.Module:
    return model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return 1.0 if step < 0.8 * cfg.steps else (0.1 if step < 0.93 * cfg.steps else 0.01)
    if cfg.schedule == "cosine":
        span = max(cfg.steps - cfg.warmup_steps, 1)
        t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use cosine, step or constant")


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, then os.replace onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: str | os.PathLike, model, optimizer, step: int, cfg: TrainConfig,
                    extra: Mapping[str, Any] | None = None) -> None:
    atomic_save({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
        "rng": rng_state(), "train_config": dataclasses.asdict(cfg), "model_config": model.cfg,
        **(extra or {}),
    }, path)


def load_training_checkpoint(path: str | os.PathLike, model, optimizer) -> dict[str, Any]:
    """Restore model, optimiser and RNG states from a training checkpoint; return the checkpoint dict."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return ckpt


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each shared tensor once (first name in ``named_parameters`` order)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple]] = set()
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct trainable parameter values (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # nn.Module.parameters already yields each shared Parameter once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def export_weights(model: torch.nn.Module, path: str | os.PathLike, config_yaml: str | os.PathLike | None = None,
                   metadata: Mapping[str, str] | None = None) -> Path:
    """Write the model's weights as fp16 safetensors (shared tensors once) and its config as YAML."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in unique_state_dict(model).items():
        if name.endswith("num_batches_tracked"):  # BatchNorm bookkeeping, absent from FrozenBN
            continue
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.to(torch.float16)
        tensors[name] = t.contiguous().clone()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    yaml_path = Path(config_yaml) if config_yaml is not None else path.with_suffix(".yaml")
    text = "# maskdino-lrp config of the weights " + path.name + "\n" + yaml.safe_dump(
        _plain(getattr(model, "export_cfg", model.cfg)), sort_keys=False, default_flow_style=None)
    yaml_path.write_text(text)
    return path


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, seed: int, num_images: int, shapes: ShapesConfig | None = None) -> dict[str, float]:
    """COCO box / mask AP of ``model.predict`` on ``num_images`` shapes images of dataset ``seed``."""
    was_training = model.training
    model.eval()
    samples, preds = [], []
    try:
        for i in range(num_images):
            s = generate_sample(seed, i, shapes)
            d = model.predict(s.image)
            samples.append(s)
            preds.append({"scores": d.scores, "labels": d.labels, "boxes": d.boxes, "masks": d.masks})
    finally:
        model.train(was_training)
    return evaluate_detections(samples, preds)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def build_training_model(cfg: TrainConfig):
    """The MaskDINO to train; ``model.export_cfg`` is the config its weights are shipped with.

    A backbone configured with FrozenBN (no statistics to learn from scratch) is trained with
    ``cfg.backbone_norm`` (BatchNorm) instead; BatchNorm in eval mode is the same affine map as
    FrozenBN with the same weight / bias / running_mean / running_var, so the exported weights load
    into the configured FrozenBN model unchanged.
    """
    from ..model.maskdino import MaskDINO

    export_cfg = load_config(cfg.preset, cfg.overrides)
    size = int(get(export_cfg, "INPUT.MIN_SIZE_TEST"))
    if size != cfg.image_size:
        log.warning("INPUT.MIN_SIZE_TEST=%d differs from the training image size %d", size, cfg.image_size)
    train_overrides = dict(cfg.overrides)
    if cfg.backbone_norm and get(export_cfg, "MODEL.RESNETS.NORM") == "FrozenBN":
        train_overrides["MODEL.RESNETS.NORM"] = cfg.backbone_norm
    model = MaskDINO(load_config(cfg.preset, train_overrides))
    model.export_cfg = export_cfg
    if cfg.class_prior > 0:
        bias = -math.log((1 - cfg.class_prior) / cfg.class_prior)
        with torch.no_grad():
            model.sem_seg_head.predictor.class_embed.bias.fill_(bias)
    return model


def train_step(model, criterion: SetCriterion, optimizer, images: torch.Tensor, targets, cfg: TrainConfig,
               step: int) -> dict[str, float]:
    """One optimisation step; returns the total and the grouped losses as floats."""
    for g in optimizer.param_groups:
        g["lr"] = cfg.lr * g.get("lr_mult", 1.0) * lr_factor(cfg, step)
    x = model_inputs(model, images)
    targets = pad_targets(targets, tuple(x.shape[-2:]))
    m = get(model.cfg, "MODEL.MaskDINO")
    dn_num = int(m["DN_NUM"]) if m["DN"] in ("seg", "standard") else 0
    with fast_deform_attn(cfg.fast_deform_attn):
        outputs = training_forward(model, x, targets, dn_num, float(m["DN_NOISE_SCALE"]))
    losses = criterion(outputs, targets)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = float("nan")
    if cfg.clip_grad_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm))
    optimizer.step()
    out = {"loss": float(total.detach()), "grad_norm": grad_norm, "lr": optimizer.param_groups[0]["lr"]}
    for kind in ("ce", "bbox", "giou", "mask", "dice"):  # final layer's unweighted-by-layer parts
        key = f"loss_{kind}"
        if key in losses:
            out[key] = float(losses[key].detach())
    return out


def train(cfg: TrainConfig | None = None, resume: bool = True, progress: bool = True, stop_at: int = 0,
          **kwargs) -> dict[str, Any]:
    """Train (or resume) a MaskDINO on synthetic shapes; returns a summary dict.

    Keyword arguments override fields of ``cfg`` (e.g. ``train(steps=100, out_dir="runs/x")``).
    ``stop_at > 0`` stops after that many steps in all with a checkpoint and no export (a planned
    interruption: the next call resumes and continues exactly as an uninterrupted run would).
    """
    from tqdm import tqdm

    cfg = dataclasses.replace(cfg or TrainConfig(), **kwargs)
    torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT_NAME

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    model = build_training_model(cfg)
    criterion = build_criterion(model.cfg, num_points=cfg.num_points)
    optimizer = build_optimizer(model, cfg)
    start, elapsed = 0, 0.0
    if resume and ckpt_path.exists():
        ckpt = load_training_checkpoint(ckpt_path, model, optimizer)
        saved = ckpt.get("train_config", {})
        for key in ("seed", "batch_size", "preset", "overrides", "image_size", "train_images"):
            if saved.get(key) != getattr(cfg, key):
                log.warning("resuming with %s=%r but the checkpoint used %r", key, getattr(cfg, key), saved.get(key))
        start, elapsed = int(ckpt["step"]), float(ckpt.get("elapsed_s", 0.0))
        log.info("resumed from %s at step %d", ckpt_path, start)
    model.train()

    stop_requested: list[int] = []
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM: finish the current step, write a checkpoint, stop (the next run resumes from it)
        previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.append(signum))

    metrics_path = out_dir / "metrics.jsonl"
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, dynamic_ncols=True, mininterval=2.0)
    t0 = time.time() - elapsed
    last: dict[str, float] = {}
    smooth = None
    step = start
    try:
        end = min(cfg.steps, stop_at) if stop_at > 0 else cfg.steps
        for step in range(start, end):
            images, targets = make_batch(cfg, step)
            last = train_step(model, criterion, optimizer, images, targets, cfg, step)
            if not math.isfinite(last["loss"]):
                raise FloatingPointError(f"loss is {last['loss']} at step {step}")
            smooth = last["loss"] if smooth is None else 0.95 * smooth + 0.05 * last["loss"]
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.2f}", lr=f"{last['lr']:.1e}")
            done = step + 1
            record = None
            if cfg.log_every and done % cfg.log_every == 0:
                record = {"step": done, "time_s": round(time.time() - t0, 1), "loss_avg": smooth, **last}
            if cfg.val_every and done % cfg.val_every == 0 and done < cfg.steps:
                ap = evaluate(model, cfg.val_seed, cfg.val_images, cfg.shapes_config())
                record = {**(record or {"step": done, "time_s": round(time.time() - t0, 1)}), "val": ap}
                bar.write(f"step {done}: val box AP50 {ap['box_AP50']:.3f} mask AP50 {ap.get('mask_AP50', float('nan')):.3f}")
            if record is not None:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == end or stop_requested:
                save_checkpoint(ckpt_path, model, optimizer, done, cfg, {"elapsed_s": time.time() - t0})
            if stop_requested:
                log.warning("SIGTERM: stopped after step %d with a checkpoint; rerun to resume", done)
                raise SystemExit(128 + signal.SIGTERM)
    finally:
        bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    wall = time.time() - t0
    if stop_at > 0 and stop_at < cfg.steps:
        return {"model": model, "steps": min(stop_at, cfg.steps), "wall_time_s": wall, "last": last,
                "export": None, "checkpoint": str(ckpt_path)}
    model.eval()
    export = Path(cfg.export) if cfg.export else out_dir / "model.safetensors"
    export_weights(model, export, metadata={"steps": cfg.steps, "seed": cfg.seed, "preset": cfg.preset})
    return {"model": model, "steps": cfg.steps, "wall_time_s": wall, "last": last, "export": str(export),
            "checkpoint": str(ckpt_path)}
