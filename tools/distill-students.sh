#!/usr/bin/env bash
# Distills the tiny-shapes students of models/tiny-shapes/DISTILL.md: AMD and DMD2 at 4 steps
# and AMD at 1 step, over seeds, two runs at a time with one thread each (on 2 cores this is
# faster than one run on two threads: candle's thread barrier spins when cores are shared).
# Usage: tools/distill-students.sh ITERATIONS OUT_DIR RUN...   (RUN = method:steps:seed)
# FEWSTEP_BIN picks the binary; MODELS_DIR a models directory other than models/ (a candidate teacher);
# DISTILL_CONFIG a distill config other than the shipped one (a variant of the recipe).
set -euo pipefail
iterations=$1 out=$2
shift 2
bin=${FEWSTEP_BIN:-target/release/fewstep}
config=${DISTILL_CONFIG:-models/tiny-shapes-teacher/distill.toml}
models=()
[ -n "${MODELS_DIR:-}" ] && models=(--models-dir "$MODELS_DIR")
run() {
    IFS=: read -r method steps seed <<<"$1"
    local dir="$out/$method-${steps}step-seed$seed"
    local resume=()
    [ -f "$dir/checkpoint.safetensors" ] && resume=(--resume)
    CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=1 "$bin" distill "${models[@]}" --model tiny-shapes-teacher \
        --config "$config" --method "$method" \
        --student-steps "$steps" --seed "$seed" --steps "$iterations" --out "$dir" \
        "${resume[@]}" >"$dir.log" 2>&1
}
mkdir -p "$out"
while [ $# -gt 0 ]; do
    run "$1" &
    [ $# -gt 1 ] && { run "$2" & }
    wait
    shift $(($# > 1 ? 2 : 1))
done
