"""Plans: M from keep/experts/budget, architecture checks, local/global ranking, validation, round trip.

Several tests pin a bug that once passed the suite (issue 11.6): global ranking without the per-layer
top-k floor, padding with the worst instead of the best unchosen experts, local ranking that ignores
routing groups; and plan files of the wrong shape (issue 12.6/12.7).
"""
import dataclasses
import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiny
from premoe.capture import DomainStats
from premoe.data import Source
from premoe.errors import InputError, PlanError, PremoeError
from premoe.plan import (Plan, PlanRequest, _count_notes, check_experts, explain, format_ranges, make_plan,
                         validate_plan)
from premoe.profile import Profile, ProfileParams, profile_model

ROUTER_MASS = {"router_mass": {"kind": "router_mass", "params": {}, "per_routed_token": False}}


def arch(n_group: int = 1, topk_group: int = 1, top_k: int = 2) -> dict:
    return {"top_k": top_k, "n_group": n_group, "topk_group": topk_group, "renormalises": True,
            "scoring": "softmax", "gate_changes_when_pruned": False,
            "sizes": {"total_bytes": 1000, "base_bytes": 200, "expert_bytes": {"0": 30, "1": 20}}}


def profile_of(utilities: dict[str, list[list[float]]], tokens: dict[str, int] | None = None,
               architecture: dict | None = None) -> Profile:
    """A profile over 2 layers x 8 experts whose router_mass utility per domain is exactly ``utilities``."""
    stats = {}
    for domain, rows in utilities.items():
        n = (tokens or {}).get(domain, 10)
        stats[domain] = DomainStats(n, {"router_mass": torch.tensor(rows, dtype=torch.float64) * n}, torch.ones(2, 8))
    return Profile({"name": "toy", "path": "/nonexistent", "model_type": None, "config_hash": "h"}, "Toy", [0, 1], 8,
                   2, ROUTER_MASS, stats, architecture=architecture if architecture is not None else arch())


def toy_profile() -> Profile:
    """Two domains: a (10 tokens) and b (30 tokens)."""
    return profile_of({"a": [[8, 7, 6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6, 7, 8]],
                       "b": [[1, 1, 1, 1, 1, 1, 9, 9], [9, 9, 1, 1, 1, 1, 1, 1]]}, {"a": 10, "b": 30})


def test_specialist_keeps_top_m_per_layer():
    plan = make_plan(toy_profile(), PlanRequest(experts=3, domain="a", scorer="router_mass"))
    assert plan.kept == {0: [0, 1, 2], 1: [5, 6, 7]}
    assert plan.order[0] == [0, 1, 2, 3, 4, 5, 6, 7] and plan.order[1] == [7, 6, 5, 4, 3, 2, 1, 0]
    assert plan.target == "specialist:a"
    assert "multiple of 4" in plan.notes[0]


def test_generalist_is_token_weighted():
    # tokens: a=10, b=30: layer 0 = (a + 3b) / 4 = experts 6, 7 at (2 + 27)/4, then expert 0 at (8 + 3)/4
    plan = make_plan(toy_profile(), PlanRequest(experts=3, scorer="router_mass"))
    assert plan.kept[0] == [0, 6, 7]
    balanced = make_plan(toy_profile(), PlanRequest(experts=3, scorer="router_mass", weighting="balanced"))
    assert balanced.kept[0] == [0, 6, 7] and balanced.kept[1] == [0, 1, 7]  # (a + b)/2: 5, 5.5, … 4.5
    assert make_plan(toy_profile(), PlanRequest(experts=2, scorer="router_mass", domains=["a"])).kept[0] == [0, 1]


def test_keep_fraction_budget_and_errors():
    assert len(make_plan(toy_profile(), PlanRequest(keep=0.5, domain="a", scorer="router_mass")).kept[0]) == 4
    # budget: 200 base bytes + M x (30 + 20) bytes ≤ 400 -> M = 4, from the sizes the profile recorded
    assert len(make_plan(toy_profile(), PlanRequest(budget_gb=400e-9, domain="a", scorer="router_mass")).kept[0]) == 4
    # below the smallest (M = top-k = 2: 200 + 2 x 50 = 300 bytes): refused with the budget that fits
    with pytest.raises(PlanError, match=r"below the smallest .* 300 bytes .* pass --budget-gb 0\.0000003000 or more"):
        make_plan(toy_profile(), PlanRequest(budget_gb=240e-9, domain="a", scorer="router_mass"))
    with pytest.raises(InputError, match="--budget-gb must be a positive number"):
        make_plan(toy_profile(), PlanRequest(budget_gb=float("nan"), domain="a", scorer="router_mass"))
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
        check_experts(5, profile.num_experts, profile.top_k, (2, 1))
    with pytest.raises(PlanError, match="at least 2 per group"):
        check_experts(2, profile.num_experts, profile.top_k, (2, 1))
    check_experts(4, profile.num_experts, profile.top_k, (2, 1))


