"""Prove a compiled checkpoint is the original model with its routing restricted, and measure what pruning cost.

The compiled tensors are byte copies of the original's, so the compiled model
loaded with a plain ``from_pretrained`` must reproduce the original run under
:meth:`~premoe.adapters.MoEAdapter.restrict_routing` (dropped experts get
``-inf`` router logits) up to float rounding: that is the correctness check,
``max |Δlogit| ≤ tolerance``, both in fp32. Before any model loads, the
compiled shards are checked against their own config.json on every MoE layer,
multi-token-prediction layers included (:func:`premoe.compile.check_compiled`):
loaders other than transformers read what transformers skips. Beside it, on real text, the
perplexity of the full original and of the compiled model and the token-level
KL(original ‖ compiled) say how much the pruning itself changes the model.

Rounding can flip a routing decision that is tied to within rounding (two
experts' choice scores ~1e-7 apart: common with hundreds of random-init
experts, as in bench/dsv3_layout.py). Such a token then differs by far more
than the tolerance although both models are right. So both runs' routing is
recorded: a token whose chosen experts differ, where the experts swapped had
choice scores within :data:`NEAR_TIE` of each other, is a *near-tie flip*; it
and the later positions of its window (which attend to it) are left out of the
comparison and reported. Any other routing difference stays in, and fails the
check; so does a run where near-tie flips hide more than
:data:`MAX_EXCLUDED` of the positions.

Example::

    report = verify("testbed", "python-50/")              # default data: testbed test windows
    print(report.summary())
    assert report.passed
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from premoe.data import Source
from premoe.errors import InputError

NEAR_TIE = 1e-5  # choice-score gap below which a routing flip is rounding, not a wrong model (scores are O(1))
MAX_EXCLUDED = 0.25  # at most this share of positions may be left out for near-tie flips (a guard: a wrong model
# routes differently by far more than NEAR_TIE, so its differences stay in the comparison whatever this share)


@dataclass
class DomainCheck:
    """Verification numbers on one data source."""

    name: str
    windows: int
    tokens: int  # predicted tokens (windows × (seq_len - 1))
    max_abs_diff: float  # compiled vs forced-routing original: the correctness number
    ppl_original: float  # full original model
    ppl_compiled: float
    kl: float  # mean token KL(full original ‖ compiled), nats
    max_abs_diff_full: float  # compiled vs full original: what pruning changes
    tie_flips: int = 0  # (token, layer) routing decisions flipped by rounding at a near tie
    excluded: int = 0  # positions left out of max_abs_diff for them (the flipped tokens and what follows)


@dataclass
class VerifyReport:
    original: str
    compiled: str
    family: str
    export: str
    experts_per_layer: dict[int, int]
    num_experts: int
    tolerance: float
    domains: list[DomainCheck]
    gate_changes: bool  # the family's gate weights change when experts are dropped (DESIGN.md §4)
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max(d.max_abs_diff for d in self.domains)

    @property
    def excluded_share(self) -> float:
        return sum(d.excluded for d in self.domains) / max(sum(d.tokens for d in self.domains), 1)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.excluded_share <= MAX_EXCLUDED

    def summary(self) -> str:
        counts = sorted(set(self.experts_per_layer.values()))
        lines = [f"verify {self.compiled} against {self.original} ({self.family}, export {self.export}, "
                 f"{'/'.join(map(str, counts))} of {self.num_experts} experts per MoE layer)",
                 f"  {'data':<12} {'tokens':>7} {'max|Δ| forced':>14} {'ppl orig':>9} {'ppl comp':>9} "
                 f"{'KL nats':>8} {'max|Δ| full':>12}"]
        for d in self.domains:
            lines.append(f"  {d.name:<12} {d.tokens:>7} {d.max_abs_diff:>14.2e} {d.ppl_original:>9.3f} "
                         f"{d.ppl_compiled:>9.3f} {d.kl:>8.4f} {d.max_abs_diff_full:>12.3f}")
        verdict = "PASS: compiled logits match" if self.passed else "FAIL: compiled logits differ from"
        lines.append(f"  {verdict} the forced-routing original, max |Δlogit| {self.max_abs_diff:.2e} "
                     f"(tolerance {self.tolerance:.0e})")
        flips = sum(d.tie_flips for d in self.domains)
        if flips:
            lines.append(f"  {flips} routing decision(s) tied to within {NEAR_TIE:.0e} flipped by rounding; their tokens "
                         f"and what follows them ({self.excluded_share:.2%} of positions, at most {MAX_EXCLUDED:.0%} "
                         "allowed) are left out of the comparison")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict:
        data = asdict(self)
        data["experts_per_layer"] = {str(k): v for k, v in self.experts_per_layer.items()}
        return {**data, "max_abs_diff": self.max_abs_diff, "excluded_share": self.excluded_share,
                "passed": self.passed}


def verify(original: str | Path, compiled: str | Path, data: Sequence[str] | Sequence[Source] | None = None, *,
           max_tokens: int = 2048, seq_len: int = 256, tolerance: float = 1e-4, batch_size: int = 8,
           progress: bool = True, stream: bool = False, workdir: str | Path | None = None) -> VerifyReport:
    """Compare ``compiled`` with ``original`` on ``data`` (``--data`` specs or sources; testbed: its test split).

    ``stream``: load one decoder layer of each model at a time
    (:class:`premoe.streaming.LayerRunner`), for checkpoints larger than
    memory; the same numbers to float rounding. ``workdir`` holds hidden
    states that outgrow memory then.

    >>> verify("testbed", "python-50/", ["python:test"], max_tokens=1024).passed
    True
    """
    from premoe.adapters import get_adapter
    from premoe.compile import check_compiled, compiled_info, kept_experts, load_compact
    from premoe.data import token_windows
    from premoe.modeling import check_context, config_hash, load_model, load_tokenizer, read_config
    from premoe.progress import domains_bar

    source_config = read_config(original)
    check_context(source_config, seq_len)
    info = compiled_info(compiled)
    if info["source"]["config_hash"] != config_hash(source_config):
        raise InputError(f"{compiled} was compiled from {info['source']['name']} (config {info['source']['config_hash']}), "
                         f"not from {original}; verify it against its own original")
    check_compiled(compiled)  # shards ⇔ config.json on every MoE layer, MTP layers included
    kept = kept_experts(compiled)
    tokenizer = load_tokenizer(compiled)
    sources = _sources(data, original, tokenizer)  # before loading models: a missing --data fails fast
    windows = {s.name: token_windows(s.texts, tokenizer, seq_len, max_tokens) for s in sources}  # (windows, seq)
    if stream:
        if info["export"] == "compact":
            raise InputError(f"{compiled} is a compact export (layers hold different expert counts); verify it "
                             "without --stream, or compile the default padded export")
        checks, config, adapter = _check_streaming(original, compiled, windows, kept, batch_size, workdir, progress)
    else:
        net = load_compact(compiled) if info["export"] == "compact" else load_model(compiled)
        reference = load_model(original)
        config, adapter = reference.config, get_adapter(reference.config)
        with domains_bar({n: w.shape[0] for n, w in windows.items()}, "verify", "win", enabled=progress) as start:
            checks = [_check_source(name, domain_windows, net, reference, adapter, kept, batch_size, start(name))
                      for name, domain_windows in windows.items()]
    family = get_adapter(source_config).name  # config.json's name: Kimi-K2 is built as DeepSeek-V3
    gate_changes = adapter.gate_changes_when_pruned(config)
    notes = []
    if gate_changes:
        kl = sum(c.kl * c.tokens for c in checks) / max(sum(c.tokens for c in checks), 1)
        notes.append(f"{family} here routes with a softmax over all experts without top-k renormalisation: "
                     "dropping experts enlarges the kept experts' gate weights, so the compiled model differs from "
                     f"the full original beyond the experts it lost: mean KL {kl:.4f} nats, max |Δlogit| "
                     f"{max(c.max_abs_diff_full for c in checks):.3f}")
    return VerifyReport(str(original), str(compiled), family, info["export"],
                        {layer: len(v) for layer, v in kept.items()}, info["num_experts_original"], tolerance,
                        checks, gate_changes, notes)


def _check_source(name: str, windows, net, reference, adapter, kept: dict[int, list[int]], batch_size: int,
                  advance: Callable[[int], object]) -> DomainCheck:
    """Run one domain's windows (windows, seq) through the compiled, the full and the forced-routing original model."""
    import torch

    tally = _Tally()
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]  # (batch, seq)
        with torch.no_grad():
            with _Routing(net, adapter, kept) as routed_compiled:
                compiled = net(input_ids=batch).logits.float()  # (batch, seq, vocab)
            full = reference(input_ids=batch).logits.float()
            with adapter.restrict_routing(reference, kept), _Routing(reference, adapter) as routed_forced:
                forced = reference(input_ids=batch).logits.float()
        flipped, flips = torch.zeros(batch.numel(), dtype=torch.bool), 0  # (batch * seq,)
        for layer in routed_forced.selected:
            flips += _flag_tie_flips(routed_compiled, routed_forced, layer, flipped)
        tally.add(batch, compiled, full, forced, _positions_to_compare(flipped, batch.shape), flips)
        advance(batch.shape[0])
    return tally.check(name)


