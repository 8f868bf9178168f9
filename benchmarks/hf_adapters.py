"""Hugging Face adapters on tiny random models, in one process: one forward vs one explained detection, and
the conservation error.

Per family (one row of ``FAMILIES``: a name and a function building the tiny model), measured in the same run:

- ``forward_s``: the best of ``--repeat`` plain forwards (``torch.no_grad``, float32);
- ``explain_s``: the best of ``--repeat`` ``LRP(model).explain(image, queries=[best])`` with the default
  composite and the adapter's default stops (the prepare, the LRP forward and one backward), float32;
- ``ratio``: explain_s / forward_s;
- ``conservation``: with every additive constant zeroed and the conservative composite, in float64, the
  largest relative error over the explained queries of pixels + booked constants against the logit of a
  plain forward of the untouched model.

    python benchmarks/hf_adapters.py                     # every family, 1 thread, 160x128 image
    python benchmarks/hf_adapters.py --family detr --size 320 --threads 2

Another adapter's family is one more entry in ``FAMILIES`` (a builder returning an eval-mode model).
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np
import torch

LINE_FORMAT = "{:<24} {:>10} {:>10} {:>8} {:>14}"


def _resnet():
    import transformers

    return transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                     layer_type="basic", out_features=["stage2", "stage3", "stage4"])


def detr() -> torch.nn.Module:
    import transformers

    config = transformers.DetrConfig(use_timm_backbone=False, backbone_config=_resnet(), use_pretrained_backbone=False,
                                     d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                                     num_queries=8, num_labels=4)
    return transformers.DetrForObjectDetection(config).eval()


def conditional_detr() -> torch.nn.Module:
    import transformers

    config = transformers.ConditionalDetrConfig(
        use_timm_backbone=False, backbone_config=_resnet(), use_pretrained_backbone=False, d_model=32,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, num_queries=8, num_labels=4)
    return transformers.ConditionalDetrForObjectDetection(config).eval()


def dab_detr() -> torch.nn.Module:
    import transformers

    config = transformers.DabDetrConfig(
        use_timm_backbone=False, backbone_config=_resnet(), use_pretrained_backbone=False, hidden_size=32,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, num_queries=8, num_labels=4, activation_function="relu")
    return transformers.DabDetrForObjectDetection(config).eval()


def yolos() -> torch.nn.Module:
    import transformers

    config = transformers.YolosConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                      image_size=[64, 48], patch_size=16, num_detection_tokens=8, num_labels=4)
    return transformers.YolosForObjectDetection(config).eval()


def _deformable(**variant) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers

        config = transformers.DeformableDetrConfig(
            use_timm_backbone=False, backbone_config=_resnet(), use_pretrained_backbone=False, d_model=32,
            encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=48, decoder_ffn_dim=48, num_queries=8, two_stage_num_proposals=8, num_labels=4,
            num_feature_levels=4, encoder_n_points=2, decoder_n_points=2, **variant)
        return transformers.DeformableDetrForObjectDetection(config).eval()

    return build


def _mask2former(swin: bool) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers

        stages = ["stage1", "stage2", "stage3", "stage4"]
        backbone = transformers.SwinConfig(embed_dim=16, depths=[2, 2, 1, 1], num_heads=[1, 2, 2, 4], window_size=4,
                                           out_features=stages) if swin else \
            transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                      layer_type="basic", out_features=stages)
        config = transformers.Mask2FormerConfig(backbone_config=backbone, use_pretrained_backbone=False,
                                                feature_size=32, mask_feature_size=32, hidden_dim=32,
                                                num_attention_heads=4, encoder_layers=2, decoder_layers=3,
                                                dim_feedforward=48, encoder_feedforward_dim=48, num_queries=8,
                                                num_labels=4)
        return transformers.Mask2FormerForUniversalSegmentation(config).eval()

    return build


def _rtdetr(version: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers

        backbone = transformers.RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32],
                                                   depths=[1, 1, 1, 1], layer_type="basic",
                                                   out_features=["stage2", "stage3", "stage4"])
        settings = dict(backbone_config=backbone, use_pretrained_backbone=False, encoder_hidden_dim=32,
                        encoder_in_channels=[16, 24, 32], encoder_ffn_dim=48, encoder_attention_heads=4, d_model=32,
                        decoder_in_channels=[32, 32, 32], decoder_ffn_dim=48, decoder_layers=2,
                        decoder_attention_heads=4, decoder_n_points=2, num_queries=8, num_labels=4)
        if version == "v2":
            model = transformers.RTDetrV2ForObjectDetection(transformers.RTDetrV2Config(**settings))
        else:
            model = transformers.RTDetrForObjectDetection(transformers.RTDetrConfig(**settings))
        with torch.no_grad():  # transformers draws weights of std 0.01 (batch-norm scales too): unit gain instead
            for m in model.modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                    m.weight.normal_(0.0, m.weight[0].numel() ** -0.5)
                elif isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
        # the image's own size (RT-DETR's processor would resize to 640x640), pixels in [0, 1]
        model.lrp_preprocess = {"rescale_factor": 1 / 255, "image_mean": (0.0,) * 3, "image_std": (1.0,) * 3}
        return model.eval()

    return build


FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    "detr": detr,
    "conditional_detr": conditional_detr,
    "dab_detr": dab_detr,
    "yolos": yolos,
    "deformable_detr": _deformable(),
    "deformable_detr_refine": _deformable(with_box_refine=True),
    "deformable_detr_2stage": _deformable(with_box_refine=True, two_stage=True),
    "mask2former": _mask2former(swin=False),
    "mask2former_swin": _mask2former(swin=True),
    "rt_detr": _rtdetr("v1"),
    "rt_detr_v2": _rtdetr("v2"),
}


def _randomise(model: torch.nn.Module) -> None:
    """transformers initialises biases, norms and the deformable offset/weight heads trivially: randomise them
    so every term of the computation counts."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.3)
            elif p.abs().max() == 0:
                p.normal_(0.0, 0.05)
            else:
                p.mul_(1.0 + 0.5 * torch.rand_like(p))
        for m in model.modules():
            if hasattr(m, "running_mean"):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)