def test_local_ranking_on_a_grouped_model_keeps_the_best_of_every_group():
    # all the utility sits in group 0 (experts 0-3): ignoring the groups would keep 0-3 and leave group 1 empty
    grouped = profile_of({"a": [[9, 8, 7, 6, 1, 2, 3, 4], [4, 3, 2, 1, 9, 8, 7, 6]]}, architecture=arch(2, 1))
    plan = make_plan(grouped, PlanRequest(experts=4, domain="a", scorer="router_mass"))
    assert plan.kept == {0: [0, 1, 6, 7], 1: [0, 1, 4, 5]}
    ungrouped = profile_of({"a": [[9, 8, 7, 6, 1, 2, 3, 4], [4, 3, 2, 1, 9, 8, 7, 6]]})
    assert make_plan(ungrouped, PlanRequest(experts=4, domain="a", scorer="router_mass")).kept[0] == [0, 1, 2, 3]


def test_global_ranking_on_a_grouped_model_grows_layers_by_whole_tiers_and_pads_every_group_evenly():
    # layer 0's third tier (7 in group 0, 2 in group 1) holds 9/40 of its utility; layer 1 is flat: 2/8 a tier
    grouped = profile_of({"a": [[9, 8, 7, 6, 1, 2, 3, 4], [1] * 8]}, architecture=arch(2, 1))
    plan = make_plan(grouped, PlanRequest(experts=6, domain="a", scorer="router_mass", ranking="global"))
    # 2 layers x 6 = 12 experts = 6 tiers; each layer's floor is 2 tiers; the 2 left go to layer 1 (0.25 > 0.225)
    assert plan.kept == {0: [0, 1, 6, 7], 1: list(range(8))}
    validate_plan(plan, 8, 2, (2, 1))
    uneven = dataclasses.replace(plan, kept={0: [0, 1, 6, 7], 1: [0, 1, 2, 4, 5, 6]})
    # one more per group in layer 0: its next best in group 0 (expert 2) and in group 1 (expert 5), not 2 and 3
    assert uneven.padded(n_group=2).kept == {0: [0, 1, 2, 5, 6, 7], 1: [0, 1, 2, 4, 5, 6]}
    assert uneven.padded().kept[0] == [0, 1, 2, 3, 6, 7]  # ungrouped padding: by utility alone
    with pytest.raises(PlanError, match="multiple of n_group"):
        make_plan(grouped, PlanRequest(experts=5, domain="a", scorer="router_mass", ranking="global"))
    # layer 1's utility sits in one expert per group: its second tier is worth nothing, yet grouped routing needs
    # 2 per group (the group score sums each group's top 2), so the floor keeps it
    peaked = profile_of({"a": [[9, 8, 7, 6, 1, 2, 3, 4], [9, 0, 0, 0, 9, 0, 0, 0]]}, architecture=arch(2, 1))
    plan = make_plan(peaked, PlanRequest(experts=4, domain="a", scorer="router_mass", ranking="global"))
    assert plan.kept[0] == [0, 1, 6, 7] and len(plan.kept[1]) == 4 and {0, 4} <= set(plan.kept[1])


# layer 0: six equally useful experts (share 1/6 each); layer 1: a spread whose best share (0.20) beats them
GLOBAL = {"a": [[1, 1, 1, 1, 1, 1, 0, 0], [0.14, 0.20, 0.18, 0.16, 0.12, 0.10, 0.06, 0.04]]}


def test_global_ranking_keeps_top_k_in_every_layer_then_the_best_pairs():
    plan = make_plan(profile_of(GLOBAL), PlanRequest(experts=3, domain="a", scorer="router_mass", ranking="global"))
    # 2 layers x 3 = 6 experts: the floor gives each layer its top 2 (layer 1: experts 1, 2); the 2 left go to the
    # best remaining shares: 1/6 (layer 0) beats 0.16 (layer 1)
    assert [len(plan.kept[0]), len(plan.kept[1])] == [4, 2]
    assert plan.kept[1] == [1, 2]
    assert set(plan.kept[0]) <= {0, 1, 2, 3, 4, 5}
    # without the floor layer 1 would get 1 expert (0.20) and be below top-k; make the floor bind
    peaked = {"a": [[1, 1, 1, 1, 1, 1, 0, 0], [0.125] * 8]}
    plan = make_plan(profile_of(peaked), PlanRequest(experts=3, domain="a", scorer="router_mass", ranking="global"))
    assert [len(plan.kept[0]), len(plan.kept[1])] == [4, 2]


def test_padding_adds_the_best_unchosen_experts():
    plan = make_plan(profile_of(GLOBAL), PlanRequest(experts=3, domain="a", scorer="router_mass", ranking="global"))
    padded = plan.padded()
    assert padded.uniform and padded.max_kept == 4
    assert padded.kept[1] == [0, 1, 2, 3]  # shares 0.20, 0.18 chosen; the next best are 0.16 (3) and 0.14 (0)
    assert padded.kept[0] == plan.kept[0]
    assert "padded to 4" in padded.notes[-1]


def test_plan_round_trip(tmp_path):
    plan = make_plan(toy_profile(), PlanRequest(experts=3, scorer="router_mass", ranking="global"))
    path = plan.save(tmp_path / "p.json")
    loaded = Plan.load(path)
    assert loaded.__dict__ == plan.__dict__
    with pytest.raises(Exception, match="already exists"):
        plan.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]
    with pytest.raises(PlanError, match="was made for toy"):
        plan.check_model({"name": "other", "config_hash": "zz", "path": "/nonexistent"})


