#!/usr/bin/env bash
# Measures the two choices FAME.md leaves open, on one dataset, with everything
# else at the defaults: Eq. 11's combination rule and FFN''s residual. Each
# variant trains for EPOCHS epochs (early stopping as configured); the summary
# (best validation NDCG@10 / HR@10 and test metrics of the best checkpoint)
# is printed and written to $OUT/summary.jsonl.
#   FAME_DATA_DIR=../shared/data bash scripts/open_points.sh Beauty 30 runs/open_points
set -euo pipefail
DATASET=${1:-Beauty}
EPOCHS=${2:-30}
OUT=${3:-runs/open_points}
mkdir -p "$OUT"
variants=(
  "logit_sum:mixture"
  "mixture_of_softmax:mixture"
  "logit_sum:none"
)
for v in "${variants[@]}"; do
  combine=${v%%:*}; residual=${v##*:}
  workdir="$OUT/${DATASET}_${combine}_${residual}"
  python train.py --config configs/default.py --workdir "$workdir" \
    --config.data.name="$DATASET" --config.num_epochs="$EPOCHS" \
    --config.model.combine="$combine" --config.model.head_ffn_residual="$residual" \
    > "$workdir.log" 2>&1
  python - "$workdir" "$combine" "$residual" >> "$OUT/summary.jsonl" <<'PY'
import json, sys
workdir, combine, residual = sys.argv[1:]
test = json.load(open(f"{workdir}/eval_test.json"))
valid = json.load(open(f"{workdir}/eval_valid.json"))
epochs = [json.loads(l) for l in open(f"{workdir}/metrics.jsonl")]
print(json.dumps({"workdir": workdir, "combine": combine, "head_ffn_residual": residual,
                  "epochs": len(epochs), "valid": valid, "test": test}))
PY
  tail -n 1 "$OUT/summary.jsonl"
done
