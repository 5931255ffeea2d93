"""The route config file: which backend serves which domain, and the router's timeouts, read and checked.

Nothing here loads a model or opens a connection, so ``premoe route`` refuses
a bad config (unknown key, missing generalist, a URL that ends in /v1, the
router's own address) before it spends time loading the base model.

The config is a small JSON file (relative paths are relative to it)::

    {"model": "testbed", "store": "store/", "name": "fleet",
     "backends": {"python": {"url": "http://127.0.0.1:8001"},
                  "de": {"url": "http://127.0.0.1:8002", "model": "de-25"},
                  "generalist": {"url": "http://127.0.0.1:8000", "api_key": "..."}}}

Example::

    config = load_config("route.json")
    check_no_loop(config, "127.0.0.1", 9000)
    config.backends["generalist"].url   # 'http://127.0.0.1:8000'
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from premoe.errors import InputError, MissingFileError
from premoe.fileio import read_small_text
from premoe.guard import is_loopback
from premoe.modeling import TESTBEDS

GENERALIST = "generalist"

# config key -> the largest value that still means something (seconds; tokens)
LIMITS = {"retrieval_tokens": 1 << 20, "health_interval": 3600.0, "connect_timeout": 3600.0,
          "backend_timeout": 86400.0}


@dataclass(frozen=True)
class Backend:
    name: str  # a stored domain, or "generalist"
    url: str  # base URL; /v1/completions etc. are appended
    model: str | None = None  # model id sent to it; None: the "model" field is dropped
    api_key: str | None = None  # sent as a Bearer token

    def auth_headers(self) -> dict[str, str]:
        """The headers every call to this backend carries: its API key as a Bearer token, if it has one."""
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class RouteConfig:
    model: str  # the fleet's base checkpoint: its first MoE layer picks the domain
    store: str  # pattern store built from that model
    backends: dict[str, Backend]  # domain (or "generalist") -> backend
    name: str = "premoe-route"  # model id clients send
    retrieval_tokens: int = 256  # request tokens retrieval looks at
    health_interval: float = 2.0  # seconds between health checks of every backend
    connect_timeout: float = 2.0  # a backend that does not accept a connection within this is down
    backend_timeout: float = 600.0  # a backend silent this long (non-streaming: its whole generation) is hung


def load_config(path: str | Path) -> RouteConfig:
    """Read and check a route config file (JSON); paths in it are relative to the file."""
    path = Path(path)
    raw = _read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("backends"), dict) or \
            not all(isinstance(raw.get(k), str) for k in ("model", "store")):
        raise InputError(f"route config {path} needs \"model\" and \"store\" (strings) and \"backends\" (an object "
                         "of domain -> {\"url\": ...})")
    unknown = set(raw) - {"model", "store", "backends", "name", *LIMITS}
    if unknown:
        raise InputError(f"route config {path}: unknown keys {', '.join(sorted(unknown))}")
    backends = {name: _backend(path, name, spec) for name, spec in raw["backends"].items()}
    if GENERALIST not in backends:
        raise InputError(f"route config {path} has no \"{GENERALIST}\" backend; requests that match no domain, and "
                         "those whose backend is down, go there")
    here = path.resolve().parent
    resolve = lambda p: p if p in TESTBEDS or Path(p).is_absolute() else str(here / p)  # noqa: E731
    options = {k: raw[k] for k in ("name", *LIMITS) if k in raw}
    _check_options(path, options)
    return RouteConfig(resolve(raw["model"]), resolve(raw["store"]), backends, **options)


def check_no_loop(config: RouteConfig, host: str, port: int) -> None:
    """Refuse a backend URL that is the router's own address: every request would be forwarded to itself."""
    everywhere = host in ("0.0.0.0", "::", "")
    for name, backend in config.backends.items():
        parts = urlsplit(backend.url)
        same_host = parts.hostname == host.strip("[]").lower() or \
            (is_loopback(parts.hostname) and (is_loopback(host) or everywhere))
        if same_host and (parts.port or (443 if parts.scheme == "https" else 80)) == port:
            raise InputError(f"route config: backend {name!r} ({backend.url}) is this router's own address "
                             f"({host}:{port}); requests would be forwarded to the router itself. Give the backend's "
                             "URL or another --port")


def _read_json(path: Path):
    """The config's JSON value; a duplicated key is an error (JSON would silently keep the last one)."""

    def unique(pairs: list[tuple[str, object]]) -> dict:
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise InputError(f"route config {path} names {', '.join(map(repr, twice))} twice; JSON would keep only "
                             "the last one, so say each once")
        return dict(pairs)

    try:
        text = read_small_text(path, "route config").removeprefix("\ufeff")  # a BOM, as some editors write
        return json.loads(text, object_pairs_hook=unique)
    except FileNotFoundError:
        raise MissingFileError(f"route config {path} does not exist") from None
    except InputError:
        raise
    except RecursionError:
        raise InputError(f"route config {path} is nested too deeply to be a route config") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"route config {path} is not valid JSON ({e}); see `premoe route --help`") from None


def _check_options(path: Path, options: dict) -> None:
    """``name`` a non-empty string; every :data:`LIMITS` key a finite positive number up to its limit."""
    for key, value in options.items():
        if key == "name" and not (isinstance(value, str) and value.strip()):
            raise InputError(f"route config {path}: \"name\" must be a non-empty string")
        if key != "name" and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or not 0 < value <= LIMITS[key]):
            raise InputError(f"route config {path}: \"{key}\" must be a positive number, got {value!r} (at most "
                             f"{LIMITS[key]:g})")
    if "retrieval_tokens" in options and not isinstance(options["retrieval_tokens"], int):
        raise InputError(f"route config {path}: \"retrieval_tokens\" must be a whole number of tokens, got "
                         f"{options['retrieval_tokens']!r}")


def _backend(path: Path, name: str, spec) -> Backend:
    """One entry of ``backends``: a non-empty name and ``{"url", "model"?, "api_key"?}``, all strings."""
    where = f"route config {path}: backend {name!r}"
    if not name.strip():
        raise InputError(f"route config {path}: a backend's name is empty; name it after a stored domain or "
                         f"\"{GENERALIST}\"")
    if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
        raise InputError(f"{where} needs \"url\": \"http(s)://host:port\"")
    extra = set(spec) - {"url", "model", "api_key"}
    if extra or not all(isinstance(spec.get(k), (str, type(None))) for k in ("model", "api_key")):
        raise InputError(f"{where} takes \"url\", \"model\" and \"api_key\" (strings)")
    empty = [k for k in ("model", "api_key") if isinstance(spec.get(k), str) and not spec[k].strip()]
    if empty:
        raise InputError(f"{where}: \"{empty[0]}\" is empty; give a value or leave the key out")
    return Backend(name, _base_url(where, spec["url"]), spec.get("model"), spec.get("api_key"))


def _base_url(where: str, url: str) -> str:
    """``url`` without a trailing slash, if it is an http(s) server root (a path prefix is allowed, /v1 is not)."""
    problem = None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as e:
        problem = str(e)
    else:
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problem = "it needs http:// or https:// and a host"
        elif any(c.isspace() for c in url) or parts.query or parts.fragment or parts.username or parts.password:
            problem = "it may not hold spaces, a query, a fragment or credentials (use \"api_key\")"
        elif parts.path.rstrip("/").endswith("/v1"):
            problem = ("it ends in /v1: give the server's root, premoe appends /v1/completions, "
                       "/v1/chat/completions and /health")
    if problem:
        raise InputError(f"{where}: \"url\" {url[:200]!r} is not http(s)://host:port: {problem}")
    return url.rstrip("/")