def test_format_ranges():
    assert format_ranges([0, 1, 2, 5, 6, 9]) == "0-2,5-6,9"
    assert format_ranges([]) == ""


# --------------------------------------------------------------------------- validation


def valid_plan() -> Plan:
    return make_plan(toy_profile(), PlanRequest(experts=4, domain="a", scorer="router_mass"))


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.kept.__setitem__(0, [-1, 0, 1, 2]), r"outside 0..7"),
    (lambda p: p.kept.__setitem__(0, [0, 1, 2, 8]), r"outside 0..7"),
    (lambda p: p.kept.__setitem__(0, []), "keeps no experts"),
    (lambda p: p.kept.__setitem__(0, [1, 1, 2, 3]), "twice"),
    (lambda p: p.kept.__setitem__(0, [1]), "fewer than top-k = 2"),
    (lambda p: p.order.__setitem__(0, [0, 1, 2, 3]), "order must list every expert"),
    (lambda p: p.order.__setitem__(0, [0, 0, 1, 2, 3, 4, 5, 6]), "order must list every expert"),
    (lambda p: p.kept.__setitem__(5, [0, 1]), "must agree"),
    (lambda p: p.kept.pop(1), "must agree"),
])
def test_validate_plan_refuses_each_broken_plan(mutate, message):
    plan = valid_plan()
    validate_plan(plan, 8, 2)
    mutate(plan)
    with pytest.raises(PlanError, match=message):
        validate_plan(plan, 8, 2)


def test_validate_plan_checks_the_model():
    plan = valid_plan()
    with pytest.raises(PlanError, match="8 experts per layer with top-k 2; the model has 16"):
        validate_plan(plan, 16, 2)
    with pytest.raises(PlanError, match="model's MoE layers are \\[1, 2\\]"):
        validate_plan(plan, 8, 2, moe_layers=[1, 2])
    plan.kept[0] = [0, 1, 2, 4]  # 3 in group 0, 1 in group 1
    validate_plan(plan, 8, 2)
    with pytest.raises(PlanError, match="per group"):
        validate_plan(plan, 8, 2, groups=(2, 1))


def test_check_model_validates_against_the_checkpoint(tiny_qwen3, tmp_path):
    profile = profile_model(tiny_qwen3, [Source("code", [tiny.TEXT[:600]], "x")], ["router_mass"],
                            ProfileParams(max_tokens=64, seq_len=32), progress=False)
    plan = make_plan(profile, PlanRequest(experts=4, domain="code", scorer="router_mass"))
    from premoe.modeling import model_identity

    identity = model_identity(tiny_qwen3)
    plan.check_model(identity, moe_layers=[0, 1])
    plan.kept[0] = [-1, 0, 1, 2]  # once silently expert 7
    with pytest.raises(PlanError, match="outside 0..7"):
        plan.check_model(identity)


@pytest.mark.parametrize("edit, message", [
    (lambda d: [], "JSON object with format"),
    (lambda d: {**d, "format": "premoe-plan/9"}, "format"),
    (lambda d: {**d, "kept": [[0, 1]]}, "'kept' must be a JSON dict"),
    (lambda d: {**d, "kept": {"0": "0,1"}}, r"kept\['0'\] must map"),
    (lambda d: {**d, "kept": {"x": [0, 1]}}, r"kept has layer key 'x', expected a decimal layer index"),
    (lambda d: {**d, "kept": {**d["kept"], "0": [0, 1.5, 2, 3]}}, r"kept\['0'\] must map"),
    (lambda d: {**d, "kept": {**d["kept"], "0": [-1, 1, 2, 3]}}, "outside 0..7"),
    (lambda d: {**d, "num_experts": "8"}, "'num_experts' must be a JSON int"),
    (lambda d: {**d, "top_k": True}, "'top_k' must be a JSON int"),
    (lambda d: {k: v for k, v in d.items() if k != "target"}, "'target' must be a JSON str"),
    (lambda d: {**d, "extra": 1}, "unknown plan field"),
    (lambda d: {**d, "model": {"name": 1}}, "'model' must hold"),
    (lambda d: {**d, "request": {}}, "'request' must hold"),
])
def test_load_refuses_json_of_the_wrong_shape(tmp_path, edit, message):
    path = valid_plan().save(tmp_path / "p.json")
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(PlanError, match=message):
        Plan.load(path)


def test_load_refuses_unreadable_files(tmp_path):
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PlanError, match="not a readable premoe plan"):
        Plan.load(tmp_path / "bin.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PlanError, match="invalid JSON"):
        Plan.load(tmp_path / "bad.json")
    with pytest.raises(PlanError, match="not a readable premoe plan"):
        Plan.load(tmp_path)  # a directory


def _mutations():
    json_values = st.recursive(st.none() | st.booleans() | st.integers(-10, 20) | st.floats() | st.text(max_size=4),
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                          max_size=3), max_leaves=6)
    keys = st.sampled_from(["model", "family", "num_experts", "top_k", "moe_layers", "kept", "order", "request",
                            "target", "utility_kept", "notes", "profile", "format", "kept.0", "kept.1", "order.0",
                            "kept.0.0", "order.1.3", "nonsense"])
    return st.lists(st.tuples(keys, json_values | st.integers(-3, 12)), min_size=1, max_size=3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=_mutations())
