#!/usr/bin/env bash
# One-shot GPU check: everything only a CUDA machine can show, in one summary table, in about
# 8 minutes on one H100 or H200.
#
#   bash bench/gpu_check.sh            # from the repository root
#
# 1. kernel tests with Triton compiled for real (tests/kernels, no TRITON_INTERPRET)
# 2. bench/peer_layer.py --device cuda   (achieved vs copy bandwidth)
# 3. bench/train_step.py --device cuda
# 4. a short bf16 training run of a reduced peer_1m model through launch.py (d=512, 4 blocks,
#    1024^2 experts, 20 steps), its peak GPU memory sampled with nvidia-smi
# 5. the planner's prediction for that run (python -m orchestrator.plan) against 4's measurements
#
# Packages the device image lacks (deepspeed, hydra-core, omegaconf, submitit, mlflow-skinny and
# their needs) are installed from wheels in ./.whl when that folder exists (pip --no-index). Without
# CUDA the script says so and exits 0 at once.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is false); nothing to check, exit 0"
  exit 0
fi
OUT_DIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT_DIR"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
declare -a ROWS
row() { ROWS+=("| $1 | $2 | $3 |"); echo "gpu_check: $1: $2 ($3)"; }
run_step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  local log="$OUT_DIR/$name.log" start=$SECONDS
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  echo "$rc $((SECONDS - start))"
}

read -r rc secs < <(run_step kernels 150 $PY -m pytest tests/kernels -x -q -p no:cacheprovider)
row "kernel tests (Triton compiled)" "$(tail -1 "$OUT_DIR/kernels.log")" "exit $rc, ${secs}s"

read -r rc secs < <(run_step peer_layer 120 $PY bench/peer_layer.py --device cuda --iters 5)
row "bench/peer_layer.py --device cuda" "$(grep -iE 'bandwidth|GB/s' "$OUT_DIR/peer_layer.log" | tail -1)" "exit $rc, ${secs}s"

read -r rc secs < <(run_step train_step 120 $PY bench/train_step.py --device cuda --dtype bfloat16)
row "bench/train_step.py --device cuda" "$(tail -1 "$OUT_DIR/train_step.log")" "exit $rc, ${secs}s"

REDUCED=(experiment=peer_1m model.d_model=512 model.num_layers=4 model.num_attention_heads=8 model.d_ff=2048
         data.seq_len=512 trainer.micro_batch_size=8 trainer.max_steps=20 trainer.log_every=5 trainer.eval_every=0
         trainer.eval_batches=1 trainer.precision=bf16 trainer.device=cuda trainer.progress_bar=false
         tracking.enabled=false checkpoint.every_steps=0 run.root="$OUT_DIR/runs" run.name=peer_1m_reduced)
$PY -m orchestrator.plan "${REDUCED[@]}" >"$OUT_DIR/plan.log" 2>&1
predicted=$(grep -E '^  total' "$OUT_DIR/plan.log" | awk '{print $2}')
predicted_ms=$(grep -oE 'roofline step time: [0-9.]+' "$OUT_DIR/plan.log" | awk '{print $4}')
( peak=0; while sleep 0.5; do
    used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1)
    [ -n "$used" ] && [ "$used" -gt "$peak" ] && peak=$used && echo "$peak" >"$OUT_DIR/peak_mib"
  done ) & SAMPLER=$!
read -r rc secs < <(run_step peer_1m_reduced 240 $PY launch.py "${REDUCED[@]}")
kill $SAMPLER 2>/dev/null
measured_gb=$(awk '{printf "%.2f", $1 * 1048576 / 1e9}' "$OUT_DIR/peak_mib" 2>/dev/null || echo "?")
last=$(grep -E '^step ' "$OUT_DIR/peer_1m_reduced.log" | tail -1)
row "bf16 run, reduced peer_1m (d=512, 1024^2 experts)" "$last" "exit $rc, ${secs}s"
row "planner vs measured, peak GB per GPU" "predicted ${predicted:-?} GB, nvidia-smi peak ${measured_gb} GB" "nvidia-smi includes the CUDA context"
row "planner vs measured, step" "predicted ${predicted_ms:-?} ms (roofline); measured: tok/s in the line above" "-"

echo
echo "| check | result | status |"
echo "| --- | --- | --- |"
printf '%s\n' "${ROWS[@]}"
echo "logs: $OUT_DIR"
