"""Configuration: official MaskDINO / detectron2 keys as plain nested dicts.

A config is given as an official YAML file (``_BASE_`` chains are followed), a preset name, or a
nested dict of official keys. Defaults follow detectron2 and ``maskdino/config.py``; only keys that
change the model at inference are interpreted, training-only keys are accepted and ignored, and an
unknown key is an error that names it (with the closest known key as a hint).
"""
from __future__ import annotations

import copy
import difflib
import logging
from pathlib import Path
from typing import Any, Mapping

import yaml

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


class ConfigError(ValueError):
    """A config key or value the model does not know or support."""


# Keys that shape the model at inference, with detectron2 / MaskDINO defaults (IN_FEATURES defaults to
# the ResNet's res2..res5 rather than detectron2's FPN names p2..p5, which no MaskDINO config uses).
DEFAULTS: dict[str, Any] = {
    "MODEL": {
        "META_ARCHITECTURE": "MaskDINO",
        "WEIGHTS": "",
        "DEVICE": "cpu",
        "PIXEL_MEAN": [103.530, 116.280, 123.675],
        "PIXEL_STD": [1.0, 1.0, 1.0],
        "BACKBONE": {"NAME": "build_resnet_backbone", "FREEZE_AT": 2},
        "RESNETS": {
            "DEPTH": 50,
            "OUT_FEATURES": ["res2", "res3", "res4", "res5"],
            "NUM_GROUPS": 1,
            "NORM": "FrozenBN",
            "WIDTH_PER_GROUP": 64,
            "STRIDE_IN_1X1": True,
            "RES5_DILATION": 1,
            "RES2_OUT_CHANNELS": 256,
            "STEM_OUT_CHANNELS": 64,
            "STEM_TYPE": "basic",
            "RES5_MULTI_GRID": [1, 1, 1],
            "DEFORM_ON_PER_STAGE": [False, False, False, False],
            "DEFORM_MODULATED": False,
            "DEFORM_NUM_GROUPS": 1,
        },
        # D2SwinTransformer (maskdino/config.py). The drop rates only act in training and USE_CHECKPOINT
        # only saves memory there: accepted, without effect on the eval-mode numbers.
        "SWIN": {
            "PRETRAIN_IMG_SIZE": 224,
            "PATCH_SIZE": 4,
            "EMBED_DIM": 96,
            "DEPTHS": [2, 2, 6, 2],
            "NUM_HEADS": [3, 6, 12, 24],
            "WINDOW_SIZE": 7,
            "MLP_RATIO": 4.0,
            "QKV_BIAS": True,
            "QK_SCALE": None,
            "DROP_RATE": 0.0,
            "ATTN_DROP_RATE": 0.0,
            "DROP_PATH_RATE": 0.3,
            "APE": False,
            "PATCH_NORM": True,
            "OUT_FEATURES": ["res2", "res3", "res4", "res5"],
            "USE_CHECKPOINT": False,
        },
        "SEM_SEG_HEAD": {
            "NAME": "MaskDINOHead",
            "IN_FEATURES": ["res2", "res3", "res4", "res5"],
            "IGNORE_VALUE": 255,
            "NUM_CLASSES": 54,
            "LOSS_WEIGHT": 1.0,
            "CONVS_DIM": 128,
            "MASK_DIM": 256,
            "NORM": "GN",
            "COMMON_STRIDE": 4,
            "PIXEL_DECODER_NAME": "MaskDINOEncoder",
            "TRANSFORMER_ENC_LAYERS": 0,
            "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": ["res3", "res4", "res5"],
            "DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS": 4,
            "DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS": 8,
            "DIM_FEEDFORWARD": 1024,
            "NUM_FEATURE_LEVELS": 3,
            "TOTAL_NUM_FEATURE_LEVELS": 4,
            "FEATURE_ORDER": "high2low",
        },
        "MaskDINO": {
            "LEARN_TGT": False,
            "PANO_BOX_LOSS": False,
            "SEMANTIC_CE_LOSS": False,
            "DEEP_SUPERVISION": True,
            "NO_OBJECT_WEIGHT": 0.1,
            "CLASS_WEIGHT": 4.0,
            "DICE_WEIGHT": 5.0,
            "MASK_WEIGHT": 5.0,
            "BOX_WEIGHT": 5.0,
            "GIOU_WEIGHT": 2.0,
            "COST_CLASS_WEIGHT": 4.0,
            "COST_DICE_WEIGHT": 5.0,
            "COST_MASK_WEIGHT": 5.0,
            "COST_BOX_WEIGHT": 5.0,
            "COST_GIOU_WEIGHT": 2.0,
            "NHEADS": 8,
            "DROPOUT": 0.1,
            "DIM_FEEDFORWARD": 2048,
            "ENC_LAYERS": 0,
            "DEC_LAYERS": 6,
            "INITIAL_PRED": True,
            "PRE_NORM": False,
            "BOX_LOSS": True,
            "HIDDEN_DIM": 256,
            "NUM_OBJECT_QUERIES": 100,
            "ENFORCE_INPUT_PROJ": False,
            "TWO_STAGE": True,
            "INITIALIZE_BOX_TYPE": "no",
            "DN": "seg",
            "DN_NOISE_SCALE": 0.4,
            "DN_NUM": 100,
            "PRED_CONV": False,
            "EVAL_FLAG": 1,
            "SIZE_DIVISIBILITY": 32,
            "TRANSFORMER_DECODER_NAME": "MaskDINODecoder",
            "TRAIN_NUM_POINTS": 112 * 112,
            "OVERSAMPLE_RATIO": 3.0,
            "IMPORTANCE_SAMPLE_RATIO": 0.75,
            "TEST": {
                "TEST_FOUCUS_ON_BOX": False,
                "SEMANTIC_ON": True,
                "INSTANCE_ON": False,
                "PANOPTIC_ON": False,
                "OBJECT_MASK_THRESHOLD": 0.0,
                "OVERLAP_THRESHOLD": 0.0,
                "SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE": False,
                "PANO_TRANSFORM_EVAL": True,
                "PANO_TEMPERATURE": 0.06,
            },
        },
    },
    "INPUT": {
        "FORMAT": "BGR",
        "MIN_SIZE_TEST": 800,
        "MAX_SIZE_TEST": 1333,
    },
    "TEST": {"DETECTIONS_PER_IMAGE": 100},
    # maskdino-lrp's own section: class names shown in outputs (official configs take them from datasets).
    "LRP_TOOL": {"CLASS_NAMES": []},
}

