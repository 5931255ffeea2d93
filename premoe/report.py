"""Render a sweep's results.json as a self-contained HTML page and a Markdown file with PNG plots.

No torch here (only json, statistics and matplotlib), so ``premoe report``
starts fast and runs anywhere the results file is copied to.

Every Δ is a *paired* comparison: the pruned model and the full model are
scored on the same windows, so the standard error is that of the per-window
NLL differences, much smaller than the spread of perplexity across windows.
Δ% = exp(mean ΔNLL) − 1, and its SE is exp(mean ΔNLL) · SE(ΔNLL). A mean over
domains averages ΔNLL (nats) across domains and then exponentiates: it is the
*geometric* mean of the perplexity ratios, and every table says so.

Example::

    write_report("sweeps/testbed", "sweeps/testbed/report")   # report.html, report.md, *.png
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from premoe.errors import InputError, MissingFileError

# Issue 13's goals.
GOAL_KEEP, GOAL_MAX_DELTA = 0.5, 1.5  # at 50% kept, the default scorer within 1.5% of full on every domain
GOAL_GENERALIST_GAP = 2.0  # ... and the 50% generalist within 2 points of the specialists (geometric means)
GOAL_BASELINE_KEEP = 0.25  # at 25% kept, the default scorer beats the best baseline
GOAL_BASELINE_SE = 2.0  # ... by more than 2 SE on the mean, and on all domains but one
OFFICIAL_BASELINE = "reap"  # official REAP's saliency, named in the verdict even when another baseline is stronger


# --------------------------------------------------------------------------- document


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    name: str  # file name stem of the PNG
    png: bytes
    caption: str


@dataclass
class Report:
    title: str
    blocks: list = field(default_factory=list)  # ("h2" | "p", text), Table or Figure

    def add(self, *blocks) -> None:
        self.blocks.extend(blocks)


# --------------------------------------------------------------------------- numbers


@dataclass
class Delta:
    """A pruned row vs a reference row on the same windows."""

    nll: float  # mean per-window NLL difference (nats)
    se: float  # its standard error

    @property
    def pct(self) -> float:
        return (math.exp(self.nll) - 1) * 100

    @property
    def pct_se(self) -> float:
        return math.exp(self.nll) * self.se * 100

    def __str__(self) -> str:
        return f"{self.pct:+.2f}% ± {self.pct_se:.2f}"


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return float(values[0]), 0.0
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def paired_delta(result: dict, reference: dict) -> Delta:
    """Δ NLL of ``result`` vs ``reference`` (both DomainEval dicts), paired over windows."""
    a, b = result["window_nll"], reference["window_nll"]
    if len(a) == len(b) and len(a) > 1:
        return Delta(*_mean_se([x - y for x, y in zip(a, b)]))
    return Delta(result["nll"] - reference["nll"], math.hypot(result["nll_se"], reference["nll_se"]))


def mean_delta(deltas: Sequence[Delta]) -> Delta:
    """Mean over domains; the domains are independent, so SEs add in quadrature."""
    return Delta(statistics.fmean(d.nll for d in deltas), math.sqrt(sum(d.se**2 for d in deltas)) / len(deltas))


class Results:
    """Look-ups into a results.json: rows by their parameters, the full model per domain."""

    def __init__(self, data: dict):
        if data.get("format") != "premoe-sweep/1":
            raise InputError(f"not a premoe sweep results file (format {data.get('format')!r})")
        self.data = data
        self.config = data["config"]
        self.rows = {self._key(r["params"]): r for r in data["rows"]}
        self.eval_domains = list(data["eval_data"])
        self.plan_domains = [d for d in data["profile_info"]["domains"] if d in self.eval_domains]
        self.scorers = self.config["scorers"]
        self.default = self.config["default_scorer"]
        self.full = {d: self.result(eval=d) for d in self.eval_domains}

    @staticmethod
    def _key(params: dict) -> tuple:
        return tuple(params.get(k) for k in ("profile", "target", "scorer", "keep", "ranking", "eval"))

    def row(self, *, eval: str, profile: str = "main", target: str = "full", scorer: str | None = None,
            keep: float | None = None, ranking: str = "local") -> dict | None:
        return self.rows.get((profile, target, scorer, keep, ranking, eval))

    def result(self, **params) -> dict | None:
        row = self.row(**params)
        return row.get("result") if row else None

    def delta(self, **params) -> Delta | None:
        result, full = self.result(**params), self.full.get(params["eval"])
        return paired_delta(result, full) if result and full else None

    def errors(self) -> list[str]:
        return sorted({r["error"] for r in self.data["rows"] if "error" in r})


def _cell(delta: Delta | None) -> str:
    return "—" if delta is None else str(delta)


def _ppl(value: float) -> str:
    """Four significant digits: 66.12, 3.142, 8.975e+05."""
    return f"{value:.4g}"


def _ppl_cell(result: dict | None, delta: Delta | None) -> str:
    return "—" if result is None else f"{_ppl(result['ppl'])} ({delta})"


def _keep_label(keep: float, experts: int) -> str:
    return f"{keep:g} ({round(keep * experts)}/{experts})"


# --------------------------------------------------------------------------- sections


def build_report(data: dict) -> Report:
    """All tables and plots of a sweep, in reading order."""
    res = Results(data)
    model = data["model"]["name"]
    report = Report(f"premoe sweep: {model}")
    info = data["profile_info"]
    report.add(("p", f"Model {model} ({data['model'].get('model_type')}), {len(info['moe_layers'])} MoE layers × "
                     f"{info['num_experts']} experts, top-{info['top_k']}. Profile {data['profile']} "
                     f"({', '.join(f'{d}: {t} tokens' for d, t in info['domains'].items())}). Evaluation: "
                     f"{res.config['max_windows'] or 'all'} windows × {res.config['seq_len']} tokens per domain "
                     f"({', '.join(f'{d}: {o}' for d, o in data['eval_data'].items())}). "
                     f"Default scorer: {res.default}."),
               ("p", "Δ is the change in perplexity vs the full model on the same windows, ± one standard error of "
                     "the paired per-window difference. Plans are applied by masking the router (dropped experts "
                     "get −inf logits), which is how the compiled checkpoint routes."))
    if data.get("complete") is False:
        report.add(("p", f"Partial sweep: {len(data['rows'])} of {data.get('planned', '?')} rows computed so far; "
                         "empty cells are rows still to come. Rerun the same `premoe sweep` command to finish it."))
    _goals(report, res)
    _baseline_table(report, res)
    for study, title in (("specialist", "Specialists (plan for domain d, evaluated on d)"),
                         ("generalist", "Generalist (one plan for all profiled domains, evaluated on each)")):
        _study_tables(report, res, study, title)
    _cross(report, res)
    _ranking(report, res)
    _coverage(report, res)
    _calibration(report, res)
    _peu_grid(report, res)
    _generate(report, res)
    errors = res.errors()
    if errors:
        report.add(("h2", "Rows not computed"), *(("p", f"— : {e}") for e in errors))
    params = {**data["config"], "calib_data": data.get("calib_data"), "premoe_version": data.get("premoe_version"),
              "created": data.get("created")}
    report.add(("h2", "Parameters"), Table(["parameter", "value"], [[k, json.dumps(v)] for k, v in params.items()]))
    return report


def _target(study: str, domain: str) -> str:
    return f"specialist:{domain}" if study == "specialist" else "generalist"


def _goals(report: Report, res: Results) -> None:
    report.add(("h2", "Goal checks"))
    keep_ok = GOAL_KEEP in res.config["keep"]
    rows = []
    for domain in res.plan_domains if keep_ok else []:
        delta = res.delta(target=f"specialist:{domain}", scorer=res.default, keep=GOAL_KEEP, eval=domain)
        generalist = res.delta(target="generalist", scorer=res.default, keep=GOAL_KEEP, eval=domain)
        verdict = "—" if delta is None else ("pass" if delta.pct <= GOAL_MAX_DELTA else "fail")
        rows.append([domain, _cell(delta), verdict, _cell(generalist)])
    if rows:
        verdicts = {r[2] for r in rows}
        outcome = "fail" if "fail" in verdicts else "incomplete (rows missing)" if "—" in verdicts else "pass"
        header = ["domain", f"specialist Δ ({res.default})", f"within {GOAL_MAX_DELTA:g}%", "generalist Δ"]
        report.add(Table(header, rows,
                         f"At {GOAL_KEEP:.0%} of experts kept, the default scorer's specialist stays within "
                         f"{GOAL_MAX_DELTA:g}% of the full model's perplexity on every domain: {outcome}."))
        report.add(("p", _generalist_goal(res)))
    else:
        report.add(("p", f"Keep ratio {GOAL_KEEP} was not swept: the {GOAL_MAX_DELTA:g}% goal is not checked."))
    verdict = _default_vs_baselines(res, GOAL_BASELINE_KEEP)
    if verdict is None:
        report.add(("p", f"Keep ratio {GOAL_BASELINE_KEEP} or the baselines were not swept: "
                         "the baseline goal is not checked."))
        return
    table, summary = verdict
    report.add(Table(["baseline", "specialist Δ vs full (geometric mean over domains)",
                      f"{res.default} − baseline (nats, mean over domains)", "in SEs",
                      f"domains {res.default} is better"], table, summary))


def _generalist_goal(res: Results) -> str:
    """The 50% generalist vs the 50% specialists, each as the geometric mean of its Δ over the domains."""
    special = [res.delta(target=f"specialist:{d}", scorer=res.default, keep=GOAL_KEEP, eval=d) for d in res.plan_domains]
    general = [res.delta(target="generalist", scorer=res.default, keep=GOAL_KEEP, eval=d) for d in res.plan_domains]
    if not all(special) or not all(general):
        return f"The {GOAL_KEEP:.0%} generalist goal is not checked: rows missing."
    s, g = mean_delta(special), mean_delta(general)
    gap = g.pct - s.pct
    outcome = "pass" if gap <= GOAL_GENERALIST_GAP else "fail"
    return (f"At {GOAL_KEEP:.0%} kept, the generalist ({g}) stays within {GOAL_GENERALIST_GAP:g} points of the "
            f"specialists ({s}; geometric means over domains): {outcome}, {gap:+.2f} points.")


def _default_vs_baselines(res: Results, keep: float) -> tuple[list[list[str]], str] | None:
    """Default scorer vs each baseline, paired per window and averaged over domains."""
    kinds = res.data.get("scorer_kinds", {})
    baselines = [s for s in res.scorers if s != res.default and kinds.get(s) != "peu"]
    if keep not in res.config["keep"] or not baselines or not res.plan_domains:
        return None
    own = {d: res.result(target=f"specialist:{d}", scorer=res.default, keep=keep, eval=d) for d in res.plan_domains}
    if not all(own.values()):
        return None
    table, scored = [], []
    for baseline in baselines:
        theirs = {d: res.result(target=f"specialist:{d}", scorer=baseline, keep=keep, eval=d) for d in res.plan_domains}
        if not all(theirs.values()):
            continue
        vs_full = mean_delta([paired_delta(theirs[d], res.full[d]) for d in res.plan_domains])
        per_domain = [paired_delta(own[d], theirs[d]) for d in res.plan_domains]
        diff = mean_delta(per_domain)
        won = sum(delta.nll < 0 for delta in per_domain)
        scored.append((vs_full.nll, baseline, diff, won))
        table.append([baseline, str(vs_full), f"{diff.nll:+.4f} ± {diff.se:.4f}",
                      f"{diff.nll / diff.se:+.1f}" if diff.se else "—", f"{won}/{len(per_domain)}"])
    if not scored:
        return None
    domains = len(res.plan_domains)
    _, best, diff, won = min(scored)
    summary = (f"At {keep:.0%} kept, averaged over domains, the default scorer {res.default} vs the best baseline "
               f"({best}): {_verdict(res.default, diff, won, domains)}.")
    official = next((entry for entry in scored if entry[1] == OFFICIAL_BASELINE), None)
    if official is not None and official[1] != best:
        summary += f" Vs official REAP ({OFFICIAL_BASELINE}): {_verdict(res.default, official[2], official[3], domains)}."
    return table, summary


def _verdict(default: str, diff: Delta, won: int, domains: int) -> str:
    """Issue 13's bar: better on the mean by more than GOAL_BASELINE_SE standard errors and on all domains but one."""
    needed = domains - 1 if domains > 2 else domains
    if diff.nll < -diff.se:
        ok = diff.nll < -GOAL_BASELINE_SE * diff.se and won >= needed
        return (f"{'pass' if ok else 'fail'}: {default} beats it by {-diff.nll:.4f} nats, "
                f"{-diff.nll / max(diff.se, 1e-12):.1f} SE (needed > {GOAL_BASELINE_SE:g}), and is better on {won} of "
                f"{domains} domains (needed {needed})")
    if diff.nll <= diff.se:
        return f"fail: within one SE of it ({diff.nll:+.4f} ± {diff.se:.4f} nats)"
    return f"fail: {default} is worse by {diff.nll:.4f} nats ({diff.nll / diff.se:.1f} SE)"


