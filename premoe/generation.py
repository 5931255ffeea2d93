"""Quality beyond perplexity: exact-match on held-out math problems and the repetition rate of greedy text.

The PreMoE v3 paper saw pruned models loop ("So, 15. So, 15. …"); perplexity
on reference text does not show that, greedy generation does. Two metrics:

* ``math_exact``: the testbed's synthetic math documents are numbered problems,
  each followed by one answer line (``Answer: 7 * 62 = 434.`` or
  ``Solution: 7x = -42, so x = -6.``). The prompt is the document up to and
  including a problem's question line (the earlier problems serve as worked
  examples); the model's greedy continuation up to the first newline must equal
  the reference answer line exactly. ``math_setup`` is the looser share whose
  line matches the reference up to its last `` = `` (the problem set up right,
  the arithmetic aside): a 15M-parameter testbed rarely gets the sums right.
* ``repetition``: on greedy continuations of the same prompts, the share of
  4-grams of generated tokens that repeat an earlier 4-gram of the same
  continuation (0: no repeats; looping text tends to 1).

Example::

    problems = math_problems(parse_sources(["math:test"])[0].texts, count=32)
    generation_metrics(model, tokenizer, problems, kept=plan.kept)   # {"math_exact": 0.91, "repetition": 0.04, …}
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

_PROBLEM = re.compile(r"(?m)^Problem (\d+)\. [^\n]*\n")


@dataclass(frozen=True)
class MathProblem:
    prompt: str  # the document up to and including the question line
    answer: str  # the reference answer line, without its newline


def math_problems(texts: Sequence[str], count: int, min_context: int = 2) -> list[MathProblem]:
    """Up to ``count`` problems, each with ≥ ``min_context`` worked problems before it in its document."""
    problems = []
    for text in texts:
        for match in _PROBLEM.finditer(text):
            if int(match.group(1)) <= min_context:
                continue
            answer = text[match.end():].split("\n", 1)[0]
            if answer.startswith(("Answer:", "Solution:")):
                problems.append(MathProblem(text[: match.end()], answer))
            if len(problems) >= count:
                return problems
    return problems


def repetition_rate(tokens: Sequence[int], n: int = 4) -> float:
    """Share of the n-grams of ``tokens`` that already occurred earlier in ``tokens``.

    >>> repetition_rate([1, 2, 3, 4, 1, 2, 3, 4], n=4)   # 5 4-grams, 1 repeats (1, 2, 3, 4)
    0.2
    """
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


@torch.no_grad()
def generation_metrics(model, tokenizer, problems: Sequence[MathProblem], *,
                       kept: Mapping[int, Sequence[int]] | None = None, max_new_tokens: int = 48,
                       context_tokens: int = 192) -> dict:
    """Greedy-decode every problem (with ``kept`` applied by masking the router) and score it.

    The prompt keeps its last ``context_tokens`` tokens. Returns
    ``math_exact`` (share of exact answer lines), ``math_setup`` (lines right up
    to their last `` = ``), ``repetition`` (mean over
    problems of :func:`repetition_rate` of the whole continuation) and ``problems``.
    """
    from premoe.adapters import get_adapter

    adapter = get_adapter(model.config)
    exact, setup, repeats = 0, 0, []
    restriction = adapter.restrict_routing(model, kept) if kept else contextlib.nullcontext()
    with restriction:
        for problem in problems:
            ids = tokenizer(problem.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            ids = ids[:, -context_tokens:]  # (1, ≤ context)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
            text = tokenizer.decode(out, skip_special_tokens=True)
            line = text.split("\n", 1)[0].strip()
            exact += line == problem.answer.strip()
            setup += line.rpartition(" = ")[0] == problem.answer.strip().rpartition(" = ")[0]
            repeats.append(repetition_rate(out.tolist()))
    count = max(len(problems), 1)
    return {"math_exact": exact / count, "math_setup": setup / count, "repetition": sum(repeats) / count,
            "problems": len(problems)}
