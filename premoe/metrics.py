"""Pure metric functions: token NLL, perplexity with its standard error, KL divergence.

No model, no I/O: tensors in, tensors or floats out, so evaluation, verification
and the sweep all measure the same way.

Example::

    logits = model(ids).logits                                # (windows, seq, vocab)
    nll = token_nll(logits[:, :-1], ids[:, 1:])               # (windows, seq-1)
    mean, se = mean_and_se(nll.mean(1))                       # over windows
    perplexity(nll)                                           # exp(mean token NLL)
    kl_divergence(reference_logits[:, :-1], logits[:, :-1])   # (windows, seq-1)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, targets: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
    """Negative log-likelihood of each target token, in nats: shape of ``targets``.

    ``logits[..., t, :]`` must already be aligned with ``targets[..., t]``
    (shift before calling: ``token_nll(logits[:, :-1], ids[:, 1:])``).
    Computed in fp32 whatever the logits' dtype. ``normalized=True`` says
    the input already is log-probabilities (skips a ``log_softmax`` pass).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not align with targets {tuple(targets.shape)}; "
                         "expected logits of shape targets.shape + (vocab,)")
    log_probs = logits.float() if normalized else F.log_softmax(logits.float(), dim=-1)  # (..., vocab)
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (...)


def perplexity(nll: torch.Tensor | Sequence[float]) -> float:
    """exp of the mean NLL (token NLLs, or per-window means of equal-length windows).

    >>> round(perplexity([0.0, math.log(4.0)]), 6)
    2.0
    """
    values = torch.as_tensor(nll, dtype=torch.float64)
    return math.exp(float(values.mean()))


def mean_and_se(values: torch.Tensor | Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / √n; 0 for a single value).

    Windows, not tokens, are the independent samples: tokens of one window
    are correlated, so the SE of a per-token mean would be too optimistic.

    >>> mean_and_se([1.0, 3.0])
    (2.0, 1.0)
    """
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("mean_and_se needs at least one value")
    if x.numel() == 1:
        return float(x[0]), 0.0
    return float(x.mean()), float(x.std(unbiased=True) / math.sqrt(x.numel()))


def kl_divergence(reference: torch.Tensor, model: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
    """KL(reference ‖ model) per position, in nats: shape ``(...)`` for inputs ``(..., vocab)``.

    Both inputs are logits or log-probabilities (each is normalised with
    ``log_softmax``, which leaves log-probabilities unchanged);
    ``normalized=True`` says both already are log-probabilities and skips
    those two passes (most of the cost). This is the information lost when
    the model's next-token distribution replaces the reference's; it is 0
    exactly when they agree.
    """
    if reference.shape != model.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and model {tuple(model.shape)} shapes differ")
    ref = reference.float() if normalized else F.log_softmax(reference.float(), dim=-1)  # (..., vocab)
    out = model.float() if normalized else F.log_softmax(model.float(), dim=-1)  # (..., vocab)
    return (ref.exp() * (ref - out)).sum(-1).clamp(min=0)  # (...)
