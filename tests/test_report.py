import base64
import io
import math
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from premoe.errors import OutputExistsError
from premoe.report import Figure, Table, build_report, paired_delta, render_html, render_markdown, write_report

FULL = [2.0, 2.2, 1.8, 2.1]  # per-window NLL of the full model
NOISE = [0.001, -0.001, 0.002, -0.002]


def _row(params: dict, shift: float) -> dict:
    nll = [f + shift + (n if shift else 0) for f, n in zip(FULL, NOISE)]
    mean = sum(nll) / len(nll)
    return {"key": str(params), "params": params, "studies": [],
            "result": {"domain": params["eval"], "windows": 4, "tokens": 60, "nll": mean, "nll_se": 0.05,
                       "ppl": math.exp(mean), "ppl_low": math.exp(mean - 0.05), "ppl_high": math.exp(mean + 0.05),
                       "kl": shift / 2, "kl_se": 0.0, "window_nll": nll}}


def synthetic(shifts: dict) -> dict:
    """A results.json whose specialists are the full model shifted by shifts[(domain, scorer, keep)] nats."""
    domains = ["python", "bible"]
    scorers = ["peu", "frequency", "random"]
    keeps = [0.5, 0.25]
    rows = [_row({"profile": "main", "target": "full", "scorer": None, "keep": None, "ranking": "local", "eval": d}, 0)
            for d in domains]
    for d in domains:
        for s in scorers:
            for k in keeps:
                params = {"profile": "main", "target": f"specialist:{d}", "scorer": s, "keep": k, "ranking": "local",
                          "eval": d}
                rows.append(_row(params, shifts[(d, s, k)]))
    rows.append({"key": "x", "params": {"profile": "main", "target": "generalist", "scorer": "peu", "keep": 0.25,
                                        "ranking": "local", "eval": "python"}, "studies": [],
                 "error": "M = 1 is below top-k = 2"})
    return {
        "format": "premoe-sweep/1", "model": {"name": "testbed", "model_type": "qwen3_moe"}, "profile": "prof",
        "config": {"keep": keeps, "scorers": scorers, "default_scorer": "peu", "cross_keep": 0.25, "seq_len": 16,
                   "max_windows": 4, "study_keep": [0.5], "calib_tokens": [], "peu_grid": False, "generate": 0},
        "eval_data": {d: f"testbed:{d}:test" for d in domains}, "calib_data": [],
        "scorer_kinds": {"peu": "peu", "frequency": "frequency", "random": "random"},
        "profile_info": {"domains": {d: 1000 for d in domains}, "num_experts": 32, "top_k": 4, "moe_layers": [0, 1],
                         "params": {"max_tokens": 1000}},
        "coverage": {"peu": {"python": [20, 18], "bible": [22, 16]}}, "grid_scorers": [], "rows": rows,
    }


def _shifts(peu_half: float = math.log(1.01), peu_quarter: float = 0.10) -> dict:
    shifts = {}
    for d in ("python", "bible"):
        shifts.update({(d, "peu", 0.5): peu_half, (d, "frequency", 0.5): 0.05, (d, "random", 0.5): 0.3,
                       (d, "peu", 0.25): peu_quarter, (d, "frequency", 0.25): 0.20, (d, "random", 0.25): 0.5})
    return shifts


def _table(report, header_part: str) -> Table:
    return next(b for b in report.blocks if isinstance(b, Table) and any(header_part in h for h in b.header))


def test_paired_delta_by_hand():
    delta = paired_delta({"window_nll": [1.0, 2.0]}, {"window_nll": [0.5, 1.0]})
    assert delta.nll == pytest.approx(0.75)
    assert delta.se == pytest.approx(0.25)  # stdev of [0.5, 1.0] / sqrt(2)
    assert delta.pct == pytest.approx((math.exp(0.75) - 1) * 100)
    assert delta.pct_se == pytest.approx(math.exp(0.75) * 25)


def test_goal_checks_pass():
    report = build_report(synthetic(_shifts()))
    goal = _table(report, "within 1.5%")
    assert [row[2] for row in goal.rows] == ["pass", "pass"]
    assert goal.rows[0][1].startswith("+1.00%")
    assert goal.caption.endswith("every domain: pass.")
    baseline = _table(report, "peu − baseline (nats")
    assert [row[0] for row in baseline.rows] == ["frequency", "random"]
    assert "best baseline (frequency): pass: peu beats it by 0.1000 nats" in baseline.caption
    assert "better on 2 of 2 domains" in baseline.caption and baseline.rows[0][-1] == "2/2"


def _with_generalist(data: dict, shift: float) -> dict:
    for d in ("python", "bible"):
        data["rows"].append(_row({"profile": "main", "target": "generalist", "scorer": "peu", "keep": 0.5,
                                  "ranking": "local", "eval": d}, shift))
    return data


@pytest.mark.parametrize(("shift", "outcome"), [(math.log(1.025), "pass, +1.50 points"),
                                                (math.log(1.035), "fail, +2.50 points")])
def test_generalist_goal_is_two_points_over_the_specialists(shift, outcome):
    report = build_report(_with_generalist(synthetic(_shifts()), shift))  # specialists +1.00% on both domains
    text = next(b[1] for b in report.blocks if isinstance(b, tuple) and "generalist (" in b[1])
    assert text.endswith(f"geometric means over domains): {outcome}.")


def test_generalist_goal_without_rows_says_so():
    report = build_report(synthetic(_shifts()))
    assert any(isinstance(b, tuple) and "generalist goal is not checked: rows missing" in b[1] for b in report.blocks)


