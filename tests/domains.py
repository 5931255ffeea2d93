"""Three tiny synthetic domains (code, scripture, German) and a pattern store over them, for TAER tests."""
from __future__ import annotations

from pathlib import Path

from premoe.data import Source


def texts(domain: str, start: int, count: int) -> list[str]:
    """``count`` documents of ``domain``; different ``start`` values give different (held-out) documents."""
    make = {
        "code": lambda i: f"def add{i}(a, b):\n    return a + b * {i}\n\nx = add{i}(1, 2)\n",
        "bible": lambda i: f"And on day {i} God created the heaven and the earth, and it was good.\n",
        "de": lambda i: f"Der schnelle braune Fuchs Nummer {i} springt über den faulen Hund.\n",
    }[domain]
    return ["".join(make(i) for i in range(start + 8 * j, start + 8 * j + 8)) for j in range(count)]


DOMAINS = ("code", "bible", "de")


def sources(start: int = 0, count: int = 6) -> list[Source]:
    return [Source(d, texts(d, start, count), f"synthetic:{d}") for d in DOMAINS]


def make_store(model_dir: Path, loaded=None, novelty=None):
    """(profile, store) of the three domains, the threshold calibrated on held-out documents.

    ``novelty`` (premoe.novelty.NoveltyParams) defaults to the store's default fallback score.
    """
    from premoe.modeling import load_model, load_tokenizer
    from premoe.profile import ProfileParams, profile_model
    from premoe.matchers import MatchParams
    from premoe.store import PatternData, build_store

    loaded = loaded or (load_model(model_dir), load_tokenizer(model_dir))
    profile = profile_model(model_dir, sources(0), ["router_mass", "peu", "peu_norm", "frequency"], ProfileParams(max_tokens=1024, seq_len=64),
                            progress=False, loaded=loaded)
    store = build_store(model_dir, profile, sources(0), sources(1000, 4), match=MatchParams(lengths=(8, 16, 32)),
                        amounts=PatternData(tokens=2048, held_out_tokens=1024), loaded=loaded, novelty=novelty)
    return profile, store
