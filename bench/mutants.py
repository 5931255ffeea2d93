"""The mutants ``bench/mutation.py`` injects, one plausible bug each, with the tests that should catch it.

Written against the code as it is; a mutant whose snippet no longer occurs
exactly once is reported "not applied" (update it when the code moves).
"""
from mutation import Mutant

SCORES = ("tests/test_scores.py", "tests/test_baselines.py", "tests/test_capture.py")
PLAN = ("tests/test_plan.py",)
PROFILE = ("tests/test_profile.py", "tests/test_plan.py")
CKPT = ("tests/test_checkpoint.py",)
COMPILE = ("tests/test_compile.py", "tests/test_mtp.py")
VERIFY = ("tests/test_verify.py",)
SERVE = ("tests/test_serve.py", "tests/test_serve_hardening.py")
RETRIEVAL = ("tests/test_retrieval.py", "tests/test_store.py", "tests/test_matchers.py")
BANK = ("tests/test_bank.py",)
NOVELTY = ("tests/test_novelty.py", "tests/test_store.py")
MALLOC = ("tests/test_malloc.py",)
BYTES = ("tests/test_bytelm.py",)
MODELING = ("tests/test_rehearsal.py::test_kimi_k2_layout_profile_plan_compile_verify",
            "tests/test_rehearsal.py::test_unregistered_model_type_is_refused_before_transformers_asks_to_run_its_code",
            "tests/test_testbed.py::test_artefacts_of_a_shipped_testbed_find_it_after_the_repository_moves")

