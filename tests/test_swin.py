"""The Swin backbone (D2SwinTransformer): the official outputs, independent slow references, configs, checkpoints.

The references here share no code with ``model/swin.py``: a block is dense attention over the whole
padded map in which each token attends to the tokens of its (shifted) window, found by coordinate
arithmetic (no partition, no roll, no mask tensor), with the bias of their offset read from the table as
a (2·ws − 1) × (2·ws − 1) grid and −100 between tokens that wrapped around the map differently; patches
and 2×2 merges are taken with unfold / reshape instead of a conv and strided slices.
"""
import itertools
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from conftest import fixture_dir
from maskdino_lrp.model.checkpoint import load_checkpoint, read_state_dict
from maskdino_lrp.model.config import ConfigError, get, load_config
from maskdino_lrp.model.swin import (SHIFT_MASK_VALUE, AttentionProduct, SwinTransformer, WindowAttention,
                                     build_swin_backbone, relative_position_index, shift_attention_mask,
                                     window_attention, window_partition, window_reverse)

OFFICIAL_CONFIGS = Path(__file__).parent / "configs" / "official_coco"
SWIN_YAMLS = sorted(OFFICIAL_CONFIGS.glob("*/swin/*.yaml"))


# ----------------------------------------------------------------------------- independent references
def ref_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def ref_block(block, x: torch.Tensor) -> torch.Tensor:
    """One Swin block on (B, H, W, C) as dense attention over the zero-padded map."""
    b, h, w, c = x.shape
    ws, s = block.window_size, block.shift_size
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    y = x.new_zeros(b, hp, wp, c)
    y[:, :h, :w] = ref_layer_norm(block.norm1, x)  # padding comes after the norm: padded tokens are zeros
    rows, cols = (t.flatten() for t in torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij"))
    sr, sc = (rows - s) % hp, (cols - s) % wp  # where each token sits after the cyclic shift by −s
    window = (sr // ws) * (wp // ws) + sc // ws
    lr, lc = sr % ws, sc % ws  # position inside its window
    attn = block.attn
    heads, d = attn.num_heads, c // attn.num_heads
    grid = attn.relative_position_bias_table.view(2 * ws - 1, 2 * ws - 1, heads)
    bias = grid[lr[:, None] - lr[None, :] + ws - 1, lc[:, None] - lc[None, :] + ws - 1].permute(2, 0, 1)  # (nH, L, L)
    if s:
        wrapped = (sr >= hp - s).long() * 2 + (sc >= wp - s).long()  # came from the other side of the map
        bias = bias + SHIFT_MASK_VALUE * (wrapped[:, None] != wrapped[None, :])
    tokens = y.reshape(b, hp * wp, c)
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2)
               for t in (tokens @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0)).split(c, -1))
    logits = (q @ k.transpose(-1, -2)) * attn.scale + bias
    logits = logits.masked_fill(window[:, None] != window[None, :], float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, hp, wp, c)
    x = x + (out @ attn.proj.weight.T + attn.proj.bias)[:, :h, :w]
    mlp = block.mlp
    hidden = ref_layer_norm(block.norm2, x) @ mlp.fc1.weight.T + mlp.fc1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / 2 ** 0.5))  # exact GELU
    return x + hidden @ mlp.fc2.weight.T + mlp.fc2.bias


