"""What the retrieval benchmarks share: a model, its pattern store, and test text of stored and unseen domains.

Not run on its own; ``eval_retrieval.py`` and ``bench_serve.py`` import it.

* a real model (default ``testbed``): the store is read from ``--store`` if
  that directory exists, else the trained domains' calib split is profiled
  (the store's default ranking scorer) and a store is built with the default matcher on
  the calib split and the val split as held-out text, then saved there; test
  text is the test split, unseen text ``c_headers:test``, ``es:test`` and the
  texts written for this project in ``tests/data/unseen`` (cooking prose,
  JSON, a shell script, Italian, YAML config, SQL, JavaScript, English news);
* ``--quick``: a tiny random Qwen3-MoE from ``tests/tiny.py`` and the three
  synthetic domains of ``tests/domains.py`` (unseen: random digits), so the
  scripts run in seconds anywhere. Its numbers mean nothing about PreMoE.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OWN_UNSEEN = [f"{p.stem}={p.relative_to(ROOT)}" for p in sorted((ROOT / "tests" / "data" / "unseen").glob("*.*"))]


@dataclass
class Setup:
    model: Path  # checkpoint directory
    store: object  # premoe.store.Store
    test: list  # [premoe.data.Source] of stored domains, held out from calibration and threshold
    unseen: list  # [premoe.data.Source] of domains the store never saw
    experts: int  # M for specialists and the bank
    val: list = None  # [premoe.data.Source] the held-out split the thresholds and choices were made on
    calib: list = None  # [premoe.data.Source] the calibration split the store was built from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="testbed", help="checkpoint directory or 'testbed'")
    parser.add_argument("--store", type=Path, help="store directory: loaded if it exists, else built and saved there")
    parser.add_argument("--experts", type=int, help="M, experts per layer (default: a quarter of them)")
    parser.add_argument("--calib-tokens", type=int, default=16384, help="profiling tokens per domain")
    parser.add_argument("--unseen", nargs="*", default=["c_headers:test", "es:test", *OWN_UNSEEN],
                        help="unseen domains' data")
    parser.add_argument("--quick", action="store_true", help="a tiny random model and synthetic domains (seconds)")


def quick_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser, values: dict) -> None:
    """With ``--quick``, smaller defaults: each of ``values`` replaces an option left at its default, while what the
    command line gives still counts."""
    if args.quick:
        for name, value in values.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)


def setup(args: argparse.Namespace) -> Setup:
    return _quick(args) if args.quick else _real(args)


def _real(args) -> Setup:
    from premoe.data import parse_sources
    from premoe.modeling import load_tokenizer, resolve_model_path
    from premoe.profile import ProfileParams, profile_model
    from premoe.store import DEFAULT_RANKING, Store, build_store

    model = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model)
    calib = parse_sources(["testbed"], tokenizer, split="calib")
    val = parse_sources(["testbed"], tokenizer, split="val")
    if args.store and (args.store / "store.json").exists():
        store = Store.load(args.store)
    else:
        profile = profile_model(args.model, calib, [DEFAULT_RANKING], ProfileParams(max_tokens=args.calib_tokens))
        store = build_store(args.model, profile, calib, val)
        if args.store:
            store.save(args.store)
    test = parse_sources([f"{d}:test" for d in store.domains], tokenizer)
    unseen = parse_sources([u if "=" not in u else u.split("=")[0] + "=" + str(ROOT / u.split("=", 1)[1])
                            for u in args.unseen], tokenizer) if args.unseen else []
    return Setup(model, store, test, unseen, args.experts or max(store.profile.top_k, store.profile.num_experts // 4),
                 [v for v in val if v.name in store.domains], [c for c in calib if c.name in store.domains])


def _quick(args) -> Setup:
    sys.path.insert(0, str(ROOT / "tests"))
    import domains
    import tiny
    from premoe.data import Source

    model = tiny.save("qwen3_moe", Path(tempfile.mkdtemp(prefix="premoe-quick-")) / "tiny")
    _, store = domains.make_store(model)
    digits = random.Random(0)
    unseen = [Source("digits", [" ".join(str(digits.randrange(10**6)) for _ in range(400))], "synthetic:digits")]
    return Setup(model, store, domains.sources(5000, 6), unseen, args.experts or 4, domains.sources(1000, 4),
                 domains.sources(0))