def _baseline_table(report: Report, res: Results) -> None:
    rows = [[d, _ppl(r["ppl"]), f"[{_ppl(r['ppl_low'])}, {_ppl(r['ppl_high'])}]", str(r["windows"])]
            for d, r in res.full.items() if r]
    report.add(("h2", "Full model"), Table(["domain", "perplexity", "± SE interval", "windows"], rows))


def _study_tables(report: Report, res: Results, study: str, title: str) -> None:
    keeps, experts = res.config["keep"], res.data["profile_info"]["num_experts"]
    domains = res.plan_domains if study == "specialist" else res.eval_domains
    report.add(("h2", title))
    header = ["domain", "scorer"] + [_keep_label(k, experts) for k in keeps]
    rows = []
    for d in domains:
        full = res.full[d]
        for i, scorer in enumerate(res.scorers):
            cells = []
            for keep in keeps:
                params = dict(target=_target(study, d), scorer=scorer, keep=keep, eval=d)
                cells.append(_ppl_cell(res.result(**params), res.delta(**params)))
            label = (f"{d} (full {_ppl(full['ppl'])})" if full else d) if i == 0 else ""
            rows.append([label, scorer, *cells])
    report.add(Table(header, rows, "Perplexity (Δ vs full ± SE) per domain, scorer and fraction of experts kept."))
    mean_rows, kl_rows = [], []
    for scorer in res.scorers:
        deltas, kls = [], []
        for keep in keeps:
            found = [res.delta(target=_target(study, d), scorer=scorer, keep=keep, eval=d) for d in domains]
            deltas.append(_cell(mean_delta(found)) if found and all(found) else "—")
            results = [res.result(target=_target(study, d), scorer=scorer, keep=keep, eval=d) for d in domains]
            ok = results and all(r and r["kl"] is not None for r in results)
            kls.append(f"{statistics.fmean(r['kl'] for r in results):.4f}" if ok else "—")
        mean_rows.append([scorer, *deltas])
        kl_rows.append([scorer, *kls])
    report.add(Table(["scorer"] + header[2:], mean_rows,
                     "Mean Δ perplexity over domains (± SE), geometric: exp(mean ΔNLL over domains) − 1."),
               Table(["scorer"] + header[2:], kl_rows, "Mean KL(full ‖ pruned) per token over domains (nats)."),
               _keep_plot(res, study, domains))


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _panels(count: int, width: float = 4.2, height: float = 3.2):
    plt = _pyplot()
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _keep_plot(res: Results, study: str, domains: list[str]) -> Figure:
    fig, axes = _panels(len(domains))
    keeps = sorted(res.config["keep"])
    for ax, d in zip(axes, domains):
        full = res.full[d]
        for scorer in res.scorers:
            points = [(k, res.result(target=_target(study, d), scorer=scorer, keep=k, eval=d)) for k in keeps]
            points = [(k, r) for k, r in points if r]
            if not points:
                continue
            below = [r["ppl"] - r["ppl_low"] for _, r in points]
            above = [r["ppl_high"] - r["ppl"] for _, r in points]
            ax.errorbar([k for k, _ in points], [r["ppl"] for _, r in points], yerr=[below, above],
                        marker="o", markersize=3, capsize=2, linewidth=1.2, label=scorer,
                        zorder=3 if scorer == res.default else 2)
        if full:
            ax.axhline(full["ppl"], color="black", linestyle="--", linewidth=1, label="full")
        ax.set_title(d)
        ax.set_xlabel("fraction of experts kept")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        _plain_numbers(ax.yaxis)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{study}: perplexity vs experts kept")
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=len(labels), fontsize=8)
    return Figure(f"{study}_ppl_vs_keep", _png(fig), f"{study.capitalize()} perplexity vs fraction of experts kept, "
                                                     "one line per scorer (bars: ± SE; dashed: full model).")


