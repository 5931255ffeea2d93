"""Per-domain byte n-gram models: how familiar a request's *characters* are to each stored domain.

The fallback score (:mod:`premoe.novelty`) asks whether any stored domain
explains a request. Token bigrams (:mod:`premoe.ngram`) see a tokenizer's
pieces, which text of a language or programming language the store never saw
shares with the ones it did (Spanish with French, C headers with Python);
byte 5-grams see spelling (``ción``, ``);\\n``, ``__THROW``), the signal
language identifiers use. Added to the ``joint`` score they raise the share
of C headers that fall back at 64 tokens on the testbed's val split from
0.31 to 0.65 (docs/results/fallback.txt, section 3a, which picks their weight).

Each domain's model is Witten-Bell interpolated over orders 1..``order`` with
a uniform base; P(b | h) for the k bytes of context h:

    P_k(b | h) = (c(h b) + t(h) · P_{k-1}(b | h')) / (c(h) + t(h))

with c the counts in the domain's calibration bytes, t(h) the number of
distinct bytes seen after h, h' the context one byte shorter (a context never
seen leaves P_{k-1}). A request's score for a domain is its mean NLL per byte.

Requests arrive as token ids, so the models read bytes through a table of
each token id's bytes (:func:`token_bytes`): fit and score see the same
bytes, whatever the tokenizer.

Example::

    lms = fit_byte_lms({"python": ids_py, "de": ids_de}, token_bytes(tokenizer, vocab), order=5)
    lms.nll(request_ids)             # (n, 2) mean NLL per byte under each domain; lower = more familiar
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from premoe.errors import InputError

MAX_ORDER = 6  # n-gram codes pack n bytes into an int64 below 2**48; the domain index goes above (ByteLMs._merged)


def token_bytes(tokenizer, vocab: int) -> list[bytes]:
    """Each token id's bytes (ids past the tokenizer's vocabulary: none).

    A byte-level BPE tokenizer (GPT-2's alphabet: Qwen, Llama 3, DeepSeek, the testbed) gives each piece's
    exact bytes, so a character split over two tokens keeps its bytes; any other tokenizer gives
    ``tokenizer.decode([id])`` in UTF-8.
    """
    size = min(int(vocab), len(tokenizer))
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    alphabet = _byte_level_alphabet()
    if all(isinstance(p, str) and all(c in alphabet for c in p) for p in pieces):
        table = [bytes(alphabet[c] for c in p) for p in pieces]
    else:
        decoded = tokenizer.batch_decode([[i] for i in range(size)], clean_up_tokenization_spaces=False)
        table = [p.encode("utf-8", "replace") for p in decoded]
    return table + [b""] * (int(vocab) - size)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@dataclass
class _Order:
    """Counts of one order: n-grams of ``k`` context bytes + one (``grams``) and their contexts."""

    grams: torch.Tensor  # (G,) int64 sorted distinct codes of context + byte
    gram_counts: torch.Tensor  # (G,) int32
    contexts: torch.Tensor  # (C,) int64 sorted distinct context codes (k = 0: the one empty context, code 0)
    totals: torch.Tensor  # (C,) int32 occurrences of the context
    types: torch.Tensor  # (C,) int32 distinct bytes seen after it


@dataclass
class ByteLMs:
    """One byte n-gram model per domain, over a shared token-id -> bytes table."""

    order: int
    table: torch.Tensor  # (total bytes,) uint8: every token id's bytes, concatenated
    offsets: torch.Tensor  # (vocab + 1,) int64: token id i's bytes are table[offsets[i]:offsets[i + 1]]
    models: dict[str, list[_Order]] = field(default_factory=dict)  # domain -> orders 0..order-1 (context bytes)
    _merged_tables: list = field(default_factory=list, init=False, repr=False, compare=False)  # emptied by add()

    @property
    def domains(self) -> list[str]:
        return list(self.models)

    def bytes_of(self, ids: torch.Tensor) -> torch.Tensor:
        """(bytes,) int64 of token ids (T,)."""
        ids = ids.long().reshape(-1)
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(self.offsets) - 1):
            raise InputError(f"token ids must lie in [0, {len(self.offsets) - 1}), got {int(ids.min())}.."
                             f"{int(ids.max())}; is the store from this model's tokenizer?")
        starts, lengths = self.offsets[ids], self.offsets[ids + 1] - self.offsets[ids]  # (T,) each
        written = lengths.cumsum(0) - lengths  # (T,) where each token's bytes start in the output
        index = torch.repeat_interleave(starts - written, lengths) + torch.arange(int(lengths.sum()))
        return self.table[index].long()  # (bytes,)

    def add(self, ids: dict[str, torch.Tensor]) -> "ByteLMs":
        """Add domains from their calibration ids ``{domain: (tokens,)}``."""
        clashes = sorted(set(ids) & set(self.models))
        if clashes:
            raise InputError(f"domain {', '.join(clashes)} already has a byte model; rename the new domain")
        for domain, tokens in ids.items():
            data = self.bytes_of(tokens)
            if len(data) < 2:
                raise InputError(f"domain {domain!r} has no calibration text for its byte model")
            self.models[domain] = [_count(data, k) for k in range(self.order)]
        self._merged_tables = []  # rebuilt with the new domains on the next score
        return self

    def nll(self, ids: torch.Tensor) -> torch.Tensor:
        """(n, D) mean NLL per byte of requests ``ids`` (n, T) under each domain (domains order); a request
        without bytes scores 0 everywhere. All requests are scored in one pass: their bytes are joined and no
        n-gram reaches across two."""
        ids = ids.long().reshape(len(ids), -1)
        pieces = [self.bytes_of(request) for request in ids]
        sizes = torch.tensor([len(p) for p in pieces], dtype=torch.long)  # (n,)
        out = torch.zeros(len(ids), len(self.models), dtype=torch.float64)
        if int(sizes.sum()) == 0:
            return out
        data = torch.cat(pieces)  # (L,)
        owner = torch.repeat_interleave(torch.arange(len(ids)), sizes)  # (L,) request of each byte
        offset = torch.arange(len(data)) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)  # (L,) in it
        logp = _logp(data, offset, self._merged())  # (D, L)
        out = -torch.zeros(len(self.models), len(ids), dtype=torch.float64).index_add_(1, owner, logp)  # (D, n)
        return out.T / sizes.clamp(min=1).unsqueeze(1)

    def _merged(self) -> list[_Order]:
        """Per order, every domain's table in one, codes offset by domain index << 48 (one search for all)."""
        if not self._merged_tables:
            shift = [i << 48 for i in range(len(self.models))]
            self._merged_tables = [
                _Order(*(torch.cat([getattr(orders[k], name) + (s if name in ("grams", "contexts") else 0)
                                    for s, orders in zip(shift, self.models.values())])
                         for name in ("grams", "gram_counts", "contexts", "totals", "types")))
                for k in range(self.order)]
        return self._merged_tables

    # ------------------------------------------------------------------ files

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"bytes/table": self.table.contiguous(), "bytes/offsets": self.offsets.contiguous()}
        for domain, orders in self.models.items():
            for k, o in enumerate(orders):
                for name in ("grams", "gram_counts", "contexts", "totals", "types"):
                    out[f"bytes/{domain}/{k}/{name}"] = getattr(o, name).contiguous()
        return out

    def manifest(self) -> dict:
        return {"order": self.order, "domains": self.domains}

    @classmethod
    def load(cls, manifest: dict, tensors: dict[str, torch.Tensor]) -> "ByteLMs":
        order, domains = int(manifest["order"]), list(manifest["domains"])
        names = ("grams", "gram_counts", "contexts", "totals", "types")
        missing = [d for d in domains for k in range(order) for n in names if f"bytes/{d}/{k}/{n}" not in tensors]
        if "bytes/table" not in tensors or "bytes/offsets" not in tensors or missing:
            raise InputError("the store's byte models are incomplete; rebuild the store")
        models = {d: [_Order(*(tensors[f"bytes/{d}/{k}/{n}"] for n in names)) for k in range(order)]
                  for d in domains}
        return cls(order, tensors["bytes/table"], tensors["bytes/offsets"].long(), models)


