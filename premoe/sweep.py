"""Evaluate scorers × keep ratios × domains with one model load: cached per row, resumable.

A sweep is a list of row specs, a loop, and a cache. Each row is one plan
(profile, target, scorer, keep ratio, ranking) evaluated on one domain's
held-out windows with the plan applied by masking (no checkpoint is written).
Every finished row is appended to ``DIR/rows.jsonl`` under a hash of
everything that determines its numbers, so a rerun skips finished rows and an
interrupted sweep resumes. ``DIR/results.json`` gathers all rows, the
parameters that made them and each domain's expert coverage; ``premoe report``
renders it.

Studies (a row may belong to several; rows are computed once):

* ``full``        the unpruned model on every domain (the baseline);
* ``specialist``  the plan for domain d, on d, for every scorer and keep ratio;
* ``generalist``  one plan over all profiled domains, on every domain;
* ``cross``       the specialist of d on every domain d′, default scorer, one keep ratio;
* ``ranking``     local vs global ranking of the specialists, default scorer;
* ``calibration`` (optional) specialists from profiles re-collected with fewer/more tokens;
* ``peu_grid``    (optional) PEU's candidates × threshold × transform;
* ``generate``    (optional) profiles of the text alone vs the text plus the model's own continuation.

Example::

    config = SweepConfig(keep=[0.5, 0.25], scorers=["peu", "frequency"])
    run_sweep("testbed", "profiles/testbed", "sweeps/testbed", config)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator, Sequence, TextIO

from premoe import __version__
from premoe.data import Source, data_paths, parse_sources
from premoe.errors import InputError, OutputExistsError, PlanError
from premoe.fileio import disk_errors, write_text_atomic
from premoe.plan import PlanRequest, make_plan
from premoe.profile import Profile, ProfileParams, profile_model
from premoe.scores import DEFAULT_SCORER

FORMAT = "premoe-sweep/1"
PARTIAL_EVERY_S = 30.0  # seconds between rewrites of results.json while rows are computed


@dataclass
class SweepConfig:
    """What to sweep. The optional studies are off unless their fields are set."""

    keep: list[float] = field(default_factory=lambda: [0.75, 0.5, 0.375, 0.25, 0.125])  # fraction of experts kept
    scorers: list[str] = field(default_factory=lambda: ["peu", "peu_norm", "tcess", "tcess_top1", "frequency",
                                                        "router_mass", "reap", "reap_softmax", "ean_sum", "ean_mean",
                                                        "random"])
    default_scorer: str = DEFAULT_SCORER  # the scorer of the cross-domain, ranking and optional studies
    cross_keep: float = 0.25  # keep ratio of the cross-domain matrix
    seq_len: int = 256  # tokens per evaluation window
    max_windows: int | None = 128  # evaluation windows per domain (None: all)
    batch_size: int = 8  # windows per forward pass
    kl: bool = True  # measure KL(full ‖ pruned) too
    cache_gb: float = 4.0  # memory for cached full-model log-probs (recomputed beyond it)
    study_keep: list[float] = field(default_factory=lambda: [0.5, 0.25])  # keep ratios of the optional studies
    calib_tokens: list[int] = field(default_factory=list)  # calibration study: --max-tokens values to re-profile with
    peu_grid: bool = False  # PEU parameter grid study
    grid_candidates: list[int] = field(default_factory=lambda: [1, 2, 4])
    grid_thresholds: list[float] = field(default_factory=lambda: [0.0, 0.55])
    grid_transforms: list[str] = field(default_factory=lambda: ["logit", "prob", "gate"])
    generate: int = 0  # query+output study: tokens the model continues each calibration window by (0: off)

    def grid_scorers(self) -> list[str]:
        """Canonical names of the PEU grid, as a profile collected with them records them."""
        from premoe.scores import parse_scorer

        return [parse_scorer(f"peu(candidates={c},threshold={t},transform={x})").name
                for c in self.grid_candidates for t in self.grid_thresholds for x in self.grid_transforms]


@dataclass
class Row:
    params: dict  # profile, target, scorer, keep, ranking, eval: what the row computes
    studies: list[str]  # which tables/plots it belongs to
    key: str = ""  # hash of params + everything else that fixes its numbers


def row_specs(config: SweepConfig, plan_domains: Sequence[str], eval_domains: Sequence[str]) -> list[Row]:
    """Every row of the sweep, each computed once even when several studies use it."""
    rows: dict[str, Row] = {}

    def add(study: str, **params) -> None:
        params = {"profile": "main", "target": "full", "scorer": None, "keep": None, "ranking": "local", **params}
        ident = json.dumps(params, sort_keys=True)
        rows.setdefault(ident, Row(params, []))
        if study not in rows[ident].studies:
            rows[ident].studies.append(study)

    both = [d for d in plan_domains if d in eval_domains]
    for d in eval_domains:
        add("full", eval=d)
    for scorer in config.scorers:
        for keep in config.keep:
            for d in both:
                add("specialist", target=f"specialist:{d}", scorer=scorer, keep=keep, eval=d)
            for d in eval_domains:
                add("generalist", target="generalist", scorer=scorer, keep=keep, eval=d)
    for d in both:
        for other in eval_domains:
            add("cross", target=f"specialist:{d}", scorer=config.default_scorer, keep=config.cross_keep, eval=other)
        for keep in config.keep:
            for ranking in ("local", "global"):
                add("ranking", target=f"specialist:{d}", scorer=config.default_scorer, keep=keep, ranking=ranking,
                    eval=d)
    studies = [(f"calib:{n}", "calibration", [config.default_scorer]) for n in config.calib_tokens]
    studies += [("grid", "peu_grid", config.grid_scorers())] if config.peu_grid else []
    if config.generate:
        studies += [(f"{p}:{config.generate}", "generate", [config.default_scorer]) for p in ("query", "generate")]
    for profile, study, scorers in studies:
        for scorer in scorers:
            for keep in config.study_keep:
                for d in both:
                    add(study, profile=profile, target=f"specialist:{d}", scorer=scorer, keep=keep, eval=d)
    for keep in config.study_keep if config.calib_tokens else []:  # the main profile's size, for comparison
        for d in both:
            add("calibration", target=f"specialist:{d}", scorer=config.default_scorer, keep=keep, eval=d)
    return list(rows.values())


def run_sweep(model: str | Path, profile: str | Path, out: str | Path, config: SweepConfig | None = None, *,
              eval_data: Sequence[str] | None = None, calib_data: Sequence[str] | None = None,
              progress: bool = True, loaded=None) -> dict:
    """Run every row not already in ``out/rows.jsonl``; write and return ``out/results.json``'s content.

    ``eval_data`` are ``--data`` specs of held-out text (default for the
    testbed: each domain's ``test`` split); ``calib_data`` the calibration
    text for the studies that re-profile (default: what the profile used).
    """
    from premoe.evaluate import Evaluator
    from premoe.modeling import check_context, load_model, load_tokenizer, model_identity, read_config
    from premoe.progress import bar

    config = config or SweepConfig()
    out = Path(out)
    check_context(read_config(model), config.seq_len)
    _check_out(out, model, profile, eval_data, calib_data)
    with _claim_rows(out) as sink:  # before any compute: a second sweep of the same OUT stops here
        main = Profile.load(profile)
        identity = model_identity(model)
        if main.model["config_hash"] != identity["config_hash"]:
            raise InputError(f"profile {profile} was made for {main.model['name']}, not {identity['name']}; "
                             f"profile this model first")
        for scorer in {*config.scorers, config.default_scorer}:
            main.check_scorer(scorer)
        _check_generate(config, main)
        net, tokenizer = loaded or (load_model(model), load_tokenizer(model))
        eval_sources = _eval_sources(identity, eval_data, tokenizer, config)
        calib_specs = list(calib_data or calib_specs_of(main))
        evaluator = Evaluator(net, tokenizer, eval_sources, seq_len=config.seq_len, max_windows=config.max_windows,
                              batch_size=config.batch_size, cache_gb=config.cache_gb, name=str(model))
        origins = {s.name: s.origin for s in eval_sources}
        rows = keyed_rows(config, main, identity, origins, calib_specs)

        cache_path = out / "rows.jsonl"
        cache = read_cache(cache_path)
        profiles = _ProfileSource(model, main, out / "profiles", calib_specs, config, (net, tokenizer), progress)
        todo = [row for row in rows if row.key not in cache]

        def save(computed: int) -> dict:  # results.json of the rows done so far (`premoe report` renders those)
            results = _results(identity, profile, main, config, origins, calib_specs, rows, cache, computed=computed)
            write_text_atomic(out / "results.json", json.dumps(results) + "\n", force=True)
            return results

        saved_at = time.time()
        if cache_path.stat().st_size and not cache_path.read_bytes().endswith(b"\n"):
            sink.write("\n")  # end a line an interruption cut short, so the next record starts clean
        with bar(len(todo), "sweep", "row", enabled=progress) as shown:  # the rows' profiles and evals: no bars
            for done, row in enumerate(todo, 1):
                record = {"key": row.key, "params": row.params, **_compute(row.params, profiles, evaluator, config)}
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                cache[row.key] = record
                shown.update()
                if time.time() - saved_at > PARTIAL_EVERY_S and done < len(todo):
                    save(done)
                    saved_at = time.time()
        return save(len(todo))


@contextlib.contextmanager
def _claim_rows(out: Path) -> Iterator[TextIO]:
    """``out/rows.jsonl`` opened for appending, under an exclusive lock held for the whole sweep.

    Two sweeps of the same OUT computed every row twice and interleaved their records; the lock (``flock``, which
    the kernel drops when its process ends, SIGKILL included) makes the second one stop before any compute.
    """
    import fcntl

    with disk_errors(out / "rows.jsonl", "free some space and rerun this command: it resumes after the rows "
                     "already written"), open(out / "rows.jsonl", "a") as sink:
        try:
            fcntl.flock(sink.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputExistsError(f"another premoe sweep is writing {out} (its rows.jsonl is locked); wait for it to "
                                    "finish, or stop it and rerun this command to resume") from None
        yield sink


def keyed_rows(config: SweepConfig, main: Profile, identity: dict, origins: dict[str, str],
               calib_specs: list[str]) -> list[Row]:
    """The sweep's rows, each with the cache key that holds everything fixing its numbers (batch size does not)."""
    context = {"model": identity["config_hash"], "main_profile": fingerprint(main), "seq_len": config.seq_len,
               "max_windows": config.max_windows, "kl": config.kl}
    rows = row_specs(config, list(main.domains), list(origins))
    for row in rows:
        calib = calib_specs if row.params["profile"] != "main" else None  # study profiles re-read this text
        row.key = _hash({"row": row.params, "context": context, "eval_data": origins[row.params["eval"]],
                         "calib": calib})
    return rows


def estimate_sweep(model: str | Path, profile: str | Path, out: str | Path, config: SweepConfig | None = None, *,
                   eval_data: Sequence[str] | None = None, calib_data: Sequence[str] | None = None) -> dict:
    """What :func:`run_sweep` would do, without doing it: rows per study, rows cached, and an ETA.

    The time per row is the median of the rows already computed in ``out``, else one timed forward pass of a
    batch (so the estimate loads the model but reads no data).

    >>> estimate_sweep("testbed", "prof/", "sweep/")["todo"]
    486
    """
    from premoe.data import source_origins
    from premoe.modeling import check_context, is_testbed, model_identity, read_config

    config = config or SweepConfig()
    check_context(read_config(model), config.seq_len)
    _check_out(Path(out), model, profile, eval_data, calib_data, create=False)  # what the run would refuse
    main = Profile.load(profile)
    identity = model_identity(model)
    if main.model["config_hash"] != identity["config_hash"]:
        raise InputError(f"profile {profile} was made for {main.model['name']}, not {identity['name']}; "
                         f"profile this model first")
    for scorer in dict.fromkeys([*config.scorers, config.default_scorer]):  # as run_sweep: a dry run promises no rows
        main.check_scorer(scorer)
    _check_generate(config, main)
    if not eval_data and not is_testbed(identity["name"]):  # as _eval_sources: every shipped testbed has a corpus
        raise InputError("give held-out evaluation text with --data NAME=PATH (one per profiled domain)")
    origins = source_origins(list(eval_data or ["testbed"]), split="test")
    rows = keyed_rows(config, main, identity, origins, list(calib_data or calib_specs_of(main)))
    cache = read_cache(Path(out) / "rows.jsonl")
    todo = [row for row in rows if row.key not in cache]
    timed = sorted(r["seconds"] for r in cache.values() if isinstance(r.get("seconds"), (int, float)))
    if timed:
        per_row, basis = timed[len(timed) // 2], f"median of {len(timed)} computed rows"
    else:
        per_row, basis = _time_one_row(model, config)
    studies: dict[str, int] = {}
    for row in todo:
        for study in row.studies:
            studies[study] = studies.get(study, 0) + 1
    profiles = sorted({row.params["profile"] for row in todo} - {"main"}
                      - {p.name.replace("-", ":", 1) for p in (Path(out) / "profiles").glob("*")})
    return {"rows": len(rows), "cached": len(rows) - len(todo), "todo": len(todo), "studies": studies,
            "profiles_to_collect": profiles, "seconds_per_row": per_row, "eta_seconds": per_row * len(todo),
            "eta_basis": basis}


def _time_one_row(model, config: SweepConfig) -> tuple[float, str]:
    """Seconds one row should take: one timed forward pass of a batch, times the batches of a domain."""
    import math

    import torch

    from premoe.modeling import load_model

    net = load_model(model)
    batch = min(config.batch_size, config.max_windows or config.batch_size)
    ids = torch.randint(0, net.config.vocab_size, (batch, config.seq_len))  # (batch, seq)
    with torch.no_grad():
        net(input_ids=ids[:1, :8])  # warm-up
        started = time.time()
        net(input_ids=ids)
        seconds = time.time() - started
    windows = config.max_windows or 128
    note = "" if config.max_windows else " (assuming 128 windows per domain: --max-windows 0 reads all)"
    return seconds * math.ceil(windows / batch), f"one timed batch of {batch}x{config.seq_len} tokens{note}"


def _check_generate(config: SweepConfig, main: Profile) -> None:
    """The query+output study continues calibration windows: it needs room for text before the continuation."""
    seq_len = int(main.params.get("seq_len", 0) or 0)
    if config.generate and seq_len and config.generate >= seq_len:
        raise InputError(f"--generate {config.generate} must be below the profile's window of {seq_len} tokens "
                         "(the continuation shares the window with the text)")


def _inputs(model, profile, eval_data, calib_data) -> list[Path]:
    from premoe.modeling import is_testbed, resolve_model_path

    profile_file = Path(profile) / "profile.json"  # OUT may hold the profile (the demo does), not be it
    eval_specs = eval_data or (["testbed"] if is_testbed(model) else [])  # a testbed's default: its corpus
    return [resolve_model_path(model), profile_file, *data_paths(eval_specs), *data_paths(calib_data)]


def _check_out(out: Path, model, profile, eval_data, calib_data, create: bool = True) -> None:
    """Before any compute: OUT is no input, and is new, empty or a sweep (resumed); then (``create``) mark it."""
    from premoe.fileio import MARKER, check_inputs, check_replaceable, check_space, read_marker, write_marker

    check_inputs(out, _inputs(model, profile, eval_data, calib_data))
    if out.exists() and not (out / "rows.jsonl").is_file():
        check_replaceable(out, force=True)  # resume a sweep; never fill a directory premoe did not write
        kind = read_marker(out).get("kind")
        if kind != "sweep" and any(out.iterdir()):  # a compiled checkpoint, a profile: not a place for sweep rows
            raise OutputExistsError(f"{out} is another premoe output ({kind or 'no sweep marker'}), not a sweep: its "
                                    "files and the sweep's would mix; choose a new or empty --out, or a sweep to resume")
    if not create:
        return
    check_space(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).exists():
        write_marker(out, {"kind": "sweep"})


def _results(identity: dict, profile_path, main: Profile, config: SweepConfig, origins: dict, calib_specs: list[str],
             rows: list[Row], cache: dict, computed: int) -> dict:
    """Everything the report needs, with the parameters that made it: the content of results.json."""
    return {
        "format": FORMAT, "premoe_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": identity, "profile": str(profile_path), "config": asdict(config), "eval_data": origins,
        "calib_data": calib_specs, "scorer_kinds": {n: i["kind"] for n, i in main.scorers.items()},
        "profile_info": {"domains": {d: s.tokens for d, s in main.domains.items()}, "num_experts": main.num_experts,
                         "top_k": main.top_k, "moe_layers": main.moe_layers, "params": main.params},
        "grid_scorers": config.grid_scorers() if config.peu_grid else [],
        "coverage": {s: {d: main.coverage(d, s) for d in main.domains}  # experts holding 90% of utility per layer
                     for s in dict.fromkeys([config.default_scorer, "router_mass"]) if s in main.scorers},
        "computed": computed,
        "planned": len(rows),  # rows the sweep has; "rows" holds those finished (all, once complete)
        "complete": all(row.key in cache for row in rows),
        "rows": [{**cache[row.key], "studies": row.studies} for row in rows if row.key in cache],
    }


def _compute(params: dict, profiles: "_ProfileSource", evaluator, config: SweepConfig) -> dict:
    """One row: make the plan (if any), evaluate it on one domain. A plan the architecture forbids is recorded."""
    started = time.time()
    kept, experts = None, None
    if params["target"] != "full":
        domain = params["target"].partition(":")[2] or None
        request = PlanRequest(keep=params["keep"], domain=domain, scorer=params["scorer"], ranking=params["ranking"])
        try:
            plan = make_plan(profiles.get(params["profile"]), request)
        except PlanError as e:
            return {"error": str(e)}
        kept, experts = plan.kept, {str(l): len(v) for l, v in plan.kept.items()}
    result = evaluator.evaluate(kept, domains=[params["eval"]], kl=config.kl).domains[params["eval"]]
    return {"result": asdict(result), "experts": experts, "seconds": round(time.time() - started, 3)}


class _ProfileSource:
    """The main profile, and the optional studies' profiles: collected on first use, saved under ``dir``."""

    def __init__(self, model, main: Profile, dir: Path, calib_specs: list[str], config: SweepConfig, loaded,
                 progress: bool):
        self.model, self.main, self.dir, self.calib_specs = model, main, dir, calib_specs
        self.config, self.loaded, self.progress = config, loaded, progress
        self.cache: dict[str, Profile] = {"main": main}

    def get(self, label: str) -> Profile:
        if label not in self.cache:
            path = self.dir / label.replace(":", "-")
            if (path / "profile.json").exists():
                self.cache[label] = Profile.load(path)
            else:
                scorers, params = self._recipe(label)
                sources = parse_sources(self.calib_specs, tokenizer=self.loaded[1], max_tokens=params.max_tokens)
                collected = profile_model(self.model, sources, scorers, params, progress=self.progress,
                                          loaded=self.loaded)
                collected.save(path, force=True)
                self.cache[label] = collected
        return self.cache[label]

    def _recipe(self, label: str) -> tuple[list[str], ProfileParams]:
        """Scorers and parameters of a study profile: the main profile's, with one thing changed."""
        known = {f.name for f in fields(ProfileParams)}
        base = ProfileParams(**{k: v for k, v in self.main.params.items() if k in known})
        kind, _, value = label.partition(":")
        if kind == "calib":
            return [self.config.default_scorer], ProfileParams(**{**vars(base), "max_tokens": int(value)})
        if kind == "grid":
            return self.config.grid_scorers(), base
        if kind == "query":  # the same text windows as "generate", without the continuation
            return [self.config.default_scorer], ProfileParams(**{**vars(base), "seq_len": base.seq_len - int(value),
                                                                   "generate": 0})
        if kind == "generate":
            return [self.config.default_scorer], ProfileParams(**{**vars(base), "generate": int(value)})
        raise InputError(f"unknown profile label {label!r} in a sweep row")


def _eval_sources(identity: dict, eval_data: Sequence[str] | None, tokenizer, config: SweepConfig) -> list[Source]:
    from premoe.modeling import is_testbed

    if not eval_data:
        if not is_testbed(identity["name"]):
            raise InputError("give held-out evaluation text with --data NAME=PATH (one per profiled domain)")
        eval_data = ["testbed"]
    max_tokens = config.max_windows * config.seq_len if config.max_windows else None
    return parse_sources(list(eval_data), tokenizer=tokenizer, split="test", max_tokens=max_tokens)


def calib_specs_of(profile: Profile) -> list[str]:
    """``--data`` specs that reproduce a profile's calibration text, from the origins it recorded.

    >>> calib_specs_of(Profile.load("prof"))   # origins testbed:python:calib, /data/c.jsonl
    ['python:calib', 'code=/data/c.jsonl']
    """
    specs = []
    for domain, origin in profile.data.items():
        if origin.startswith("testbed:"):
            _, name, split = origin.split(":")
            specs.append(f"{name}:{split}")
        else:
            specs.append(f"{domain}={origin}")
    return specs


def fingerprint(profile: Profile) -> str:
    """A hash of what a profile measured (not when): rows of another profile never share a cache key."""
    return _hash({"model": profile.model["config_hash"], "scorers": profile.scorers, "params": profile.params,
                  "data": profile.data, "tokens": {d: s.tokens for d, s in profile.domains.items()},
                  "sums": {d: float(sum(t.sum() for t in s.sums.values())) for d, s in profile.domains.items()}})


def _hash(value: dict) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


def read_cache(path: Path) -> dict[str, dict]:
    """Finished rows by key; a line cut short by an interruption is ignored (that row runs again)."""
    cache = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue
            if isinstance(record, dict) and isinstance(record.get("key"), str) and isinstance(record.get("params"), dict):
                cache[record["key"]] = record  # anything else is not a row premoe wrote: that row runs again
    return cache