def _plain_numbers(axis) -> None:
    """Label a log axis 40, 50, 60 rather than 4 × 10^1: perplexities read as plain numbers."""
    from matplotlib.ticker import FuncFormatter

    def minor(value, _):  # label the 2..9 ticks only when the axis spans little more than a decade
        low, high = axis.get_view_interval()
        return f"{value:g}" if high < 20 * max(low, 1e-12) else ""

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def _cross(report: Report, res: Results) -> None:
    keep = res.config["cross_keep"]
    matrix = [[res.delta(target=f"specialist:{d}", scorer=res.default, keep=keep, eval=e) for e in res.eval_domains]
              for d in res.plan_domains]
    if not any(any(row) for row in matrix):
        return
    report.add(("h2", f"Cross-domain: specialist of d evaluated on d′ ({res.default}, keep {keep:g})"))
    report.add(Table(["plan \\ eval"] + res.eval_domains,
                     [[d] + [_cell(x) for x in row] for d, row in zip(res.plan_domains, matrix)],
                     "Δ perplexity vs the full model on the evaluated domain. The diagonal is the specialist at home."))
    plt = _pyplot()
    values = [[x.pct if x else float("nan") for x in row] for row in matrix]
    fig, ax = plt.subplots(figsize=(1.1 * len(res.eval_domains) + 2.5, 0.8 * len(res.plan_domains) + 1.8))
    image = ax.imshow(values, cmap="magma_r", aspect="auto")
    ax.set_xticks(range(len(res.eval_domains)), res.eval_domains, rotation=30, ha="right")
    ax.set_yticks(range(len(res.plan_domains)), res.plan_domains)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("specialist of")
    finite = [v for row in values for v in row if not math.isnan(v)]
    middle = (max(finite) + min(finite)) / 2 if finite else 0
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:+.1f}%", ha="center", va="center", fontsize=8,
                        color="white" if v > middle else "black")
    fig.colorbar(image, ax=ax, label="Δ perplexity vs full (%)")
    report.add(Figure("cross_domain", _png(fig), f"Cross-domain heat map at keep {keep:g}: Δ perplexity (%)."))