MUTANTS = [
    # ---------------------------------------------------------------- scores
    Mutant("scores:peu-threshold-strict", "premoe/scores.py", "confident = local >= threshold",
           "confident = local > threshold", SCORES),
    Mutant("scores:peu-local-softmax-over-all", "premoe/scores.py", "local = top.softmax(dim=-1)  # (tokens, Ka)",
           "local = batch.logits.softmax(dim=-1).gather(1, idx)  # (tokens, Ka)", SCORES),
    Mutant("scores:peu-ignores-filter", "premoe/scores.py",
           "torch.where(confident, value, torch.zeros_like(value))", "value", SCORES),
    Mutant("scores:biased-rule-ignores-bias", "premoe/scores.py",
           "ranked_by = batch.choice_scores if batch.correction_bias is not None else batch.logits",
           "ranked_by = batch.logits", SCORES),
    Mutant("scores:routed-rule-unranked", "premoe/scores.py",
           "return batch.selected.gather(1, rank[:, :candidates])", "return batch.selected[:, :candidates]", SCORES),
    Mutant("scores:choice-scores-no-bias", "premoe/scores.py",
           "return base + self.correction_bias.to(base.dtype)", "return base", SCORES),
    Mutant("scores:shifted-logit-wrong-neighbour", "premoe/scores.py",
           "return batch.top(idx.shape[1] + 1)[0][:, -1:]", "return batch.top(idx.shape[1] + 1)[0][:, :1]", SCORES),
    Mutant("scores:frequency-from-logits", "premoe/scores.py",
           "return torch.zeros(tokens, experts, dtype=torch.float64).scatter_(1, batch.selected, 1.0)",
           "return torch.zeros(tokens, experts, dtype=torch.float64).scatter_(1, "
           "batch.logits.topk(batch.selected.shape[1], dim=-1).indices, 1.0)", SCORES),
    Mutant("scores:reap-never-renormalises", "premoe/scores.py",
           "if batch.renormalises if renormalise == \"model\" else renormalise:", "if False:", SCORES),
    Mutant("scores:reap-no-norm", "premoe/scores.py", "return _routed(batch, gate * norms)",
           "return _routed(batch, gate)", SCORES),
    Mutant("scores:random-ignores-layer", "premoe/scores.py", 'f"{seed}/{batch.layer}"', 'f"{seed}"', SCORES),
    Mutant("scores:tcess-threshold", "premoe/scores.py",
           '"tcess": ScorerSpec("peu", (("candidates", 2), ("threshold", 0.55)',
           '"tcess": ScorerSpec("peu", (("candidates", 2), ("threshold", 0.5)', SCORES),
    # ---------------------------------------------------------------- profile
    Mutant("profile:reap-over-all-tokens", "premoe/profile.py",
           "if info[\"per_routed_token\"] else max(stats.tokens, 1)", "if False else max(stats.tokens, 1)", PROFILE),
    Mutant("profile:generalist-unweighted", "premoe/profile.py",
           "if weighting == \"balanced\":", "if weighting in (\"balanced\", \"tokens\"):", PROFILE),
    # ---------------------------------------------------------------- plan
    Mutant("plan:global-no-topk-floor", "premoe/plan.py",
           "kept = [set(share[l].topk(top_k).indices.tolist()) for l in range(layers)]\n    budget = layers * m - layers * top_k",
           "kept = [set() for l in range(layers)]\n    budget = layers * m", PLAN),
    Mutant("plan:global-off-by-one", "premoe/plan.py", "if budget <= 0:\n            break\n        layer, expert",
           "if budget < 0:\n            break\n        layer, expert", PLAN),
    Mutant("plan:global-raw-utility", "premoe/plan.py",
           "for flat in share.flatten().argsort(descending=True).tolist():",
           "for flat in utility.flatten().argsort(descending=True).tolist():", PLAN),
    Mutant("plan:local-ascending", "premoe/plan.py", "return row.topk(m).indices.tolist()",
           "return row.topk(m, largest=False).indices.tolist()", PLAN),
    Mutant("plan:groups-ignored", "premoe/plan.py", "    if n_group <= 1:\n        return row.topk(m).indices.tolist()",
           "    if True:\n        return row.topk(m).indices.tolist()", PLAN),
    Mutant("plan:keep-rounding", "premoe/plan.py", "m = max(1, round(keep * num_experts))",
           "m = max(1, int(keep * num_experts))", PLAN),
    Mutant("plan:budget-ignores-base", "premoe/checkpoint.py",
           "return self.base_bytes + sum(self.expert_bytes[l] * n for l, n in kept_per_layer.items())",
           "return sum(self.expert_bytes[l] * n for l, n in kept_per_layer.items())", PLAN + ("tests/test_budget.py",)),
    Mutant("plan:validate-allows-negative", "premoe/plan.py", "bad = [e for e in kept if not 0 <= e < num_experts]",
           "bad = [e for e in kept if not e < num_experts]", PLAN),
    Mutant("plan:validate-allows-duplicates", "premoe/plan.py", "if len(set(kept)) != len(kept):", "if False:", PLAN),
    Mutant("plan:validate-below-topk", "premoe/plan.py", "if len(kept) < top_k:", "if len(kept) < top_k - 1:", PLAN),
    Mutant("plan:groups-uneven-allowed", "premoe/plan.py", "if len(set(per_group)) != 1 or per_group[0] < 2",
           "if per_group[0] < 2", PLAN),
    Mutant("plan:check-experts-multiple", "premoe/plan.py", "if m % n_group:", "if False:", PLAN),
    # ---------------------------------------------------------------- checkpoint headers
    Mutant("checkpoint:no-overlap-check", "premoe/checkpoint.py", "if begin != end:", "if begin > end:", CKPT),
    Mutant("checkpoint:no-trailing-check", "premoe/checkpoint.py", "if end != data_bytes:", "if end > data_bytes:",
           CKPT),
    Mutant("checkpoint:no-size-check", "premoe/checkpoint.py", "if end - begin != needed:", "if False:",
           CKPT),
    Mutant("checkpoint:index-mismatch-ignored", "premoe/checkpoint.py", "if moved:", "if False:", CKPT + COMPILE),
    # ---------------------------------------------------------------- compile
    Mutant("compile:ranges-wrong-stride", "premoe/compile.py", "start = begin + (o * count + r) * block",
           "start = begin + (o + r) * block", COMPILE),
    Mutant("compile:renumber-keeps-original", "premoe/compile.py",
           "new_key = adapter.rename_expert_key(key, expert, renumber[layer][expert])", "new_key = key",
           COMPILE),
    Mutant("compile:rows-shape-unchanged", "premoe/compile.py",
           "(*shape[:axis], len(rows), *shape[axis + 1 :])", "tuple(shape)", COMPILE),
    Mutant("compile:no-alignment-padding", "premoe/checkpoint.py", 'return raw + b" " * (-len(raw) % 8)', "return raw",
           COMPILE + CKPT),
    Mutant("compile:index-total-size-before", "premoe/compile.py", '"total_size": plan.bytes_after',
           '"total_size": plan.bytes_before', COMPILE),
    Mutant("compile:missing-experts-accepted", "premoe/compile.py",
           "if found and found != set(range(num_experts)):", "if False:", COMPILE),
    # ---------------------------------------------------------------- verify
    Mutant("verify:loose-tolerance", "premoe/verify.py", "tolerance: float = 1e-4", "tolerance: float = 1e-1",
           VERIFY),
    Mutant("verify:pass-strict-inequality", "premoe/verify.py", "return self.max_abs_diff <= self.tolerance",
           "return self.max_abs_diff < 10 * self.tolerance", VERIFY),
    # ---------------------------------------------------------------- serve (OpenAI request parsing)
    Mutant("serve:max-tokens-zero-allowed", "premoe/openai_request.py",
           "max_tokens=_integer(body, tokens_key, 1, None)", "max_tokens=_integer(body, tokens_key, 0, None)", SERVE),
    Mutant("serve:top-p-zero-not-greedy", "premoe/openai_request.py",
           "return self.temperature < MIN_TEMPERATURE or self.top_p == 0",
           "return self.temperature < MIN_TEMPERATURE", SERVE),
    Mutant("serve:depth-unbounded", "premoe/openai_request.py", "if _depth(value) > MAX_DEPTH:", "if False:", SERVE),
    Mutant("serve:unsupported-accepted", "premoe/openai_request.py",
           "names = [k for k in body if k not in FIELDS[chat] and (k not in NO_OP or not _same(body[k], NO_OP[k]))]",
           "names = []", SERVE),
    Mutant("serve:auth-any-token", "premoe/guard.py",
           'if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self._key):',
           'if scheme.lower() != b"bearer":', SERVE),
    # ---------------------------------------------------------------- retrieval (matchers) and the expert bank
    Mutant("retrieval:argmax-not-argmin", "premoe/matchers.py", "best = int(scores.argmin())",
           "best = int(scores.argmax())", RETRIEVAL),
    Mutant("retrieval:never-falls-back", "premoe/matchers.py",
           "return best, float(scores[best]), scores, threshold is not None and float(scores[best]) > threshold",
           "return best, float(scores[best]), scores, False", RETRIEVAL),
    Mutant("retrieval:bucket-longest-not-shorter", "premoe/matchers.py", "usable = [t for t in lengths if t <= tokens]",
           "usable = list(lengths)", RETRIEVAL),
    Mutant("retrieval:threshold-median", "premoe/matchers.py",
           "matcher.thresholds[length] = float(best.quantile(matcher.params.quantile))",
           "matcher.thresholds[length] = float(best.quantile(0.5))", RETRIEVAL),
    Mutant("retrieval:lda-no-shrinkage", "premoe/matchers.py",
           "cov = (1 - params.shrinkage) * cov + params.shrinkage * scale * torch.eye(len(cov), dtype=cov.dtype)",
           "cov = cov + 1e-9 * torch.eye(len(cov), dtype=cov.dtype)", RETRIEVAL),
    Mutant("retrieval:centroid-l1", "premoe/matchers.py", "return torch.cdist(x, f(\"mean\"))",
           "return torch.cdist(x, f(\"mean\"), p=1)", RETRIEVAL),
    Mutant("bank:loads-nothing", "premoe/bank.py", "report.bytes += self._load(layer, expert, slot)",
           "report.bytes += self.expert_bytes(layer, expert)", BANK),
    Mutant("bank:free-slots-wrong", "premoe/bank.py", "free = [i for i, e in enumerate(slots) if e not in wanted]",
           "free = [i for i, e in enumerate(slots)]", BANK),
    Mutant("bank:mapped-slices-one-offset", "premoe/bank.py", "                    raise\n            start += size",
           "                    raise", BANK),
    # ---------------------------------------------------------------- added with grouped global ranking, streaming
    Mutant("plan:global-tiers-floor-one", "premoe/plan.py", "floor = max(2, -(-top_k // topk_group))", "floor = 1",
           PLAN),
    Mutant("plan:padding-ignores-groups", "premoe/plan.py",
           "unchosen = [e for e in self.order[layer] if e // size == group and e not in chosen]",
           "unchosen = [e for e in self.order[layer] if e not in chosen]", PLAN),
    Mutant("streaming:pruned-load-skips-a-layer", "premoe/streaming.py",
           "prune_in_memory(net, adapter, {index: kept[index]})", "prune_in_memory(net, adapter, {})", BANK),
    Mutant("verify:stream-forced-run-unrestricted", "premoe/verify.py",
           "adapter.restrict_routing(reference.net, {index: kept[index]} if index in kept else {})",
           "adapter.restrict_routing(reference.net, {})", VERIFY),
    # ---------------------------------------------------------------- added with the joint fallback, malloc, compact loads
    Mutant("novelty:joint-ignores-pattern", "premoe/novelty.py", "self.params.pattern_weight)  # (n, D)",
           "0.0)  # (n, D)", NOVELTY),
    Mutant("novelty:margin-default-zero", "premoe/novelty.py", "self.margin_weight = MARGIN_WEIGHTS.get(self.method, 0.0)",
           "self.margin_weight = 0.0", NOVELTY),
    Mutant("malloc:threshold-not-set", "premoe/malloc.py", "libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)",
           "libc.malloc_trim(0)", MALLOC),
    Mutant("modeling:compact-not-dispatched", "premoe/modeling.py", 'config["premoe"].get("export") == "compact"',
           'config["premoe"].get("export") == "compacted"', COMPILE),
    # ---------------------------------------------------------------- added with byte models, Kimi-K2, locate_model
    Mutant("bytes:context-crosses-requests", "premoe/bytelm.py", "found &= offset[k:] >= k", "found &= offset[k:] >= 0",
           BYTES),
    Mutant("bytes:no-interpolation", "premoe/bytelm.py", "(count + types * lower) / (total + types).clamp(min=1)",
           "(count + 1 / 256) / (total + types).clamp(min=1)", BYTES),
    Mutant("bytes:partial-utf8-decoded", "premoe/bytelm.py", "if all(isinstance(p, str) and all(c in alphabet",
           "if False and all(isinstance(p, str) and all(c in alphabet", BYTES),
    Mutant("novelty:bytes-not-added", "premoe/novelty.py", "score = score + self.params.byte_weight * ",
           "score = score + 0.0 * ", BYTES),
    Mutant("modeling:kimi-not-aliased", "premoe/modeling.py", "if adapter is not None and adapter.transformers_model_type:",
           "if False:", MODELING),
    Mutant("modeling:moved-testbed-lost", "premoe/modeling.py", "            if config_hash(read_config(name)) ==",
           "            if False and config_hash(read_config(name)) ==", MODELING),
]
