"""Per-domain perplexity and KL divergence of a model, a compiled checkpoint, or a plan applied by masking.

A plan is evaluated without writing anything: ``adapter.restrict_routing``
gives the dropped experts ``-inf`` router logits, which is exactly how the
compiled checkpoint routes (DESIGN.md §4). So a sweep loads the model once,
tokenizes each domain once, caches the reference log-probs, and evaluates
many plans with an :class:`Evaluator`.

Perplexity is ``exp(mean NLL)``; windows (not tokens) are the independent
samples, so the standard error is that of the per-window mean NLL, and the
perplexity interval is ``exp(mean ± SE)``. KL is ``KL(reference ‖ model)``
averaged over tokens; the reference defaults to the same model unmasked.

Example::

    result = evaluate("testbed", parse_sources(["testbed"], split="test"), plan=Plan.load("python-50.json"))
    print(result.table())

    ev = Evaluator(model, tokenizer, sources, max_windows=64)
    full = ev.evaluate()
    half = ev.evaluate({layer: experts[:16] for layer, experts in plan.order.items()})
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from premoe.data import Source, token_windows
from premoe.errors import InputError
from premoe.metrics import kl_divergence, mean_and_se, token_nll
from premoe.plan import Plan


@dataclass
class DomainEval:
    """One domain's numbers. ``window_nll`` allows paired comparisons between plans on the same windows."""

    domain: str
    windows: int
    tokens: int  # predicted tokens: windows × (seq_len - 1)
    nll: float  # mean over windows of the per-window mean NLL (nats)
    nll_se: float  # standard error of that mean
    ppl: float  # exp(nll)
    ppl_low: float  # exp(nll - nll_se)
    ppl_high: float  # exp(nll + nll_se)
    kl: float | None  # mean per-token KL(reference ‖ model), None when not measured
    kl_se: float | None  # standard error over windows of the per-window mean KL
    window_nll: list[float] = field(repr=False, default_factory=list)


@dataclass
class EvalResult:
    model: str
    label: str  # what was evaluated: "full", a plan's target, a checkpoint
    kept: dict[int, list[int]] | None  # the routing restriction applied (None: none)
    seq_len: int
    domains: dict[str, DomainEval]
    seconds: float

    def to_dict(self) -> dict:
        data = asdict(self)
        data["kept"] = None if self.kept is None else {str(k): v for k, v in self.kept.items()}
        return data

    def table(self) -> str:
        """A fixed-width table for the terminal."""
        lines = [f"{self.model} [{self.label}] seq_len {self.seq_len}",
                 f"{'domain':<12} {'windows':>7} {'ppl':>9} {'±SE interval':>19} {'NLL':>7} {'KL':>9}"]
        for d in self.domains.values():
            kl = "-" if d.kl is None else f"{d.kl:.4f}"
            lines.append(f"{d.domain:<12} {d.windows:>7} {d.ppl:>9.3f} {f'[{d.ppl_low:.3f}, {d.ppl_high:.3f}]':>19} "
                         f"{d.nll:>7.4f} {kl:>9}")
        return "\n".join(lines)