def _ranking(report: Report, res: Results) -> None:
    keeps = res.config["keep"]
    rows = []
    for d in res.plan_domains:
        for ranking in ("local", "global"):
            cells = [_cell(res.delta(target=f"specialist:{d}", scorer=res.default, keep=keep, ranking=ranking, eval=d))
                     for keep in keeps]
            rows.append([d if ranking == "local" else "", ranking, *cells])
    if not rows:
        return
    experts = res.data["profile_info"]["num_experts"]
    report.add(("h2", f"Local vs global ranking ({res.default} specialists)"),
               Table(["domain", "ranking"] + [_keep_label(k, experts) for k in keeps], rows,
                     "Δ perplexity; local: top M experts in every layer; global: top L·M (layer, expert) pairs by "
                     "each layer's utility share, at least top-k per layer."))


def _coverage(report: Report, res: Results) -> None:
    coverage = res.data.get("coverage") or {}
    scorer = res.default if res.default in coverage else next(iter(coverage), None)
    if scorer is None:
        return
    layers = res.data["profile_info"]["moe_layers"]
    experts = res.data["profile_info"]["num_experts"]
    by_domain = coverage[scorer]
    report.add(("h2", f"Experts covering 90% of {scorer} utility"),
               Table(["domain"] + [f"layer {l}" for l in layers], [[d, *map(str, c)] for d, c in by_domain.items()],
                     f"Per MoE layer, how many of the {experts} experts hold 90% of the domain's calibration utility."))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for d, counts in by_domain.items():
        ax.plot(layers, counts, marker="o", label=d)
    ax.axhline(experts, color="gray", linestyle=":", label="all experts")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("experts for 90% of utility")
    ax.set_ylim(0, experts * 1.05)
    ax.set_xticks(layers)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    report.add(Figure("coverage", _png(fig), f"Experts covering 90% of {scorer} utility per layer and domain."))