def ref_merge(merge, x: torch.Tensor) -> torch.Tensor:
    """2×2 neighbourhoods in the order (0,0), (1,0), (0,1), (1,1) (row offset fastest), norm, reduction."""
    b, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    x = x.reshape(b, x.shape[1] // 2, 2, x.shape[2] // 2, 2, c).permute(0, 1, 3, 4, 2, 5)  # (B, H/2, W/2, dc, dr, C)
    return ref_layer_norm(merge.norm, x.reshape(*x.shape[:3], 4 * c)) @ merge.reduction.weight.T


def ref_forward(model: SwinTransformer, image: torch.Tensor) -> dict:
    embed = model.patch_embed
    p = embed.patch_size[0]
    h, w = image.shape[-2:]
    x = F.pad(image, (0, (-w) % p, 0, (-h) % p))
    patches = x.unfold(2, p, p).unfold(3, p, p)  # (B, 3, H/p, W/p, p, p)
    x = torch.einsum("bcijuv,ecuv->bije", patches, embed.proj.weight) + embed.proj.bias
    if embed.norm is not None:
        x = ref_layer_norm(embed.norm, x)
    if model.ape:
        x = x + F.interpolate(model.absolute_pos_embed, size=x.shape[1:3], mode="bicubic").permute(0, 2, 3, 1)
    outs = {}
    for i, layer in enumerate(model.layers):
        for block in layer.blocks:
            x = ref_block(block, x)
        outs[f"res{i + 2}"] = ref_layer_norm(getattr(model, f"norm{i}"), x).permute(0, 3, 1, 2)
        if layer.downsample is not None:
            x = ref_merge(layer.downsample, x)
    return outs


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter so that biases, norms and the bias tables all matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("relative_position_bias_table") or name.endswith("absolute_pos_embed"):
                p.copy_(noise)
            elif p.dim() == 1:
                p.add_(0.2 * noise)
            else:
                p.mul_(1 + 0.2 * noise)
    return model.eval()


def scale_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's activation scale (its largest magnitude)."""
    return ((out - ref).abs().max() / ref.abs().max()).item()


# ----------------------------------------------------------------------------- the official outputs
@pytest.fixture(scope="module")
def official():
    folder = fixture_dir("swin")
    return json.loads((folder / "config.json").read_text()), load_file(str(folder / "swin.safetensors"))


def test_matches_the_official_backbone(official):
    config, tensors = official
    state = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    model = build_swin_backbone({"MODEL": {"SWIN": config["MODEL.SWIN"]}}).eval()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    # through the checkpoint loader, as a full checkpoint holds it (under backbone.)
    holder = nn.Module()
    holder.backbone = model
    report = load_checkpoint(holder, {f"backbone.{k}": v for k, v in state.items()}, strict=True)
    assert report.ok and len(report.loaded) == len(state)
    with torch.no_grad():
        out = model(tensors["input.image"])
    assert list(out) == config["MODEL.SWIN"]["OUT_FEATURES"]
    for name, shape in config["outputs"].items():
        ref = tensors[f"output.{name}"]
        assert tuple(out[name].shape) == tuple(shape)
        assert out[name].is_contiguous()
        # measured 6e-7 of the activation scale (float32 rounding of a differently ordered computation)
        assert scale_error(out[name], ref) <= 1e-5, name


def test_official_fixture_against_the_reference(official):
    """The reference below is checked against the official outputs too, so its semantics are the official ones."""
    config, tensors = official
    state = {k[len("state_dict."):]: v.double() for k, v in tensors.items() if k.startswith("state_dict.")}
    model = build_swin_backbone({"MODEL": {"SWIN": config["MODEL.SWIN"]}}).double().eval()
    model.load_state_dict(state)
    with torch.no_grad():
        ref = ref_forward(model, tensors["input.image"].double())
    for name in config["outputs"]:
        assert scale_error(ref[name].float(), tensors[f"output.{name}"]) <= 1e-5, name


def test_swin_large_has_exactly_the_official_keys_and_shapes():
    lines = (fixture_dir("swin") / "swin_large_keys.txt").read_text().splitlines()
    official = [(key, json.loads(shape)) for key, shape in (line.split(" ", 1) for line in lines)]
    model = build_swin_backbone(load_config("maskdino_swinl_coco"))
    assert [(f"backbone.{k}", list(v.shape)) for k, v in model.state_dict().items()] == official
    assert model.output_shape() == {"res2": (192, 4), "res3": (384, 8), "res4": (768, 16), "res5": (1536, 32)}


# ----------------------------------------------------------------------------- cross-checks
SETTINGS = {
    # name: (SwinTransformer keyword arguments, input shape)
    "window7-fixture-size": (dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7), (1, 3, 96, 128)),
    "window3-odd-sizes": (dict(embed_dim=8, depths=[1, 3, 2, 2], num_heads=[2, 2, 4, 4], window_size=3), (1, 3, 50, 78)),
    "window2-batch2": (dict(embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 1, 2, 2], window_size=2), (2, 3, 64, 40)),
    "window12-maps-smaller": (dict(embed_dim=8, depths=[2, 2, 2, 2], num_heads=[2, 2, 2, 2], window_size=12), (1, 3, 56, 88)),
    "window5-ape-options": (dict(embed_dim=12, depths=[2, 1, 2, 1], num_heads=[3, 3, 6, 6], window_size=5, ape=True,
                                 pretrain_img_size=64, patch_norm=False, qkv_bias=False, qk_scale=0.3, mlp_ratio=2.5),
                            (1, 3, 36, 60)),
    "window1": (dict(embed_dim=8, depths=[2, 2, 1, 1], num_heads=[1, 2, 2, 2], window_size=1), (1, 3, 32, 24)),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_matches_the_slow_reference(setting):
    kwargs, shape = SETTINGS[setting]
    torch.manual_seed(1)
    model = randomised(SwinTransformer(**kwargs).double())
    image = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        out, ref = model(image), ref_forward(model, image)
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for name in out:
        assert out[name].shape == ref[name].shape
        assert scale_error(out[name], ref[name]) <= 1e-10, name


