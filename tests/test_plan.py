"""Plans: M from keep/experts/budget, architecture checks, local/global ranking, round trip."""
import pytest
import torch

from premoe.capture import DomainStats
from premoe.errors import InputError, PlanError
from premoe.plan import Plan, PlanRequest, _global_top, _top_in_groups, check_experts, make_plan
from premoe.profile import Profile


def toy_profile(tmp_path=None) -> Profile:
    """Two domains over 2 layers x 8 experts with known utilities (router_mass sums / tokens)."""
    a = torch.tensor([[8, 7, 6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.float64)
    b = torch.tensor([[1, 1, 1, 1, 1, 1, 9, 9], [9, 9, 1, 1, 1, 1, 1, 1]], dtype=torch.float64)
    stats = {"a": DomainStats(10, {"router_mass": a * 10}, torch.ones(2, 8)),
             "b": DomainStats(30, {"router_mass": b * 30}, torch.ones(2, 8))}
    return Profile({"name": "toy", "path": "/nonexistent", "model_type": None, "config_hash": "h"}, "Toy", [0, 1], 8, 2,
                   {"router_mass": {"kind": "router_mass", "params": {}, "per_routed_token": False}}, stats)


def test_specialist_keeps_top_m_per_layer():
    plan = make_plan(toy_profile(), PlanRequest(experts=3, domain="a", scorer="router_mass"))
    assert plan.kept == {0: [0, 1, 2], 1: [5, 6, 7]}
    assert plan.target == "specialist:a"
    assert "multiple of 4" in plan.notes[0]


def test_generalist_is_token_weighted():
    # tokens: a=10, b=30, so b dominates: layer 0 experts 6,7 (b=9) then 0 (a=8 weighted 0.25 -> 2+0.75)
    plan = make_plan(toy_profile(), PlanRequest(experts=2, scorer="router_mass"))
    assert plan.kept[0] == [6, 7]
    balanced = make_plan(toy_profile(), PlanRequest(experts=3, scorer="router_mass", weighting="balanced"))
    assert 0 in balanced.kept[0]


def test_keep_fraction_and_errors():
    assert len(make_plan(toy_profile(), PlanRequest(keep=0.5, domain="a", scorer="router_mass")).kept[0]) == 4
    with pytest.raises(PlanError, match="below top-k = 2"):
        make_plan(toy_profile(), PlanRequest(experts=1, domain="a", scorer="router_mass"))
    with pytest.raises(InputError, match="exactly one"):
        make_plan(toy_profile(), PlanRequest(experts=2, keep=0.5, domain="a", scorer="router_mass"))
    with pytest.raises(InputError, match="not in this profile"):
        make_plan(toy_profile(), PlanRequest(experts=2, domain="zz", scorer="router_mass"))
    with pytest.raises(InputError, match="was not collected"):
        make_plan(toy_profile(), PlanRequest(experts=2, domain="a", scorer="reap"))


def test_group_constraints_offer_the_nearest_valid_choice():
    profile = toy_profile()
    with pytest.raises(PlanError, match="nearest valid: M = 4 or 6"):
        check_experts(5, profile, (2, 1))
    with pytest.raises(PlanError, match="at least 2 per group"):
        check_experts(2, profile, (2, 1))
    check_experts(4, profile, (2, 1))
    row = torch.tensor([1.0, 5, 3, 2, 9, 8, 0, 7])
    assert sorted(_top_in_groups(row, 4, 2)) == [1, 2, 4, 5]


def test_global_ranking_moves_experts_between_layers():
    utility = torch.tensor([[10.0, 9, 8, 7, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    kept = _global_top(utility, 3, 2, 1)
    assert sum(map(len, kept)) == 6
    assert len(kept[0]) == 4 and len(kept[1]) == 2  # the peaked layer gets more, each keeps >= top-k


def test_plan_round_trip_and_padding(tmp_path):
    plan = make_plan(toy_profile(), PlanRequest(experts=3, scorer="router_mass", ranking="global"))
    path = plan.save(tmp_path / "p.json")
    loaded = Plan.load(path)
    assert loaded.kept == plan.kept and loaded.order == plan.order
    padded = loaded.padded()
    assert padded.uniform and all(set(plan.kept[l]) <= set(padded.kept[l]) for l in plan.kept)
    with pytest.raises(Exception, match="already exists"):
        plan.save(path)
    with pytest.raises(PlanError, match="was made for toy"):
        plan.check_model({"name": "other", "config_hash": "zz"})
