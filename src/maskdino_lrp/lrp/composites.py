"""Which LRP rule goes where: by module kind (found by type or structure) and by qualified name.

A composite never looks at MaskDINO specifically; it classifies modules by what they are
(a ``nn.Linear``, a ``nn.MultiheadAttention``, anything with ``sampling_offsets``,
``attention_weights``, ``value_proj`` and ``output_proj`` is a multi-scale deformable attention, …)
and maps each kind to a :class:`Rule`. Name patterns (``fnmatch`` on the qualified module name) take
precedence, so a user can say "gamma everywhere in ``backbone.res*``" or "epsilon for ``backbone.stem.conv1``".
A pattern ``@group`` names a group of modules the model's adapter declares (``Adapter.groups``, e.g.
``@backbone``: the CNN body, wherever the family keeps it); the presets use only groups.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from torch import nn

from .rules import KINDS, Rule, RuleError, rule_names

__all__ = ["Composite", "DEFAULT_GROUPS", "Rule", "RuleError", "check_rule", "composite_names", "get_composite",
           "module_kind"]

# module groups when no adapter declares them: the CNN body is the module named ``backbone``
DEFAULT_GROUPS: dict[str, tuple[str, ...]] = {"backbone": ("backbone.*",)}


def module_kind(module: nn.Module) -> str | None:
    """The kind of a module for rule assignment, or None when it needs no rule (gradient is LRP-0)."""
    if all(hasattr(module, a) for a in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")):
        return "deform_attn"
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return "norm"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.MaxPool2d):
        return "max_pool"
    if isinstance(module, (nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU)):
        return "elementwise"
    if isinstance(getattr(module, "equation", None), str) and not any(True for _ in module.parameters(recurse=False)):
        return "product"  # a parameterless bilinear product of two variable tensors (einsum equation)
    return None


@dataclass
class Composite:
    """A rule per module kind, name-pattern overrides, and the rule for the layer that sees the pixels."""

    name: str
    by_kind: dict[str, Rule]
    by_name: list[tuple[str, Rule]] = field(default_factory=list)
    first_layer: Rule | None = None
    epsilon: float = 1e-6

    def __post_init__(self) -> None:
        for kind, rule in self.by_kind.items():
            check_rule(kind, rule)
        for pattern, rule in self.by_name:
            if not any(rule.applies_to(kind) for kind in KINDS):
                raise RuleError(f"the rule for pattern {pattern!r}, {rule!r}, applies to no module kind; "
                                f"rules: {', '.join(rule_names())}")
        if self.first_layer is not None:
            check_rule("conv", self.first_layer)

    def rule_for(self, qualified_name: str, module: nn.Module, is_first_layer: bool = False,
                 kind: str | None = None, groups: Mapping[str, Sequence[str]] | None = None) -> Rule | None:
        """The rule for one module (of ``kind``, by default found by :func:`module_kind`), or None when
        the plain gradient already is its LRP rule. ``groups`` resolves ``@group`` patterns."""
        kind = kind or module_kind(module)
        if kind is None:
            return None
        if is_first_layer and self.first_layer is not None and kind == "conv":
            return self.first_layer
        groups = DEFAULT_GROUPS if groups is None else groups
        for pattern, rule in self.by_name:
            # a pattern rule applies to the modules it can apply to (gamma: convs, not the max-pool)
            patterns = groups.get(pattern[1:], ()) if pattern.startswith("@") else (pattern,)
            if rule.applies_to(kind) and any(fnmatch.fnmatchcase(qualified_name, p) for p in patterns):
                return rule
        return self.by_kind.get(kind)

    def with_rules(self, name: str | None = None, **by_kind: Rule | str) -> "Composite":
        """A copy with some kinds' rules replaced, e.g. ``c.with_rules(mha="ah")``."""
        rules = dict(self.by_kind)
        for kind, rule in by_kind.items():
            if kind == "first_layer":
                continue
            rules[kind] = rule if isinstance(rule, Rule) else Rule(rule)
        first = by_kind.get("first_layer", self.first_layer)
        if isinstance(first, str):
            first = Rule(first)
        return replace(self, name=name or self.name, by_kind=rules, first_layer=first)

    def describe(self) -> str:
        """One line per kind: which rule applies."""
        lines = [f"composite {self.name!r}"]
        lines += [f"  {kind:<12} {rule!r}" for kind, rule in sorted(self.by_kind.items())]
        if self.first_layer is not None:
            lines.append(f"  first layer  {self.first_layer!r}")
        lines += [f"  {pattern:<12} {rule!r}" for pattern, rule in self.by_name]
        return "\n".join(lines)


