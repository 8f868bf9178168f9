"""Configs the tool cannot serve are refused before any work, with one line naming the file / key and the fix:
base configs that name no MaskDINO model, and semantic-only configs (the official ADE20K / Cityscapes R50
YAMLs, mimicked here key for key). Panoptic configs with instance output are served, with a warning. Boxes
are clipped to the image."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from maskdino_lrp import ConfigError, build_model, load_config
from maskdino_lrp.cli import main
from maskdino_lrp.model.config import PRESET_DIR, check_instance_task

# The official Base-*.yaml files (configs/{coco/instance-segmentation,ade20k/semantic-segmentation}/) without
# their training-only sections: no META_ARCHITECTURE, no MaskDINO section.
BASE_COCO = """\
MODEL:
  BACKBONE:
    FREEZE_AT: 0
    NAME: "build_resnet_backbone"
  WEIGHTS: "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
  PIXEL_MEAN: [123.675, 116.280, 103.530]
  PIXEL_STD: [58.395, 57.120, 57.375]
  RESNETS:
    DEPTH: 50
    STEM_TYPE: "basic"  # not used
    STEM_OUT_CHANNELS: 64
    STRIDE_IN_1X1: False
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
    RES5_MULTI_GRID: [1, 1, 1]  # not used
DATASETS:
  TRAIN: ("coco_2017_train",)
  TEST: ("coco_2017_val",)
SOLVER:
  IMS_PER_BATCH: 16
  BASE_LR: 0.0001
  OPTIMIZER: "ADAMW"
INPUT:
  IMAGE_SIZE: 1024
  FORMAT: "RGB"
  DATASET_MAPPER_NAME: "coco_instance_lsj"
TEST:
  EVAL_PERIOD: 5000
DATALOADER:
  NUM_WORKERS: 4
VERSION: 2
"""

BASE_SEMANTIC = """\
MODEL:
  BACKBONE:
    FREEZE_AT: 0
    NAME: "build_resnet_backbone"
  PIXEL_MEAN: [123.675, 116.280, 103.530]
  PIXEL_STD: [58.395, 57.120, 57.375]
  RESNETS:
    DEPTH: 50
    STEM_OUT_CHANNELS: 64
    STRIDE_IN_1X1: False
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
    NORM: "{norm}"
DATASETS:
  TRAIN: ("{dataset}_sem_seg_train",)
INPUT:
  MIN_SIZE_TRAIN: !!python/object/apply:eval ["[int(x * 0.1 * 512) for x in range(5, 21)]"]
  MIN_SIZE_TEST: {min_size}
  MAX_SIZE_TEST: 2048
  CROP:
    ENABLED: True
    SIZE: (512, 1024)
  FORMAT: "RGB"
  DATASET_MAPPER_NAME: "mask_former_semantic"
VERSION: 2
"""

# maskdino_R50_bs16_160k_steplr.yaml (ADE20K) / maskdino_R50_bs16_90k_steplr.yaml (Cityscapes)
SEMANTIC_CHILD = """\
_BASE_: Base.yaml
MODEL:
  META_ARCHITECTURE: "MaskDINO"
  SEM_SEG_HEAD:
    NAME: "MaskDINOHead"
    IGNORE_VALUE: 255
    NUM_CLASSES: {classes}
    CONVS_DIM: 256
    MASK_DIM: 256
    NORM: "GN"
    PIXEL_DECODER_NAME: "MaskDINOEncoder"
    DIM_FEEDFORWARD: 1024
    NUM_FEATURE_LEVELS: 3
    TOTAL_NUM_FEATURE_LEVELS: 3
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
    DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES: ["res3", "res4", "res5"]
    COMMON_STRIDE: 4
    TRANSFORMER_ENC_LAYERS: 6
  MaskDINO:
    TRANSFORMER_DECODER_NAME: "MaskDINODecoder"
    DEEP_SUPERVISION: True
    HIDDEN_DIM: 256
    NUM_OBJECT_QUERIES: 100
    NHEADS: 8
    DROPOUT: 0.0
    DIM_FEEDFORWARD: 2048
    DEC_LAYERS: 9
    TRAIN_NUM_POINTS: 12544
    TWO_STAGE: False
    DN: "seg"
    DN_NUM: 100
    INITIALIZE_BOX_TYPE: "no"
    SEMANTIC_CE_LOSS: True
    TEST:
      SEMANTIC_ON: True
      INSTANCE_ON: False
      PANOPTIC_ON: False
      OVERLAP_THRESHOLD: 0.8
      OBJECT_MASK_THRESHOLD: 0.8