def _study_keeps(res: Results) -> list[float]:
    return res.config.get("study_keep") or []


def _calibration(report: Report, res: Results) -> None:
    sizes = res.config.get("calib_tokens") or []
    if not sizes:
        return
    main_tokens = res.data["profile_info"]["params"].get("max_tokens")
    columns = sorted({*sizes, main_tokens} if main_tokens else set(sizes))
    report.add(("h2", f"Calibration size ({res.default} specialists)"))
    for keep in _study_keeps(res):
        rows = []
        for d in res.plan_domains:
            cells = [_cell(res.delta(profile="main" if n == main_tokens else f"calib:{n}", target=f"specialist:{d}",
                                     scorer=res.default, keep=keep, eval=d)) for n in columns]
            rows.append([d, *cells])
        report.add(Table(["domain"] + [f"{n} tokens" for n in columns], rows,
                         f"Δ perplexity at keep {keep:g} for profiles collected on this many tokens per domain."))


def _peu_grid(report: Report, res: Results) -> None:
    grid = res.data.get("grid_scorers") or []
    if not grid:
        return
    report.add(("h2", "PEU parameters: candidates × threshold × transform (specialists)"))
    for keep in _study_keeps(res):
        rows = []
        for scorer in grid:
            found = [res.delta(profile="grid", target=f"specialist:{d}", scorer=scorer, keep=keep, eval=d)
                     for d in res.plan_domains]
            mean = _cell(mean_delta(found)) if found and all(found) else "—"
            rows.append([scorer, *map(_cell, found), mean])
        report.add(Table(["scorer"] + res.plan_domains + ["geometric mean"], rows, f"Δ perplexity at keep {keep:g}."))


