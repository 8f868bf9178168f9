"""The whole pipeline: configs, image input, pre/post-processing, checkpoints — and clear errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from maskdino_lrp import ConfigError, ImageError, build_model, load_config
from maskdino_lrp.model.checkpoint import CheckpointError
from maskdino_lrp.model.config import get


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny")


def test_config_forms_agree(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("MODEL:\n  MaskDINO:\n    DEC_LAYERS: 4\n    NUM_OBJECT_QUERIES: 50\nSOLVER:\n  BASE_LR: 0.1\n")
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: base.yaml\nMODEL:\n  MaskDINO:\n    DEC_LAYERS: 5\n")
    cfg = load_config(child, overrides={"MODEL.MaskDINO.NUM_OBJECT_QUERIES": 20})
    assert get(cfg, "MODEL.MaskDINO.DEC_LAYERS") == 5 and get(cfg, "MODEL.MaskDINO.NUM_OBJECT_QUERIES") == 20
    as_dict = load_config({"MODEL": {"MaskDINO": {"DEC_LAYERS": 5, "NUM_OBJECT_QUERIES": 20}}})
    assert get(as_dict, "MODEL.MaskDINO.DEC_LAYERS") == 5
    full = load_config("maskdino_r50_3s_coco_3dec")
    assert get(full, "MODEL.MaskDINO.DEC_LAYERS") == 3 and get(full, "MODEL.MaskDINO.NUM_OBJECT_QUERIES") == 300


@pytest.mark.parametrize("config,overrides,message", [
    ({"MODEL": {"MaskDINO": {"DEC_LAYER": 3}}}, None, "unknown config key 'MODEL.MaskDINO.DEC_LAYER'; did you mean 'MODEL.MaskDINO.DEC_LAYERS'"),
    ("tiny", {"MODEL.MaskDINO.INITIALIZE_BOX_TYPE": "boxes"}, "INITIALIZE_BOX_TYPE='boxes' is not supported"),
    ("tiny", {"MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone"},
     "MODEL.BACKBONE.NAME='build_resnet_fpn_backbone' is not supported"),
    ("tiny", {"MODEL.MaskDINO.DEC_LAYERS": 0}, "DEC_LAYERS=0 must be a positive integer"),
    ("no_such_preset", None, "neither a file nor a preset"),
])
def test_config_errors_name_the_key(config, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(config, overrides)


def test_predict_accepts_array_pil_and_path(tiny, tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)  # non-square, padded
    path = tmp_path / "x.png"
    Image.fromarray(img).save(path)
    results = [tiny.predict(img), tiny.predict(Image.fromarray(img)), tiny.predict(path)]
    for det in results:
        assert det.masks.shape[1:] == (100, 150) and det.image_size == (100, 150)
        assert torch.all(det.scores[:-1] >= det.scores[1:])
        assert torch.all((det.query_indices >= 0) & (det.query_indices < tiny.num_queries))
    assert torch.equal(results[0].scores, results[2].scores)


def test_preprocessing_resizes_and_pads_like_detectron2(tiny):
    prepared = tiny.prepare(np.zeros((100, 150, 3), np.uint8))
    # shortest edge 100 → 128 (MIN_SIZE_TEST), capped by MAX_SIZE_TEST 128 on the long side: scale 128/150
    assert prepared.resized_size == (int(100 * 128 / 150 + 0.5), 128)
    assert prepared.tensor.shape[-2] % 32 == 0 and prepared.tensor.shape[-1] % 32 == 0
    assert torch.all(prepared.tensor[..., prepared.resized_size[0]:, :] == 0)  # zero padding after normalising


@pytest.mark.parametrize("image,message", [
    (np.zeros((64, 64), np.uint8), "grayscale"),
    (np.zeros((64, 64, 4), np.uint8), "RGBA"),
    (np.zeros((3, 64, 64), np.uint8), "channel-first"),
    (np.zeros((64, 64, 3), np.float32), "uint8"),
    (np.full((64, 64, 3), np.nan, np.float32), "NaN"),
    (np.zeros((16, 64, 3), np.uint8), "at least 32"),
    ("/no/such/image.png", "not found"),
])
def test_bad_images_get_clear_errors(tiny, image, message):
    with pytest.raises(ImageError, match=message):
        tiny.predict(image)


def test_too_few_encoder_tokens_for_the_queries_is_a_clear_error():
    torch.manual_seed(0)
    model = build_model("tiny", overrides={"MODEL.MaskDINO.NUM_OBJECT_QUERIES": 400})
    assert model.encoder_tokens(128, 128) == 16 * 16 + 8 * 8 + 4 * 4
    with pytest.raises(ImageError, match="its 336 encoder tokens are fewer than the model's 400 queries"):
        model.predict(np.zeros((64, 64, 3), np.uint8))


def test_checkpoint_for_a_different_config_is_refused(tiny, tmp_path):
    torch.manual_seed(0)
    other = build_model("tiny", overrides={"MODEL.SEM_SEG_HEAD.NUM_CLASSES": 7})
    path = tmp_path / "other.pth"
    torch.save({"model": other.state_dict()}, path)
    with pytest.raises(CheckpointError, match="class_embed.weight"):
        build_model("tiny", checkpoint=path, strict=True)
    with pytest.raises(CheckpointError, match="not found|does not exist|No such"):
        build_model("tiny", checkpoint=tmp_path / "missing.pth")


def test_checkpoint_round_trip_gives_identical_outputs(tiny, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save({"model": tiny.state_dict(), "pixel_mean": tiny.pixel_mean.flatten()}, path)
    again = build_model("tiny", checkpoint=path, strict=True)
    img = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    assert torch.equal(tiny.predict(img).scores, again.predict(img).scores)
