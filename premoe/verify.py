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

Example::

    report = verify("testbed", "python-50/")              # default data: testbed test windows
    print(report.summary())
    assert report.passed
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from premoe.data import Source
from premoe.errors import InputError


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
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

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
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict:
        data = asdict(self)
        data["experts_per_layer"] = {str(k): v for k, v in self.experts_per_layer.items()}
        return {**data, "max_abs_diff": self.max_abs_diff, "passed": self.passed}


def verify(original: str | Path, compiled: str | Path, data: Sequence[str] | Sequence[Source] | None = None, *,
           max_tokens: int = 2048, seq_len: int = 256, tolerance: float = 1e-4, batch_size: int = 8,
           progress: bool = True) -> VerifyReport:
    """Compare ``compiled`` with ``original`` on ``data`` (``--data`` specs or sources; testbed: its test split).

    >>> verify("testbed", "python-50/", ["python:test"], max_tokens=1024).passed
    True
    """
    from premoe.adapters import get_adapter
    from premoe.compile import check_compiled, compiled_info, kept_experts, load_compact
    from premoe.modeling import config_hash, load_model, load_tokenizer, read_config

    info = compiled_info(compiled)
    if info["source"]["config_hash"] != config_hash(read_config(original)):
        raise InputError(f"{compiled} was compiled from {info['source']['name']} (config {info['source']['config_hash']}), "
                         f"not from {original}; verify it against its own original")
    check_compiled(compiled)  # shards ⇔ config.json on every MoE layer, MTP layers included
    kept = kept_experts(compiled)
    tokenizer = load_tokenizer(compiled)
    sources = _sources(data, original, tokenizer)  # before loading models: a missing --data fails fast
    net = load_compact(compiled) if info["export"] == "compact" else load_model(compiled)
    reference = load_model(original)
    adapter = get_adapter(reference.config)
    checks = [_check_source(source, net, reference, adapter, kept, tokenizer, seq_len, max_tokens, batch_size,
                            progress) for source in sources]
    gate_changes = adapter.gate_changes_when_pruned(reference.config)
    notes = []
    if gate_changes:
        kl = sum(c.kl * c.tokens for c in checks) / max(sum(c.tokens for c in checks), 1)
        notes.append(f"{adapter.name} here routes with a softmax over all experts without top-k renormalisation: "
                     "dropping experts enlarges the kept experts' gate weights, so the compiled model differs from "
                     f"the full original beyond the experts it lost: mean KL {kl:.4f} nats, max |Δlogit| "
                     f"{max(c.max_abs_diff_full for c in checks):.3f}")
    return VerifyReport(str(original), str(compiled), adapter.name, info["export"],
                        {layer: len(v) for layer, v in kept.items()}, info["num_experts_original"], tolerance,
                        checks, gate_changes, notes)


def _check_source(source: Source, net, reference, adapter, kept: dict[int, list[int]], tokenizer, seq_len: int,
                  max_tokens: int, batch_size: int, progress: bool) -> DomainCheck:
    """Run one source's windows through the compiled, the full and the forced-routing original model."""
    import torch
    from tqdm import tqdm

    from premoe.data import token_windows
    from premoe.metrics import kl_divergence, perplexity, token_nll

    windows = token_windows(source.texts, tokenizer, seq_len, max_tokens)  # (windows, seq)
    nll_full, nll_comp, kl = [], [], []
    diff = diff_full = 0.0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=f"verify {source.name}", unit="batch",
                      disable=not progress, leave=False):
        batch = windows[start : start + batch_size]  # (batch, seq)
        with torch.no_grad():
            compiled = net(input_ids=batch).logits.float()  # (batch, seq, vocab)
            full = reference(input_ids=batch).logits.float()
            with adapter.restrict_routing(reference, kept):
                forced = reference(input_ids=batch).logits.float()
        targets = batch[:, 1:]  # (batch, seq-1)
        nll_full.append(token_nll(full[:, :-1], targets).flatten())
        nll_comp.append(token_nll(compiled[:, :-1], targets).flatten())
        kl.append(kl_divergence(full[:, :-1], compiled[:, :-1]).flatten())
        diff = max(diff, float((compiled - forced).abs().max()))
        diff_full = max(diff_full, float((compiled - full).abs().max()))
    kl_all = torch.cat(kl)  # (tokens,)
    return DomainCheck(source.name, windows.shape[0], kl_all.numel(), diff, perplexity(torch.cat(nll_full)),
                       perplexity(torch.cat(nll_comp)), float(kl_all.mean()), diff_full)


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