def _generate(report: Report, res: Results) -> None:
    tokens = res.config.get("generate") or 0
    if not tokens:
        return
    seq = res.data["profile_info"]["params"].get("seq_len", res.config["seq_len"])
    report.add(("h2", f"Query only vs query + the model's own output ({res.default} specialists)"))
    for keep in _study_keeps(res):
        rows = [[d] + [_cell(res.delta(profile=f"{p}:{tokens}", target=f"specialist:{d}", scorer=res.default, keep=keep,
                                       eval=d)) for p in ("query", "generate")] for d in res.plan_domains]
        report.add(Table(["domain", f"text only ({seq - tokens} tokens/window)",
                          f"text + {tokens} generated tokens"], rows,
                         f"Δ perplexity at keep {keep:g}: profiles of the same text windows, alone or continued by "
                         "the model (the paper: query-only profiles make pruned models loop)."))


# --------------------------------------------------------------------------- rendering

def _css() -> str:
    """The report's styles, from the package data file ``premoe/report.css``."""
    from importlib.resources import files

    return files("premoe").joinpath("report.css").read_text(encoding="utf-8")


def _cell_class(text: str) -> str:
    return "pass" if text.startswith("pass") else "fail" if text.startswith("fail") else ""


def render_html(report: Report) -> str:
    """One self-contained page: styles inline, plots as base64 PNG data URIs."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(report.title)}</title>"
             f"<style>{_css()}</style></head><body><h1>{esc(report.title)}</h1>"]
    for block in report.blocks:
        if isinstance(block, Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in block.header)
            body = "".join("<tr>" + "".join(f"<td class='{_cell_class(c)}'>{esc(c)}</td>" for c in row) + "</tr>"
                           for row in block.rows)
            parts.append(f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
                         f"<p class='caption'>{esc(block.caption)}</p>")
        elif isinstance(block, Figure):
            data = base64.b64encode(block.png).decode()
            parts.append(f"<figure><img alt='{esc(block.caption)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{esc(block.caption)}</figcaption></figure>")
        else:
            tag, text = block
            parts.append(f"<{tag}>{esc(text)}</{tag}>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(report: Report) -> str:
    """Markdown with the plots referenced as ``<name>.png`` beside it."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"# {report.title}", ""]
    for block in report.blocks:
        if isinstance(block, Table):
            lines += ["| " + " | ".join(map(cell, block.header)) + " |",
                      "|" + "|".join("---" for _ in block.header) + "|"]
            lines += ["| " + " | ".join(map(cell, row)) + " |" for row in block.rows]
            lines += (["", f"*{block.caption}*"] if block.caption else []) + [""]
        elif isinstance(block, Figure):
            lines += [f"![{block.caption}]({block.name}.png)", "", f"*{block.caption}*", ""]
        else:
            tag, text = block
            lines += [("## " if tag == "h2" else "") + text, ""]
    return "\n".join(lines)


