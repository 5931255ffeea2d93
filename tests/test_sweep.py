import json
import random

import pytest
from click.testing import CliRunner

import tiny
from premoe.data import parse_sources
from premoe.errors import InputError
from premoe.evaluate import Evaluator
from premoe.profile import Profile, ProfileParams, profile_model
from premoe.report import build_report, render_html
from premoe.sweep import SweepConfig, calib_specs_of, row_specs, run_sweep

SCORERS = ["peu", "frequency", "random"]


@pytest.fixture(scope="module")
def setup(tiny_qwen3, tmp_path_factory):
    """A tiny checkpoint, two domains of text and a profile of them."""
    root = tmp_path_factory.mktemp("sweep")
    lines = tiny.TEXT.splitlines(keepends=True)
    random.Random(0).shuffle(lines)
    (root / "code.txt").write_text("".join(lines[:30]))
    (root / "prose.txt").write_text("".join(lines[30:]))
    data = [f"code={root / 'code.txt'}", f"prose={root / 'prose.txt'}"]
    profile = profile_model(tiny_qwen3, parse_sources(data), SCORERS, ProfileParams(max_tokens=128, seq_len=16),
                            progress=False)
    profile.save(root / "profile")
    return tiny_qwen3, root / "profile", data, root


def _config(**overrides) -> SweepConfig:
    # default_scorer peu: these tests are about the sweep's mechanics, and peu needs no expert outputs (fast)
    return SweepConfig(**{"keep": [0.5, 0.25, 0.125], "scorers": SCORERS, "seq_len": 16, "max_windows": 2,
                          "study_keep": [0.5], "default_scorer": "peu", **overrides})


@pytest.fixture
def counting(monkeypatch):
    """Counts Evaluator.evaluate and profile_model calls made by the sweep."""
    calls = {"evaluate": 0, "profile": 0}
    real_evaluate = Evaluator.evaluate

    def evaluate(self, *args, **kwargs):
        calls["evaluate"] += 1
        return real_evaluate(self, *args, **kwargs)

    import premoe.sweep

    real_profile = premoe.sweep.profile_model

    def profile(*args, **kwargs):
        calls["profile"] += 1
        return real_profile(*args, **kwargs)

    monkeypatch.setattr(Evaluator, "evaluate", evaluate)
    monkeypatch.setattr(premoe.sweep, "profile_model", profile)
    return calls


def test_row_specs_compute_shared_rows_once():
    config = SweepConfig(keep=[0.5, 0.25], scorers=["peu", "frequency"], cross_keep=0.25, default_scorer="peu")
    rows = row_specs(config, ["a", "b"], ["a", "b", "c"])
    params = [json.dumps(r.params, sort_keys=True) for r in rows]
    assert len(params) == len(set(params))
    by_study = {s: [r for r in rows if s in r.studies] for s in ("full", "specialist", "generalist", "cross", "ranking")}
    assert len(by_study["full"]) == 3
    assert len(by_study["specialist"]) == 2 * 2 * 2  # scorers × keeps × profiled domains with eval data
    assert len(by_study["generalist"]) == 2 * 2 * 3  # scorers × keeps × eval domains
    assert len(by_study["cross"]) == 2 * 3
    assert len(by_study["ranking"]) == 2 * 2 * 2  # domains × keeps × {local, global}
    diagonal = next(r for r in rows if r.params == {"profile": "main", "target": "specialist:a", "scorer": "peu",
                                                    "keep": 0.25, "ranking": "local", "eval": "a"})
    assert diagonal.studies == ["specialist", "cross", "ranking"]


def test_sweep_caches_every_row_and_resumes(setup, counting, tmp_path):
    model, profile, data, _ = setup
    out = tmp_path / "sweep"
    first = run_sweep(model, profile, out, _config(), eval_data=data, progress=False)
    computed = [r for r in first["rows"] if "result" in r]
    errors = [r for r in first["rows"] if "error" in r]
    assert counting["evaluate"] == len(computed) == first["computed"] - len(errors)
    assert errors and all("below top-k" in r["error"] for r in errors)  # keep 0.125 of 8 experts < top-2
    assert json.loads((out / "results.json").read_text())["rows"] == first["rows"]

    counting["evaluate"] = 0
    second = run_sweep(model, profile, out, _config(), eval_data=data, progress=False)
    assert counting["evaluate"] == 0 and second["computed"] == 0
    assert second["rows"] == first["rows"]

    lines = (out / "rows.jsonl").read_text().splitlines()
    (out / "rows.jsonl").write_text("\n".join(lines[1:]) + "\n" + lines[0][:25])  # lose a row, cut one short
    third = run_sweep(model, profile, out, _config(), eval_data=data, progress=False)
    assert third["computed"] == 1 and _numbers(third) == _numbers(first)
    assert run_sweep(model, profile, out, _config(), eval_data=data, progress=False)["computed"] == 0

    changed = run_sweep(model, profile, out, _config(max_windows=1), eval_data=data, progress=False)
    assert changed["computed"] == len(changed["rows"])  # other evaluation windows: other keys