def _check_streaming(original, compiled, windows: dict, kept: dict[int, list[int]], batch_size: int, workdir,
                     progress: bool) -> tuple[list[DomainCheck], object, object]:
    """:func:`_check_source` for every domain, one decoder layer of each model in memory at a time.

    The original's layer runs twice on its own copies of the hidden states
    (full, and with routing restricted to ``kept``); then the compiled
    model's layer. Routing flips are flagged layer by layer; the logits come
    at the end, from both models' heads.
    """
    import torch

    from premoe.progress import bar
    from premoe.streaming import LayerRunner

    with LayerRunner(original, windows, batch_size, workdir=workdir, streams=2) as reference, \
            LayerRunner(compiled, windows, batch_size, workdir=workdir) as pruned, torch.no_grad():
        adapter = reference.adapter
        flipped = [torch.zeros(b.rows, dtype=torch.bool) for b in reference.batches]  # per batch: (batch * seq,)
        flips = [0] * len(reference.batches)
        with bar(len(reference.layers), "verify (streaming)", "layer", enabled=progress) as shown:
            for index in range(len(reference.layers)):
                forced = []
                with reference.layer(index):
                    for batch in reference.batches:
                        reference.run(index, batch, stream=0)
                        with adapter.restrict_routing(reference.net, {index: kept[index]} if index in kept else {}), \
                                _Routing(reference.net, adapter) as routed:
                            reference.run(index, batch, stream=1)
                        forced.append(routed)
                with pruned.layer(index):
                    for b, batch in enumerate(pruned.batches):
                        with _Routing(pruned.net, pruned.adapter, kept) as routed:
                            pruned.run(index, batch)
                        if index in forced[b].selected:
                            flips[b] += _flag_tie_flips(routed, forced[b], index, flipped[b])
                shown.update(1)
        tallies = {name: _Tally() for name in windows}
        with reference.head(), pruned.head():
            for b, batch in enumerate(reference.batches):
                done = tallies[batch.domain].windows  # a domain's batches come in order
                ids = windows[batch.domain][done : done + batch.shape[0]]  # (batch, seq)
                tallies[batch.domain].add(ids, pruned.logits(pruned.batches[b]), reference.logits(batch, 0),
                                          reference.logits(batch, 1), _positions_to_compare(flipped[b], batch.shape),
                                          flips[b])
        config = reference.config
    return [tallies[name].check(name) for name in windows], config, adapter