def test_mutated_plan_files_load_cleanly_or_fail_cleanly(tmp_path, mutations):
    (tmp_path / "p.json").unlink(missing_ok=True)  # hypothesis reuses tmp_path across examples
    path = valid_plan().save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    for key, value in mutations:
        target, *rest = key.split(".")
        if not rest:
            data[target] = value
        elif isinstance(data.get(target), dict):
            if len(rest) == 1:
                data[target][rest[0]] = value
            elif isinstance(data[target].get(rest[0]), list) and data[target][rest[0]]:
                data[target][rest[0]][int(rest[1]) % len(data[target][rest[0]])] = value
    text = json.dumps(data)
    path.write_text(text)
    try:
        plan = Plan.load(path)
    except PremoeError as e:
        assert "\n" not in str(e)
    else:
        validate_plan(plan, plan.num_experts, plan.top_k)  # whatever loads is a valid plan
        assert all(isinstance(e, int) for v in plan.kept.values() for e in v)
    assert path.read_text() == text  # loading never changes the file


# --------------------------------------------------------------------------- the profile carries the architecture


def test_a_grouped_model_keeps_its_groups_after_its_directory_is_gone(tmp_path):
    model = tiny.save("deepseek_v3", tmp_path / "dsv3")  # 2 groups of 4 experts
    profile = profile_model(model, [Source("code", [tiny.TEXT[:600]], "x")], ["router_mass"],
                            ProfileParams(max_tokens=64, seq_len=32), progress=False)
    saved = profile.save(tmp_path / "prof")
    shutil.rmtree(model)
    loaded = Profile.load(saved)
    assert loaded.groups == (2, 1) and loaded.architecture["top_k"] == 2 and loaded.architecture["renormalises"]
    assert loaded.sizes() is not None and sorted(loaded.sizes().expert_bytes) == [1, 2]
    plan = make_plan(loaded, PlanRequest(experts=4, domain="code", scorer="router_mass"))
    for kept in plan.kept.values():
        assert [e // 4 for e in kept] == [0, 0, 1, 1]  # two from each group, whatever the utility says
    with pytest.raises(PlanError, match="multiple of n_group = 2"):
        make_plan(loaded, PlanRequest(experts=3, domain="code", scorer="router_mass"))
    assert len(make_plan(loaded, PlanRequest(budget_gb=1.0, domain="code", scorer="router_mass")).kept[1]) == 8


def test_an_old_profile_without_architecture_and_model_is_refused_not_planned_ungrouped():
    old = profile_of(GLOBAL, architecture={})
    with pytest.raises(InputError, match="profile the model again"):
        make_plan(old, PlanRequest(experts=4, domain="a", scorer="router_mass"))


# --------------------------------------------------------------------------- pinned by surviving mutants


def test_keep_fraction_rounds_to_the_nearest_count():
    # 0.45 x 8 experts = 3.6: the nearest count is 4 (truncating would keep 3)
    assert len(make_plan(toy_profile(), PlanRequest(keep=0.45, domain="a", scorer="router_mass")).kept[0]) == 4
    assert len(make_plan(toy_profile(), PlanRequest(keep=0.3, domain="a", scorer="router_mass")).kept[0]) == 2


def test_global_ranking_compares_shares_not_raw_utilities():
    # layer 0's raw utilities are 10x larger, but its shares (1/6 each) are below layer 1's third expert (0.20):
    # ranked by share, the 2 experts left after the top-k floor go one to each layer; by raw utility both to layer 0
    scaled = {"a": [[10, 10, 10, 10, 10, 10, 0, 0], [0.30, 0.25, 0.20, 0.15, 0.10, 0, 0, 0]]}
    plan = make_plan(profile_of(scaled), PlanRequest(experts=3, domain="a", scorer="router_mass", ranking="global"))
    assert plan.kept[1] == [0, 1, 2]
    assert len(plan.kept[0]) == 3


def test_validate_plan_refuses_uneven_groups_even_with_two_per_group():
    plan = valid_plan()
    plan.kept = {0: [0, 1, 4, 5, 6, 7], 1: [0, 1, 4, 5]}  # layer 0: 2 experts in group 0, 4 in group 1
    with pytest.raises(PlanError, match=r"layer 0 keeps \[2, 4\] experts per group"):
        validate_plan(plan, 8, 2, (2, 1))
    plan.kept[0] = [0, 1, 4, 5]
    validate_plan(plan, 8, 2, (2, 1))


# --- gaps mutmut found (bench/mutmut_run.py): each test below fails under a mutant that survived the suite before


def test_utility_kept_is_each_domains_mean_share_over_layers():
    plan = make_plan(toy_profile(), PlanRequest(experts=3, domain="a", scorer="router_mass"))
    # a: layer 0 keeps 8 + 7 + 6 of 36, layer 1 keeps 6 + 7 + 8 of 36; b: 1 + 1 + 1 of 24 in both layers
    assert plan.utility_kept == {"a": round(21 / 36, 6), "b": 0.125}
    # negative utilities count as zero; a layer with no utility holds a share of 0; totals below 1 are shares too
    odd = profile_of({"a": [[-4, 3, 2, 1, 0, 0, 0, 0], [0.5, 0.25, 0.125, 0.125, 0, 0, 0, 0]],
                      "b": [[0] * 8, [0] * 8]})
    plan = make_plan(odd, PlanRequest(experts=2, domain="a", scorer="router_mass"))
    assert plan.kept == {0: [1, 2], 1: [0, 1]}
    assert plan.utility_kept == {"a": round((5 / 6 + 0.75) / 2, 6), "b": 0.0}


def test_balanced_weighting_changes_the_generalist_where_token_counts_differ():
    # a (10 tokens) loves experts 0, 1; b (90 tokens) mildly prefers 2, 3
    uneven = profile_of({"a": [[10, 10, 0, 0, 0, 0, 0, 0]] * 2, "b": [[0, 0, 3, 3, 0, 0, 0, 0]] * 2},
                        {"a": 10, "b": 90})
    by_tokens = make_plan(uneven, PlanRequest(experts=2, scorer="router_mass"))  # (10a + 90b) / 100: 1.0 vs 2.7
    balanced = make_plan(uneven, PlanRequest(experts=2, scorer="router_mass", weighting="balanced"))  # 5 vs 1.5
    assert by_tokens.kept == {0: [2, 3], 1: [2, 3]}
    assert balanced.kept == {0: [0, 1], 1: [0, 1]}
    assert by_tokens.target == balanced.target == "generalist:a,b"


@pytest.mark.parametrize("nbytes, text", [(0, "0"), (8_976_131, "0.008977"), (10**9, "1.000"),
                                           (123_456_789_012, "123.5"), (5 * 10**14, "500000"),
                                           (15, "0.00000001501"),  # 1.500e-8 * 1e9 < 15 in floats: one step up
                                           (35, "0.00000003500"), (1, "0.000000001000")])  # floats once gave 3501
def test_gb_at_least_pins(nbytes, text):
    from premoe.plan import gb_at_least

    assert gb_at_least(nbytes) == text


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 10**15))
def test_gb_at_least_is_the_smallest_four_digit_budget_that_fits(nbytes):
    """What the refusal tells the user to pass must be accepted by the check the planner runs (x * 1e9 >= bytes),
    with four significant digits, and one unit less in its last digit must not be."""
    from premoe.plan import gb_at_least

    from decimal import Decimal

    text = gb_at_least(nbytes)
    assert float(text) * 1e9 >= nbytes
    figure = Decimal(text)
    assert len(figure.normalize().as_tuple().digits) <= 4
    assert float(figure - Decimal(1).scaleb(figure.adjusted() - 3)) * 1e9 < nbytes  # one unit less: refused