SOLVER:
  MAX_ITER: 90000
  STEPS: (80000,87000)
"""

SEMANTIC = {"ade20k": dict(classes=150, norm="FrozenBN", min_size=512),
            "cityscapes": dict(classes=19, norm="SyncBN", min_size=1024)}


def _semantic_config(folder: Path, dataset: str) -> Path:
    spec = SEMANTIC[dataset]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Base.yaml").write_text(BASE_SEMANTIC.format(norm=spec["norm"], dataset=dataset,
                                                           min_size=spec["min_size"]))
    child = folder / "maskdino_R50.yaml"
    child.write_text(SEMANTIC_CHILD.format(classes=spec["classes"]))
    return child


def _one_error_line(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskdino-lrp: error: ") and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- base configs
def test_a_base_config_alone_is_refused_naming_the_file(tmp_path):
    base = tmp_path / "Base-COCO-InstanceSegmentation.yaml"
    base.write_text(BASE_COCO)
    with pytest.raises(ConfigError) as info:
        load_config(base)
    message = str(info.value)
    assert "\n" not in message and str(base) in message
    assert "names no MaskDINO model" in message and "child config" in message


def test_the_child_of_a_base_config_loads(tmp_path):
    (tmp_path / "Base-COCO-InstanceSegmentation.yaml").write_text(BASE_COCO)
    child = tmp_path / "maskdino_R50.yaml"
    child.write_text((PRESET_DIR / "maskdino_r50_3s_coco.yaml").read_text()
                     .replace("MODEL:\n", "_BASE_: Base-COCO-InstanceSegmentation.yaml\nMODEL:\n", 1))
    cfg = load_config(child)
    assert cfg["MODEL"]["MaskDINO"]["NUM_OBJECT_QUERIES"] == 300
    check_instance_task(cfg)


def test_a_yaml_with_only_maskdino_keys_still_loads(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"_BASE_: {PRESET_DIR / 'tiny.yaml'}\nMODEL:\n  MaskDINO:\n    DEC_LAYERS: 1\n")
    assert load_config(cfg)["MODEL"]["MaskDINO"]["DEC_LAYERS"] == 1
    plain = tmp_path / "plain.yaml"
    plain.write_text("MODEL:\n  MaskDINO:\n    DEC_LAYERS: 1\n")
    load_config(plain)


def test_cli_refuses_a_base_config_in_one_line(tmp_path, capsys):
    base = tmp_path / "Base.yaml"
    base.write_text(BASE_COCO)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    line = _one_error_line(capsys, main(["explain", str(image), "--config", str(base), "--out", str(tmp_path / "o")]))
    assert "names no MaskDINO model" in line and "Base.yaml" in line
    assert not (tmp_path / "o").exists()
    line = _one_error_line(capsys, main(["estimate", "--config", str(base), "--image-size", "64", "--queries", "1"]))
    assert "names no MaskDINO model" in line


# ----------------------------------------------------------------------------- semantic / panoptic
@pytest.mark.parametrize("dataset", sorted(SEMANTIC))
def test_official_semantic_configs_are_refused_before_building(tmp_path, dataset, monkeypatch):
    child = _semantic_config(tmp_path / dataset, dataset)
    cfg = load_config(child)  # the config itself is valid
    assert cfg["MODEL"]["SEM_SEG_HEAD"]["NUM_CLASSES"] == SEMANTIC[dataset]["classes"]
    import maskdino_lrp.model.maskdino as maskdino

    monkeypatch.setattr(maskdino, "MaskDINO", lambda cfg: pytest.fail("the model was built"))
    with pytest.raises(ConfigError) as info:
        maskdino.build_model(child)
    message = str(info.value)
    assert "\n" not in message and "INSTANCE_ON is False" in message and "semantic-segmentation" in message
    assert message.startswith(f"config {child}: ")


@pytest.mark.parametrize("dataset", sorted(SEMANTIC))
def test_cli_refuses_semantic_configs_before_any_work(tmp_path, capsys, dataset):
    child = _semantic_config(tmp_path / dataset, dataset)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    out = tmp_path / "out"
    line = _one_error_line(capsys, main(["explain", str(image), "--config", str(child), "--out", str(out)]))
    assert "INSTANCE_ON is False" in line and "instance-segmentation config" in line and str(child) in line
    assert not out.exists()


def test_semantic_ce_head_with_instance_output_is_refused():
    cfg = load_config("tiny", {"MODEL.MaskDINO.SEMANTIC_CE_LOSS": True, "MODEL.MaskDINO.TEST.SEMANTIC_ON": True})
    with pytest.raises(ConfigError, match="NUM_CLASSES \\+ 1"):
        check_instance_task(cfg)
    with pytest.raises(ConfigError, match="SEMANTIC_CE_LOSS"):
        build_model("tiny", {"MODEL.MaskDINO.SEMANTIC_CE_LOSS": True, "MODEL.MaskDINO.TEST.SEMANTIC_ON": True})


def test_postprocess_refuses_a_class_head_of_another_width():
    """A model built around the check (MaskDINO(cfg) directly) fails clearly, not with an IndexError."""
    from maskdino_lrp import MaskDINO

    torch.manual_seed(0)
    model = MaskDINO(load_config("tiny", {"MODEL.MaskDINO.SEMANTIC_CE_LOSS": True,
                                          "MODEL.MaskDINO.TEST.SEMANTIC_ON": True}))
    with pytest.raises(ValueError, match="class head has 5 outputs, not NUM_CLASSES=4"):
        model.predict(np.zeros((64, 64, 3), np.uint8))


def test_panoptic_config_with_instance_output_works_with_a_warning(tmp_path, caplog):
    """The official COCO panoptic config's TEST flags (and its 4 feature levels, low2high order) on tiny sizes."""
    cfg = tmp_path / "panoptic.yaml"
    cfg.write_text(f"_BASE_: {PRESET_DIR / 'tiny.yaml'}\nMODEL:\n  SEM_SEG_HEAD:\n    TOTAL_NUM_FEATURE_LEVELS: 4\n"
                   "    FEATURE_ORDER: low2high\n  MaskDINO:\n    INITIALIZE_BOX_TYPE: 'no'\n    TEST:\n"
                   "      SEMANTIC_ON: True\n      INSTANCE_ON: True\n      PANOPTIC_ON: True\n")
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="maskdino_lrp"):
        model = build_model(cfg)
    assert "panoptic config" in caplog.text and "'stuff' classes" in caplog.text
    det = model.predict(np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8))
    assert len(det) > 0 and det.masks.shape[1:] == (96, 80)