class Evaluator:
    """A model, each domain's token windows, and cached reference log-probs: evaluate many plans cheaply.

    ``reference`` is another loaded model to measure KL against (e.g. the
    original when ``model`` is a compiled checkpoint); by default it is
    ``model`` itself without any routing restriction. Reference log-probs
    are kept in memory up to ``cache_gb`` (fp32, ``windows × seq × vocab``)
    and recomputed beyond that.
    """

    def __init__(self, model, tokenizer, sources: Sequence[Source], *, reference=None, seq_len: int = 256,
                 max_windows: int | None = None, batch_size: int = 8, device: str = "cpu", cache_gb: float = 4.0,
                 name: str = "model", progress: bool = False):
        from premoe.adapters import get_adapter
        from premoe.modeling import check_context

        if seq_len < 2:
            raise InputError(f"seq_len must be at least 2 (one token predicts the next), got {seq_len}")
        check_context(model.config, seq_len)
        self.model, self.reference, self.name = model, reference, name
        self.adapter = get_adapter(model.config)
        self.seq_len, self.batch_size, self.device, self.progress = seq_len, batch_size, device, progress
        max_tokens = max_windows * seq_len if max_windows else None
        # domain -> (windows, seq) token ids
        self.windows = {s.name: token_windows(s.texts, tokenizer, seq_len, max_tokens) for s in sources}
        for domain, windows in self.windows.items():
            if windows.shape[1] < 2:
                raise InputError(f"data {domain!r} has fewer than 2 tokens; it cannot be evaluated")
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self._cache_left = int(cache_gb * 2**30)

    @torch.no_grad()
    def evaluate(self, kept: Mapping[int, Sequence[int]] | None = None, *, domains: Sequence[str] | None = None,
                 kl: bool = True, label: str | None = None) -> EvalResult:
        """Evaluate with routing restricted to ``kept`` ({decoder layer: experts}; None: the full model)."""
        from premoe.progress import domains_bar

        names = list(domains or self.windows)
        unknown = [d for d in names if d not in self.windows]
        if unknown:
            raise InputError(f"no evaluation data for {', '.join(unknown)}; "
                             f"this evaluator has {', '.join(self.windows)}")
        kept = None if kept is None else {int(l): sorted(int(e) for e in v) for l, v in kept.items()}
        trivial_kl = kept is None and self.reference is None  # the reference is this very model
        started = time.time()
        results = {}
        work = {d: self.windows[d].shape[0] for d in names}
        with domains_bar(work, "eval", "win", enabled=self.progress) as start:
            for domain in names:
                results[domain] = self._evaluate_domain(domain, kept, kl, trivial_kl, start(domain))
        return EvalResult(self.name, label or ("full" if kept is None else "restricted"), kept, self.seq_len, results,
                          round(time.time() - started, 3))

    def _evaluate_domain(self, domain: str, kept: dict[int, list[int]] | None, kl: bool, trivial_kl: bool,
                         advance: Callable[[int], object]) -> DomainEval:
        """One domain's windows, batch by batch; ``advance(windows)`` after each batch."""
        windows = self.windows[domain]
        nll, kls = [], []
        for start in range(0, windows.shape[0], self.batch_size):
            batch = windows[start : start + self.batch_size].to(self.device)  # (batch, seq)
            restriction = self.adapter.restrict_routing(self.model, kept) if kept else contextlib.nullcontext()
            with restriction:
                logits = self.model(input_ids=batch).logits[:, :-1]  # (batch, seq-1, vocab)
            log_probs = torch.log_softmax(logits.float(), dim=-1)  # (batch, seq-1, vocab)
            nll.append(token_nll(log_probs, batch[:, 1:], normalized=True).mean(1))  # (batch,)
            if trivial_kl:  # these are the reference log-probs: keep them for the plans evaluated next
                self._remember((domain, start), log_probs)
            elif kl:
                reference = self._reference(domain, start, batch)  # (batch, seq-1, vocab) log-probs
                kls.append(kl_divergence(reference, log_probs, normalized=True).mean(1))  # (batch,)
            advance(batch.shape[0])
        return _domain_eval(domain, torch.cat(nll), torch.cat(kls) if kls else None, windows.shape[1] - 1,
                            trivial_kl and kl)

    def _reference(self, domain: str, start: int, batch: torch.Tensor) -> torch.Tensor:
        """Reference log-probs (batch, seq-1, vocab), from the cache or computed (and cached while room is left)."""
        key = (domain, start)
        if key in self._cache:
            return self._cache[key]
        model = self.reference if self.reference is not None else self.model
        log_probs = torch.log_softmax(model(input_ids=batch).logits[:, :-1].float(), dim=-1)  # (batch, seq-1, vocab)
        self._remember(key, log_probs)
        return log_probs

    def _remember(self, key: tuple[str, int], log_probs: torch.Tensor) -> None:
        size = log_probs.numel() * log_probs.element_size()
        if key not in self._cache and size <= self._cache_left:
            self._cache[key] = log_probs
            self._cache_left -= size


