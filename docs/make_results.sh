#!/usr/bin/env bash
# Regenerate docs/results.md, its plots and the retrieval numbers from the shipped testbed.
#
#   bash docs/make_results.sh            # ~40 min on 2 CPU cores; reruns resume from runs/ (cached rows)
#
# Every number in docs/results.md comes from these commands.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${PREMOE_RUNS:-runs}"
windows="${PREMOE_WINDOWS:-48}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

# 1. profile the six trained domains on their calibration split, every scorer preset, 32768 tokens each
[ -f "$runs/prof/profile.json" ] || premoe profile testbed --data testbed --max-tokens 32768 --out "$runs/prof"

# 2. specialists, generalist, cross-domain, local vs global, PEU grid, calibration size, query vs query+output
premoe sweep testbed --profile "$runs/prof" --out "$runs/sweep" --max-windows "$windows" --cache-gb 8 \
    --scorers peu,tcess,tcess_top1,frequency,router_mass,reap,reap_softmax,ean_sum,ean_mean,random \
    --peu-grid --study-keep 0.25 --calib-tokens 1024,4096 --generate 32

# 3. the report: docs/results.md + plots (docs/results/*.png)
premoe report "$runs/sweep" --out "$runs/report" --force
rm -rf docs/results && mkdir -p docs/results
cp "$runs"/report/*.png docs/results/
sed -E 's/\]\(([a-z_0-9]+\.png)\)/](results\/\1)/' "$runs/report/report.md" > docs/results.md

# 4. task-adaptive retrieval: accuracy vs request tokens, unseen-domain fallback, served perplexity
python bench/eval_retrieval.py --model testbed --store "$runs/store" --json docs/results/retrieval.json \
    > docs/results/retrieval.txt
