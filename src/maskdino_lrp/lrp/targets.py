"""What is explained: which queries, and which scalar of each query's prediction."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from .rules import identity_rule, uniform_product

TargetFn = Callable[[Mapping[str, Any], torch.Tensor, torch.Tensor], torch.Tensor]


class TargetError(ValueError):
    """A query selection or target that cannot be used."""


# ----------------------------------------------------------------------------- queries
@dataclass(frozen=True)
class QuerySpec:
    """A parsed query selection: ``topk:N``, ``thr:T``, explicit indices, or ``all``."""

    kind: str  # "topk" | "thr" | "indices" | "all"
    value: Any = None

    def __str__(self) -> str:
        if self.kind == "indices":
            return ",".join(str(i) for i in self.value)
        return self.kind if self.value is None else f"{self.kind}:{self.value}"


def parse_queries(spec: str | int | Sequence[int] | QuerySpec) -> QuerySpec:
    """Parse a query selection; raises TargetError with the accepted forms on a bad spec."""
    if isinstance(spec, QuerySpec):
        return spec
    if isinstance(spec, bool):
        raise TargetError(f"query spec {spec!r} does not parse; use topk:N, thr:0.5, 3,7 or all")
    if isinstance(spec, int):
        return QuerySpec("indices", (spec,))
    if isinstance(spec, (list, tuple)) or (isinstance(spec, torch.Tensor) and spec.ndim == 1):
        values = [int(v) for v in spec]
        if not values:
            raise TargetError("query list is empty; give at least one query index")
        return QuerySpec("indices", tuple(values))
    text = str(spec).strip().lower()
    hint = "use topk:N, thr:0.5, a comma list of query indices like 3,7, or all"
    if text == "all":
        return QuerySpec("all")
    if m := re.fullmatch(r"topk:(\d+)", text):
        n = int(m.group(1))
        if n < 1:
            raise TargetError(f"query spec {spec!r}: N must be >= 1; {hint}")
        return QuerySpec("topk", n)
    if m := re.fullmatch(r"(?:thr|threshold):([0-9]*\.?[0-9]+)", text):
        t = float(m.group(1))
        if not 0.0 <= t <= 1.0:
            raise TargetError(f"query spec {spec!r}: the score threshold must lie in [0, 1]; {hint}")
        return QuerySpec("thr", t)
    if re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
        return QuerySpec("indices", tuple(int(v) for v in text.split(",")))
    raise TargetError(f"query spec {spec!r} does not parse; {hint}")


def select_queries(spec: QuerySpec, detections, num_queries: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(query indices, class labels) to explain, from post-processed detections or raw logits (Q, C)."""
    best_label = logits.argmax(-1)
    if spec.kind == "all":
        queries = torch.arange(num_queries)
        return queries, best_label[queries]
    if spec.kind == "indices":
        bad = [q for q in spec.value if not 0 <= q < num_queries]
        if bad:
            raise TargetError(f"query index {bad[0]} is out of range: the model has {num_queries} queries (0..{num_queries - 1})")
        queries = torch.tensor(spec.value, dtype=torch.long)
        return queries, best_label[queries]
    # detections are sorted by score; a query may appear with several classes: keep its best
    seen: dict[int, int] = {}
    for q, label, score in zip(detections.query_indices.tolist(), detections.labels.tolist(), detections.scores.tolist()):
        if spec.kind == "thr" and score < spec.value:
            break
        if q not in seen:
            seen[q] = label
        if spec.kind == "topk" and len(seen) == spec.value:
            break
    queries = torch.tensor(list(seen), dtype=torch.long)
    labels = torch.tensor(list(seen.values()), dtype=torch.long)
    return queries, labels


