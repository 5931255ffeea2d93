"""`premoe plan --budget-gb` is a promise (issue 15.5): the checkpoint compile writes fits it, or the plan is refused.

The measure is what lands on disk: the .safetensors files, headers included,
after compile pads an uneven (global) plan to one count per layer, with its
default ``--mtp drop``. Every test measures the files compile really wrote
(or its exact dry-run count), never premoe's own estimate alone.
"""
import json
import re
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiny
from checkpoints import save_family
from premoe.cli import main
from premoe.compile import compile_checkpoint
from premoe.data import Source
from premoe.errors import PlanError
from premoe.plan import PlanRequest, make_plan
from premoe.profile import ProfileParams, profile_model

TEXT = [Source("code", [tiny.TEXT[:600]], "tiny"), Source("bible", [tiny.TEXT[600:1700]], "tiny")]
PARAMS = ProfileParams(max_tokens=64, seq_len=32)
# per-expert tensors on disk; fused experts on disk (one entry per layer); grouped routing + an MTP layer + shards
FAMILIES = ["qwen3_moe", "gpt_oss", "deepseek_v3"]


@pytest.fixture(scope="module", params=FAMILIES)
def profiled(request, tmp_path_factory):
    """(checkpoint path, its profile) for a tiny model of each layout."""
    path = tmp_path_factory.mktemp("budget") / request.param
    save_family(request.param, path, max_shard_size="60KB")
    if request.param == "deepseek_v3":
        tiny.add_mtp_layer(path, request.param)
    return path, profile_model(path, TEXT, ["router_mass"], PARAMS, progress=False)


def safetensors_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def exact_bytes(path, plan, tmp_path, **options) -> int:
    """The .safetensors bytes compile would write for ``plan``, from its dry run (headers encoded for real)."""
    return compile_checkpoint(path, plan, tmp_path / "dry", dry_run=True, **options).plan.file_bytes


def uniform(profile, m: int) -> int:
    return profile.sizes().file_bytes_with({layer: m for layer in profile.moe_layers})


def smallest_m(profile) -> int:
    """M = top-k, or the next count grouped routing accepts (2 per group)."""
    n_group = profile.groups[0]
    return max(profile.top_k, 2 * n_group) if n_group > 1 else profile.top_k


def rankings(profile) -> list[str]:
    return ["local"] if profile.groups[0] > 1 else ["local", "global"]  # global ranking refuses grouped routing


def test_the_written_checkpoint_meets_the_budget_and_is_the_largest_that_does(profiled, tmp_path):
    path, profile = profiled
    E = profile.num_experts
    budget = (uniform(profile, smallest_m(profile)) + uniform(profile, E)) // 2  # bytes, between min and full
    for ranking in rankings(profile):
        plan = make_plan(profile, PlanRequest(budget_gb=budget / 1e9, scorer="router_mass", ranking=ranking))
        out = tmp_path / ranking
        report = compile_checkpoint(path, plan, out)
        assert safetensors_bytes(out) == report.plan.file_bytes <= budget
        m = plan.max_kept  # every layer holds this many on disk (padded)
        assert report.plan.config["premoe"]["experts_per_layer"] == {str(l): m for l in plan.kept}
        local = make_plan(profile, PlanRequest(budget_gb=budget / 1e9, scorer="router_mass")).max_kept
        assert m <= local
        assert (m < local) == any(f"holds M = {local} in every layer" in n for n in plan.notes), plan.notes
        bigger = m + profile.groups[0]  # the next count the architecture accepts
        if bigger <= E and ranking == "local":
            more = make_plan(profile, PlanRequest(experts=bigger, scorer="router_mass"))
            assert exact_bytes(path, more, tmp_path) > budget, f"M = {bigger} would also have fitted {budget}"


def test_the_estimate_bounds_the_exact_size_within_a_few_bytes_per_tensor(profiled, tmp_path):
    path, profile = profiled
    plan = make_plan(profile, PlanRequest(keep=0.5, domain="code", scorer="router_mass"))
    report = compile_checkpoint(path, plan, tmp_path / "dry", dry_run=True)
    estimate = uniform(profile, plan.max_kept)
    assert report.plan.file_bytes <= estimate <= report.plan.file_bytes + 8 * len(report.plan.writes) + 16 * len(
        report.plan.shards()), "the header bound is loose: a budget would leave room unused"


