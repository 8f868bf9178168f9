"""Query specs, targets and composites: parsing, rule assignment, clear errors."""
import pytest
import torch
from torch import nn

from maskdino_lrp.lrp.composites import Composite, Rule, RuleError, get_composite, module_kind
from maskdino_lrp.lrp.targets import TargetError, get_target, parse_queries, select_queries


@pytest.mark.parametrize("spec,kind,value", [
    ("topk:5", "topk", 5), ("thr:0.5", "thr", 0.5), ("3,7", "indices", (3, 7)), ("all", "all", None),
    (4, "indices", (4,)), ([1, 2], "indices", (1, 2)), (" 3 , 7 ", "indices", (3, 7)),
])
def test_parse_queries(spec, kind, value):
    parsed = parse_queries(spec)
    assert parsed.kind == kind and parsed.value == value


@pytest.mark.parametrize("spec", ["top5", "thr:1.5", "topk:0", "", "a,b", [], True])
def test_bad_query_specs_name_the_accepted_forms(spec):
    with pytest.raises(TargetError, match="topk|empty|threshold|N must"):
        parse_queries(spec)


def test_out_of_range_query_is_named():
    logits = torch.zeros(10, 3)
    with pytest.raises(TargetError, match="query index 12 is out of range.*10 queries"):
        select_queries(parse_queries("2,12"), None, 10, logits)


def test_unknown_target_lists_choices():
    with pytest.raises(TargetError, match="unknown target 'score'.*class"):
        get_target("score")


def test_module_kinds_by_type_and_structure():
    class Deform(nn.Module):
        def __init__(self):
            super().__init__()
            self.sampling_offsets = nn.Linear(4, 4)
            self.attention_weights = nn.Linear(4, 2)
            self.value_proj = nn.Linear(4, 4)
            self.output_proj = nn.Linear(4, 4)

    class Product(nn.Module):
        equation = "bqc,bchw->bqhw"

    assert module_kind(Deform()) == "deform_attn"
    assert module_kind(nn.MultiheadAttention(8, 2)) == "mha"
    assert module_kind(nn.LayerNorm(4)) == "norm" and module_kind(nn.GroupNorm(2, 4)) == "norm"
    assert module_kind(nn.Linear(2, 2)) == "linear" and module_kind(nn.Conv2d(1, 1, 1)) == "conv"
    assert module_kind(nn.Sigmoid()) == "elementwise" and module_kind(nn.MaxPool2d(2)) == "max_pool"
    assert module_kind(Product()) == "product" and module_kind(nn.ReLU()) is None


def test_composite_assignment_first_layer_then_names_then_kinds():
    c = get_composite("default")
    conv = nn.Conv2d(3, 3, 3)
    assert c.rule_for("backbone.stem.conv1", conv, is_first_layer=True).name == "zbox"
    assert c.rule_for("backbone.res2.0.conv1", conv).name == "zplus"
    assert c.rule_for("backbone.stem.max_pool", nn.MaxPool2d(3)).name == "wta"  # z+ does not apply to pools
    assert c.rule_for("sem_seg_head.pixel_decoder.mask_features", conv).name == "epsilon"
    assert get_composite("ah").rule_for("x", nn.MultiheadAttention(8, 2)).name == "ah"


def test_unknown_rule_and_composite_are_named():
    with pytest.raises(RuleError, match="rule 'softmax' does not apply to 'linear'"):
        Composite("bad", by_kind={"linear": Rule("softmax")})
    with pytest.raises(RuleError, match="unknown composite 'fancy'.*default"):
        get_composite("fancy")
