"""Per-domain expert-utility profiles: the artefact that profiling writes and planning reads.

A profile directory holds::

    profile.json          manifest: format, model identity, MoE layers, scorers, data, parameters, timing,
                          and the architecture facts planning needs (top-k, routing groups, renormalisation,
                          scoring function, checkpoint bytes per expert), so a plan never re-reads the model
    scores.safetensors    "<domain>/<scorer>" (layers, experts) float64 sums of token scores,
                          "<domain>/routed" (layers, experts) routed-token counts

Sums and token counts (not means) are stored so profiles of the same model
merge exactly and a generalist is the token-weighted mean over all domains'
tokens (DESIGN.md §2, eq. 11).

Example::

    profile = profile_model("testbed", parse_sources(["testbed"]), max_tokens=16384)
    profile.save("profiles/testbed")
    profile.utility("python", "peu")      # (layers, experts)
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from premoe import __version__
from premoe.capture import DomainStats, RouterCapture
from premoe.data import Source, token_windows
from premoe.errors import CheckpointError, InputError, MissingFileError, PremoeError
from premoe.fileio import load_artefact, save_artefact
from premoe.scores import DEFAULT_SCORERS, SCORERS, ScorerSpec, parse_scorer

FORMAT = "premoe-profile/1"


@dataclass
class ProfileParams:
    """How the calibration tokens were collected."""

    max_tokens: int = 32768  # per domain
    seq_len: int = 256  # tokens per window
    batch_size: int = 8  # windows per forward pass
    generate: int = 0  # tokens the model appends to each window before profiling (0: text only)
    device: str = "cpu"


@dataclass
class Profile:
    model: dict  # identity: name, path, model_type, config_hash
    family: str
    moe_layers: list[int]  # decoder layer index of each row of the score tensors
    num_experts: int
    top_k: int
    scorers: dict[str, dict]  # name -> {"kind", "params", "per_routed_token"}
    domains: dict[str, DomainStats]
    params: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # domain -> origin
    timing: dict = field(default_factory=dict)
    architecture: dict = field(default_factory=dict)  # what plan needs (architecture_of); {} in profiles before it

    # ------------------------------------------------------------------ queries

    def check_domain(self, domain: str) -> DomainStats:
        if domain not in self.domains:
            raise InputError(f"domain {domain!r} is not in this profile; it has {', '.join(self.domains)}")
        return self.domains[domain]

    def check_scorer(self, scorer: str) -> dict:
        if scorer not in self.scorers:
            raise InputError(f"scorer {scorer!r} was not collected in this profile; it has {', '.join(self.scorers)}. "
                             f"Profile again with --scorers {scorer}")
        return self.scorers[scorer]

    def utility(self, domain: str, scorer: str) -> torch.Tensor:
        """Mean token utility (layers, experts) of one domain."""
        return self.generalist_utility(scorer, [domain])

    def generalist_utility(self, scorer: str, domains: Sequence[str] | None = None,
                           weighting: str = "tokens") -> torch.Tensor:
        """Utility over several domains (layers, experts).

        ``tokens``: Σ_d sums_d / Σ_d tokens_d, every calibration token counts
        once (eq. 11). ``balanced``: the plain mean of the per-domain utilities.
        """
        info = self.check_scorer(scorer)
        names = list(domains or self.domains)
        twice = sorted({d for d in names if names.count(d) > 1})
        if twice:  # a repeated domain would silently weigh double
            raise InputError(f"domain {', '.join(twice)} is listed twice in --domains; list each domain once")
        stats = [self.check_domain(d) for d in names]
        if weighting == "balanced":
            return torch.stack([self.mean_utility(s, scorer, info) for s in stats]).mean(0)
        if weighting != "tokens":
            raise InputError(f"weighting must be 'tokens' or 'balanced', got {weighting!r}")
        total = stats[0]
        for s in stats[1:]:
            total = total.merge(s)
        return self.mean_utility(total, scorer, info)

    @staticmethod
    def mean_utility(stats: DomainStats, scorer: str, info: dict) -> torch.Tensor:
        """Utility (layers, experts) from sums: per routed token (REAP, EAN mean) or per token (the rest)."""
        denominator = stats.routed.clamp(min=1) if info["per_routed_token"] else max(stats.tokens, 1)
        return stats.sums[scorer] / denominator

    def coverage(self, domain: str, scorer: str = "router_mass", mass: float = 0.9) -> list[int]:
        """Per layer, how many experts cover ``mass`` of the domain's utility (by that scorer)."""
        utility = self.utility(domain, scorer).clamp(min=0)  # (layers, experts)
        ordered = utility.sort(dim=1, descending=True).values
        share = ordered.cumsum(1) / ordered.sum(1, keepdim=True).clamp(min=1e-30)
        return [int((row < mass - 1e-9).sum()) + 1 for row in share]

    # ------------------------------------------------------------------ architecture

    @property
    def groups(self) -> tuple[int, int]:
        """(n_group, topk_group) of the profiled model's router; (1, 1) when ungrouped."""
        arch = self.require_architecture()
        return int(arch["n_group"]), int(arch["topk_group"])

    def require_architecture(self) -> dict:
        """The recorded architecture; for a profile made before premoe recorded it, read from the model once.

        Refuses (rather than planning without groups) when neither is available.
        """
        if self.architecture:
            return self.architecture
        from premoe.adapters import get_adapter
        from premoe.modeling import locate_model, read_config, resolve_model_path

        try:
            model = resolve_model_path(locate_model(self.model))
        except MissingFileError as e:
            raise InputError(f"this profile (of {self.model.get('name')}) predates premoe recording the model's "
                             f"routing constraints, and the model directory {self.model.get('path')} is gone; "
                             "profile the model again") from e
        config = read_config(model)
        self.architecture = architecture_of(get_adapter(config), config, model, self.num_experts)
        return self.architecture

    def sizes(self):
        """The :class:`~premoe.checkpoint.SizeBreakdown` recorded at profile time, or ``None``."""
        from premoe.checkpoint import SizeBreakdown

        size = self.require_architecture().get("sizes")
        if not size:
            return None
        return SizeBreakdown(size["total_bytes"], size["base_bytes"],
                             {int(l): b for l, b in size["expert_bytes"].items()}, self.num_experts,
                             header_bytes=size.get("header_bytes"),  # absent in profiles before premoe counted it
                             expert_header_bytes={int(l): b for l, b in (size.get("expert_header_bytes") or {}).items()})

    # ------------------------------------------------------------------ merge

    def merge(self, other: "Profile") -> "Profile":
        """Union of two profiles of the same model; a domain in both has its sums added."""
        if other.model["config_hash"] != self.model["config_hash"]:
            raise InputError(f"cannot merge profiles of different models ({self.model['name']} vs {other.model['name']})")
        if set(other.scorers) != set(self.scorers):
            raise InputError(f"cannot merge profiles with different scorers: {sorted(self.scorers)} vs {sorted(other.scorers)}")
        for key in _WINDOW_PARAMS:  # what a token's statistics depend on; one value must describe the merged profile
            mine, theirs = self.params.get(key), other.params.get(key)
            if mine != theirs:
                raise InputError(f"cannot merge profiles made with different --{key.replace('_', '-')} ({mine} vs "
                                 f"{theirs}): their statistics are not comparable; profile again with one value")
        domains = dict(self.domains)
        for name, stats in other.domains.items():
            domains[name] = domains[name].merge(stats) if name in domains else stats
        return Profile(self.model, self.family, self.moe_layers, self.num_experts, self.top_k, self.scorers, domains,
                       self.params, {**self.data, **other.data}, {"merged": [self.timing, other.timing]},
                       self.architecture or other.architecture)

    # ------------------------------------------------------------------ files

    def save(self, out: str | Path, force: bool = False) -> Path:
        tensors = {}
        for domain, stats in self.domains.items():
            for name, total in stats.sums.items():
                tensors[f"{domain}/{name}"] = total
            tensors[f"{domain}/routed"] = stats.routed
        manifest = {
            "format": FORMAT, "premoe_version": __version__, "model": self.model, "family": self.family,
            "moe_layers": self.moe_layers, "num_experts": self.num_experts, "top_k": self.top_k,
            "scorers": self.scorers, "domains": {d: {"tokens": s.tokens} for d, s in self.domains.items()},
            "params": self.params, "data": self.data, "timing": self.timing, "architecture": self.architecture,
        }
        return save_artefact(out, "profile.json", manifest, "scores.safetensors", tensors, force=force)

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        """Read a profile directory, refusing (one line) anything malformed: bad JSON, wrong types, shapes, NaN."""
        try:
            manifest, tensors = load_artefact(path, "profile.json", FORMAT, "scores.safetensors",
                                              f"premoe profile MODEL --data ... --out {path}")
        except PremoeError:
            raise
        except FileNotFoundError as e:
            raise MissingFileError(f"{path}: {e.filename or e} is missing; profile the model again") from e
        except Exception as e:  # JSONDecodeError, SafetensorError, UnicodeDecodeError, OSError …
            raise CheckpointError(f"{path} is not a readable premoe profile ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); profile the model again") from e
        _check_manifest(manifest, path)
        for info in manifest["scorers"].values():  # older profiles' "reap" used the all-experts probability
            if info["kind"] == "reap" and "renormalise" not in info["params"]:
                info["params"] = {"renormalise": False}
        layers, experts = len(manifest["moe_layers"]), manifest["num_experts"]
        domains = {
            d: DomainStats(info["tokens"], {n: _tensor(tensors, f"{d}/{n}", (layers, experts), path)
                                            for n in manifest["scorers"]},
                           _tensor(tensors, f"{d}/routed", (layers, experts), path, non_negative=True))
            for d, info in manifest["domains"].items()
        }
        return cls(manifest["model"], manifest["family"], manifest["moe_layers"], experts, manifest["top_k"],
                   manifest["scorers"], domains, manifest["params"], manifest["data"], manifest["timing"],
                   manifest.get("architecture") or {})