class _Tally:
    """One domain's verification numbers, accumulated batch by batch."""

    def __init__(self):
        self.nll_full, self.nll_comp, self.kl = [], [], []
        self.diff = self.diff_full = 0.0
        self.flips = self.excluded = self.windows = 0

    def add(self, ids, compiled, full, forced, compare, flips: int) -> None:
        """(batch, seq) ``ids``; (batch, seq, vocab) logits; (batch, seq) ``compare`` mask; near-tie ``flips``."""
        from premoe.metrics import kl_divergence, token_nll

        self.windows += ids.shape[0]
        self.flips += flips
        self.excluded += int((~compare[:, :-1]).sum())
        targets = ids[:, 1:]  # (batch, seq-1)
        self.nll_full.append(token_nll(full[:, :-1], targets).flatten())
        self.nll_comp.append(token_nll(compiled[:, :-1], targets).flatten())
        self.kl.append(kl_divergence(full[:, :-1], compiled[:, :-1]).flatten())
        if compare.any():
            self.diff = max(self.diff, float((compiled - forced).abs()[compare].max()))
        self.diff_full = max(self.diff_full, float((compiled - full).abs().max()))

    def check(self, name: str) -> DomainCheck:
        import torch

        from premoe.metrics import perplexity

        kl_all = torch.cat(self.kl)  # (tokens,)
        return DomainCheck(name, self.windows, kl_all.numel(), self.diff, perplexity(torch.cat(self.nll_full)),
                           perplexity(torch.cat(self.nll_comp)), float(kl_all.mean()), self.diff_full, self.flips,
                           self.excluded)