def test_a_budget_below_the_smallest_checkpoint_is_refused_with_the_budget_that_fits(profiled, tmp_path):
    path, profile = profiled
    smallest = uniform(profile, smallest_m(profile))
    with pytest.raises(PlanError, match=f"below the smallest checkpoint this model compiles to, {smallest} bytes") as e:
        make_plan(profile, PlanRequest(budget_gb=(smallest - 1) / 1e9, domain="code", scorer="router_mass"))
    suggested = float(re.search(r"pass --budget-gb (\S+) or more", str(e.value)).group(1))
    plan = make_plan(profile, PlanRequest(budget_gb=suggested, domain="code", scorer="router_mass"))
    assert plan.max_kept == smallest_m(profile)
    out = tmp_path / "smallest"
    compile_checkpoint(path, plan, out)
    assert smallest_m(profile) and safetensors_bytes(out) <= suggested * 1e9 < smallest + 1e-3 * smallest


def test_compile_refuses_to_break_a_budget(profiled, tmp_path):
    """A plan from an older premoe (which did not count padding) or --mtp prune must not silently overshoot."""
    path, profile = profiled
    plan = make_plan(profile, PlanRequest(keep=0.5, domain="code", scorer="router_mass"))
    exact = exact_bytes(path, plan, tmp_path)
    plan.request["budget_gb"] = (exact - 1) / 1e9  # what an old plan file holds: the budget, overshot by a byte
    with pytest.raises(PlanError, match="made for --budget-gb .* would write"):
        compile_checkpoint(path, plan, tmp_path / "over", dry_run=True)
    assert not (tmp_path / "over").exists()
    plan.request["budget_gb"] = exact / 1e9
    assert "budget" in compile_checkpoint(path, plan, tmp_path / "exact").plan.notes[-1]
    if profile.family == "DeepSeek-V3":  # the MTP layer the budget left out would overshoot it
        with pytest.raises(PlanError, match="pass --mtp drop"):
            compile_checkpoint(path, plan, tmp_path / "mtp", mtp="prune", dry_run=True)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("budget") / "qwen3"
    save_family("qwen3_moe", path)
    return path, profile_model(path, TEXT, ["router_mass"], PARAMS, progress=False)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0, 1.2), ranking=st.sampled_from(["local", "global"]))
def test_any_budget_is_met_or_refused(qwen3, tmp_path, fraction, ranking):
    path, profile = qwen3
    smallest, full = uniform(profile, profile.top_k), uniform(profile, profile.num_experts)
    budget = int(smallest * 0.9 + fraction * (full - smallest * 0.9))
    request = PlanRequest(budget_gb=budget / 1e9, scorer="router_mass", ranking=ranking)
    if budget < smallest:
        with pytest.raises(PlanError, match="below the smallest"):
            make_plan(profile, request)
        return
    plan = make_plan(profile, request)
    shutil.rmtree(tmp_path / "dry", ignore_errors=True)
    assert exact_bytes(path, plan, tmp_path) <= budget
    if ranking == "local" and plan.max_kept < profile.num_experts:
        assert uniform(profile, plan.max_kept + 1) > budget


def premoe(capsys, *args: str) -> tuple[int, str]:
    """Run the CLI in-process as a user would: (exit status, stdout + stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def test_the_readme_budget_on_the_shipped_testbed(tmp_path, capsys):
    """README: `premoe plan prof/ --budget-gb 0.02 --generalist --ranking global` once wrote 0.0215 GB."""
    profile = profile_model("testbed", TEXT, ["peu_norm"], ProfileParams(max_tokens=64, seq_len=32), progress=False)
    profile.save(tmp_path / "prof")
    code, planned = premoe(capsys, "plan", tmp_path / "prof", "--budget-gb", "0.02", "--generalist", "--ranking",
                           "global", "--out", tmp_path / "g.json")
    assert code == 0, planned
    held = re.search(r"pads every layer to M = (\d+)", planned)
    code, compiled = premoe(capsys, "compile", "testbed", tmp_path / "g.json", "--out", tmp_path / "g")
    assert code == 0, compiled
    assert safetensors_bytes(tmp_path / "g") <= 0.02e9
    counts = set(json.loads((tmp_path / "g" / "config.json").read_text())["premoe"]["experts_per_layer"].values())
    assert held is None or counts == {int(held.group(1))}, "the plan's note names a count the file does not hold"
    code, refused = premoe(capsys, "plan", tmp_path / "prof", "--budget-gb", "0.005", "--generalist", "--dry-run")
    assert code == 2
    assert re.fullmatch(r"premoe: error: --budget-gb 0\.005 is below the smallest checkpoint this model compiles "
                        r"to, \d+ bytes of \.safetensors \(M = 4 experts per layer\); pass --budget-gb 0\.\d+ "
                        r"or more\n", refused), refused