def test_baseline_goal_needs_most_domains():
    shifts = _shifts()
    shifts[("bible", "peu", 0.25)] = 0.21  # peu loses bible narrowly, wins python by a lot: the mean still favours it
    shifts[("python", "peu", 0.25)] = 0.0
    baseline = _table(build_report(synthetic(shifts)), "peu − baseline (nats")
    assert baseline.rows[0][-1] == "1/2"
    assert "fail: peu beats it by" in baseline.caption and "better on 1 of 2 domains (needed 2)" in baseline.caption


def test_goal_checks_fail():
    report = build_report(synthetic(_shifts(peu_half=math.log(1.05), peu_quarter=0.20)))
    goal = _table(report, "within 1.5%")
    assert [row[2] for row in goal.rows] == ["fail", "fail"] and goal.caption.endswith("fail.")
    assert "fail: within one SE" in _table(report, "peu − baseline (nats").caption


def test_tables_hold_ppl_delta_and_missing_rows():
    data = synthetic(_shifts())
    report = build_report(data)
    specialists = _table(report, "scorer")
    assert specialists.header == ["domain", "scorer", "0.5 (16/32)", "0.25 (8/32)"]
    python_peu = specialists.rows[0]
    assert python_peu[0].startswith("python (full ") and python_peu[1] == "peu"
    ppl = math.exp(sum(FULL) / 4 + math.log(1.01) + sum(NOISE) / 4)
    assert python_peu[2] == f"{ppl:.4g} (+1.00% ± 0.09)"  # SE: exp(Δ) · stdev(NOISE) / √4
    generalist = [b for b in report.blocks if isinstance(b, Table) and b.header[:2] == ["domain", "scorer"]][1]
    assert all(cell == "—" for row in generalist.rows for cell in row[2:])  # no generalist rows computed
    html = render_html(report)
    assert "M = 1 is below top-k = 2" in html


def test_report_files_render(tmp_path):
    import json

    from PIL import Image

    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "results.json").write_text(json.dumps(synthetic(_shifts())))
    out = write_report(tmp_path / "sweep", tmp_path / "report")
    html = (out / "report.html").read_text()
    for title in ("Goal checks", "Full model", "Specialists", "Cross-domain", "Experts covering 90%"):
        assert title in html
    assert html.count("<table>") >= 8
    images = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert len(images) >= 4
    for data in images:
        png = base64.b64decode(data)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert Image.open(io.BytesIO(png)).size[0] > 100
    markdown = (out / "report.md").read_text()
    for name in re.findall(r"\]\(([\w.]+\.png)\)", markdown):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert "| domain | specialist Δ (peu) | within 1.5% | generalist Δ |" in markdown
    with pytest.raises(OutputExistsError):
        write_report(tmp_path / "sweep", out)
    assert write_report(tmp_path / "sweep", out, force=True) == out


def test_renderers_escape_and_cover_every_block():
    from premoe.report import Report

    report = Report("a <b>", [("h2", "x & y"), ("p", "1 < 2"), Table(["a|b"], [["pass"]], "cap"),
                              Figure("f", b"\x89PNG", "fig")])
    html = render_html(report)
    assert "a &lt;b&gt;" in html and "x &amp; y" in html and "<td class='pass'>pass</td>" in html
    markdown = render_markdown(report)
    assert "| a\\|b |" in markdown and "![fig](f.png)" in markdown and "## x & y" in markdown


def test_report_module_does_not_import_torch():
    code = "import sys, premoe.report, premoe.cli.report; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_report(tmp_path):
    import json

    from premoe.cli import cli

    (tmp_path / "results.json").write_text(json.dumps(synthetic(_shifts())))
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "results.json"), "--out", str(tmp_path / "r"), "--json"])
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)["files"]
    assert any(f.endswith("report.html") for f in files) and any(f.endswith("coverage.png") for f in files)


def test_baseline_goal_needs_more_than_two_standard_errors():
    from premoe.report import Delta, _verdict

    assert _verdict("d", Delta(-0.03, 0.01), won=6, domains=6).startswith("pass: d beats it by 0.0300 nats, 3.0 SE")
    assert _verdict("d", Delta(-0.015, 0.01), won=6, domains=6).startswith("fail: d beats it by 0.0150 nats, 1.5 SE")
    assert _verdict("d", Delta(-0.03, 0.01), won=4, domains=6).startswith("fail:")  # 5 of 6 needed
    assert _verdict("d", Delta(-0.03, 0.01), won=5, domains=6).startswith("pass:")
    assert _verdict("d", Delta(0.005, 0.01), won=2, domains=6).startswith("fail: within one SE")


def test_official_reap_verdict_is_named_beside_a_stronger_baseline():
    """When another baseline beats REAP, the caption still says how the default fares against official REAP."""
    data = synthetic(_shifts())
    data["config"]["scorers"].append("reap")
    data["scorer_kinds"]["reap"] = "reap"
    for d in ("python", "bible"):
        for keep, shift in ((0.5, 0.1), (0.25, 0.4)):  # worse than frequency (0.20 at 25%): not the best baseline
            data["rows"].append(_row({"profile": "main", "target": f"specialist:{d}", "scorer": "reap", "keep": keep,
                                      "ranking": "local", "eval": d}, shift))
    caption = _table(build_report(data), "peu − baseline (nats").caption
    assert "best baseline (frequency): pass" in caption
    assert "Vs official REAP (reap): pass: peu beats it by 0.3000 nats" in caption