def check_rule(kind: str, rule: Rule) -> Rule:
    """Raise RuleError unless ``rule`` is a rule object that applies to module kind ``kind``."""
    if kind not in KINDS:
        raise RuleError(f"unknown module kind {kind!r}; kinds: {', '.join(KINDS)}")
    if not isinstance(rule, Rule) and not (hasattr(rule, "applies_to") and hasattr(rule, "name")):
        raise RuleError(f"the rule for {kind!r} must be a Rule, e.g. Rule('epsilon', epsilon=1e-6); got {rule!r}")
    if not rule.applies_to(kind):
        unknown = "" if rule.name in rule_names() else " (no rule has that name)"
        raise RuleError(f"rule {rule.name!r} does not apply to {kind!r} modules{unknown}; "
                        f"choose one of {rule_names(kind)}")
    return rule


def _default() -> Composite:
    return Composite(
        name="default",
        by_kind={
            "linear": Rule("epsilon", epsilon=1e-6),
            "conv": Rule("epsilon", epsilon=1e-6),
            "norm": Rule("ln"),
            "mha": Rule("attnlrp"),
            "deform_attn": Rule("value"),
            "product": Rule("uniform"),
            "elementwise": Rule("identity"),
            "max_pool": Rule("wta"),
        },
        # the CNN body: z+ (gamma -> infinity), chosen by the composite study on the demo model over gamma 0.25
        # (held-out pixel SRG +0.099 [0.083, 0.115]; docs/results/composite_study.md); the pixels: z^B
        by_name=[("@backbone", Rule("zplus"))],
        first_layer=Rule("zbox"),
    )


def _presets() -> dict[str, Composite]:
    default = _default()
    # exactly conservative: AH-rule self-attention, ε → 0, no gamma / z^B (which move relevance to biases)
    conservative = replace(default.with_rules("conservative", linear=Rule("epsilon", epsilon=1e-9),
                                              conv=Rule("epsilon", epsilon=1e-9), mha=Rule("ah")),
                           by_name=[], first_layer=None)
    gradient = Composite(
        name="gradient",
        by_kind={"linear": Rule("gradient"), "conv": Rule("gradient"), "norm": Rule("gradient"),
                 "mha": Rule("gradient"), "deform_attn": Rule("gradient"), "product": Rule("gradient"),
                 "elementwise": Rule("gradient"), "max_pool": Rule("wta")},
    )
    return {
        "default": default,
        "attnlrp": default.with_rules("attnlrp"),
        "ah": default.with_rules("ah", mha=Rule("ah")),
        "deform-query": default.with_rules("deform-query", deform_attn=Rule("value+query")),
        "epsilon": replace(default.with_rules("epsilon"), by_name=[], first_layer=None),
        # the default before the composite study: gamma on the CNN body (zennit's EpsilonGammaBox)
        "gamma": replace(default.with_rules("gamma"), by_name=[("@backbone", Rule("gamma", gamma=0.25))]),
        "conservative": conservative,
        "gradient": gradient,
    }


def composite_names() -> list[str]:
    """Names of the preset composites."""
    return sorted(_presets())


def get_composite(composite: str | Composite) -> Composite:
    """A preset composite by name, or the composite itself."""
    if isinstance(composite, Composite):
        return composite
    presets = _presets()
    if composite not in presets:
        raise RuleError(f"unknown composite {composite!r}; presets: {', '.join(sorted(presets))}")
    return presets[composite]