def _zero_additive_constants(model: torch.nn.Module) -> None:
    """Biases and batch-norm shifts to zero (the offset and weight heads' biases stay: they only place samples)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "sampling_offsets" not in name and "attention_weights" not in name:
                p.zero_()
        for m in model.modules():
            if hasattr(m, "running_mean"):
                m.running_mean.zero_()
                m.bias.zero_()


def _best(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(build: Callable[[], torch.nn.Module], image: np.ndarray, repeat: int) -> dict[str, float]:
    """Seconds of one forward and of one explained detection (float32), and the conservation error (float64)."""
    from maskdino_lrp.adapters import find_adapter
    from maskdino_lrp.lrp.explainer import LRP

    torch.manual_seed(0)
    model = build()
    _randomise(model)
    adapter = find_adapter(model)
    x = adapter.prepare(model, image).tensor
    with torch.no_grad():
        forward_s = _best(lambda: model(pixel_values=x), repeat)
    lrp = LRP(model)
    best = int(adapter.postprocess(model, adapter.forward(model, x, None), None).query_indices[0])
    explain_s = _best(lambda: lrp.explain(image, queries=[best], stops=adapter.default_stops), repeat)

    model = model.double()
    _zero_additive_constants(model)
    queries = [0, 1, 2]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # DAB-DETR makes its decoder queries in the default dtype
    try:
        with torch.no_grad():
            logits = adapter.forward(model, adapter.prepare(model, image).tensor, None)["pred_logits"][0]
        expl = LRP(model, composite="conservative").explain(image, queries=queries, stops=["pixels"])
    finally:
        torch.set_default_dtype(default_dtype)
    row = expl.conservation["pixels"]
    target = logits[queries, expl.labels]
    accounted = row["total"] + row["embeddings"] + row["positional"]
    error = float(((accounted - target).abs() / target.abs()).max())
    return {"forward_s": forward_s, "explain_s": explain_s, "ratio": explain_s / forward_s, "conservation": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="(repeatable; default: all)")
    parser.add_argument("--size", type=int, nargs=2, default=(160, 128), metavar=("H", "W"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image = np.random.default_rng(0).integers(0, 256, (*args.size, 3), dtype=np.uint8)
    print(f"image {args.size[0]}x{args.size[1]}, {args.threads} thread(s), best of {args.repeat}")
    print(LINE_FORMAT.format("family", "forward_s", "explain_s", "ratio", "conservation"))
    for name in args.family or FAMILIES:
        r = measure(FAMILIES[name], image, args.repeat)
        print(LINE_FORMAT.format(name, f"{r['forward_s']:.4f}", f"{r['explain_s']:.4f}", f"{r['ratio']:.1f}",
                                 f"{r['conservation']:.1e}"))


if __name__ == "__main__":
    main()
