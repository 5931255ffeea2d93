#!/usr/bin/env bash
# Regenerate docs/results.md, its plots, the retrieval numbers and the selection study from the shipped testbed.
#
#   bash docs/make_results.sh            # keep 0.5 and 0.25 (the goals): ~40 min on 2 idle CPU cores
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

# 1. profile the six trained domains on their calibration split, every scorer preset, 32768 tokens each
[ -f "$runs/prof/profile.json" ] || premoe profile testbed --data testbed --max-tokens 32768 --out "$runs/prof"

# 2. specialists, generalist, cross-domain, local vs global (test split, 48 windows of 256 tokens per domain)
if [ -n "${PREMOE_FULL:-}" ]; then
    premoe sweep testbed --profile "$runs/prof" --out "$runs/sweep" --max-windows "$windows" --cache-gb 8 \
        --scorers "$scorers" --peu-grid --study-keep 0.25 --calib-tokens 1024,4096 --generate 32
else
    premoe sweep testbed --profile "$runs/prof" --out "$runs/sweep" --max-windows "$windows" --cache-gb 8 \
        --keep 0.5,0.25 --scorers "$scorers"
fi

# 3. the report: docs/results.md + plots (docs/results/*.png; the retrieval files beside them are kept)
premoe report "$runs/sweep" --out "$runs/report" --force
mkdir -p docs/results
cp "$runs"/report/*.png docs/results/
sed -E 's/\]\(([a-z_0-9]+\.png)\)/](results\/\1)/' "$runs/report/report.md" > docs/results.md

# 4. task-adaptive retrieval: matcher choice (val), accuracy, unseen fallback + ROC, served perplexity, swaps
python bench/eval_retrieval.py --model testbed --store "$runs/store" --json docs/results/retrieval.json \
    --roc docs/results/retrieval_roc.png > docs/results/retrieval.txt
python bench/bench_serve.py --store "$runs/store" --json bench/results/serve-testbed.json

# 5. the selection study behind the default scorer (docs/selection.md, "Reproduce")
python bench/select_study.py --split val --windows 24 --keep 0.5,0.25 --methods peu,tcess,reap,peu_gate_norm,reconstruct
python bench/select_study.py --split test --windows 24 --keep 0.5,0.25 --generalist \
    --methods reap,peu,peu_gate_norm,reconstruct