def test_the_last_requested_stage_skips_its_patch_merging():
    """Fewer OUT_FEATURES: the same features, and no stage or patch merging that nothing reads is run."""
    torch.manual_seed(3)
    kwargs = dict(embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=3)
    full = randomised(SwinTransformer(**kwargs).double())
    part = SwinTransformer(**kwargs, out_features=["res2", "res3"]).double()
    part.load_state_dict(full.state_dict())
    calls = []
    for i, layer in enumerate(part.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: calls.append(f"stage{i}"))
        if layer.downsample is not None:
            layer.downsample.register_forward_hook(lambda m, a, o, i=i: calls.append(f"merge{i}"))
    image = torch.randn(1, 3, 40, 52, dtype=torch.float64)
    with torch.no_grad():
        out, ref = part(image), full(image)
    assert list(out) == ["res2", "res3"] and calls == ["merge0", "stage0", "stage1"]
    assert all(torch.equal(out[name], ref[name]) for name in out)


def test_batch_of_two_equals_two_single_runs():
    torch.manual_seed(2)
    model = randomised(SwinTransformer(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[2, 2, 4, 4], window_size=7))
    images = torch.randn(2, 3, 72, 100)
    with torch.no_grad():
        both = model(images)
        single = [model(images[i:i + 1]) for i in range(2)]
    for name, value in both.items():
        for i in range(2):
            assert scale_error(value[i:i + 1], single[i][name]) <= 1e-6, name


def test_relative_position_index_is_the_offset_grid():
    for wh, ww in [(1, 1), (2, 3), (7, 7), (4, 2)]:
        index = relative_position_index((wh, ww))
        cells = list(itertools.product(range(wh), range(ww)))
        expected = torch.tensor([[(r1 - r2 + wh - 1) * (2 * ww - 1) + (c1 - c2 + ww - 1) for r2, c2 in cells]
                                 for r1, c1 in cells])
        assert torch.equal(index, expected)
        # every offset has its own table row, and all rows are used
        assert index.unique().numel() == (2 * wh - 1) * (2 * ww - 1)


def test_bias_lookup_reads_the_table_by_offset():
    attn = WindowAttention(8, (3, 3), 2)
    with torch.no_grad():
        attn.relative_position_bias_table.copy_(torch.randn(25, 2))
    bias = attn.relative_position_bias()  # (nH, 9, 9)
    grid = attn.relative_position_bias_table.view(5, 5, 2)
    for (i, (r1, c1)), (j, (r2, c2)) in itertools.product(enumerate(itertools.product(range(3), repeat=2)), repeat=2):
        assert torch.equal(bias[:, i, j], grid[r1 - r2 + 2, c1 - c2 + 2])


@pytest.mark.parametrize("height,width,window,shift", [(7, 7, 7, 3), (14, 21, 7, 3), (24, 32, 7, 3), (3, 4, 7, 3),
                                                       (12, 8, 4, 2), (5, 9, 2, 1)])