_WINDOW_PARAMS = ("seq_len", "generate")  # profile parameters that change what a routed token's statistics mean
_TESTBED_ORIGIN = re.compile(r"testbed:[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}:(?:calib|val|test)")  # data.Source.origin


def _check_manifest(m, path) -> None:
    """Types and ranges of profile.json's fields; one CheckpointError naming the first bad one."""
    def bad(key: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{path}/profile.json: {key} must be {expected}; the profile is damaged, "
                               "profile the model again")

    def is_int(x, low: int = 0) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= low

    if not isinstance(m, dict):
        raise bad("the manifest", "a JSON object")
    for key, kind in (("model", dict), ("family", str), ("moe_layers", list), ("scorers", dict), ("domains", dict),
                      ("params", dict), ("data", dict), ("timing", dict)):
        if not isinstance(m.get(key), kind):
            raise bad(key, f"a JSON {kind.__name__}")
    if not all(isinstance(m["model"].get(k), str) for k in ("name", "path", "config_hash")):
        raise bad("model", "an object with string name, path and config_hash")
    layers = m["moe_layers"]
    if not layers or not all(is_int(l) for l in layers) or len(set(layers)) != len(layers):
        raise bad("moe_layers", "a non-empty list of distinct layer indices ≥ 0")
    if not is_int(m.get("num_experts"), 1):
        raise bad("num_experts", "an integer ≥ 1")
    if not is_int(m.get("top_k"), 1) or m["top_k"] > m["num_experts"]:
        raise bad("top_k", f"an integer in 1..num_experts ({m['num_experts']})")
    for name, info in m["scorers"].items():
        if (name == "routed" or "/" in name or not isinstance(info, dict) or info.get("kind") not in SCORERS
                or not isinstance(info.get("params"), dict) or not isinstance(info.get("per_routed_token"), bool)):
            raise bad(f"scorers[{name!r}]", f"{{kind: one of {', '.join(SCORERS)}, params: object, "
                                            "per_routed_token: bool}")
    for domain, info in m["domains"].items():
        if "/" in domain or not isinstance(info, dict) or not is_int(info.get("tokens")):
            raise bad(f"domains[{domain!r}]", "{tokens: integer ≥ 0} under a name without '/'")
    for domain, origin in m["data"].items():  # reread by store build, plan --select reconstruct and sweep studies
        if domain not in m["domains"] or not isinstance(origin, str) or (
                origin.startswith("testbed:") and not _TESTBED_ORIGIN.fullmatch(origin)):
            raise bad(f"data[{domain!r}]", "where a profiled domain's text came from: a path, or "
                                           "testbed:<domain>:<calib|val|test>")
    for key, low in (("max_tokens", 1), ("seq_len", 2), ("batch_size", 1), ("generate", 0)):
        if key in m["params"] and not is_int(m["params"][key], low):
            raise bad(f"params.{key}", f"an integer ≥ {low}")
    arch = m.get("architecture") or {}
    if not isinstance(arch, dict):
        raise bad("architecture", "a JSON object")
    if arch and not (all(is_int(arch.get(k), 1) for k in ("top_k", "n_group", "topk_group"))
                     and isinstance(arch.get("sizes"), (dict, type(None)))):
        raise bad("architecture", "{top_k, n_group, topk_group: integers ≥ 1, sizes: object or null, …}")