class _Routing:
    """Record each MoE layer's routing during one forward pass, in the original model's expert indices.

    ``kept`` maps a compiled model's experts 0..M-1 back to the original's;
    without it the model is the original (run under restrict_routing).
    ``selected[layer]`` is (tokens, k) sorted, ``scores[layer]`` (tokens, E)
    the choice scores the router ranks by (−inf for experts it cannot choose).
    """

    def __init__(self, model, adapter, kept: dict[int, list[int]] | None = None):
        self.model, self.adapter, self.kept = model, adapter, kept
        self.top_k = adapter.top_k(model.config)
        self.n_group = adapter.groups(model.config)[0]  # grouped routers choose groups first, by their top-2 sum
        self.selected: dict = {}
        self.scores: dict = {}
        self._handles: list = []

    def __enter__(self) -> "_Routing":
        for layer in self.adapter.moe_layers(self.model):
            hook = functools.partial(self._on_router, layer)
            self._handles.append(layer.router.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _on_router(self, layer, module, args, output) -> None:
        import torch

        from premoe.scores import RouterBatch

        logits = self.adapter.router_logits(output).detach().float().reshape(-1, layer.num_experts)  # (tokens, E')
        selected = self.adapter.selected_experts(output, logits, self.top_k)  # (tokens, k) local indices
        bias = self.adapter.correction_bias_of(layer)
        batch = RouterBatch(logits, self.adapter.gate_probs(logits), selected,
                            correction_bias=None if bias is None else bias.detach().float().reshape(-1),
                            bias_added_to=self.adapter.correction_bias_added_to)
        if self.kept is not None:  # compiled: experts 0..M-1 are the original kept[layer]; its scores are not needed
            selected = torch.tensor(self.kept[layer.index])[selected]
        else:
            self.scores[layer.index] = batch.choice_scores  # (tokens, E)
        self.selected[layer.index] = selected.sort(dim=-1).values


def _flag_tie_flips(compiled: _Routing, forced: _Routing, layer: int, flipped) -> int:
    """Mark in ``flipped`` (tokens,) the tokens of ``layer`` whose routing differs by a near tie; returns their count.

    A token whose chosen experts differ is a near-tie flip when the experts
    it swapped scored within NEAR_TIE of each other in the forced run, or
    (grouped routers) the groups they belong to did. Other differences are
    not marked: they stay in the comparison (and fail it).
    """
    chosen, other = forced.selected[layer], compiled.selected.get(layer)
    if other is None or other.shape != chosen.shape:
        return 0
    scores = forced.scores[layer]  # (tokens, E)
    flips = 0
    for token in (other != chosen).any(-1).nonzero().flatten().tolist():
        a, b = set(chosen[token].tolist()), set(other[token].tolist())
        if _tied(scores[token], sorted((a - b) | (b - a)), forced.n_group):
            flips += 1
            flipped[token] = True
    return flips


def _positions_to_compare(flipped, shape):
    """(batch, seq) mask of positions whose logits must agree: all before a window's first near-tie flip.

    The flipped token and the later positions of its window (which attend to
    it) are left out.
    """
    import torch

    batch, seq = shape
    compare = ~flipped.reshape(batch, seq)
    first = torch.where(compare.all(-1), seq, (~compare).int().argmax(-1))  # (batch,) first flipped position
    return torch.arange(seq)[None, :] < first[:, None]


def _sources(data, original: str | Path, tokenizer) -> list[Source]:
    """The verification text: what was given, else the testbed's test split when verifying the testbed."""
    from premoe.data import parse_sources
    from premoe.modeling import is_testbed

    if data:
        specs = [d for d in data if not isinstance(d, Source)]
        return [d for d in data if isinstance(d, Source)] + (parse_sources(specs, tokenizer, split="test") if specs else [])
    if is_testbed(original):
        return parse_sources(["testbed"], tokenizer, split="test")
    raise InputError(f"no data to verify {original} on; pass --data NAME=PATH (text, .jsonl) — only the testbed "
                     "has default data")


def _tied(scores, swapped: list[int], n_group: int) -> bool:
    """Whether experts ``swapped`` (or, grouped, their groups) had choice scores within NEAR_TIE: (E,) ``scores``."""
    import torch

    values = scores[swapped]
    if bool(torch.isfinite(values).all()) and float(values.max() - values.min()) <= NEAR_TIE:
        return True
    if n_group <= 1:
        return False
    size = scores.numel() // n_group
    group_scores = scores.reshape(n_group, size).topk(2, dim=-1).values.sum(-1)  # (groups,) as the router ranks them
    groups = sorted({e // size for e in swapped})
    values = group_scores[groups]
    return len(groups) > 1 and bool(torch.isfinite(values).all()) and float(values.max() - values.min()) <= NEAR_TIE