def _numbers(results: dict) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in results["rows"]]


def test_sweep_row_numbers_match_a_direct_evaluation(setup, tmp_path):
    from premoe.modeling import load_model, load_tokenizer
    from premoe.plan import PlanRequest, make_plan

    model, profile, data, _ = setup
    results = run_sweep(model, profile, tmp_path / "s", _config(keep=[0.5], scorers=["frequency"],
                                                                 default_scorer="frequency"),
                        eval_data=data, progress=False)
    row = next(r for r in results["rows"] if r["params"]["target"] == "specialist:code" and r["params"]["eval"] == "code")
    plan = make_plan(Profile.load(profile), PlanRequest(keep=0.5, domain="code", scorer="frequency"))
    direct = Evaluator(load_model(model), load_tokenizer(model), parse_sources(data), seq_len=16, max_windows=2)
    assert row["result"]["window_nll"] == pytest.approx(direct.evaluate(plan.kept).domains["code"].window_nll, abs=1e-5)


def test_optional_studies_profile_once(setup, counting, tmp_path):
    model, profile, data, _ = setup
    config = _config(keep=[0.5], calib_tokens=[64], peu_grid=True, grid_candidates=[1, 2], grid_thresholds=[0.0],
                     grid_transforms=["logit"], generate=4)
    results = run_sweep(model, profile, tmp_path / "s", config, eval_data=data, progress=False)
    assert counting["profile"] == 4  # calib:64, grid, query:4, generate:4
    assert sorted(p.name for p in (tmp_path / "s" / "profiles").iterdir()) == ["calib-64", "generate-4", "grid", "query-4"]
    studies = {s for r in results["rows"] for s in r["studies"]}
    assert {"calibration", "peu_grid", "generate"} <= studies
    assert results["grid_scorers"] == ["peu(candidates=1,threshold=0.0,transform=logit)",
                                       "peu(candidates=2,threshold=0.0,transform=logit)"]
    assert Profile.load(tmp_path / "s" / "profiles" / "generate-4").params["generate"] == 4
    assert Profile.load(tmp_path / "s" / "profiles" / "query-4").params["seq_len"] == 12
    assert all("result" in r for r in results["rows"] if "peu_grid" in r["studies"])
    html = render_html(build_report(results))  # the report reads what the sweep wrote
    for title in ("Calibration size", "PEU parameters", "Query only vs query + the model"):
        assert title in html
    counting["profile"] = 0
    assert run_sweep(model, profile, tmp_path / "s", config, eval_data=data, progress=False)["computed"] == 0
    assert counting["profile"] == 0


def test_sweep_refuses_missing_scorer_and_other_model(setup, tmp_path):
    model, profile, data, _ = setup
    with pytest.raises(InputError, match="scorer 'reap' was not collected"):
        run_sweep(model, profile, tmp_path / "s", _config(scorers=["reap"]), eval_data=data, progress=False)
    other = tiny.save("qwen3_moe", tmp_path / "other", num_experts=4)
    with pytest.raises(InputError, match="was made for"):
        run_sweep(other, profile, tmp_path / "s", _config(), eval_data=data, progress=False)


def test_calib_specs_reproduce_the_profile_data(setup):
    _, profile, data, _ = setup
    assert calib_specs_of(Profile.load(profile)) == data


def test_cli_sweep_json(setup, tmp_path):
    from premoe.cli import cli

    model, profile, data, _ = setup
    args = ["sweep", str(model), "--profile", str(profile), "--out", str(tmp_path / "s"), "--keep", "0.5,0.25",
            "--scorers", "peu,frequency", "--default-scorer", "peu", "--seq-len", "16", "--max-windows", "2", "--json"]
    for spec in data:
        args += ["--data", spec]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["computed"] == summary["rows"] > 0 and summary["errors"] == 0
    again = json.loads(CliRunner().invoke(cli, args).stdout)
    assert again["cached"] == again["rows"] and again["computed"] == 0


