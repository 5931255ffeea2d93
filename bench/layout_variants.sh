#!/usr/bin/env bash
# DeepSeek-V3-like layouts nobody tuned for, each through the pipeline a user runs (issue 16):
# generate (bench/dsv3_layout.py, 5 layers) -> profile run --stream -> plan 50% local and 25% global ->
# compile (vanilla and compact) -> verify. Prints one line per step and the verify verdict per variant.
#   bash bench/layout_variants.sh [WORKDIR]        # default /tmp/premoe-layout-variants; ~6 min on 2 cores
set -u
work=${1:-/tmp/premoe-layout-variants}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work" && cd "$work" || exit 1
python - <<'PY'
import random
random.seed(0)
lines = ["def f%d(x):\n    return x * %d + %d\n" % (i, i, random.randint(0, 99)) for i in range(200)]
open("code.txt", "w").write("".join(lines))
PY
# the only shard renamed model.safetensors, no index (a single-file checkpoint)
single='import json, os; i = json.load(open("model.safetensors.index.json")); (s,) = set(i["weight_map"].values()); os.rename(s, "model.safetensors"); os.remove("model.safetensors.index.json")'
# shards renamed weights_partN, the index's metadata emptied
renamed='import json, os; i = json.load(open("model.safetensors.index.json")); n = {s: f"weights_part{k}.safetensors" for k, s in enumerate(sorted(set(i["weight_map"].values())))}; [os.rename(a, b) for a, b in n.items()]; i["weight_map"] = {k: n[v] for k, v in i["weight_map"].items()}; i["metadata"] = {}; json.dump(i, open("model.safetensors.index.json", "w"))'
run() {  # run NAME HOOK GENERATOR-ARGS...
  local name=$1 hook=$2; shift 2
  rm -rf "$name" "$name"-*
  python "$root/bench/dsv3_layout.py" "$name" --layers 5 "$@" > "$name.log" 2>&1 || { echo "$name: generate FAILED"; return; }
  [ -n "$hook" ] && (cd "$name" && python -c "$hook")
  local steps=(
    "profile run $name --data code=code.txt --out $name-prof --stream --max-tokens 256 --seq-len 64"
    "plan $name-prof --keep 0.5 --domain code --out $name-plan.json"
    "plan $name-prof --keep 0.25 --domain code --ranking global --out $name-planG.json"
    "compile $name $name-plan.json --out $name-c50"
    "compile $name $name-planG.json --out $name-cG --export compact"
    "verify $name $name-c50 --data code=code.txt --max-tokens 256 --seq-len 64")
  for step in "${steps[@]}"; do
    premoe $step >> "$name.log" 2>&1 || { echo "$name: premoe ${step%% *} FAILED (exit $?): $(tail -1 "$name.log")"; return; }
  done
  echo "$name ($*${hook:+, hook}): $(grep -E '^  (PASS|FAIL)' "$name.log" | tail -1 | sed 's/^ *//')"
}
run release "" --shards 30
run kimi-k2 "" --experts 384 --n-group 1 --topk-group 1 --first-dense 1 --mtp 0 --shards 40 --model-type kimi_k2
run kimi-k2-fp8-scattered "" --fp8 --variant scattered --experts 384 --n-group 1 --topk-group 1 --first-dense 1 \
    --mtp 0 --shards 61 --model-type kimi_k2
run fp8-odd-widths "" --fp8 --hidden 136 --moe-intermediate 72 --intermediate 200 --shards 20
run two-mtp-layers "" --mtp 2 --shards 30
run no-dense-layer "" --first-dense 0 --shards 17
run top6-of-4-groups "" --experts 128 --n-group 4 --topk-group 2 --top-k 6 --shards 9 --variant scattered
run single-file "$single" --shards 1
run renamed-shards "$renamed" --shards 12 --fp8 --variant scattered