def _tensor(tensors: dict, key: str, shape: tuple[int, int], path, non_negative: bool = False) -> torch.Tensor:
    """``tensors[key]`` as float64 (layers, experts), refused when missing, misshapen or not finite."""
    t = tensors.get(key)
    if t is None:
        raise CheckpointError(f"{path}/scores.safetensors has no tensor {key!r}; profile the model again")
    if tuple(t.shape) != shape or not t.is_floating_point():
        raise CheckpointError(f"{path}/scores.safetensors: {key} is {str(t.dtype).removeprefix('torch.')} "
                              f"{tuple(t.shape)}, expected float {shape}; profile the model again")
    t = t.double()
    if not torch.isfinite(t).all() or (non_negative and (t < 0).any()):
        raise CheckpointError(f"{path}/scores.safetensors: {key} holds NaN, infinite"
                              f"{' or negative' if non_negative else ''} values; profile the model again")
    return t


def architecture_of(adapter, config, model_path: Path | None, num_experts: int) -> dict:
    """What planning needs to know about the model, recorded in the profile at profile time.

    top-k, routing groups, top-k renormalisation, scoring function, whether
    pruning changes the kept gate weights, and (when the checkpoint is on
    disk) its byte sizes per expert, so ``plan --budget-gb`` needs no model.
    """
    n_group, topk_group = adapter.groups(config)
    arch = {"top_k": adapter.top_k(config), "n_group": n_group, "topk_group": topk_group,
            "renormalises": adapter.renormalises_top_k(config), "scoring": adapter.scoring,
            "gate_changes_when_pruned": adapter.gate_changes_when_pruned(config), "sizes": None}
    if model_path is not None and Path(model_path).is_dir():
        from premoe.checkpoint import size_breakdown

        sizes = size_breakdown(Path(model_path), adapter, num_experts)
        arch["sizes"] = {"total_bytes": sizes.total_bytes, "base_bytes": sizes.base_bytes,
                         "expert_bytes": {str(l): b for l, b in sizes.expert_bytes.items()},
                         "header_bytes": sizes.header_bytes,
                         "expert_header_bytes": {str(l): b for l, b in sizes.expert_header_bytes.items()}}
    return arch