def test_budget_with_global_ranking_steps_down_until_the_padded_checkpoint_fits():
    # 200 base bytes + 50 per expert per layer... M = 4 fits 400 bytes uniformly, but global ranking at M = 4 keeps
    # 5 + 3 experts (layer 1's utility sits in two experts), padded to 5 per layer = 450 bytes: one step down to
    # M = 3 keeps 4 + 2, padded to 4 = 400 bytes
    p = profile_of({"a": [[10, 9.9, 9.8, 9.7, 9.6, 1, 1, 1], [10, 9.95, 1, 1, 1, 1, 1, 1]]})
    assert make_plan(p, PlanRequest(experts=4, domain="a", scorer="router_mass", ranking="global")).kept == \
        {0: [0, 1, 2, 3, 4], 1: [0, 1, 2]}
    plan = make_plan(p, PlanRequest(budget_gb=400e-9, domain="a", scorer="router_mass", ranking="global"))
    assert plan.kept == {0: [0, 1, 2, 3], 1: [0, 1]}
    assert any("predates header sizes" in n for n in plan.notes)


def test_save_with_force_replaces_and_without_force_refuses(tmp_path):
    first = make_plan(toy_profile(), PlanRequest(experts=3, domain="a", scorer="router_mass"))
    second = make_plan(toy_profile(), PlanRequest(experts=4, domain="a", scorer="router_mass"))
    path = first.save(tmp_path / "p.json")
    with pytest.raises(PremoeError, match="already exists"):
        second.save(path)
    assert Plan.load(path).kept == first.kept
    second.save(path, force=True)
    assert Plan.load(path).kept == second.kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_check_model_refuses_a_plan_for_other_moe_layers(tiny_qwen3):
    profile = profile_model(tiny_qwen3, [Source("code", [tiny.TEXT[:600]], "x")], ["router_mass"],
                            ProfileParams(max_tokens=64, seq_len=32), progress=False)
    plan = make_plan(profile, PlanRequest(experts=4, domain="code", scorer="router_mass"))
    from premoe.modeling import model_identity

    with pytest.raises(PlanError):
        plan.check_model(model_identity(tiny_qwen3), moe_layers=[0, 1, 2])