# ----------------------------------------------------------------------------- targets
def class_target(outputs: Mapping[str, Any], queries: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The class logit of each query for its label."""
    return outputs["pred_logits"][0, queries, labels]


BOX_COORDS = ("cx", "cy", "w", "h")
# an edge is a centre coordinate ∓ half the size: (centre index, size index, sign)
BOX_EDGES = {"x1": (0, 2, -1.0), "y1": (1, 3, -1.0), "x2": (0, 2, 1.0), "y2": (1, 3, 1.0)}


def final_boxes(outputs: Mapping[str, Any], queries: torch.Tensor) -> torch.Tensor:
    """(K, 4) normalised cx, cy, w, h of the queries' final boxes.

    An adapter whose model applies the box sigmoid as a function (no module a rule can be attached to) gives
    the boxes before it as ``box_logits``; the sigmoid is then taken here under the identity rule (R_in = R_out),
    the rule a ``nn.Sigmoid`` module gets, with the same values as ``pred_boxes``.
    """
    logits = outputs.get("box_logits")
    if logits is not None:
        return identity_rule(torch.sigmoid, logits[0, queries])
    return outputs["pred_boxes"][0, queries]


def box_target(coord: int | None = None) -> TargetFn:
    """One box coordinate (0..3: cx, cy, w, h) of each query, or the sum of all four."""

    def target(outputs: Mapping[str, Any], queries: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        boxes = final_boxes(outputs, queries)
        return boxes.sum(-1) if coord is None else boxes[:, coord]

    target.__name__ = "box" if coord is None else f"box:{coord}"
    return target


def edge_target(edge: str) -> TargetFn:
    """One edge of each query's final box (normalised): ``x1`` / ``y1`` the left / top, ``x2`` / ``y2`` the
    right / bottom; a centre coordinate ∓ half the size, so relevance splits between the two linearly."""
    centre, size, sign = BOX_EDGES[edge]

    def target(outputs: Mapping[str, Any], queries: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        boxes = final_boxes(outputs, queries)
        return boxes[:, centre] + sign * 0.5 * boxes[:, size]

    target.__name__ = f"box:{edge}"
    return target


def refinement_target(coord: str, stage: str | None = None) -> TargetFn:
    """The refinement of one box coordinate in the inverse-sigmoid space where the model adds it.

    ``outputs["box_refinements"]`` (given by adapters of models that refine boxes) maps stage names to (B, Q, 4)
    deltas which, added to the constant anchor (``box_anchor``), give the final box's inverse sigmoid: e.g.
    ``proposal`` (the box head on the selected encoder token) and ``0`` … ``L-1`` (each decoder layer).
    ``stage`` None: their sum, everything the network computed beyond its anchor.
    """
    index = BOX_COORDS.index(coord)
    name = f"refine:{coord}" if stage is None else f"refine:{coord}:{stage}"

    def target(outputs: Mapping[str, Any], queries: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        steps = outputs.get("box_refinements") or {}
        if not steps:
            raise TargetError(f"target {name!r}: this model's adapter reports no box refinements (a model that "
                              "regresses its boxes directly has none); explain box:cx … or box:x1 … instead")
        if stage is not None and stage not in steps:
            raise TargetError(f"target {name!r}: no refinement stage {stage!r}; this model's stages: "
                              f"{', '.join(steps)} (refine:{coord} sums them)")
        parts = list(steps.values()) if stage is None else [steps[stage]]
        return sum(part[0, queries, index] for part in parts)

    target.__name__ = name
    return target


def mask_target(outputs: Mapping[str, Any], queries: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of each query's mask logits inside its own predicted mask (logit > 0)."""
    logits = outputs["pred_masks"][0, queries]
    inside = (logits > 0).to(logits.dtype).detach()
    return (logits * inside).flatten(1).sum(1)


def embedding_target(outputs: Mapping[str, Any], queries: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of each query's final decoder embedding: relevance starts as the activation itself."""
    emb = outputs["decoder_embedding"]  # (B, Q, C), recorded by the engine
    return emb[0, queries].sum(-1)


# ----------------------------------------------------------------------------- segmentation (mask classification)
# A mask-classification model scores pixel p for class c as S_c(p) = Σ_q P_qc · σ(m_qp): each query's class
# probability times its mask probability. For LRP each term is a product of two variable factors (relevance
# split half/half: the uniform rule the engine uses for products) and each probability hands its relevance to
# its own logit (the identity rule of elementwise nonlinearities; a softmax entry is read as a function of its
# own logit). The value is exact, and the relevance at the logits sums to it; regions are constant selections.
def _segment_probabilities(outputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, C) object-class probabilities and (Q, h, w) mask probabilities, linearised as above."""
    activation = outputs.get("class_activation")
    logits = outputs["pred_logits"][0]
    if activation == "softmax":  # the last class is "no object"
        probs = identity_rule(lambda z: z.softmax(-1), logits)[:, :-1]
    elif activation == "sigmoid":
        probs = identity_rule(torch.sigmoid, logits)
    else:
        raise TargetError("the semantic and panoptic targets need the model's class activation: its adapter must "
                          "give outputs['class_activation'] ('softmax' with a last no-object class, or 'sigmoid')")
    return probs, identity_rule(torch.sigmoid, outputs["pred_masks"][0])


def _object_classes(labels: torch.Tensor, num_classes: int, target: str) -> list[int]:
    classes = labels.tolist()
    if any(c >= num_classes for c in classes):
        raise TargetError(f"target {target!r}: a selected query's class is 'no object', which has no region; "
                          "select detections (topk:N, thr:T) instead of raw query indices")
    return classes


def semantic_target(outputs: Mapping[str, Any], queries: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per explained query, the semantic score of its class c over the pixels where c wins the semantic map:
    Σ_{p: argmax S(p) = c} S_c(p), at the mask logits' resolution (all queries contribute)."""
    probs, masks = _segment_probabilities(outputs)
    with torch.no_grad():
        winner = torch.einsum("qc,qhw->chw", probs, masks).argmax(0)
    rows = []
    for c in _object_classes(labels, probs.shape[1], "semantic"):
        region = (winner == c).to(masks.dtype)
        rows.append((uniform_product(probs[:, c, None, None], masks) * region).sum())
    return torch.stack(rows)


def panoptic_target(outputs: Mapping[str, Any], queries: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per explained query, its segment's score: Σ_{p in its segment} P_qc · σ(m_qp), the segment being the
    pixels the query wins in the panoptic assignment (argmax over queries of best class probability × mask
    probability; no score threshold or overlap filter), at the mask logits' resolution."""
    probs, masks = _segment_probabilities(outputs)
    with torch.no_grad():
        owner = (probs.max(-1).values[:, None, None] * masks).argmax(0)
    rows = []
    for q, c in zip(queries.tolist(), _object_classes(labels, probs.shape[1], "panoptic")):
        region = (owner == q).to(masks.dtype)
        rows.append((uniform_product(probs[q, c], masks[q]) * region).sum())
    return torch.stack(rows)


TARGETS: dict[str, TargetFn] = {
    "class": class_target,
    "box": box_target(None),
    "mask": mask_target,
    "embedding": embedding_target,
    "semantic": semantic_target,
    "panoptic": panoptic_target,
}
for _i, _name in enumerate(BOX_COORDS):
    TARGETS[f"box:{_name}"] = box_target(_i)
for _name in BOX_EDGES:
    TARGETS[f"box:{_name}"] = edge_target(_name)
for _name in BOX_COORDS:
    TARGETS[f"refine:{_name}"] = refinement_target(_name)
# refine:<coord>:<stage> (one stage's refinement) is parsed by get_target: the stages depend on the model
_STAGE_TARGET = re.compile(r"refine:(cx|cy|w|h):([A-Za-z0-9_]+)")


def get_target(target: str | TargetFn) -> tuple[str, TargetFn]:
    """(name, function) of a target given by name or as a callable ``fn(outputs, queries, labels) -> (K,)``."""
    if callable(target):
        return getattr(target, "__name__", "custom"), target
    if isinstance(target, str) and (m := _STAGE_TARGET.fullmatch(target)):
        return target, refinement_target(m.group(1), m.group(2))
    if target not in TARGETS:
        raise TargetError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}, refine:<coord>:<stage> "
                          "(one refinement stage, e.g. refine:cx:0) or pass a callable")
    return target, TARGETS[target]