def resolve_scorers(names: Sequence[str] | None) -> list[ScorerSpec]:
    specs = [parse_scorer(n) for n in (names or DEFAULT_SCORERS)]
    seen = [s.name for s in specs]
    if len(set(seen)) != len(seen):
        raise InputError(f"scorer names repeat: {seen}")
    return specs


def check_sources(sources: Sequence[Source]) -> None:
    """Refuse no data, a domain given twice, or a domain without text, before any weight is loaded."""
    if not sources:
        raise InputError("no calibration data; pass --data NAME=PATH (or --data testbed for the shipped domains)")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise InputError(f"domain names repeat: {names}; give each data source its own NAME")
    for source in sources:
        if not any(t.strip() for t in source.texts):
            raise InputError(f"data {source.name!r} ({source.origin}) contains no text")


def profile_model(model: str | Path, sources: Sequence[Source], scorers: Sequence[str] | None = None,
                  params: ProfileParams | None = None, progress: bool = True, loaded=None) -> Profile:
    """Run each domain's calibration text through the model and sum every scorer's token scores.

    ``loaded`` is an optional ``(model, tokenizer)`` pair already in memory.
    """
    from premoe.adapters import get_adapter
    from premoe.modeling import check_context, load_model, load_tokenizer, model_identity, read_config
    from premoe.progress import domains_bar

    params = params or ProfileParams()
    check_sources(sources)
    specs = resolve_scorers(scorers)
    identity = model_identity(model)
    check_context(read_config(model) if loaded is None else loaded[0].config, params.seq_len)
    net, tokenizer = loaded or (load_model(model, params.device), load_tokenizer(model))
    adapter = get_adapter(net.config)
    started = time.time()
    domains: dict[str, DomainStats] = {}
    windows = {s.name: token_windows(s.texts, tokenizer, params.seq_len - params.generate, params.max_tokens)
               for s in sources}  # name -> (windows, seq): tokenised first, so one bar spans every domain
    with RouterCapture(net, adapter, specs) as capture, \
            domains_bar({n: w.shape[0] for n, w in windows.items()}, "profile", "win", enabled=progress) as start:
        for name, domain_windows in windows.items():
            advance = start(name)
            for first in range(0, domain_windows.shape[0], params.batch_size):
                batch = domain_windows[first : first + params.batch_size].to(params.device)  # (batch, seq)
                if params.generate:
                    batch = _continue(net, batch, params.generate, tokenizer)
                capture.run(batch)
                advance(batch.shape[0])
            domains[name] = capture.reset()
    return assemble_profile(identity, adapter, net.config, capture.layers, specs, domains, params, sources, started)


