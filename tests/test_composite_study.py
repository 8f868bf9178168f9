"""The composite study's candidates, selection rule and paired statistics (no model runs here; the study's
phases are `evaluate` runs, tested elsewhere)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from maskdino_lrp.eval import composite_study as cs
from maskdino_lrp.eval import metrics as M
from maskdino_lrp.lrp.composites import get_composite
from maskdino_lrp.lrp.rules import Rule


def _differences(a, b) -> set[str]:
    out = {kind for kind in set(a.by_kind) | set(b.by_kind) if a.by_kind.get(kind) != b.by_kind.get(kind)}
    if a.by_name != b.by_name:
        out.add("by_name")
    if a.first_layer != b.first_layer:
        out.add("first_layer")
    return out


def test_each_candidate_changes_exactly_its_own_choice_of_the_default():
    default = get_composite("default")
    expected = {"backbone gamma": {"by_name"}, "linear epsilon": {"linear"}, "self-attention": {"mha"},
                "first layer": {"first_layer"}, "deformable query path": {"deform_attn"}, "LayerNorm": {"norm"}}
    same_as_default = []
    for dimension, options in cs.DIMENSIONS.items():
        for option in options:
            c = cs.candidate(option)
            assert c.name == f"study-{option}"
            changed = _differences(c, default)
            assert changed in (expected[dimension], set()), option
            if not changed:
                same_as_default.append(option)
    # the study's winner became the default (z+ on the CNN body); every other option changes something
    assert same_as_default == ["backbone-zplus"]
    assert cs.candidate("gamma-0.25").by_name == get_composite("gamma").by_name  # the default before the study
    assert cs.candidate("gamma-0.5").by_name == [("@backbone", Rule("gamma", gamma=0.5))]
    assert cs.candidate("first-epsilon").first_layer is None
    assert cs.candidate("default") == default
    with pytest.raises(ValueError, match="unknown study option 'gamma-7'"):
        cs.candidate("gamma-7")


def test_combined_applies_one_option_per_dimension_and_leaves_the_default_untouched():
    tuned = cs.combined(["gamma-1", "linear-eps-0.1", "default", "mha-ah"])
    assert tuned.name == "study-tuned"
    assert tuned.by_name == [("@backbone", Rule("gamma", gamma=1.0))]
    assert get_composite("default").by_name == [("@backbone", Rule("zplus"))]
    assert tuned.by_kind["linear"] == Rule("epsilon", epsilon=0.1)
    assert tuned.by_kind["mha"] == Rule("ah")
    default = get_composite("default")
    assert _differences(tuned, default) == {"by_name", "linear", "mha"}
    assert default.by_kind["mha"] == Rule("attnlrp")  # the preset itself is not modified


def _est(mean: float) -> M.Estimate:
    return M.Estimate(mean, mean - 0.1, mean + 0.1, 10)


def test_choose_takes_the_best_score_among_methods_whose_mass_accuracy_is_not_worse_by_more_than_the_tolerance():
    scores = {"lrp-default": {"score": _est(0.20), "mass_accuracy": _est(0.50)},
              "a": {"score": _est(0.40), "mass_accuracy": _est(0.47)},  # best score, mass accuracy 0.03 lower
              "b": {"score": _est(0.30), "mass_accuracy": _est(0.485)},  # within 0.02
              "c": {"score": _est(0.10), "mass_accuracy": _est(0.70)}}
    assert cs.choose(scores, ["a", "b", "c"]) == "b"
    assert cs.choose(scores, ["a", "b", "c"], tolerance=0.05) == "a"
    assert cs.choose(scores, ["c"]) == "lrp-default"  # nothing better: the reference stays
    assert cs.choose(scores, ["missing"]) == "lrp-default"


def _records():
    rng = np.random.default_rng(0)
    recs = []
    for image in range(6):
        base = rng.random(2)
        for method, shift in (("lrp-default", 0.0), ("x", 0.1 + 0.01 * image)):
            recs.append({"method": method, "image": float(image), "query": 3.0, "srg@mean": base[0] + shift,
                         "srg@zero": base[1] + 2 * shift, "mass_accuracy": 0.5})
    recs.append({"method": "x", "image": 99.0, "query": 0.0, "srg@mean": 5.0, "srg@zero": 5.0})  # no partner
    return recs


def test_pair_score_and_paired_advantage_by_hand():
    recs = _records()
    assert cs.pair_score(recs[0], ["mean", "zero"]) == pytest.approx((recs[0]["srg@mean"] + recs[0]["srg@zero"]) / 2)
    assert math.isnan(cs.pair_score({"srg@mean": 1.0}, ["mean", "zero"]))
    adv = cs.paired_advantage(recs, "x", "lrp-default", ["mean", "zero"])
    shifts = np.array([0.1 + 0.01 * i for i in range(6)])
    diffs = 1.5 * shifts  # (shift + 2·shift) / 2 per pair; the unpaired image 99 is left out
    assert adv.n == 6 and adv.mean == pytest.approx(diffs.mean())
    half = adv.high - adv.mean
    assert half == pytest.approx(2.5705818 * diffs.std(ddof=1) / math.sqrt(6), rel=1e-5)  # t(0.975, 5)
    only_mean = cs.paired_advantage(recs, "x", "lrp-default", ["mean"], key="srg@mean")
    assert only_mean.mean == pytest.approx(shifts.mean())


def test_method_scores_average_the_replacements_per_pair_before_the_mean():
    scores = cs.method_scores(_records(), ["mean", "zero"])
    rows = [r for r in _records() if r["method"] == "lrp-default"]
    by_hand = np.mean([(r["srg@mean"] + r["srg@zero"]) / 2 for r in rows])
    assert scores["lrp-default"]["score"].mean == pytest.approx(by_hand)
    assert scores["lrp-default"]["srg@zero"].mean == pytest.approx(np.mean([r["srg@zero"] for r in rows]))
    assert scores["x"]["mass_accuracy"].n == 6  # the pair without a mass accuracy is not counted


def _write_pairs(folder, rows):
    folder.mkdir(parents=True)
    keys = list(rows[0])
    lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")


def test_phases_after_select_need_its_table_and_later_selection_folders_add_methods(tmp_path, capsys):
    assert cs.main(["combine", "--out", str(tmp_path)]) == 2
    assert "select is missing: run the select phase first" in capsys.readouterr().err
    (tmp_path / "select_0.log").write_text("a log beside the folders is not a folder of results")
    _write_pairs(tmp_path / "select", [{"method": "lrp-default", "image": 0, "query": 1, "srg@mean": 0.5},
                                       {"method": "a", "image": 0, "query": 1, "srg@mean": 0.25}])
    _write_pairs(tmp_path / "select-2", [{"method": "lrp-default", "image": 0, "query": 1, "srg@mean": 0.75},
                                         {"method": "b", "image": 0, "query": 1, "srg@mean": "nan"}])
    records = cs._select_records(tmp_path)
    assert [(r["method"], r["srg@mean"]) for r in records][:2] == [("lrp-default", 0.5), ("a", 0.25)]
    assert len(records) == 3 and records[2]["method"] == "b" and math.isnan(records[2]["srg@mean"])
    folder = cs._combine_folder(tmp_path, {"x": "default", "y": "mha-ah", "z": "gamma-1"})
    assert folder.name == "combine-gamma-1+mha-ah"
    assert cs._combine_folder(tmp_path, {"x": "default"}).name == "combine-default"