def test_shift_mask_against_a_per_token_brute_force(height, width, window, shift):
    mask = shift_attention_mask(height, width, window, shift)
    hp, wp = -(-height // window) * window, -(-width // window) * window
    nw = wp // window
    assert mask.shape == ((hp // window) * nw, window * window, window * window)
    for w_index in range(mask.shape[0]):
        wr, wc = divmod(w_index, nw)
        for i, j in itertools.product(range(window * window), repeat=2):
            (ri, ci), (rj, cj) = divmod(i, window), divmod(j, window)
            # shifted-frame coordinates → did the token wrap around the (padded) map?
            wrap_i = (wr * window + ri >= hp - shift, wc * window + ci >= wp - shift)
            wrap_j = (wr * window + rj >= hp - shift, wc * window + cj >= wp - shift)
            assert mask[w_index, i, j].item() == (0.0 if wrap_i == wrap_j else SHIFT_MASK_VALUE)


def test_window_partition_round_trip_and_order():
    x = torch.arange(2 * 6 * 9 * 2).view(2, 6, 9, 2)
    windows = window_partition(x, 3)
    assert windows.shape == (12, 3, 3, 2)
    assert torch.equal(windows[4], x[0, 3:6, 3:6])  # row-major over the windows of image 0, then image 1
    assert torch.equal(windows[6], x[1, 0:3, 0:3])
    assert torch.equal(window_reverse(windows, 3, 6, 9), x)


@pytest.mark.parametrize("shifted", [False, True])
def test_one_window_over_the_map_is_global_attention(shifted):
    """With the window covering the map, window attention is global attention with the bias (and mask) added;
    torch's scaled_dot_product_attention is the independent implementation."""
    torch.manual_seed(3)
    attn = randomised(WindowAttention(12, (5, 5), 3))
    x = torch.randn(2, 25, 12)
    bias = attn.relative_position_bias()
    mask = shift_attention_mask(5, 5, 5, 2) if shifted else None
    with torch.no_grad():
        out = attn(x, mask)
        q, k, v = (t.view(2, 25, 3, 4).transpose(1, 2) for t in attn.qkv(x).split(12, -1))
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias + (mask if shifted else 0), scale=attn.scale)
        expected = attn.proj(expected.transpose(1, 2).reshape(2, 25, 12))
    assert scale_error(out, expected) <= 1e-6


# ----------------------------------------------------------------------------- structure for LRP
def test_window_attention_steps_are_separate_and_replaceable():
    from maskdino_lrp.lrp.composites import module_kind

    torch.manual_seed(4)
    attn = randomised(WindowAttention(8, (3, 3), 2))
    assert isinstance(attn.qkv, nn.Linear) and isinstance(attn.proj, nn.Linear)
    assert isinstance(attn.softmax, nn.Softmax)
    assert isinstance(attn.scores, AttentionProduct) and attn.scores.equation == "bhnd,bhmd->bhnm"
    assert isinstance(attn.mix, AttentionProduct) and attn.mix.equation == "bhnm,bhmd->bhnd"
    assert module_kind(attn.scores) == module_kind(attn.mix) == "product"
    assert module_kind(attn.qkv) == "linear"
    x = torch.randn(4, 9, 8)
    mask = shift_attention_mask(6, 6, 3, 1)  # 4 windows of one image
    seen = []
    replaced = window_attention(attn, x, attn.relative_position_bias(), mask,
                                qkv=lambda t: F.linear(t, attn.qkv.weight, attn.qkv.bias),
                                scores=lambda q, k: q @ k.transpose(-1, -2),
                                probabilities=lambda s: torch.softmax(s, -1),
                                mix=lambda a, v: a @ v, proj=lambda t: F.linear(t, attn.proj.weight, attn.proj.bias),
                                record=seen.append)
    assert torch.allclose(replaced, attn(x, mask), atol=1e-6)
    assert seen[0].shape == (4, 2, 9, 9) and torch.allclose(seen[0].sum(-1), torch.ones(4, 2, 9))
    # the bias is an input: a different one changes the output
    assert not torch.allclose(window_attention(attn, x, torch.zeros(2, 9, 9), mask), replaced, atol=1e-4)


def test_modules_are_plain_and_gradients_are_exact():
    model = randomised(SwinTransformer(embed_dim=4, depths=[2, 2, 1, 1], num_heads=[1, 1, 2, 2], window_size=3)).double()
    kinds = {type(m) for m in model.modules()}
    assert nn.GELU in kinds and nn.LayerNorm in kinds and nn.Softmax in kinds
    image = torch.randn(1, 3, 10, 14, dtype=torch.float64, requires_grad=True)

    def total(x):
        return sum((v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view_as(v)).sum() for v in model(x).values())

    assert torch.autograd.gradcheck(total, (image,), eps=1e-6, atol=1e-6, fast_mode=True)


# ----------------------------------------------------------------------------- configs and presets
def test_every_official_swin_yaml_loads():
    assert len(SWIN_YAMLS) == 6
    for path in SWIN_YAMLS:
        cfg = load_config(path)
        assert get(cfg, "MODEL.BACKBONE.NAME") == "D2SwinTransformer"
        assert get(cfg, "MODEL.SWIN.WINDOW_SIZE") == 12 and get(cfg, "MODEL.SWIN.EMBED_DIM") == 192


@pytest.mark.slow
@pytest.mark.parametrize("path", SWIN_YAMLS, ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_every_official_swin_yaml_builds_at_full_size(path):
    from maskdino_lrp.model.maskdino import build_model

    keys = [line.split(" ", 1)[0] for line in (fixture_dir("swin") / "swin_large_keys.txt").read_text().splitlines()]
    model = build_model(path)
    assert [k for k in model.state_dict() if k.startswith("backbone.")] == keys
    assert model.size_divisibility == 32
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert 219 < millions < 224  # README: 223 M (FFN 2048); the FFN-1024 variant has 219.6 M


SMALL = {
    "MODEL.SWIN.EMBED_DIM": 16, "MODEL.SWIN.DEPTHS": [2, 2, 2, 2], "MODEL.SWIN.NUM_HEADS": [1, 2, 2, 4],
    "MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD": 32, "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 1,
    "MODEL.MaskDINO.DIM_FEEDFORWARD": 32, "MODEL.MaskDINO.DEC_LAYERS": 2, "MODEL.MaskDINO.NUM_OBJECT_QUERIES": 8,
    "INPUT.MIN_SIZE_TEST": 64, "INPUT.MAX_SIZE_TEST": 96, "TEST.DETECTIONS_PER_IMAGE": 8,
}


@pytest.mark.parametrize("path", SWIN_YAMLS, ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_every_official_swin_yaml_explains(path):
    """Each official config with smaller sizes (window 12 and the head's layout kept) predicts and explains."""
    from maskdino_lrp.lrp import LRP
    from maskdino_lrp.model.maskdino import build_model

    torch.manual_seed(5)
    model = build_model(path, overrides=SMALL)
    image = np.random.default_rng(5).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    detections = model.predict(image)
    assert len(detections) == 8
    explanation = LRP(model).explain(image, queries="topk:1", stops=["pixels", "encoder_input"])
    pixels = explanation.relevance["pixels"]
    assert pixels.shape == (1, 64, 96) and torch.isfinite(pixels).all() and pixels.abs().sum() > 0  # resized input


def test_explaining_a_swin_model_conserves_at_the_backbone_cut():
    """Below the backbone every rule of the conservative composite conserves, so the four features together
    (each an output norm of a stage the next stage reads before that norm) carry the target exactly; with
    AH window attention the pixels do too (biases and the booked constants take the rest)."""
    from maskdino_lrp.lrp import LRP
    from maskdino_lrp.model.maskdino import build_model

    torch.manual_seed(7)
    model = build_model("maskdino_swint_coco", overrides={**SMALL, "MODEL.SWIN.WINDOW_SIZE": 5}).double()
    image = np.random.default_rng(7).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    runs = {mode: LRP(model, composite="conservative", batch_mode=mode).explain(
        image, queries="topk:2", stops=["pixels", "backbone", "memory"]) for mode in ("loop", "vmap")}
    explanation = runs["loop"]
    for cut in ("backbone", "memory"):
        row = explanation.conservation[cut]
        assert (row["residual"].abs() / row["target"].abs()).max() < 1e-8, cut
    row = explanation.conservation["pixels"]
    assert torch.allclose(row["total"] + row["bias"] + row["embeddings"] + row["positional"] + row["residual"],
                          row["target"])
    assert (row["residual"].abs() / row["target"].abs()).max() < 1e-6
    for stop, relevance in explanation.relevance.items():  # the bias-table gather and the rolls batch under vmap
        assert torch.allclose(runs["vmap"].relevance[stop], relevance, rtol=1e-8, atol=1e-12), stop


def test_presets_follow_the_official_config():
    official = load_config(OFFICIAL_CONFIGS / "instance-segmentation/swin/maskdino_R50_bs16_50ep_4s_dowsample1_2048.yaml")
    preset = load_config("maskdino_swinl_coco")
    for key in ("MODEL.BACKBONE.NAME", "MODEL.SWIN", "MODEL.SEM_SEG_HEAD", "MODEL.MaskDINO", "MODEL.PIXEL_MEAN",
                "MODEL.PIXEL_STD", "INPUT.FORMAT", "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST"):
        assert get(preset, key) == get(official, key), key
    tiny = load_config("maskdino_swint_coco")
    assert {k: get(tiny, f"MODEL.SWIN.{k}") for k in ("EMBED_DIM", "DEPTHS", "NUM_HEADS", "WINDOW_SIZE")} == \
        {"EMBED_DIM": 96, "DEPTHS": [2, 2, 6, 2], "NUM_HEADS": [3, 6, 12, 24], "WINDOW_SIZE": 7}
    assert get(tiny, "MODEL.SEM_SEG_HEAD") == get(preset, "MODEL.SEM_SEG_HEAD")
    # parameters counted by hand: per block 12·C² + 13·C (norms, qkv, proj, MLP) + 169·heads (bias table);
    # patch merging 8·C² + 8·C; patch embedding 48·96 + 96 + 2·96; output norms 2·ΣC
    dims, heads, depths = (96, 192, 384, 768), (3, 6, 12, 24), (2, 2, 6, 2)
    count = sum(d * (12 * c * c + 13 * c + 169 * h) for c, h, d in zip(dims, heads, depths))
    count += sum(8 * c * c + 8 * c for c in dims[:3]) + 48 * 96 + 96 + 2 * 96 + 2 * sum(dims)
    assert sum(p.numel() for p in build_swin_backbone(tiny).parameters()) == count == 27_520_698


@pytest.mark.parametrize("overrides,message", [
    ({"MODEL.SWIN.PATCH_SIZE": 2}, "MODEL.SWIN.PATCH_SIZE=2 is not supported"),
    ({"MODEL.SWIN.NUM_HEADS": [3, 6, 12, 25]}, r"MODEL.SWIN.NUM_HEADS\[3\]=25 does not divide"),
    ({"MODEL.SWIN.DEPTHS": [2, 2, 6]}, r"MODEL.SWIN.DEPTHS=\[2, 2, 6\] must be a list of 4 positive integers"),
    ({"MODEL.SWIN.DEPTHS": [2, 2, 0, 2]}, r"MODEL.SWIN.DEPTHS\[2\]=0 must be a positive integer"),
    ({"MODEL.SWIN.WINDOW_SIZE": 0}, "MODEL.SWIN.WINDOW_SIZE=0 must be a positive integer"),
    ({"MODEL.SWIN.OUT_FEATURES": ["res3", "res6"]}, "MODEL.SWIN.OUT_FEATURES"),
    ({"MODEL.SWIN.APE": "yes"}, "MODEL.SWIN.APE='yes' must be true or false"),
])
def test_bad_swin_values_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_swin_backbone(load_config("maskdino_swint_coco", overrides))


def test_config_checks_the_swin_out_features():
    with pytest.raises(ConfigError, match=r"needs \['res2'\] which MODEL.SWIN.OUT_FEATURES does not produce"):
        load_config("maskdino_swint_coco", {"MODEL.SWIN.OUT_FEATURES": ["res3", "res4", "res5"]})
    with pytest.raises(ConfigError, match="unknown config key 'MODEL.SWIN.WINDOWSIZE'"):
        load_config("maskdino_swint_coco", {"MODEL.SWIN.WINDOWSIZE": 7})
    cfg = load_config("maskdino_swint_coco", {"MODEL.SWIN.OUT_FEATURES": ["res3", "res5"],
                                              "MODEL.SEM_SEG_HEAD.IN_FEATURES": ["res3", "res5"]})
    backbone = build_swin_backbone(cfg).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 64))
    assert list(out) == ["res3", "res5"] and list(backbone.output_shape()) == ["res3", "res5"]


def test_estimate_counts_the_swin_backbone():
    """estimate's Swin stages have the backbone's output sizes and its multiply-accumulates are torch's count."""
    from torch.utils.flop_counter import FlopCounterMode

    from maskdino_lrp.analysis.estimate import _backbone_counts, model_shapes

    shapes = model_shapes("maskdino_swint_coco", (150, 230), count_parameters=False,
                          overrides={"INPUT.MIN_SIZE_TEST": 150, "INPUT.MAX_SIZE_TEST": 400})
    backbone = build_swin_backbone(load_config("maskdino_swint_coco")).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = backbone(torch.zeros(1, 3, *shapes.padded_size))
    assert [(st["channels"], st["height"], st["width"]) for st in shapes.backbone] == \
        [tuple(t.shape[1:]) for t in out.values()]
    _, macs, _ = _backbone_counts(shapes)
    assert 2 * macs == counter.get_total_flops()


# ----------------------------------------------------------------------------- checkpoints
def test_a_full_swin_checkpoint_loads_strictly(tmp_path):
    """An official-style .pth ({"model": state dict, ...}, backbone.* and sem_seg_head.* keys) round-trips."""
    from maskdino_lrp.model.maskdino import build_model

    config = OFFICIAL_CONFIGS / "instance-segmentation/swin/maskdino_R50_bs16_50ep_4s_dowsample1_2048.yaml"
    torch.manual_seed(8)
    source = build_model(config, overrides=SMALL)
    path = tmp_path / "model_final.pth"
    torch.save({"model": source.state_dict(), "iteration": 1}, path)
    torch.manual_seed(9)
    loaded = build_model(config, overrides=SMALL, checkpoint=path, strict=True)
    x = source.prepare(np.random.default_rng(8).integers(0, 256, (64, 96, 3), dtype=np.uint8)).tensor
    with torch.no_grad():
        assert torch.equal(source(x)["pred_logits"], loaded(x)["pred_logits"])


def test_converted_imagenet_pkl_reads_and_loads_under_backbone(tmp_path):
    """tools/convert-pretrained-swin-model-to-d2.py pickles the classification model's torch tensors as they
    are, with the classifier's extra keys (final norm, head, precomputed shift masks)."""
    torch.manual_seed(6)
    source = randomised(SwinTransformer(embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 1, 2, 2], window_size=3))
    classification = {k: v for k, v in source.state_dict().items() if not k.startswith("norm")}
    classification.update({"norm.weight": torch.ones(64), "norm.bias": torch.zeros(64), "head.weight": torch.ones(5, 64),
                           "head.bias": torch.zeros(5), "layers.0.blocks.1.attn_mask": torch.zeros(4, 9, 9)})
    path = tmp_path / "swin_tiny_patch4_window7_224.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": classification, "__author__": "third_party", "matching_heuristics": True}, f)
    state = read_state_dict(path)
    assert state.keys() == classification.keys()
    assert all(torch.equal(state[k], v) for k, v in classification.items())

    holder = nn.Module()
    holder.backbone = SwinTransformer(embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 1, 2, 2], window_size=3)
    report = load_checkpoint(holder, path, strict=False, prefix_map={"": "backbone."})
    assert sorted(report.missing) == sorted(f"backbone.norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert sorted(report.unexpected) == ["backbone.head.bias", "backbone.head.weight",
                                         "backbone.layers.0.blocks.1.attn_mask", "backbone.norm.bias",
                                         "backbone.norm.weight"]
    assert torch.equal(holder.backbone.layers[1].blocks[1].attn.relative_position_bias_table,
                       source.layers[1].blocks[1].attn.relative_position_bias_table)
