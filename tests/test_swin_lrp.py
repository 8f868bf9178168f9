"""LRP through the Swin backbone: window attention under the attention rules, conservation to the pixels."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from maskdino_lrp.adapters.base import Adapter
from maskdino_lrp.adapters.maskdino import MaskDINOAdapter
from maskdino_lrp.lrp import LRP
from maskdino_lrp.lrp.composites import Composite, get_composite
from maskdino_lrp.lrp.engine import lrp_mode
from maskdino_lrp.lrp.rules import Rule
from maskdino_lrp.model.maskdino import build_model
from maskdino_lrp.model.swin import SwinTransformerBlock, WindowAttention, shift_attention_mask
from conftest import zero_additive_constants

# the small official-layout Swin MaskDINO of tests/test_swin.py, window 5: every stage pads and shifts
SMALL = {
    "MODEL.SWIN.EMBED_DIM": 16, "MODEL.SWIN.DEPTHS": [2, 2, 2, 2], "MODEL.SWIN.NUM_HEADS": [1, 2, 2, 4],
    "MODEL.SWIN.WINDOW_SIZE": 5,
    "MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD": 32, "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 1,
    "MODEL.MaskDINO.DIM_FEEDFORWARD": 32, "MODEL.MaskDINO.DEC_LAYERS": 2, "MODEL.MaskDINO.NUM_OBJECT_QUERIES": 8,
    "INPUT.MIN_SIZE_TEST": 64, "INPUT.MAX_SIZE_TEST": 96, "TEST.DETECTIONS_PER_IMAGE": 8,
}


def swin_model(seed: int = 7) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("maskdino_swint_coco", overrides=SMALL).double()


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(7).integers(0, 256, (60, 90, 3), dtype=np.uint8)


def test_window_attention_is_attention_by_structure():
    """The adapter gives WindowAttention the kind of nn.MultiheadAttention, so the same rules and options apply."""
    model = swin_model()
    adapter = MaskDINOAdapter()
    windows = [n for n, m in model.named_modules() if isinstance(m, WindowAttention)]
    assert windows and all(adapter.module_kind(n, model.get_submodule(n)) == "mha" for n in windows)
    with lrp_mode(model, "default", adapter=adapter) as state:
        assert all(state.rules[n] == Rule("attnlrp") for n in windows)
    with lrp_mode(model, "conservative", adapter=adapter) as state:
        assert all(state.rules[n] == Rule("ah") for n in windows)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_zero_constant_conservation_to_the_pixels(image):
    """Every additive constant zeroed (bias tables included), AH window attention, float64: the pixels carry the
    target at every cut, through window partition, cyclic shift, padding, cropping and patch merging."""
    model = swin_model()
    zero_additive_constants(model)
    with torch.no_grad():  # LayerNorm weights of 1 would make some targets degenerate
        model.sem_seg_head.predictor.decoder_norm.weight.uniform_(0.5, 1.5)
    for target in ("class", "mask"):
        expl = LRP(model, composite="conservative").explain(image, queries="topk:2", target=target,
                                                            stops=["pixels", "backbone", "memory"])
        for cut, row in expl.conservation.items():
            rel = (row["residual"].abs() / row["target"].abs()).max().item()
            assert rel < 1e-5, f"{target}: cut {cut} conserves only to {rel:.2e}"
            assert torch.all(row["bias"].abs() < 1e-12) and torch.all(row["positional"].abs() < 1e-12), cut
            assert torch.allclose(row["total"] + row["embeddings"], row["target"], rtol=1e-5), cut


@pytest.mark.parametrize("composite", ["conservative", "default", "attnlrp"])
def test_pixels_and_the_ledger_account_for_the_target(image, composite):
    """Biases on: pixels + booked constants (biases, relative-position bias, shift mask) + residual == target;
    the conservative composite leaves no residual."""
    model = swin_model()
    expl = LRP(model, composite=composite).explain(image, queries="topk:2", stops=["pixels", "backbone", "memory"])
    for cut, row in expl.conservation.items():
        recomposed = row["total"] + row["bias"] + row["embeddings"] + row["positional"] + row["residual"]
        assert torch.allclose(recomposed, row["target"], rtol=1e-10), cut
    row = expl.conservation["pixels"]
    if composite == "conservative":
        assert (row["residual"].abs() / row["target"].abs()).max() < 1e-6
    assert torch.isfinite(expl.relevance["pixels"]).all()


def test_the_ledger_books_the_bias_and_the_shift_mask():
    """Under AttnLRP the relevance flows into the logits: the bias and the shift mask absorb some, booked per call."""
    model = swin_model()
    backbone = model.backbone
    x = torch.randn(1, 3, 40, 60, dtype=torch.float64)
    with lrp_mode(backbone, "default", adapter=MaskDINOAdapter()) as state:
        out = backbone(x)
        total = sum(v.sum() for v in out.values())
        entries = {e.name: e for e in state.ledger.entries}
        grads = torch.autograd.grad(total, [e.tensor for e in entries.values()], allow_unused=True)
    taken = {name: (g * e.tensor).sum().item() if g is not None else 0.0
             for (name, e), g in zip(entries.items(), grads)}
    biases = [n for n in entries if n.endswith("attn.relative_position_bias")]
    masks = [n for n in entries if n.endswith("attn.shift_mask")]
    assert len(biases) == 8 and len(masks) == 4  # every block's bias, every shifted block's mask
    assert all(entries[n].category == "positional" for n in biases + masks)
    assert any(abs(taken[n]) > 0 for n in biases)
    assert not any(n.endswith("relative_position_bias_table") for n in entries)  # booked as the bias, once


def test_ah_window_attention_against_an_explicit_reference():
    """AH: A held constant, out_n = Σ_h Wp_h Σ_m A_hnm (Wv_h x_m + bv_h) + bp, so with gradient linears
    R(x_mi) = x_mi Σ_n Σ_h Σ_j Σ_c c_nc Wp[c, h·d+j] A_hnm Wv[h·d+j, i], written out element by element."""
    torch.manual_seed(3)
    dim, heads, ws = 4, 2, 2
    attn = WindowAttention(dim, (ws, ws), heads).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
    mask = shift_attention_mask(2, 4, ws, 1, dtype=torch.float64)  # two windows, one with −100 pairs
    assert (mask != 0).any()
    x = torch.randn(2, ws * ws, dim, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, ws * ws, dim, dtype=torch.float64)
    composite = Composite("test", {"mha": Rule("ah"), "linear": Rule("gradient")})
    with lrp_mode(attn, composite, adapter=MaskDINOAdapter()) as state:
        y = attn(x, mask)
        target = (y * c).sum()
        leaves = {e.name: e.tensor for e in state.ledger.entries}
        grads = torch.autograd.grad(target, [x, *leaves.values()], allow_unused=True)
    relevance = (x * grads[0]).detach()
    booked = {n: (g * t).sum() if g is not None else torch.tensor(0.0, dtype=x.dtype)
              for (n, t), g in zip(leaves.items(), grads[1:])}
    assert set(booked) == {"qkv.bias", "proj.bias", "relative_position_bias", "shift_mask"}
    assert booked["relative_position_bias"] == 0 and booked["shift_mask"] == 0  # constant attention: none
    assert torch.allclose(relevance.sum() + booked["qkv.bias"] + booked["proj.bias"], target)

    # the reference, from the weights by hand
    d, n_tok = dim // heads, ws * ws
    with torch.no_grad():
        wq, wk, wv = attn.qkv.weight.split(dim)
        bq, bk, _ = attn.qkv.bias.split(dim)
        wp = attn.proj.weight
        table = attn.relative_position_bias()
        reference = torch.zeros_like(relevance)
        for w in range(2):
            q = x[w] @ wq.T + bq
            k = x[w] @ wk.T + bk
            for h in range(heads):
                logits = torch.empty(n_tok, n_tok, dtype=x.dtype)
                for n, m in itertools.product(range(n_tok), range(n_tok)):
                    dot = sum(q[n, h * d + j] * k[m, h * d + j] for j in range(d))
                    logits[n, m] = attn.scale * dot + table[h, n, m] + mask[w, n, m]
                a = logits.exp() / logits.exp().sum(-1, keepdim=True)
                for m, i in itertools.product(range(n_tok), range(dim)):
                    s = sum(c[w, n, ch] * wp[ch, h * d + j] * a[n, m] * wv[h * d + j, i]
                            for n in range(n_tok) for j in range(d) for ch in range(dim))
                    reference[w, m, i] += x[w, m, i] * s
    assert torch.allclose(relevance, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("composite", ["default", "conservative", "gradient"])
def test_window_attention_follows_the_multihead_attention_rules(composite):
    """A single window with a zero bias and no mask is nn.MultiheadAttention: the same rule gives the same relevance."""
    torch.manual_seed(5)
    dim, heads = 8, 2
    attn = WindowAttention(dim, (3, 3), heads).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
        attn.relative_position_bias_table.zero_()
    mha = nn.MultiheadAttention(dim, heads, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(3, 9, dim, dtype=torch.float64)
    c = torch.randn(3, 9, dim, dtype=torch.float64)

    def relevance(module: nn.Module, call, adapter: Adapter) -> torch.Tensor:
        xx = x.clone().requires_grad_(True)
        with lrp_mode(module, get_composite(composite), adapter=adapter):
            (g,) = torch.autograd.grad((call(xx) * c).sum(), xx)
        return xx.detach() * g

    window = relevance(attn, lambda t: attn(t), MaskDINOAdapter())
    reference = relevance(mha, lambda t: mha(t, t, t, need_weights=False)[0], Adapter())
    assert torch.allclose(window, reference, rtol=1e-9, atol=1e-12)


def test_padded_tokens_receive_no_relevance():
    """Padding comes after norm1, so padded tokens are exact zeros: their relevance is 0, and what attending
    to them moves goes to the qkv bias (booked); with zero biases the block conserves exactly."""
    torch.manual_seed(9)
    block = SwinTransformerBlock(8, 2, window_size=4, shift_size=2).double()
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_() if not name.endswith("bias") and "table" not in name else p.zero_()
    x = torch.randn(1, 5, 6, 8, dtype=torch.float64, requires_grad=True)  # padded to 8 × 8
    mask = shift_attention_mask(5, 6, 4, 2, dtype=torch.float64)
    seen = []
    handle = block.attn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].retain_grad() or args[0]))
    composite = get_composite("conservative")
    try:
        with lrp_mode(block, composite, adapter=MaskDINOAdapter()):
            y = block(x, mask)
            target = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
            target.backward()
    finally:
        handle.remove()
    windows = seen[0]  # (B·nW, N, C) after shift and partition
    relevance = (windows * windows.grad).detach()
    padded = windows.detach().abs().sum(-1) == 0
    assert padded.sum() == 8 * 8 - 5 * 6
    assert torch.all(relevance[padded] == 0)
    assert torch.allclose((x * x.grad).sum(), target, rtol=1e-8)


def test_gradient_composite_is_gradient_times_input(image):
    """With every rule set to 'gradient' the engine reproduces autograd's gradient × input on a Swin model."""
    model = swin_model()
    expl = LRP(model, composite="gradient").explain(image, queries=[0, 3], stops=["pixels"])
    x = model.prepare(image).tensor.clone().requires_grad_(True)
    model.sem_seg_head.predictor.detach_query_content = False  # as in LRP mode: the selected content is connected
    try:
        out = model(x)
        for row, q in enumerate([0, 3]):
            (g,) = torch.autograd.grad(out["pred_logits"][0, q, expl.labels[row]], x, retain_graph=True)
            reference = (x * g).detach().sum(1)[0]
            h, w = expl.relevance["pixels"].shape[1:]
            assert torch.allclose(expl.relevance["pixels"][row], reference[:h, :w], atol=1e-10, rtol=1e-7)
    finally:
        model.sem_seg_head.predictor.detach_query_content = True


def test_model_is_bit_identical_after_explaining(image):
    model = swin_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = model.prepare(image).tensor
    with torch.no_grad():
        reference = model(x)["pred_logits"]
    for composite in ("default", "conservative"):
        LRP(model, composite=composite).explain(image, queries="topk:1", stops=["pixels", "backbone"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x)["pred_logits"], reference)
