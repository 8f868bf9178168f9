"""Rules as objects: validated parameters, the kinds they apply to, the same ops as the rule functions."""
import math

import pytest
import torch
from torch import nn

from maskdino_lrp.lrp import rules
from maskdino_lrp.lrp.composites import Composite, get_composite
from maskdino_lrp.lrp.rules import KINDS, Rule, RuleError, rule_names

# the op a rule implements for each module kind (see rules.Rule)
OP_OF_KIND = {"linear": "linear", "conv": "conv2d", "norm": "norm", "mha": "attention", "deform_attn": "deformable",
              "product": "product", "elementwise": "elementwise", "max_pool": "max_pool"}


@pytest.mark.parametrize("make,match", [
    (lambda: Rule("gamma", gama=0.5), "rule 'gamma' has no parameter 'gama'"),
    (lambda: Rule("epsilon", epsilon=-1e-6), "epsilon must be >= 0"),
    (lambda: Rule("gamma", gamma=-0.25), "gamma must be >= 0"),
    (lambda: Rule("epsilon", epsilon=math.nan), "finite number"),
    (lambda: Rule("epsilon", epsilon="small"), "finite number"),
    (lambda: Rule("ln", epsilon=1e-6), "rule 'ln' has no parameter 'epsilon'"),
    (lambda: rules.Gamma(0.5), "keyword parameters only"),
])
def test_bad_rule_parameters_are_refused(make, match):
    with pytest.raises(RuleError, match=match):
        make()


def test_rule_for_the_wrong_kind_or_an_unknown_name_is_refused():
    with pytest.raises(RuleError, match="rule 'ln' does not apply to 'linear' modules; choose one of"):
        Composite("bad", by_kind={"linear": Rule("ln")})
    with pytest.raises(RuleError, match="rule 'gamam' does not apply to 'conv' modules \\(no rule has that name\\)"):
        Composite("bad", by_kind={"conv": Rule("gamam", gamma=0.5)})
    with pytest.raises(RuleError, match="unknown module kind 'convolution'"):
        Composite("bad", by_kind={"convolution": Rule("epsilon")})
    with pytest.raises(RuleError, match="applies to no module kind"):
        Composite("bad", by_kind={}, by_name=[("backbone.*", Rule("gamam"))])
    with pytest.raises(RuleError, match="does not apply to 'conv'"):
        Composite("bad", by_kind={}, first_layer=Rule("ln"))
    with pytest.raises(RuleError, match="does not apply to 'mha'"):
        get_composite("default").with_rules(mha="uniform")


def test_rule_by_name_is_the_registered_class_with_defaults_filled():
    rule = Rule("gamma", gamma=0.5)
    assert isinstance(rule, rules.Gamma) and isinstance(rule, Rule)
    assert rule.params == {"gamma": 0.5, "epsilon": 1e-9}
    assert rule == rules.Gamma(gamma=0.5) and hash(rule) == hash(rules.Gamma(gamma=0.5))
    assert rule != Rule("gamma") and rule.applies_to("conv") and not rule.applies_to("max_pool")
    assert set(rule_names("max_pool")) == {"wta", "proportional"}


@pytest.mark.parametrize("name", sorted(Rule.registry))
def test_every_rule_implements_the_op_of_each_kind_it_names(name):
    cls = Rule.registry[name]
    assert cls.kinds and set(cls.kinds) <= set(KINDS)
    for kind in KINDS:
        overridden = getattr(cls, OP_OF_KIND[kind]) is not getattr(Rule, OP_OF_KIND[kind])
        assert overridden == (kind in cls.kinds), (name, kind)


def test_rule_objects_compute_what_the_rule_functions_compute():
    """Each object's op is the rule function with the object's parameters: same value, same gradient."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64)
    w, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    cases = [(Rule("gamma", gamma=0.7), lambda t: rules.linear_gamma(t, w, b, 0.7, 1e-9)),
             (Rule("epsilon", epsilon=0.1), lambda t: rules.linear_epsilon(t, w, b, 0.1)),
             (Rule("zplus"), lambda t: rules.linear_zplus(t, w, b))]
    for rule, reference in cases:
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        ys = [rule.linear(xs[0], w, b), reference(xs[1])]
        assert torch.equal(ys[0], ys[1])
        seed = torch.randn_like(ys[0])
        g = [torch.autograd.grad(y, t, seed)[0] for y, t in zip(ys, xs)]
        assert torch.equal(g[0], g[1]), rule
    conv_x = torch.rand(1, 2, 5, 5, dtype=torch.float64)
    conv_w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    geometry = (1, 1, 1, 1)
    assert torch.equal(Rule("epsilon").conv2d(conv_x, conv_w, None, geometry, None),
                       rules.conv2d_epsilon(conv_x, conv_w, None, *geometry, 1e-6))
    with pytest.raises(RuleError, match="layer that sees the pixels"):
        Rule("zbox").conv2d(conv_x, conv_w, None, geometry, None)
    pool = nn.MaxPool2d(2)
    assert torch.equal(Rule("proportional").max_pool(pool, conv_x), nn.functional.max_pool2d(conv_x, 2))
    steps = Rule("ah").attention(Rule("gradient"))
    scores = torch.randn(2, 3, 3, requires_grad=True)
    assert not steps.probabilities(scores).requires_grad  # the AH-rule's probabilities are constants
    assert Rule("value").deformable().constant_weights and Rule("value+query").deformable().query_relevance