def test_keep_one_keeps_every_expert_and_notes_follow_multiples_of_four():
    everything = make_plan(toy_profile(), PlanRequest(keep=1.0, domain="a", scorer="router_mass"))
    assert everything.kept == {0: list(range(8)), 1: list(range(8))}
    assert not any("multiple of 4" in n for n in everything.notes)  # M = 8
    five = make_plan(toy_profile(), PlanRequest(experts=5, domain="a", scorer="router_mass"))
    assert any("M = 5 is not a multiple of 4" in n for n in five.notes)
    for keep in (0.0, 1.5):
        with pytest.raises(InputError):
            make_plan(toy_profile(), PlanRequest(keep=keep, domain="a", scorer="router_mass"))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1e-6, 1e3), min_size=2, max_size=2))
def test_global_ranking_does_not_depend_on_each_layers_utility_scale(scales):
    """Global ranking compares each layer's utility *shares*: scaling one layer's utilities (another scorer's
    units, a layer with tiny logits) must not move experts between layers, including scales where a layer's total
    is below 1."""
    rows = [[8, 7, 6, 5, 4, 3, 2, 1], [9, 9, 1, 1, 1, 1, 1, 1]]
    base = make_plan(profile_of({"a": rows}), PlanRequest(experts=4, domain="a", scorer="router_mass",
                                                           ranking="global"))
    scaled = [[v * s for v in row] for row, s in zip(rows, scales)]
    got = make_plan(profile_of({"a": scaled}), PlanRequest(experts=4, domain="a", scorer="router_mass",
                                                            ranking="global"))
    assert got.kept == base.kept


# --------------------------------------------------------------------------- what mutmut found unpinned


def test_reconstruct_selection_is_local_only_and_gets_the_plans_domains_and_m(monkeypatch):
    import premoe.select

    calls = []

    def fake(profile, names, m, sample_tokens):
        calls.append((names, m, sample_tokens))
        utility = torch.arange(16, dtype=torch.float64).reshape(2, 8)
        return utility, [[7, 0, 3][:m], [1, 2, 5][:m]]

    monkeypatch.setattr(premoe.select, "reconstruct", fake)
    with pytest.raises(InputError, match="--select reconstruct chooses M experts in every layer; use --ranking local"):
        make_plan(toy_profile(), PlanRequest(experts=3, domain="a", select="reconstruct", ranking="global", scorer="router_mass"))
    assert calls == []
    plan = make_plan(toy_profile(), PlanRequest(experts=3, domain="b", select="reconstruct", sample_tokens=77, scorer="router_mass"),
                     "prof/")
    assert calls == [(["b"], 3, 77)]
    assert plan.kept == {0: [0, 3, 7], 1: [1, 2, 5]} and plan.order[0] == [7, 6, 5, 4, 3, 2, 1, 0]
    assert plan.profile == "prof/"
    make_plan(toy_profile(), PlanRequest(experts=2, select="reconstruct", domains=["a", "b"], scorer="router_mass"))
    assert calls[-1] == (["a", "b"], 2, 2048)
    with pytest.raises(InputError, match="--select must be top or reconstruct, got 'best'"):
        make_plan(toy_profile(), PlanRequest(experts=3, domain="a", select="best", scorer="router_mass"))


def test_a_budget_is_a_strict_ceiling_in_bytes():
    # 200 base bytes + 50 per expert per layer: M = 4 is 400 bytes; a budget 1e-7 bytes short of it keeps M = 3
    request = dict(domain="a", scorer="router_mass")
    assert len(make_plan(toy_profile(), PlanRequest(budget_gb=400e-9, **request)).kept[0]) == 4
    assert len(make_plan(toy_profile(), PlanRequest(budget_gb=399.9999999e-9, **request)).kept[0]) == 3
    with pytest.raises(InputError, match="--budget-gb must be a positive number, got 0"):
        make_plan(toy_profile(), PlanRequest(budget_gb=0.0, **request))


def test_budget_notes_appear_only_with_a_budget():
    p = profile_of({"a": [[10, 9.9, 9.8, 9.7, 9.6, 1, 1, 1], [10, 9.95, 1, 1, 1, 1, 1, 1]]})  # sizes lack headers
    free = make_plan(p, PlanRequest(experts=4, domain="a", scorer="router_mass", ranking="global"))
    assert not any("budget" in n or "predates header sizes" in n for n in free.notes)
    exact = make_plan(p, PlanRequest(budget_gb=400e-9, domain="a", scorer="router_mass", ranking="global"))
    assert not any("budget holds" in n for n in exact.notes)  # M = 4 uniform, and the padded global plan is 4 too
    assert "predates header sizes" in exact.notes[-1]
    wider = make_plan(p, PlanRequest(budget_gb=500e-9, domain="a", scorer="router_mass", ranking="global"))
    assert wider.kept == {0: [0, 1, 2, 3, 4], 1: [0, 1, 2, 3, 4]}  # M = 6 global pads past 500 bytes: one step down
    assert ("the 5e-07 GB budget holds M = 6 in every layer: --ranking local keeps that many, more than this padded "
            "global plan's 5") in wider.notes


