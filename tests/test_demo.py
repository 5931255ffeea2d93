"""`premoe demo` end to end at a reduced size (what a newcomer runs first)."""
import json
import subprocess
import sys


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-c", "from premoe.cli import main; main()", "demo", "--quick",
                             "--out", str(out), "--json", str(tmp_path / "demo.json")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads((tmp_path / "demo.json").read_text())
    assert all(diff < 1e-4 for diff in numbers["verify"].values()), numbers["verify"]
    assert (out / "report" / "report.html").stat().st_size > 10_000
    for name in ("python-50", "generalist-50"):
        config = json.loads((out / name / "config.json").read_text())
        assert config["num_local_experts"] == 16 and config["num_experts"] == 16
    assert "full ppl" in result.stdout and "demo finished" in result.stdout
