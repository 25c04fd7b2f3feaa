#!/bin/bash
# The first thing to run on a GPU machine: does the CUDA/NCCL path work here, and how fast is the MoE layer?
#
#   scripts/gpu_check.sh [OUT_DIR]        (default OUT_DIR: runs/gpu-check; nothing else is written)
#
# 1. NCCL on 1 GPU, 3 steps of configs/tiny-cpu.yaml in bf16, every step with a competing layer beside router-step
#    layers (competition rate 1, cap 1: one of the 4 MoE layers competes, the others route);
# 2. with 2+ GPUs: the same job at EP 1 and at EP 2 on 2 GPUs, 10 steps; their losses must agree within bf16's
#    tolerance (relative 2e-2: the expert-parallel transport changes the order of bf16 sums, nothing else);
# 3. the experts' grouped GEMM (what moe.grouped_gemm=auto takes on CUDA) against the per-expert loop on 1 GPU,
#    20 steps each: losses within the same bf16 tolerance, and the ratio of their median tokens/s;
# 4. `competesmoe bench moe-layer --quick` (the MoE-layer benchmark; its figures are the CPU/gloo path's);
# then one summary table. Exit 0 when every check passed, 1 when one failed, 2 when there is no CUDA device.
set -uo pipefail

OUT=${1:-runs/gpu-check}
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False): run it on a GPU machine" >&2
  exit 2
fi
GPUS=$(python -c 'import torch; print(torch.cuda.device_count())')
mkdir -p "$OUT"
SUMMARY=()
FAILED=0
CUDA_ARGS=(parallel.device=cuda parallel.backend=nccl train.precision=bf16 train.log_every=1 train.eval_every=0
           train.eval_batches=2 train.checkpoint_every=0 moe.competition.rate=1.0 moe.competition.cap=1
           moe.competition.warmup=0)

record() {  # check, result, detail
  SUMMARY+=("$(printf '%-34s %-6s %s' "$1" "$2" "$3")")
  [ "$2" = ok ] || FAILED=1
}

train() {  # name, nproc, overrides...
  local name=$1 nproc=$2
  shift 2
  competesmoe launch --launcher torchrun --nproc "$nproc" configs/tiny-cpu.yaml "output_dir=$OUT/$name" \
    "${CUDA_ARGS[@]}" "$@" > "$OUT/$name.log" 2>&1
}

last_losses() {  # run dir -> "step:loss ..." of its train records
  python - "$1" <<'EOF'
import json, sys
from pathlib import Path
rows = [json.loads(line) for line in (Path(sys.argv[1]) / "metrics.jsonl").read_text().splitlines()]
print(" ".join(f"{r['step']}:{r['loss']:.4f}" for r in rows if r["split"] == "train"))
EOF
}

compare_runs() {  # run dir A, run dir B -> their train losses agree within bf16's tolerance; prints the figures
  python - "$1" "$2" <<'EOF'
import json, statistics, sys
from pathlib import Path
def train_rows(d):
    return [r for r in map(json.loads, (Path(d) / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
a, b = (train_rows(d) for d in sys.argv[1:])
la, lb = ({r["step"]: r["loss"] for r in rows} for rows in (a, b))
worst = max(abs(la[s] - lb[s]) / abs(la[s]) for s in la)
speed = statistics.median(r["tokens_per_s"] for r in b[4:]) / statistics.median(r["tokens_per_s"] for r in a[4:])
print(f"worst relative loss difference {worst:.2e} over {len(la)} steps; tokens/s second/first {speed:.2f}x")
sys.exit(0 if la.keys() == lb.keys() and worst <= 2e-2 else 1)
EOF
}

# 1. NCCL, one GPU, router and competition steps
if train nccl-1gpu 1 train.max_steps=3 && grep -q '"competing_layers": \[[0-9]' "$OUT/nccl-1gpu/metrics.jsonl"; then
  record "1 GPU NCCL, 3 steps router+compete" ok "losses $(last_losses "$OUT/nccl-1gpu")"
else
  record "1 GPU NCCL, 3 steps router+compete" FAILED "see $OUT/nccl-1gpu.log"
fi

# 2. EP 2 against EP 1 on two GPUs
if [ "$GPUS" -ge 2 ]; then
  if train ep1 2 train.max_steps=10 parallel.expert_parallel_size=1 \
      && train ep2 2 train.max_steps=10 parallel.expert_parallel_size=2; then
    if compare_runs "$OUT/ep1" "$OUT/ep2" > "$OUT/ep-compare.txt"
    then record "2 GPUs EP 2 vs EP 1, 10 steps" ok "$(cat "$OUT/ep-compare.txt")"
    else record "2 GPUs EP 2 vs EP 1, 10 steps" FAILED "$(cat "$OUT/ep-compare.txt")"
    fi
  else
    record "2 GPUs EP 2 vs EP 1, 10 steps" FAILED "see $OUT/ep1.log, $OUT/ep2.log"
  fi
else
  record "2 GPUs EP 2 vs EP 1, 10 steps" skip "only $GPUS GPU"
fi

# 3. grouped GEMM against the per-expert loop, one GPU
if train loop 1 train.max_steps=20 moe.grouped_gemm=off && train grouped 1 train.max_steps=20 moe.grouped_gemm=on; then
  if compare_runs "$OUT/loop" "$OUT/grouped" > "$OUT/grouped-compare.txt"
  then record "1 GPU grouped GEMM vs loop, 20 steps" ok "$(cat "$OUT/grouped-compare.txt")"
  else record "1 GPU grouped GEMM vs loop, 20 steps" FAILED "$(cat "$OUT/grouped-compare.txt")"
  fi
else
  record "1 GPU grouped GEMM vs loop, 20 steps" FAILED "see $OUT/loop.log, $OUT/grouped.log"
fi

# 4. the MoE-layer benchmark
if competesmoe bench moe-layer --quick > "$OUT/bench-moe-layer.txt" 2>&1; then
  record "bench moe-layer --quick" ok "$(grep -m1 'ours / DeepSpeed tokens/s' "$OUT/bench-moe-layer.txt" | sed 's/^ *//')"
else
  record "bench moe-layer --quick" FAILED "see $OUT/bench-moe-layer.txt"
fi

echo
echo "gpu_check on $GPUS GPU(s): $(python -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__, "NCCL", ".".join(map(str, torch.cuda.nccl.version())))')"
printf '%-34s %-6s %s\n' check result detail
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED
