#!/usr/bin/env bash
# One device call of issue 7 (Mamba2 prefill on the GPU): install, then the named phases, each under
# its own `timeout`; full logs go to $OUT (when set). Run from the repository root on the device machine:
#   bash experiments/gpu_run.sh probe      # breakdown + per-kernel profile + command-buffer A/B
#   bash experiments/gpu_run.sh solver     # placement solver: HLO loop/kernel counts, then timings
#   bash experiments/gpu_run.sh hybrid     # qwen3.5 prefill table, emission, bitwise resume
#   bash experiments/gpu_run.sh resume     # resume through the Engine at 50/90/98% overlap (qwen3.5-0.8b)
#   bash experiments/gpu_run.sh mamba      # Mamba2 table of record with the peer, emission, bitwise resume
#   bash experiments/gpu_run.sh kernels    # block-size sweep of the Mamba2 mixer's Pallas kernels
#   bash experiments/gpu_run.sh head       # one-row LM head and embedding lookup vs XLA's plain lowering
#   bash experiments/gpu_run.sh cache-out  # the persistent compilation cache into $OUT as 8 MB parts
#   bash experiments/gpu_run.sh replays PRESET SECONDS  # timed replays of both data sets (traces/*.xz;
#                                                       # ROUNDS=3: each policy list three times, pooled;
#                                                       # CMDBUF=off: XLA command buffers off)
# The machine's own jax / flax are used; only the peer's wheel (carried in wheels/) is installed.
# Compilation cache across machines: `cache-out` returns /tmp/jaxcache as $OUT/jaxcache.part.*; put
# those parts in jaxcache/ (git-ignored) and carry it, and the next machine unpacks them first. It
# hits only for the same card model, jax / XLA and programs (a group-preset System Prompts replay:
# first setup 37 s instead of 311 s, fourteenth session); a changed policy list can change the
# checkpoint slots and with them every program.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/deps
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
if compgen -G "jaxcache/jaxcache.part.*" > /dev/null; then
  mkdir -p /tmp && cat jaxcache/jaxcache.part.* | xz -d | tar x -C /tmp \
    && echo "compilation cache: $(ls /tmp/jaxcache | wc -l) entries unpacked"
fi
python3 -m pip install -q --no-index --no-deps --target /tmp/deps wheels/mamba2_jax-1.1.2-py3-none-any.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
BENCH="python3 -m sparse_prefix.experiments.bench_prefill"
PROFILE="python3 -m sparse_prefix.experiments.profile_prefill"

step() {  # step NAME SECONDS command...: run with a timeout, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name: rc=$? ($((SECONDS - start)) s)"
  grep -v "^WARNING\|^I0000\|^W0000" "$OUT/$name.log" | tail -n "${TAIL:-40}"
}