def test_a_family_whose_gates_change_when_pruned_gets_a_note():
    changing = {**arch(), "gate_changes_when_pruned": True}
    plan = make_plan(profile_of(GLOBAL, architecture=changing), PlanRequest(experts=4, domain="a",
                                                                           scorer="router_mass"))
    assert ("Toy routes with a softmax over all experts without top-k renormalisation: after pruning the kept "
            "experts' gate weights grow (the compiled model renormalises over the kept experts only)") in plan.notes
    assert not any("softmax over all experts" in n
                   for n in make_plan(profile_of(GLOBAL), PlanRequest(experts=4, domain="a", scorer="router_mass")).notes)


def test_global_tiers_floor_is_the_tiers_top_k_needs_when_that_exceeds_two():
    # top-8 routing over 2 groups with topk_group 1 would need 8 per group; top-3 with topk_group 1 needs 3 tiers
    # (3 experts per group = 6 per layer), whatever the utility: both layers get exactly the floor at M = 6
    stats = {"a": DomainStats(10, {"router_mass": torch.tensor([[9, 8, 7, 6, 5, 4, 3, 2], [1] * 8],
                                                                dtype=torch.float64) * 10}, torch.ones(2, 8))}
    grouped = Profile({"name": "toy", "path": "/nonexistent", "model_type": None, "config_hash": "h"}, "Toy", [0, 1],
                      8, 3, ROUTER_MASS, stats, architecture=arch(2, 1, top_k=3))
    plan = make_plan(grouped, PlanRequest(experts=6, domain="a", scorer="router_mass", ranking="global"))
    assert plan.kept == {0: [0, 1, 2, 4, 5, 6], 1: [0, 1, 2, 4, 5, 6]}


# --------------------------------------------------------------------------- mutmut survivors in explain, _count_notes,
# _plan_fields, Plan.load/save, validate_plan (premoe plan --explain's exact text, the exact refusals)


def explained_plan(**request) -> Plan:
    """A plan built by hand: 3 of 8 experts in layer 0, 2 in layer 1 (compile pads both to 3), two domains."""
    return Plan({"name": "toy", "config_hash": "h"}, "Toy", 8, 2, [0, 1], {0: [0, 1, 2], 1: [5, 7]},
                {0: list(range(8)), 1: list(range(8))}, request, "specialist:a", {"a": 0.583333, "b": 0.125},
                ["first note", "second note"])


def explained_sizes(mtp_bytes: int):
    """Sizes whose GB figures sit a hair above a rounding boundary: dividing by 1e9 + 1 instead of 1e9 drops them
    below it. Compile's padded plan (3 experts in both layers) holds 1_000_049_551 + 3 x 100 + 3 x 50 bytes."""
    from premoe.checkpoint import SizeBreakdown

    return SizeBreakdown(total_bytes=2_000_050_001, base_bytes=1_000_049_551, expert_bytes={0: 100, 1: 50},
                         num_experts=8, mtp_bytes=mtp_bytes, header_bytes=500)


EXPLAIN_HEAD = ["  layer   0: keep   3/8  0-2", "  layer   1: keep   2/8  5,7"]
EXPLAIN_TAIL = ["  utility kept: a 58.3%, b 12.5%", "  note: first note", "  note: second note"]
EXPLAIN_SIZE = ("  checkpoint size: 2.0001 GB -> 1.0001 GB (50.0%) of tensors, 1.000051 GB of .safetensors files at "
                "most")


@pytest.mark.parametrize("request_, mtp_bytes, lines", [
    ({"scorer": "router_mass", "ranking": "local", "select": "top"}, None,
     ["plan for toy (Toy): specialist:a, scorer router_mass, local ranking", *EXPLAIN_HEAD, *EXPLAIN_TAIL]),
    ({"scorer": "router_mass", "ranking": "global"}, None,  # a plan from before --select: the scorer ranked it
     ["plan for toy (Toy): specialist:a, scorer router_mass, global ranking", *EXPLAIN_HEAD, *EXPLAIN_TAIL]),
    ({"scorer": "reap", "ranking": "local", "select": "reconstruct", "budget_gb": 1.5}, 1_000_050_001,
     ["plan for toy (Toy): specialist:a, reconstruction search, local ranking", *EXPLAIN_HEAD, EXPLAIN_SIZE,
      "  of which 1.0001 GB are multi-token-prediction layers that compile drops by default (--mtp drop; --mtp "
      "prune keeps them, pruned)",
      "  budget: 1.5 GB, checked again by compile against the exact file sizes", *EXPLAIN_TAIL]),
    ({"scorer": "router_mass", "ranking": "local", "select": "top", "budget_gb": None}, 0,  # no MTP, no budget
     ["plan for toy (Toy): specialist:a, scorer router_mass, local ranking", *EXPLAIN_HEAD, EXPLAIN_SIZE,
      *EXPLAIN_TAIL]),
])
def test_explain_prints_exactly(request_, mtp_bytes, lines):
    sizes = None if mtp_bytes is None else explained_sizes(mtp_bytes)
    assert explain(explained_plan(**request_), sizes).split("\n") == lines