def load_results(path: str | Path) -> dict:
    """results.json from a sweep directory (or the file itself)."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.exists():
        raise MissingFileError(f"{file} not found; run `premoe sweep MODEL --profile P --out {path}` first")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{file} is not valid JSON ({getattr(e, 'msg', e)}); rerun the sweep to rewrite it") from e
    if not isinstance(data, dict) or data.get("format") != "premoe-sweep/1":
        raise InputError(f"{file} is not a premoe sweep's results.json; give the directory `premoe sweep --out` wrote")
    return data


def build_checked(data: dict, file: str | Path) -> Report:
    """:func:`build_report`, with a damaged results file (a key missing, a wrong type) as one clear error."""
    try:
        return build_report(data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{file} is damaged ({type(e).__name__}: {e}); rerun the sweep to rewrite it") from e


def write_report(results: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write ``out/report.html`` (self-contained), ``out/report.md`` and its PNG plots, atomically."""
    from premoe.fileio import check_output, write_dir

    out = Path(out)
    file = Path(results) / "results.json" if Path(results).is_dir() else Path(results)
    check_output(out, inputs=[file], force=force)  # OUT may sit in the sweep directory, never hold results.json
    report = build_checked(load_results(results), file)

    def write(tmp: Path) -> None:
        (tmp / "report.html").write_text(render_html(report), encoding="utf-8")
        (tmp / "report.md").write_text(render_markdown(report), encoding="utf-8")
        for block in report.blocks:
            if isinstance(block, Figure):
                (tmp / f"{block.name}.png").write_bytes(block.png)

    return write_dir(out, write, force=force)