def test_cli_scorer_lists_keep_parenthesised_specs_whole():
    from premoe.cli.options import split_names as _names

    assert _names("peu, peu(candidates=2,threshold=0.55,transform=logit),random") == [
        "peu", "peu(candidates=2,threshold=0.55,transform=logit)", "random"]


def test_dry_run_counts_rows_and_times_them_without_writing(setup, tmp_path):
    from premoe.sweep import estimate_sweep

    model, profile, data, _ = setup
    out = tmp_path / "sweep"
    fresh = estimate_sweep(model, profile, out, _config(), eval_data=data)
    assert not out.exists()
    rows = len(row_specs(_config(), ["code", "prose"], ["code", "prose"]))
    assert fresh["rows"] == fresh["todo"] == rows and fresh["cached"] == 0
    assert fresh["studies"]["specialist"] == 3 * 3 * 2 and fresh["eta_basis"].startswith("one timed batch")
    assert fresh["eta_seconds"] == pytest.approx(fresh["seconds_per_row"] * rows)
    run_sweep(model, profile, out, _config(keep=[0.5]), eval_data=data, progress=False)
    partly = estimate_sweep(model, profile, out, _config(), eval_data=data)
    assert partly["cached"] == len(row_specs(_config(keep=[0.5]), ["code", "prose"], ["code", "prose"]))
    assert partly["todo"] == rows - partly["cached"] and partly["eta_basis"].startswith("median of")


def test_cli_dry_run_prints_rows_and_eta(setup, tmp_path):
    from premoe.cli import cli

    model, profile, data, _ = setup
    args = ["sweep", str(model), "--profile", str(profile), "--out", str(tmp_path / "s"), "--seq-len", "16",
            "--max-windows", "2", "--scorers", "peu", "--default-scorer", "peu", "--keep", "0.5", "--dry-run", *sum((["--data", d] for d in data), [])]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "to compute" in result.stdout and "ETA about" in result.stdout and not (tmp_path / "s").exists()


def test_partial_sweep_is_saved_and_renders(setup, tmp_path, monkeypatch):
    """results.json is rewritten while rows run, so `premoe report` renders a sweep that was stopped."""
    import premoe.sweep

    model, profile, data, _ = setup
    out = tmp_path / "sweep"
    monkeypatch.setattr(premoe.sweep, "PARTIAL_EVERY_S", -1.0)  # save after every row
    real = premoe.sweep._compute
    calls = []

    def stop_after_five(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(premoe.sweep, "_compute", stop_after_five)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(model, profile, out, _config(), eval_data=data, progress=False)
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False and len(partial["rows"]) == 5 < partial["planned"]  # saved after each row
    html = render_html(build_report(partial))
    assert f"Partial sweep: 5 of {partial['planned']} rows" in html


def test_sweep_out_must_be_new_a_sweep_or_premoes(setup, tmp_path):
    from premoe.errors import OutputExistsError

    model, profile, data, _ = setup
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="not written by premoe"):
        run_sweep(model, profile, mine, _config(), eval_data=data, progress=False)
    with pytest.raises(InputError, match="contains the input"):
        run_sweep(model, profile, profile.parent, _config(), eval_data=data, progress=False)
    assert (mine / "notes.txt").read_text() == "keep" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


@pytest.mark.skipif(not (__import__("premoe.modeling").modeling.shipped_dir("testbed-dsv3") / "config.json").exists(),
                    reason="testbed-dsv3 is not shipped")
def test_dry_run_of_the_second_testbed_defaults_to_its_corpus(tmp_path):
    """`sweep testbed-dsv3 --dry-run` without --data (docs/make_results.sh) was refused while the run accepted it."""
    from premoe.sweep import estimate_sweep

    data = parse_sources(["python:calib"], split="calib", max_tokens=32)
    profile_model("testbed-dsv3", data, ["peu"], ProfileParams(max_tokens=32, seq_len=16), progress=False).save(
        tmp_path / "prof")
    config = _config(keep=[0.5], scorers=["peu"], study_keep=[], max_windows=1)
    estimate = estimate_sweep("testbed-dsv3", tmp_path / "prof", tmp_path / "sweep", config)
    corpus = ["python", "en_docs", "de", "fr", "bible", "math"]  # the testbed's six domains, its test split
    assert estimate["todo"] == estimate["rows"] == len(row_specs(config, ["python"], corpus))
    assert not (tmp_path / "sweep").exists()