def assemble_profile(identity: dict, adapter, config, layers: Sequence, specs: Sequence[ScorerSpec],
                     domains: dict[str, DomainStats], params: ProfileParams, sources: Sequence[Source],
                     started: float, **timing) -> Profile:
    """The :class:`Profile` of a finished calibration run, in memory or streamed (premoe.streaming).

    ``layers`` are the captured :class:`~premoe.adapters.MoELayer` s in row
    order; ``timing`` adds entries such as ``mode="streaming"``.
    """
    return Profile(
        model=identity, family=adapter.name, moe_layers=[l.index for l in layers], num_experts=layers[0].num_experts,
        top_k=adapter.top_k(config),
        scorers={s.name: {"kind": s.kind, "params": dict(s.params), "per_routed_token": s.per_routed_token} for s in specs},
        domains=domains, params=vars(params).copy(), data={s.name: s.origin for s in sources},
        timing={"seconds": round(time.time() - started, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **timing},
        architecture=architecture_of(adapter, config, Path(identity["path"]), layers[0].num_experts),
    )


@torch.no_grad()
def _continue(model, batch: torch.Tensor, tokens: int, tokenizer) -> torch.Tensor:
    """Append the model's own greedy continuation (the paper: query-only profiles make pruned models loop)."""
    out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=tokens,
                         min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out  # (batch, seq + tokens)


def summary(profile: Profile, scorer: str = "router_mass") -> dict:
    """What `premoe profile show` prints: tokens, 90% coverage per layer, top-M overlap between domains."""
    m = max(profile.top_k, profile.num_experts // 4)
    top = {d: [set(row.topk(m).indices.tolist()) for row in profile.utility(d, scorer)] for d in profile.domains}
    overlap = {a: {b: round(sum(len(x & y) / len(x | y) for x, y in zip(top[a], top[b])) / len(top[a]), 4)
                   for b in profile.domains} for a in profile.domains}
    return {
        "model": profile.model, "family": profile.family, "moe_layers": profile.moe_layers,
        "num_experts": profile.num_experts, "top_k": profile.top_k, "scorer": scorer, "overlap_m": m,
        "domains": {d: {"tokens": s.tokens, "coverage90": profile.coverage(d, scorer)} for d, s in profile.domains.items()},
        "overlap": overlap,
    }
