#!/usr/bin/env bash
# Train 5 steps with every registered loss on the embedded model (LoRA): paired losses on the
# shared HH pairs, unpaired ones on the shared KTO data. Prints one line per loss.
# Usage: bash benchmarks/loss_sweep.sh [OUTDIR [LOSS ...]]   (no LOSS: every registered loss)
set -u
out=${1:-runs/loss-sweep}
shift $(( $# > 0 ? 1 : 0 ))
data=${PREFOPT_SHARED_DATA:-../shared/data}
mkdir -p "$out"
names=${*:-$(python -c "from prefopt import losses; print(' '.join(losses.names()))")}
for name in $names; do
  file=$data/hh-harmless-train.jsonl
  if python -c "from prefopt import losses; import sys; sys.exit(0 if losses.get('$name').paired else 1)"; then :; else
    file=$data/kto-en-demo.json
  fi
  start=$(date +%s)
  if prefopt train examples/hh-dpo.yaml --loss.name "$name" --data.train "$file" --data.limit 40 \
       --data.eval_fraction 0 --data.max_length 256 --data.max_prompt_length 192 --train.max_steps 5 \
       --train.batch_size 2 --train.grad_accum 1 --train.logging_steps 1 --train.progress false \
       --train.output_dir "$out/$name" > "$out/$name.log" 2>&1; then
    python - "$out/$name/metrics.jsonl" "$name" $(( $(date +%s) - start )) <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
print(f"{sys.argv[2]:<20} ok   steps {len(rows)}  loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}  {sys.argv[3]} s")
PY
  else
    echo "$name FAILED (see $out/$name.log)"; tail -3 "$out/$name.log"
  fi
done
