#!/usr/bin/env bash
# Regenerate docs/results.md (Qwen3-MoE testbed), docs/results-dsv3.md (DeepSeek-V3-router testbed), their plots,
# the retrieval numbers and the selection study from the shipped testbeds.
#
#   bash docs/make_results.sh            # keep 0.5 and 0.25 (the goals): ~80 min on 2 idle CPU cores (both testbeds)
#   PREMOE_FULL=1 bash docs/make_results.sh   # + keep 0.75/0.375/0.125, the PEU grid, calibration size, --generate
#
# Reruns resume from runs/ (rows are cached, keyed by everything that fixes their numbers). Every number in
# docs/results.md, docs/results/retrieval.* and docs/selection.md comes from these commands.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${PREMOE_RUNS:-runs}"
windows="${PREMOE_WINDOWS:-48}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
scorers=peu_norm,peu,tcess,tcess_top1,frequency,router_mass,reap,reap_softmax,ean_sum,ean_mean,random

# 1-3 for each shipped testbed: the Qwen3-MoE one -> docs/results.md (+ docs/results/*.png), the DeepSeek-V3-router
# one -> docs/results-dsv3.md (+ docs/results-dsv3/*.png). PREMOE_MODELS=testbed limits it to one.
for model in ${PREMOE_MODELS:-testbed testbed-dsv3}; do
    name=$([ "$model" = testbed ] && echo results || echo "results-${model#testbed-}")
    dir="$runs/$model"
    # 1. profile the six trained domains on their calibration split, every scorer preset, 32768 tokens each
    [ -f "$dir/prof/profile.json" ] || premoe profile run "$model" --data testbed --max-tokens 32768 --out "$dir/prof"

    # 2. specialists, generalist, cross-domain, local vs global (test split, 48 windows of 256 tokens per domain)
    if [ -n "${PREMOE_FULL:-}" ]; then
        premoe sweep "$model" --profile "$dir/prof" --out "$dir/sweep" --max-windows "$windows" --cache-gb 8 \
            --scorers "$scorers" --peu-grid --study-keep 0.25 --calib-tokens 1024,4096 --generate 32
    else
        premoe sweep "$model" --profile "$dir/prof" --out "$dir/sweep" --max-windows "$windows" --cache-gb 8 \
            --keep 0.5,0.25 --scorers "$scorers"
    fi

    # 3. the report: docs/$name.md + plots (docs/$name/*.png; other files there are kept)
    premoe report "$dir/sweep" --out "$dir/report" --force
    mkdir -p "docs/$name"
    cp "$dir"/report/*.png "docs/$name/"
    sed -E "s/\]\(([a-z_0-9]+\.png)\)/](${name}\/\1)/" "$dir/report/report.md" > "docs/$name.md"
done

# 4. task-adaptive retrieval: matcher choice (val), accuracy, unseen fallback + ROC, served perplexity, swaps
python bench/eval_retrieval.py --model testbed --store "$runs/store" --json docs/results/retrieval.json \
    --roc docs/results/retrieval_roc.png > docs/results/retrieval.txt
python bench/eval_retrieval.py --model testbed --store "$runs/store" --skip selection perplexity mixed \
    --json docs/results/fallback.json --roc docs/results/fallback_roc.png > docs/results/fallback.txt
python bench/eval_retrieval.py --model testbed --store "$runs/store" --skip selection \
    --json docs/results/retrieval-served.json > docs/results/retrieval-served.txt
python bench/outside_probe.py --store "$runs/store" --json bench/results/outside-probe.json
python bench/bench_serve.py --store "$runs/store" --json bench/results/serve-testbed.json

# 5. the selection study behind the default scorer (docs/selection.md, "Reproduce"), on both testbeds; on the
#    DeepSeek-V3 router it also decides PEU's candidate rule (logits / routed / biased)
python bench/select_study.py --split val --windows 24 --keep 0.5,0.25 --methods peu,tcess,reap,peu_gate_norm,reconstruct
python bench/select_study.py --split test --windows 24 --keep 0.5,0.25 --generalist \
    --methods reap,peu,peu_gate_norm,reconstruct
python bench/select_study.py --model testbed-dsv3 --split val --windows 24 --keep 0.5,0.25 \
    --methods peu_gate_norm,peu_norm_routed,peu_norm_biased,peu,tcess,reap,reconstruct
python bench/select_study.py --model testbed-dsv3 --split test --windows 24 --keep 0.5,0.25 --generalist \
    --methods peu_gate_norm,peu_norm_routed,peu_norm_biased,tcess,reap