def fit_byte_lms(ids: dict[str, torch.Tensor], table: list[bytes], order: int = 5) -> ByteLMs:
    """Byte models of every domain from its calibration ids ``{domain: (tokens,)}`` read through ``table``
    (:func:`token_bytes`)."""
    if not 1 <= int(order) <= MAX_ORDER:
        raise InputError(f"byte model order must be in 1..{MAX_ORDER}, got {order}")
    if not ids:
        raise InputError("no domains to build byte models for; give calibration text for at least one domain")
    lengths = torch.tensor([0] + [len(b) for b in table], dtype=torch.long)
    joined = b"".join(table)
    flat = torch.tensor(list(joined), dtype=torch.uint8)  # (total bytes,)
    return ByteLMs(int(order), flat, lengths.cumsum(0)).add(ids)


def _codes(data: torch.Tensor, n: int) -> torch.Tensor:
    """(len - n + 1,) int64 codes of every n-byte run of ``data`` (bytes,), first byte most significant."""
    runs = data.unfold(0, n, 1)  # (len - n + 1, n)
    weights = torch.tensor([256 ** (n - 1 - j) for j in range(n)], dtype=torch.long)
    return (runs * weights).sum(1)


def _count(data: torch.Tensor, k: int) -> _Order:
    """Counts of order ``k`` (k context bytes) over ``data`` (bytes,)."""
    if len(data) <= k:
        empty = torch.zeros(0, dtype=torch.long)
        return _Order(empty, empty.int(), empty, empty.int(), empty.int())
    grams, gram_counts = _codes(data, k + 1).unique(return_counts=True)  # sorted
    contexts_of_grams = grams // 256  # (G,) each distinct gram's context; grams sorted, so contexts are grouped
    contexts, types = contexts_of_grams.unique_consecutive(return_counts=True)
    totals = torch.zeros(len(contexts), dtype=torch.long).index_add_(
        0, torch.searchsorted(contexts, contexts_of_grams), gram_counts)
    return _Order(grams, gram_counts.int(), contexts, totals.int(), types.int())