for phase in ${PHASES:-$1}; do
case "$phase" in
  probe)
    DUMP="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*prefill.*"
    XLA_FLAGS="$DUMP" TAIL=12 step bench13b 130 $BENCH --presets mamba2-1.3b --lengths 8192 \
      --repeats 5 --breakdown --check-resume
    (cd /tmp/dump 2>/dev/null && ls -la > "$OUT/dump_listing.txt" \
      && tar czf "$OUT/hlo.tgz" $(ls | grep -E "after_optimizations(\.txt|-buffer-assignment)|thunk" \
      | head -40))
    XLA_FLAGS="$DUMP" TAIL=70 step prof13b 90 $PROFILE --preset mamba2-1.3b --length 8192 \
      --emit 0,8 --top 25
    XLA_FLAGS="--xla_gpu_enable_command_buffer=" TAIL=6 step nocmdbuf13b 60 $BENCH \
      --presets mamba2-1.3b --lengths 8192 --repeats 5
    XLA_FLAGS="$DUMP" TAIL=12 step bench130m 50 $BENCH --presets mamba2-130m --lengths 2048 \
      --repeats 5 --breakdown --check-resume
    XLA_FLAGS="$DUMP" TAIL=70 step prof130m 40 $PROFILE --preset mamba2-130m --length 2048 \
      --emit 0,8 --top 25
    XLA_FLAGS="--xla_gpu_enable_command_buffer=" TAIL=6 step nocmdbuf130m 30 $BENCH \
      --presets mamba2-130m --lengths 2048 --repeats 5
    ;;
  solver)
    SOLVER="python3 -m sparse_prefix.experiments.bench_solver --device gpu"
    TAIL=30 step solver_hlo 120 $SOLVER --profile-hlo --sizes 256,16384,131072 --budgets 30,32,64
    TAIL=30 step solver 150 $SOLVER --sizes 256,16384,131072 --budgets 30,32,64 --reference-max 4096 \
      --json "$OUT/solver.json"
    TAIL=12 step solver_scan 60 $SOLVER --sizes 256 --budgets 30,64 --schedule scan --reference-max 0
    TAIL=12 step solver_devback 60 $SOLVER --sizes 256 --budgets 30,32,64 --reference-max 0 \
      --host-backtrack-max 0
    ;;
  hybrid)
    TAIL=40 step hybrid 330 $BENCH --presets qwen3.5-0.8b-group,qwen3.5-0.8b --lengths 2048,8192,16384 \
      --emit 1,8,32 --emit-interleaved --repeats 5 --check-resume --check-emission 32 \
      ${BACKENDS:+--backend $BACKENDS} --out "$OUT/hybrid.json"
    ;;
  resume)
    # a call of its own: past 561 s on a fresh machine (thirteenth session: every program of the
    # static step loop compiles), 93 s with the persistent compilation cache warm
    TAIL=40 step resume 580 python3 -m sparse_prefix.experiments.bench_resume \
      --presets qwen3.5-0.8b --length 8192 --overlaps 0.5,0.9,0.98 --repeats 6 --out "$OUT/resume.json"
    ;;
  head)
    # the one-row LM head and the embedding lookup vs XLA's plain lowering (~30 s warm)
    TAIL=20 step head 150 python3 -m sparse_prefix.experiments.bench_head \
      --presets qwen3.5-0.8b,mamba2-1.3b --repeats 50 --out "$OUT/head.json"
    ;;
  kernels)
    TAIL=40 step kernels 240 python3 -m sparse_prefix.experiments.bench_kernels --preset mamba2-1.3b \
      --repeats 20
    ;;
  mamba)
    TAIL=40 step mamba 420 $BENCH --presets mamba2-130m,mamba2-1.3b --lengths 2048,8192,16384 \
      --emit 1,8,32 --emit-interleaved --repeats 5 --peer --peer-dtypes float32 --check-resume \
      --check-emission 32 ${BACKENDS:+--backend $BACKENDS} --out "$OUT/mamba.json"
    ;;
  cache-out)
    if [ -d /tmp/jaxcache ]; then
      (cd /tmp && tar cf - jaxcache | xz -1 -T0 | split -b 8M - "$OUT/jaxcache.part.")
      echo "compilation cache: $(ls /tmp/jaxcache | wc -l) entries, $(cat "$OUT"/jaxcache.part.* | wc -c) bytes in $(ls "$OUT"/jaxcache.part.* | wc -l) parts"
    else
      echo "compilation cache: /tmp/jaxcache is empty"
    fi
    ;;
  replays)
    preset=${2:-qwen3.5-0.8b-group} budget=${3:-200}
    # the static step loop (the commit overlaps the prefill) compiles one program per step count:
    # 22 for System Prompts, 263 s cold on the group preset; the 24-layer stack (not measured static)
    # replays on the dynamic loop, whose two programs compiled in 44 s
    loop=static; [ "$preset" = qwen3.5-0.8b ] && loop=dynamic
    for dataset in system-prompts quality; do
      groups=""; [ "$dataset" = system-prompts ] && groups="--sample-groups 34"
      TAIL=25 step "timed-$dataset-$preset" $((budget + 90)) python3 -m sparse_prefix.experiments.timed \
        --dataset "$dataset" --trace "traces/$dataset.jsonl.xz" $groups --preset "$preset" \
        --step-loop "$loop" --background-resolve --budget-s "$budget" --rounds "${ROUNDS:-1}" \
        ${CMDBUF:+--command-buffers $CMDBUF} \
        --out "$OUT/timed-$dataset-$preset"
    done
    ;;
  *)
    echo "unknown phase $1"; exit 2 ;;
esac
done