# Sections and keys that only matter for training or evaluation runs: accepted, never interpreted.
IGNORED_PREFIXES = (
    "SOLVER", "DATASETS", "DATALOADER", "VERSION", "OUTPUT_DIR", "SEED", "CUDNN_BENCHMARK",
    "GLOBAL", "Default_loading", "VIS_PERIOD", "TEST.AUG", "TEST.EVAL_PERIOD", "TEST.EXPECTED_RESULTS",
    "TEST.PRECISE_BN", "TEST.KEYPOINT_OKS_SIGMAS", "INPUT.", "MODEL.FOCAL", "MODEL.LOAD_PROPOSALS",
    "MODEL.MASK_ON", "MODEL.KEYPOINT_ON", "MODEL.ANCHOR_GENERATOR", "MODEL.PROPOSAL_GENERATOR", "MODEL.RPN",
    "MODEL.ROI_HEADS", "MODEL.ROI_BOX_HEAD", "MODEL.ROI_MASK_HEAD", "MODEL.FPN", "MODEL.PANOPTIC_FPN",
    "MODEL.RETINANET", "MODEL.ROI_KEYPOINT_HEAD", "MODEL.ROI_BOX_CASCADE_HEAD",
)

# The backbones the port builds (MODEL.BACKBONE.NAME) and the section holding each one's keys.
BACKBONE_SECTIONS = {"build_resnet_backbone": "RESNETS", "D2SwinTransformer": "SWIN"}

# Values the port supports, checked after merging; anything else is a ConfigError naming the key.
CHOICES: dict[str, tuple] = {
    "MODEL.META_ARCHITECTURE": ("MaskDINO",),
    "MODEL.BACKBONE.NAME": tuple(BACKBONE_SECTIONS),
    "MODEL.RESNETS.DEPTH": (18, 34, 50, 101),
    "MODEL.RESNETS.NORM": ("FrozenBN", "BN", "SyncBN", "GN"),
    "MODEL.SEM_SEG_HEAD.NAME": ("MaskDINOHead",),
    "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME": ("MaskDINOEncoder",),
    "MODEL.SEM_SEG_HEAD.NORM": ("GN", ""),
    "MODEL.SEM_SEG_HEAD.FEATURE_ORDER": ("high2low", "low2high"),
    "MODEL.MaskDINO.TRANSFORMER_DECODER_NAME": ("MaskDINODecoder",),
    "MODEL.MaskDINO.INITIALIZE_BOX_TYPE": ("no", "bitmask", "mask2box"),
    "MODEL.MaskDINO.HIDDEN_DIM": (256,),
    "MODEL.MaskDINO.PRE_NORM": (False,),
    "MODEL.MaskDINO.PRED_CONV": (False,),
    "INPUT.FORMAT": ("RGB", "BGR"),
}


