#!/usr/bin/env bash
# The refinement loop with a canary, end to end, on a private server (loopback only):
#   1. simulated users ask and rate (load-tests/users.py);
#   2. `distill --from-log` refines the served student and publishes it as a 50% canary;
#   3. more users ask and rate until the [rollout] policy promotes or rolls it back;
#   4. the same users ask again, without rating (before/after on equal prompts and seeds);
#   5. a deliberately bad candidate (a student distilled for 40 iterations at 200x the
#      learning rate) is published the same way, and the policy must roll it back.
# Usage: load-tests/canary-loop.sh [OUT_DIR [BINARY [STAGES]]]   (default binary
# target/release/fewstep; STAGES "refine bad", the default, or one of them; about 30 minutes
# on 2 cores). REFINE_STEPS sets the refinement's iterations (default 400).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/canary-loop}
bin=${2:-target/release/fewstep}
stages=${3:-refine bad}
refine_steps=${REFINE_STEPS:-400}
port=${PORT:-8097}
url=http://127.0.0.1:$port
rm -rf "$out" && mkdir -p "$out"
cat >"$out/server.toml" <<TOML
addr = "127.0.0.1:$port"
models = ["tiny-shapes"]
admin_token = "loop-secret"
store_url = "sqlite://$out/log.db"
reload_dirs = ["$out"]

[rollout]
auto = true
min_rated = 150
min_rated_to_decide = 30
check_every_s = 2
TOML
export FEWSTEP_ADMIN_TOKEN=loop-secret
"$bin" serve --config "$out/server.toml" >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 150); do curl -sf "$url/ready" >/dev/null && break; sleep 0.2; done
curl -sf "$url/ready" >/dev/null || { echo "the server did not start:" >&2; tail -5 "$out/server.log" >&2; exit 1; }

users() { python3 load-tests/users.py --url "$url" --fewstep "$bin" --json "$@"; }
rollout() { curl -sf -H "Authorization: Bearer loop-secret" "$url/admin/models/tiny-shapes/rollout"; }
# Rounds of rating users until the rollout ends (at most 12 rounds of 60).
until_decided() {
    for round in $(seq 12); do
        users --users 60 --seed $((100 + round)) --held-out-share 1.0 >>"$out/$1-rounds.txt"
        sleep 3
        if [ "$(rollout | python3 -c 'import json,sys; print(json.load(sys.stdin)["canary"] is None)')" = True ]; then
            break
        fi
    done
    rollout >"$out/$1-rollout.json"
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))["decisions"][0]; print(d["action"], d["decided_by"], "-", d["reason"])' "$out/$1-rollout.json"
}

if [[ " $stages " == *" refine "* ]]; then
    echo "== before: 300 users ask and rate"
    users --users 300 --seed 0 --held-out-share 1.0 | tee "$out/before.txt"
    echo "== refine from the log, publish as a 50% canary"
    "$bin" distill --model tiny-shapes --from-log "sqlite://$out/log.db" \
        --config models/tiny-shapes-teacher/distill.toml --steps "$refine_steps" --out "$out/refine" \
        --eval-prompts 0 --publish "$url" --canary 0.5 >"$out/refine.log" 2>&1
    echo "== users rate both versions until the policy decides"
    until_decided refine
    echo "== after: the same 300 users, no rating"
    users --users 300 --seed 0 --held-out-share 1.0 --no-feedback | tee "$out/after.txt"
fi

if [[ " $stages " == *" bad "* ]]; then
    echo "== a bad candidate: 40 iterations at 200x the learning rate, published as a 50% canary"
    # The shipped recipe with both learning rates (student and critic) raised from 1e-4 to 2e-2.
    sed 's/^lr = 1e-4$/lr = 2e-2/' models/tiny-shapes-teacher/distill.toml >"$out/bad.toml"
    grep -q '^lr = 2e-2$' "$out/bad.toml"
    "$bin" distill --model tiny-shapes-teacher --config "$out/bad.toml" \
        --method amd --student-steps 4 --steps 40 --out "$out/bad" --eval-prompts 0 \
        --publish "$url" --canary 0.5 >"$out/bad.log" 2>&1
    until_decided bad
fi