def _domain_eval(domain: str, window_nll: torch.Tensor, window_kl: torch.Tensor | None, predicted: int,
                 zero_kl: bool) -> DomainEval:
    mean, se = mean_and_se(window_nll)
    kl, kl_se = mean_and_se(window_kl) if window_kl is not None else ((0.0, 0.0) if zero_kl else (None, None))
    return DomainEval(domain, len(window_nll), len(window_nll) * predicted, mean, se, math.exp(mean),
                      math.exp(mean - se), math.exp(mean + se), kl, kl_se, [round(float(x), 6) for x in window_nll])


def evaluate(model: str | Path, sources: Sequence[Source], *, plan: Plan | str | Path | None = None,
             reference: str | Path | None = None, seq_len: int = 256, max_windows: int | None = None,
             batch_size: int = 8, kl: bool = True, progress: bool = False, loaded=None) -> EvalResult:
    """Evaluate one checkpoint (optionally with a plan applied by masking) on each source.

    ``model`` is ``testbed`` or a checkpoint directory (original or
    compiled); ``reference`` another checkpoint to measure KL against
    (default: ``model`` without the plan); ``loaded`` an optional
    ``(model, tokenizer)`` pair already in memory.

    >>> evaluate("testbed", parse_sources(["python:test"]), plan="python-50.json").domains["python"].ppl
    """
    from premoe.adapters import get_adapter
    from premoe.modeling import load_model, load_tokenizer, model_identity

    net, tokenizer = loaded or (load_model(model), load_tokenizer(model))
    if plan is not None and not isinstance(plan, Plan):
        plan = Plan.load(plan)
    if plan is not None:  # validate_plan: the model's layers, indices in range, ≥ top-k, groups
        plan.check_model(model_identity(model), [l.index for l in get_adapter(net.config).moe_layers(net)])
    ref = load_model(reference) if reference is not None else None
    evaluator = Evaluator(net, tokenizer, sources, reference=ref, seq_len=seq_len, max_windows=max_windows,
                          batch_size=batch_size, name=str(model), progress=progress)
    return evaluator.evaluate(plan.kept if plan else None, kl=kl, label=plan.target if plan else "full")


def run_lm_eval(model: str | Path, tasks: Sequence[str], *, plan: Plan | None = None, limit: int | None = None,
                batch_size: int = 8, include_path: str | Path | None = None, loaded=None) -> dict:
    """Run lm-evaluation-harness tasks on the model, with ``plan`` applied by masking if given.

    Needs the optional ``lm_eval`` package (``pip install 'premoe[eval]'``)
    and the tasks' datasets: downloaded by lm_eval, or task YAML files in
    ``include_path`` that read local data (``dataset_path: json``), which
    works offline.

    >>> run_lm_eval("testbed", ["hellaswag"], plan=Plan.load("python-50.json"), limit=100)["hellaswag"]
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise InputError("--lm-eval needs lm-evaluation-harness, which is not installed; "
                         "install it with: pip install 'premoe[eval]'") from e
    from premoe.modeling import load_model, load_tokenizer, model_identity

    from premoe.adapters import get_adapter

    tasks_found = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in tasks_found.all_tasks and not os.path.isfile(t)]
    if unknown:  # before loading the model; lm_eval raises a bare KeyError deep inside otherwise
        raise InputError(f"--lm-eval: unknown task {', '.join(unknown)}; list the tasks with `lm-eval ls tasks`, "
                         "or give --lm-eval-include DIR with the task's YAML")
    net, tokenizer = loaded or (load_model(model), load_tokenizer(model))
    if plan is not None:
        plan.check_model(model_identity(model), [l.index for l in get_adapter(net.config).moe_layers(net)])

    wrapped = HFLM(pretrained=net, tokenizer=tokenizer, batch_size=batch_size, device=str(net.device))
    restriction = get_adapter(net.config).restrict_routing(net, plan.kept) if plan else contextlib.nullcontext()
    with restriction:
        out = lm_eval.simple_evaluate(model=wrapped, tasks=list(tasks), limit=limit, task_manager=tasks_found)
    return out["results"]