def get(cfg: Mapping[str, Any], dotted: str) -> Any:
    """Value at an official dotted key, e.g. ``get(cfg, "MODEL.MaskDINO.DEC_LAYERS")``."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"config has no key {dotted!r}")
        node = node[part]
    return node


def _known_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, Mapping):
            out.extend(_known_keys(v, key + "."))
    return out


def _is_ignored(dotted: str) -> bool:
    return any(dotted == p.rstrip(".") or dotted.startswith(p if p.endswith(".") else p + ".")
               for p in IGNORED_PREFIXES) and dotted not in _INTERPRETED_INPUT


_INTERPRETED_INPUT = {"INPUT.FORMAT", "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST"}


def _merge(base: dict, update: Mapping[str, Any], prefix: str = "") -> None:
    """Merge ``update`` into ``base`` in place, rejecting unknown keys."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key == "_BASE_":
            continue
        if dotted not in _KNOWN:
            if _is_ignored(dotted):
                log.debug("config key %s is training-only or unused at inference; ignored", dotted)
                base[key] = copy.deepcopy(value)
                continue
            hint = difflib.get_close_matches(dotted, _KNOWN, n=1)
            raise ConfigError(
                f"unknown config key {dotted!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + " (maskdino-lrp accepts the official MaskDINO/detectron2 keys)"
            )
        if isinstance(value, Mapping):
            if not isinstance(base.get(key), dict):
                raise ConfigError(f"config key {dotted!r} is a section, got a mapping where a value was expected")
            _merge(base[key], value, dotted + ".")
        else:
            if isinstance(base.get(key), dict):
                raise ConfigError(f"config key {dotted!r} is a section; give its sub-keys, not a value")
            base[key] = copy.deepcopy(value)


_KNOWN = set(_known_keys(DEFAULTS))


class _YamlLoader(yaml.SafeLoader):
    """Safe loader that tolerates detectron2's python tags in training-only sections."""


_YamlLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[dict]:
    """The YAML at ``path`` preceded by its ``_BASE_`` chain, base first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"_BASE_ cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_YamlLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of official keys")
    chain: list[dict] = []
    base = data.get("_BASE_")
    if base:
        base_path = Path(base)
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        chain.extend(_read_yaml_chain(base_path, (*seen, path)))
    chain.append(data)
    return chain


def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    update: dict = {}
    node = update
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    _merge(cfg, update)


def load_config(config: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict:
    """Full config (defaults merged) from a YAML path, a preset name or a nested dict of official keys.

    ``overrides`` maps dotted official keys to values, e.g. ``{"MODEL.MaskDINO.DEC_LAYERS": 3}``.
    """
    cfg = copy.deepcopy(DEFAULTS)
    if isinstance(config, Mapping):
        _merge(cfg, config)
    else:
        text = str(config)
        path = Path(text)
        if not path.suffix and (PRESET_DIR / f"{text}.yaml").is_file():
            path = PRESET_DIR / f"{text}.yaml"
        elif not path.exists():
            raise ConfigError(
                f"config {text!r} is neither a file nor a preset; presets: {', '.join(preset_names())}"
            )
        chain = _read_yaml_chain(path)
        for layer in chain:
            _merge(cfg, layer)
        _require_maskdino_model(path, chain)
    for dotted, value in (overrides or {}).items():
        _set_dotted(cfg, dotted, value)
    validate(cfg)
    return cfg


def _require_maskdino_model(path: Path, chain: list[dict]) -> None:
    """Refuse a YAML whose chain names no MaskDINO model (e.g. an official Base-*.yaml given on its own)."""
    for layer in chain:
        model = layer.get("MODEL")
        if isinstance(model, Mapping) and ("META_ARCHITECTURE" in model or "MaskDINO" in model):
            return
    raise ConfigError(
        f"config {path} names no MaskDINO model (neither it nor its _BASE_ chain sets MODEL.META_ARCHITECTURE or "
        "MODEL.MaskDINO), so it would build from defaults; it looks like a base config: pass the child config "
        "that builds on it (e.g. maskdino_R50_bs16_50ep_3s.yaml)"
    )


def check_instance_task(cfg: Mapping[str, Any], warn: bool = True, source: Any = None) -> None:
    """Refuse, before any work, a config whose predictions the instance post-processing cannot read.

    maskdino-lrp explains instance predictions (MaskDINO's ``instance_inference``). A semantic-segmentation
    config (``TEST.INSTANCE_ON: False``, e.g. the official ADE20K / Cityscapes ones) has no instance output,
    and one trained with ``SEMANTIC_CE_LOSS`` has a softmax class head with NUM_CLASSES + 1 outputs.
    A panoptic config with ``INSTANCE_ON: True`` is read as instances, with a warning: the official instance
    output keeps only the "thing" classes, which come from dataset metadata this tool does not have
    (``warn=False``: no warning, for a check repeated later). ``source`` (a file or preset name) starts the message.
    """
    where = f"config {source}: " if isinstance(source, (str, Path)) else ""
    test = get(cfg, "MODEL.MaskDINO.TEST")
    if not test.get("INSTANCE_ON"):
        tasks = [t for t, k in (("semantic", "SEMANTIC_ON"), ("panoptic", "PANOPTIC_ON")) if test.get(k)]
        kind = f"a {' + '.join(tasks)}-segmentation config" if tasks else "a config with no output enabled"
        raise ConfigError(
            f"{where}MODEL.MaskDINO.TEST.INSTANCE_ON is False ({kind}): maskdino-lrp explains instance predictions only; "
            "semantic/panoptic post-processing is not supported — use an instance-segmentation config "
            "(MODEL.MaskDINO.TEST.INSTANCE_ON: True)"
        )
    if test.get("SEMANTIC_ON") and get(cfg, "MODEL.MaskDINO.SEMANTIC_CE_LOSS"):
        raise ConfigError(
            f"{where}MODEL.MaskDINO.SEMANTIC_CE_LOSS with TEST.SEMANTIC_ON gives a softmax class head (NUM_CLASSES + 1 "
            "outputs) that the instance post-processing cannot read; use an instance-segmentation config"
        )
    if test.get("PANOPTIC_ON") and warn:
        log.warning("%spanoptic config: its instance detections include 'stuff' classes (the official instance "
                    "output keeps 'thing' classes only, from dataset metadata maskdino-lrp does not have)", where)


def validate(cfg: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the key for values the port does not support."""
    for dotted, allowed in CHOICES.items():
        value = get(cfg, dotted)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not supported; supported: {list(allowed)}")
    for dotted in ("MODEL.MaskDINO.DEC_LAYERS", "MODEL.MaskDINO.NUM_OBJECT_QUERIES",
                   "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS"):
        value = get(cfg, dotted)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if "ENC" in dotted else 1):
            raise ConfigError(f"{dotted}={value!r} must be a positive integer")
    if any(get(cfg, "MODEL.RESNETS.DEFORM_ON_PER_STAGE")):
        raise ConfigError("MODEL.RESNETS.DEFORM_ON_PER_STAGE: deformable convolutions are not supported")
    head = get(cfg, "MODEL.SEM_SEG_HEAD")
    if head["TOTAL_NUM_FEATURE_LEVELS"] < head["NUM_FEATURE_LEVELS"]:
        raise ConfigError("MODEL.SEM_SEG_HEAD.TOTAL_NUM_FEATURE_LEVELS must be >= NUM_FEATURE_LEVELS")
    for name in ("PIXEL_MEAN", "PIXEL_STD"):
        value = get(cfg, f"MODEL.{name}")
        if len(value) != 3:
            raise ConfigError(f"MODEL.{name} must have 3 values (one per RGB channel), got {value!r}")
    out_features = f"MODEL.{BACKBONE_SECTIONS[get(cfg, 'MODEL.BACKBONE.NAME')]}.OUT_FEATURES"
    missing = set(head["IN_FEATURES"]) - set(get(cfg, out_features))
    if missing:
        raise ConfigError(
            f"MODEL.SEM_SEG_HEAD.IN_FEATURES needs {sorted(missing)} which {out_features} does not produce"
        )