def test_default_dict_config_without_instance_output_is_refused_at_build():
    with pytest.raises(ConfigError, match="INSTANCE_ON is False"):
        build_model({"MODEL": {"MaskDINO": {"DEC_LAYERS": 1}}})


# ----------------------------------------------------------------------------- boxes
def test_boxes_are_clipped_to_the_image():
    torch.manual_seed(0)
    model = build_model("tiny")
    image = np.random.default_rng(1).integers(0, 256, (70, 110, 3), dtype=np.uint8)  # padded on both sides
    prepared = model.prepare(image)
    with torch.no_grad():
        outputs = dict(model(prepared.tensor))
    boxes = outputs["pred_boxes"].clone()
    boxes[0, :, :] = torch.tensor([0.02, 0.98, 0.5, 0.5])  # every box sticks out left and bottom
    boxes[0, 1] = torch.tensor([0.5, 0.5, 3.0, 3.0])  # far larger than the image
    boxes[0, 2] = torch.tensor([0.2, 0.2, 0.1, 0.1])  # inside: left as it is
    outputs["pred_boxes"] = boxes
    det = model.postprocess(outputs, prepared)
    b = det.boxes
    assert torch.all(b[:, 0] >= 0) and torch.all(b[:, 1] >= 0)
    assert torch.all(b[:, 2] <= 110) and torch.all(b[:, 3] <= 70)
    assert torch.all(b[:, 2] >= b[:, 0]) and torch.all(b[:, 3] >= b[:, 1])
    whole = model.boxes_to_image(boxes[0, 1:2], prepared)[0]
    assert torch.allclose(whole, torch.tensor([0.0, 0.0, 110.0, 70.0]))
    inside = model.boxes_to_image(boxes[0, 2:3], prepared)[0]
    assert inside[0] > 0 and inside[2] < 110 and inside[1] > 0 and inside[3] < 70