def _lookup(table: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(found, position), each shaped like ``codes``: where ``codes`` sit in the sorted, non-empty 1-D ``table``
    (:func:`_logp` stops at the first order without contexts, and every gram has a context)."""
    pos = torch.searchsorted(table, codes.contiguous()).clamp(max=len(table) - 1)
    return table[pos] == codes, pos


def _logp(data: torch.Tensor, offset: torch.Tensor, orders: list[_Order]) -> torch.Tensor:
    """(D, L) log P of each byte of ``data`` (L,) under each domain's Witten-Bell model (``orders``: the merged
    tables, :meth:`ByteLMs._merged`), given ``offset`` (L,), each byte's position in its own request (contexts
    never reach into the request before)."""
    domains = torch.arange(int(orders[0].contexts.numel())).unsqueeze(1) << 48  # (D, 1): order 0 has one context
    p = torch.full((len(domains), len(data)), 1 / 256, dtype=torch.float64)  # (D, L) the uniform base
    for k, o in enumerate(orders):
        if len(data) <= k or len(o.contexts) == 0:  # no context this long in the requests, or in the calibration
            break
        codes = _codes(data, k + 1)  # (L - k,) the n-gram ending at byte i = k..L-1
        found, at = _lookup(o.contexts, (codes // 256).unsqueeze(0) + domains)  # (D, L - k) each
        found &= offset[k:] >= k  # the context lies inside the byte's own request
        seen, gram_at = _lookup(o.grams, codes.unsqueeze(0) + domains)
        count = torch.where(seen, o.gram_counts[gram_at].double(), 0.0)
        total, types = o.totals[at].double(), o.types[at].double()
        lower = p[:, k:]
        p[:, k:] = torch.where(found, (count + types * lower) / (total + types).clamp(min=1), lower)
    return p.log()