def uneven_note(ranking: str, low: int, m: int) -> str:
    return (f"{ranking} ranking keeps {low}-{m} experts per layer; the checkpoint compile writes by default pads every "
            f"layer to M = {m} with its next-best experts (one count in config.json, what from_pretrained and vLLM "
            "load); --export compact keeps the real counts")


def multiple_note(m: int) -> str:
    return f"M = {m} is not a multiple of 4; serving kernels (vLLM fused MoE) run best with multiples of 4"


@pytest.mark.parametrize("counts, ranking, notes", [
    ([2, 3], "global", [uneven_note("global", 2, 3), multiple_note(3)]),  # two counts: the smaller, then the larger
    ([4, 8], "local", [uneven_note("local", 4, 8)]),
    ([2, 5, 3], "global", [uneven_note("global", 2, 5), multiple_note(5)]),
    ([4, 4], "global", []),
    ([6, 6], "local", [multiple_note(6)]),
])
def test_count_notes_exact(counts, ranking, notes):
    assert _count_notes({layer: list(range(n)) for layer, n in enumerate(counts)}, ranking) == notes


AGAIN = "make the plan again with `premoe plan`"


@pytest.mark.parametrize("edit, message", [
    (lambda d: {**d, "extra": 1}, "unknown plan field(s) 'extra'; is it from a newer premoe?"),
    (lambda d: {**d, "num_experts": "8"}, f"field 'num_experts' must be a JSON int, got str; {AGAIN}"),
    (lambda d: {**d, "kept": {"x": [0, 1]}}, f"kept has layer key 'x', expected a decimal layer index; {AGAIN}"),
    # the first 3 entries that are not integers, as the list they are
    (lambda d: {**d, "kept": {**d["kept"], "0": [0, 1.5, 2, 3]}},
     f"kept['0'] must map a layer index to a list of integer expert indices, got [1.5]; {AGAIN}"),
    (lambda d: {**d, "kept": {**d["kept"], "0": ["a", 1, "b", "c", "d"]}},
     f"kept['0'] must map a layer index to a list of integer expert indices, got ['a', 'b', 'c']; {AGAIN}"),
    # cut to 80 characters: a list of one long string, and a string where the list should be
    (lambda d: {**d, "kept": {**d["kept"], "1": ["x" * 100]}},
     f"kept['1'] must map a layer index to a list of integer expert indices, got ['{'x' * 78}; {AGAIN}"),
    (lambda d: {**d, "order": {**d["order"], "1": "y" * 100}},
     f"order['1'] must map a layer index to a list of integer expert indices, got {'y' * 80}; {AGAIN}"),
])
def test_load_names_the_file_and_the_bad_field_exactly(tmp_path, edit, message):
    path = valid_plan().save(tmp_path / "p.json")
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(PlanError) as refused:
        Plan.load(path)
    assert str(refused.value) == f"{path}: {message}"


def test_load_refusals_and_old_plans_exactly(tmp_path):
    with pytest.raises(PlanError) as refused:
        Plan.load(tmp_path)  # read_small_text names what it was reading: a plan
    assert str(refused.value) == (f"{tmp_path} is not a readable premoe plan (plan {tmp_path} is not a regular file "
                                  "(a directory, device or socket); give a JSON file)")
    plan = valid_plan()
    path = plan.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "format"}))
    with pytest.raises(PlanError) as refused:
        Plan.load(path)
    assert str(refused.value) == f"{path} is not a premoe plan (expected a JSON object with format premoe-plan/1)"
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "premoe_version"}))  # the version is optional
    assert Plan.load(path).__dict__ == plan.__dict__


def test_save_writes_json_indented_by_one_space(tmp_path):
    from premoe import __version__

    text = valid_plan().save(tmp_path / "p.json").read_text()
    assert text == json.dumps(json.loads(text), indent=1) + "\n"
    assert text.split("\n")[:3] == ["{", ' "format": "premoe-plan/1",', f' "premoe_version": "{__version__}",']


def test_validate_plan_refusals_exactly():
    plan = valid_plan()
    with pytest.raises(PlanError) as refused:
        validate_plan(plan, 16, 2)
    assert str(refused.value) == ("the plan is for 8 experts per layer with top-k 2; the model has 16 with top-k 2; "
                                  "make a plan from a profile of this model")
    with pytest.raises(PlanError) as refused:
        validate_plan(plan, 8, 2, moe_layers=[1, 2])
    assert str(refused.value) == ("the plan covers layers [0, 1] but the model's MoE layers are [1, 2]; make a plan "
                                  "from a profile of this model")
    # kept and order agree but moe_layers does not; kept and moe_layers agree but order does not: either refuses
    for field_, value, listed in [("moe_layers", [0, 1, 2], "orders layers [0, 1] and lists MoE layers [0, 1, 2]"),
                                  ("order", {**plan.order, 2: list(range(8))},
                                   "orders layers [0, 1, 2] and lists MoE layers [0, 1]")]:
        with pytest.raises(PlanError) as refused:
            validate_plan(dataclasses.replace(plan, **{field_: value}), 8, 2)
        assert str(refused.value) == f"the plan keeps experts in layers [0, 1], {listed}; these must agree (make " \
                                     "the plan again)"
