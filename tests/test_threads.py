"""premoe.threads: the CLI's OpenMP settings respect the user's and count only free cores."""
from __future__ import annotations

import pytest

from premoe import threads


def test_configure_sets_passive_wait_and_free_cores(monkeypatch):
    monkeypatch.setattr(threads, "free_cpus", lambda: 3)
    env: dict[str, str] = {}
    assert threads.configure(env) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}


def test_configure_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setattr(threads, "free_cpus", lambda: 3)
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "7"}
    assert threads.configure(env) == {}
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "7"}
    env = {"OMP_NUM_THREADS": "5"}
    assert threads.configure(env) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert env["OMP_NUM_THREADS"] == "5"


@pytest.mark.parametrize(("usable", "others", "expected"), [(2, 0, 2), (2, 1, 1), (2, 5, 1), (8, 3, 5), (1, 0, 1)])
def test_free_cpus_subtracts_other_runnable_tasks(monkeypatch, usable, others, expected):
    monkeypatch.setattr(threads, "usable_cpus", lambda: usable)
    monkeypatch.setattr(threads, "other_runnable", lambda: others)
    assert threads.free_cpus() == expected


def test_other_runnable_is_the_median_minus_self(monkeypatch):
    readings = iter([3, 1, 2, 9, 2])
    monkeypatch.setattr(threads, "_procs_running", lambda: next(readings))
    assert threads.other_runnable(samples=5, interval_s=0) == 1  # median 2, minus this process
    monkeypatch.setattr(threads, "_procs_running", lambda: None)
    assert threads.other_runnable(samples=5, interval_s=0) == 0


@pytest.mark.parametrize(("text", "expected"), [("max 100000\n", None), ("200000 100000\n", 2),
                                                 ("150000 100000", 2), ("50000 100000", 1)])
def test_cgroup_v2_quota(monkeypatch, tmp_path, text, expected):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(text)
    real_path = threads.Path
    monkeypatch.setattr(threads, "Path", lambda p: cpu_max if p == "/sys/fs/cgroup/cpu.max" else real_path(p))
    assert threads._cgroup_quota() == expected


def test_usable_cpus_is_capped_by_the_quota(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 2)
    assert threads.usable_cpus() == 2
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert threads.usable_cpus() == 4


def test_the_cli_applies_it_before_torch(monkeypatch):
    """The entry point configures threads first; a verb that fails still ran after it."""
    from premoe import cli

    seen = []
    monkeypatch.setattr(threads, "configure", lambda: seen.append("configured") or {})
    with pytest.raises(SystemExit):
        cli.main(["--version-does-not-exist"])
    assert seen == ["configured"]
