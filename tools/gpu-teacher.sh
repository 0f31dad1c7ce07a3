#!/usr/bin/env bash
# Trains tiny-shapes teachers on a lent GPU inside a fixed time budget, then evaluates them
# there (the GPU samples ~50x faster than one CPU thread). Issue 14's GPU recipe.
#
#   tools/gpu-bench.sh prepare               here: packs the CUDA build into .carry/ (git-ignored)
#   tools/gpu-teacher.sh BUDGET_S [DEVICE]   there, from the repository root with .carry/
#
# The job list (GPU_TEACHER_JOBS="name|config|init-weights ...", by default the shipped teacher's
# continuation) runs side by side. Two jobs cost each other more than expected, though: on an H200
# the phase-4 DiT ran 2.25x faster alone (models/tiny-shapes-teacher/README.md, "Phases 7 and 8").
#  1. a short step-time probe of every job at once (they share the device later too);
#  2. each config scaled to the time that is left (tools/teacher_plan.py: warmup, curriculum
#     and decay keep their share of the run), so every run ends with its decay;
#  3. the runs, each under a hard stop;
#  4. on the device: the shape probe, the 64+16 eval (the table the README keeps) and the
#     256+64 eval, for every run and for the shipped teacher, as far as the budget allows;
#  5. everything but checkpoints packed into $OUT/<name>.tar; the first job's resumable
#     checkpoint in 15 MB parts (the device hands back files of at most 16 MiB).
# Env: OUT (default ./gpu-teacher-out), PROBE_STEPS (40), EVAL_S (seconds kept for step 4, 150;
#      what does not fit is left to `fewstep eval` on the CPU),
#      FEWSTEP_BIN (skip unpacking; a CPU build and DEVICE=cpu make a dry run here).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
budget=${1:?usage: tools/gpu-teacher.sh BUDGET_S [DEVICE]}
device=${2:-cuda}
deadline=$(($(date +%s) + budget))
out=${OUT:-$root/gpu-teacher-out}
work=/tmp/gpu-teacher
teachers=models/tiny-shapes-teacher
read -r -a jobs <<<"${GPU_TEACHER_JOBS:-cont|$teachers/teacher-gpu-continue-config.json|$teachers/teacher.safetensors}"
rm -rf "$work" && mkdir -p "$work" "$out"
# shellcheck source=tools/gpu-env.sh
source tools/gpu-env.sh
plan() { python3 tools/teacher_plan.py "$@"; }
left() { echo $((deadline - $(date +%s))); }
# Runs a command until 15 s before the deadline; skips it when that time is already gone.
within() {
  local s=$(($(left) - 15))
  [ "$s" -gt 0 ] && timeout "$s" "$@"
}
log() { echo "[gpu-teacher $(date +%T), $(left) s left] $*"; }

train() { # seconds config init out
  local init=()
  [ -n "$3" ] && init=(--init-from "$3")
  timeout "$1" "$FEWSTEP_BIN" train-teacher --device "$device" --config "$2" --out "$4" "${init[@]}"
}

log "1. step-time probe (${PROBE_STEPS:-40} steps, all jobs at once)"
for j in "${jobs[@]}"; do
  IFS='|' read -r name cfg init <<<"$j"
  plan probe "$cfg" "${PROBE_STEPS:-40}" "$work/$name.probe.json"
  train $(($(left) / 3)) "$work/$name.probe.json" "$init" "$work/probe-$name" \
    >"$work/probe-$name.log" 2>&1 &
done
wait

train_s=$(($(left) - ${EVAL_S:-150} - 20))
log "2. sizing the runs to $train_s s"
for j in "${jobs[@]}"; do
  IFS='|' read -r name cfg init <<<"$j"
  if ! spp=$(plan steptime "$cfg" "$work/probe-$name/metrics.jsonl"); then
    tail -5 "$work/probe-$name.log"
    log "$name: the probe failed; skipped"
    continue
  fi
  # 20% off: start-up, checkpoints, and a shared device that ran 1.35x slower than its probe.
  iters=$(python3 -c "print(int($train_s * 0.8 / $spp))")
  plan scale "$cfg" "$iters" "$work/$name.json"
  mkdir -p "$work/$name"
  plan manifest "$cfg" "$name" "$work/$name/manifest.toml"
  cp "$work/$name.json" "$work/$name/config.json"
  log "$name: $spp s/step -> $iters iterations"
done

log "3. training"
for j in "${jobs[@]}"; do
  IFS='|' read -r name cfg init <<<"$j"
  [ -f "$work/$name.json" ] || continue
  train "$train_s" "$work/$name.json" "$init" "$work/$name" >"$work/$name/train.log" 2>&1 &
done
wait
for j in "${jobs[@]}"; do
  IFS='|' read -r name _ _ <<<"$j"
  [ -f "$work/$name/metrics.jsonl" ] && log "$name: $(tail -1 "$work/$name/metrics.jsonl")"
done

log "4. evaluating on the device"
evaluate() { # models-dir model weights out
  local e=("$FEWSTEP_BIN" eval --device "$device" --models-dir "$1" --model "$2" --weights "$3")
  mkdir -p "$4"
  [ "$2" = tiny-shapes-teacher ] || within "${e[@]}" --probe \
    --probe-samples 16 --out "$4/probe" >"$4/probe.log" 2>&1
  within "${e[@]}" --image-prompts 64 --video-prompts 16 \
    --out "$4/eval64" >"$4/eval64.log" 2>&1
  within "${e[@]}" --image-prompts 256 --video-prompts 64 \
    --out "$4/eval256" >"$4/eval256.log" 2>&1
}
for j in "${jobs[@]}"; do
  IFS='|' read -r name _ _ <<<"$j"
  [ -f "$work/$name/teacher.safetensors" ] &&
    evaluate "$work" "$name" "$work/$name/teacher.safetensors" "$work/$name" &
done
evaluate models tiny-shapes-teacher "$teachers/teacher.safetensors" "$work/shipped" &
wait

log "5. packing"
first=""
for j in "${jobs[@]}"; do
  IFS='|' read -r name _ _ <<<"$j"
  [ -d "$work/$name" ] || continue
  tar -C "$work" -cf "$out/$name.tar" --exclude checkpoint.safetensors "$name" "probe-$name.log"
  if [ -z "$first" ] && [ -f "$work/$name/checkpoint.safetensors" ]; then
    first=$name
    split -b 15M "$work/$name/checkpoint.safetensors" "$out/$name-checkpoint.part-"
  fi
done
tar -C "$work" -cf "$out/shipped.tar" shipped
for d in "$work"/*/; do
  for f in probe.log eval64/report.md eval256/report.md; do
    [ -s "$d$f" ] && { echo "== $d$f"; tail -25 "$d$f"; }
  done
done
ls -la "$out"
log "done"
