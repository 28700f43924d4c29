#!/usr/bin/env bash
# The GPU checks still owed by issues 3, 4 and 6, as device calls (each under the 600 s limit; each writes at most 8
# files to $OUT: the device returns no more; the span stages keep only their logs). Stages run in the order given,
# from the repo root:
#
#     bash benchmarks/gpu_session.sh decode     # issue 4: GPU cache tests + gpu_decode.py on the current kernels
#     bash benchmarks/gpu_session.sh checks     # issue 3: every gpu_triton.py check but fp32 d=128 (incl. compile)
#     bash benchmarks/gpu_session.sh suite1     # issue 6: the GPU protocol's standard problem, deg 1, decode
#     bash benchmarks/gpu_session.sh suite2     # issue 6: the rest (d 32/128, deg 4), extending suite1's JSON
#     bash benchmarks/gpu_session.sh large      # issue 3: deg 3/4 kernels at states past 2**31 elements
#     bash benchmarks/gpu_session.sh short      # issue 3: time the single-chunk calls (t = 1024)
#     bash benchmarks/gpu_session.sh span-checks span-time   # issue 3: RETENTION_TRITON_SPAN=scan vs dot
#     bash benchmarks/gpu_session.sh checks:deg1,t3000       # issue 3: the checks whose names contain deg1 or t3000
#     bash benchmarks/gpu_session.sh compile                 # issue 3: the torch.compile(fullgraph=True) checks
#     bash benchmarks/gpu_session.sh quick-checks profile    # issue 3: quick oracle checks, then every deg-2 kernel
#     bash benchmarks/gpu_session.sh profile-lite ratios     # issue 3: deg 2 kernels as tuned at 64k and 16k, memory
#     bash benchmarks/gpu_session.sh intra-sweep             # issue 3: the intra-chunk part alone, FA tile shapes
#     bash benchmarks/gpu_session.sh profile1                # issue 3: deg 1's whole time, memory, top operations
#     bash benchmarks/gpu_session.sh quick-checks ratios     # issue 3: ... then deg 1 / 2 against cuDNN SDPA, 4k-64k
#     bash benchmarks/gpu_session.sh chunk-sweep             # issue 3: deg 2 chunk sizes at 4k-64k (the default's evidence)
#     bash benchmarks/gpu_session.sh d128-checks throughput  # issue 3: the d = 128 checks; issue 8: train at 16k
#     bash benchmarks/gpu_session.sh ab          # issue 3: these kernels against dist/ab-ref's in one call (gpu_ab.py)
#     bash benchmarks/gpu_session.sh asm         # issue 3: registers / spills / wgmma per deg-2 config (kernel_asm.py)
#     bash benchmarks/gpu_session.sh host        # issue 3: host time of one fwd+bwd against the GPU's (host_overhead.py)
#     bash benchmarks/gpu_session.sh host-ab     # issue 3: the same for dist/ab-ref's kernels, then the working tree's
#
# Then unpack $OUT/results.tar.gz into benchmarks/results/ (and `python benchmarks/plots.py --docs <json>` for the suite).
#
# Compiling and autotuning take most of a fresh machine's time. The Triton cache (compiled kernels, autotune
# results) comes back as $OUT/triton-cache.tar.gz (when under 16 MB and the stages left room among the 8 files a
# call returns); put it at dist/triton-cache.tar.gz and carry "dist" in the next call: kernels whose source did
# not change are then neither compiled nor tuned again.
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=packages/retention-core/src:packages/retention-kernels/src:packages/retention-train/src
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/retention-triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
if [ -f dist/triton-cache.tar.gz ] && tar -xzf dist/triton-cache.tar.gz -C "$TRITON_CACHE_DIR"; then
  echo "triton cache restored: $(find "$TRITON_CACHE_DIR" -type f | wc -l) files"
fi
finish() {
  # A device call returns at most 8 files: on the device ($OUT not the repo's results folder) the results travel
  # as one results.tar.gz, beside the Triton cache.
  if [ "$OUT" != benchmarks/results ] && [ -n "$(ls -A "$OUT")" ]; then
    tar -czf /tmp/gpu-session-results.tar.gz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/gpu-session-results.tar.gz "$OUT/results.tar.gz"
  fi
  [ "$(find "$OUT" -type f | wc -l)" -lt 8 ] || { echo "triton cache not returned: 8 result files already"; return; }
  tar -czf "$OUT/triton-cache.tar.gz" -C "$TRITON_CACHE_DIR" . 2>/dev/null
  if [ "$(stat -c %s "$OUT/triton-cache.tar.gz" 2>/dev/null || echo 0)" -gt 16000000 ]; then
    rm -f "$OUT/triton-cache.tar.gz"; echo "triton cache over 16 MB: not returned"
  fi
}
trap finish EXIT
# One device call runs at most 600 s: every stage's timeout is cut to what is left of GPU_SESSION_BUDGET seconds
# (stages that would get less than 30 s are skipped), so a call that asks for too much still ends in time to
# return its files.
BUDGET=${GPU_SESSION_BUDGET:-570}
limit() { local left=$((BUDGET - SECONDS)); echo $(( $1 < left ? $1 : left )); }

[ $# -gt 0 ] || set -- help
for stage in "$@"; do
if [ "$(limit 30)" -lt 30 ]; then echo "stage $stage skipped: the call's budget is spent"; continue; fi
case "$stage" in
  decode)
    timeout "$(limit 200)" python3 -m pytest -q -p no:cacheprovider packages/retention-core/tests/test_cache.py -k gpu \
      packages/retention-kernels/tests/test_decode.py > "$OUT/gpu_cache_tests.log" 2>&1
    echo "decode tests rc=$?"; tail -3 "$OUT/gpu_cache_tests.log"
    timeout "$(limit 330)" python3 benchmarks/gpu_decode.py --out "$OUT" > "$OUT/gpu_decode_log.txt" 2>&1
    echo "gpu_decode rc=$?"; tail -20 "$OUT/gpu_decode_log.txt"
    ;;
  checks)
    # all but fp32 at d = 128 (about a minute more: "checks:fp32 deg2 d128", see checks:PARTS), to stay in one call
    timeout "$(limit 560)" python3 benchmarks/gpu_triton.py --checks-only --exclude "fp32 deg2 d128" \
      --json "$OUT/gpu_triton_checks.json" > "$OUT/gpu_triton_checks_log.txt" 2>&1
    echo "checks rc=$?"; grep -E "FAIL|Error" "$OUT/gpu_triton_checks_log.txt" | head; tail -25 "$OUT/gpu_triton_checks_log.txt"
    ;;
  suite1)
    # the standard problem (deg 2, d 64) and deg 1, every pass and length, the decode suite and the breakdown
    timeout "$(limit 580)" python3 benchmarks/suite.py --degs 2,1 --head-dims 64 --tag part1 --time-budget 520 --out "$OUT" \
      > "$OUT/suite-part1-log.txt" 2>&1
    echo "suite part 1 rc=$?"; tail -6 "$OUT/suite-part1-log.txt"
    ;;
  suite2)
    # the rest of the protocol (d 32 / 128, deg 4), keeping part 1's rows: carry part 1's JSON in dist/
    part1=$(ls dist/*-part1.json | tail -1)
    timeout "$(limit 580)" python3 benchmarks/suite.py --degs 2,1,4 --head-dims 64,32,128 --extend "$part1" --no-decode \
      --no-breakdown --time-budget 540 --out "$OUT" > "$OUT/suite-log.txt" 2>&1
    echo "suite rc=$?"; tail -6 "$OUT/suite-log.txt"
    ;;
  short)
    # issue 3: the single-chunk calls (t = 1024 = the default chunk) that now skip the state passes, deg 2 at
    # d 64 and 128 (before: 3.0 / 16.0 ms fwd, 12.8 / 57.4 ms fwd+bwd in nvidia-h200-2026-11-22.json)
    timeout "$(limit 300)" python3 benchmarks/suite.py --quick --methods 'retention[triton],sdpa[cudnn]' --degs 2 \
      --head-dims 64,128 --contexts 1024 --passes fwd,bwd,fwd+bwd --no-decode --no-breakdown --no-plots \
      --tag short --out "$OUT" > "$OUT/suite_short_log.txt" 2>&1
    echo "short rc=$?"; grep -E "retention\[triton\]" "$OUT/suite_short_log.txt" | tail -6
    ;;
  large)
    # issue 3: the minimal-layout kernels (deg 3/4) at states past 2**31 elements, one process per case
    timeout "$(limit 430)" python3 benchmarks/gpu_large_state.py --variants --out "$OUT" > "$OUT/gpu_large_state_log.txt" 2>&1
    echo "large states rc=$?"; cut -c1-220 "$OUT/gpu_large_state_log.txt" | tail -40
    ;;
  span-checks)
    # the gate-gradient spanning sums by a row scan: the strong-gate checks
    RETENTION_TRITON_SPAN=scan timeout "$(limit 250)" python3 benchmarks/gpu_triton.py --checks-only --quick \
      > "$OUT/span_scan_checks_log.txt" 2>&1
    echo "scan checks rc=$?"; grep -E "FAIL|Error|dlog_G strict" "$OUT/span_scan_checks_log.txt" | head -20
    ;;
  span-time)
    # ... and its time against the ones-matrix product (deg 2 at 64k, fwd and fwd+bwd)
    for mode in dot scan; do
      RETENTION_TRITON_SPAN=$mode timeout "$(limit 150)" python3 benchmarks/suite.py --quick --methods 'retention[triton]' \
        --degs 2 --contexts 65536 --no-decode --no-breakdown --tag "span-$mode" --out "/tmp/span-$mode" \
        > "$OUT/span_${mode}_log.txt" 2>&1
      echo "span=$mode rc=$?"; grep -E "retention\[triton\]" "$OUT/span_${mode}_log.txt" | tail -4
    done
    ;;
  checks:*)
    # the checks whose names contain one of the comma-separated parts, e.g. checks:deg1,t3000 (no compile check).
    # "checks:fp32 deg2 d128" took 63 s on an H200 once its configs were cut to the small ones (before: every call
    # ran out of time compiling pipelined configs that do not fit).
    timeout "$(limit 550)" python3 benchmarks/gpu_triton.py --checks-only --no-compile --only "${stage#checks:}" \
      > "$OUT/checks_only_log.txt" 2>&1
    echo "checks ${stage#checks:} rc=$?"; grep -E "^\[|FAIL|Error|checks" "$OUT/checks_only_log.txt" | cut -c1-200
    ;;
  compile)
    # the torch.compile(fullgraph=True) checks alone (no check name contains "torch.compile")
    timeout "$(limit 200)" python3 benchmarks/gpu_triton.py --checks-only --only torch.compile > "$OUT/compile_log.txt" 2>&1
    echo "compile rc=$?"; grep -E "^\[|checks" "$OUT/compile_log.txt" | cut -c1-200
    ;;
  quick-checks)
    timeout "$(limit 350)" python3 benchmarks/gpu_triton.py --checks-only --quick > "$OUT/checks_quick_log.txt" 2>&1
    echo "quick checks rc=$?"; grep -E "FAIL|Error" "$OUT/checks_quick_log.txt" | head; tail -4 "$OUT/checks_quick_log.txt"
    ;;
  profile)
    # every deg-2 kernel of one fwd+bwd at t = 65536 alone: as tuned, intra-chunk only, without gates, a config sweep
    timeout "$(limit 290)" python3 benchmarks/gpu_kernel_profile.py --out "$OUT" > "$OUT/gpu_kernel_profile_log.txt" 2>&1
    echo "profile rc=$?"; grep -E "tuned|intra|no gates|whole|sum of|peak memory" "$OUT/gpu_kernel_profile_log.txt"
    ;;
  intra-sweep)
    # the intra-chunk part of the output and dQ kernels alone (NP = 0) under flash-attention's tile shapes: what
    # a separate intra-chunk kernel would gain (gpu_kernel_profile.py --intra-sweep)
    timeout "$(limit 290)" python3 benchmarks/gpu_kernel_profile.py --intra-sweep --out "$OUT" \
      > "$OUT/gpu_kernel_profile_intra_log.txt" 2>&1
    echo "intra-sweep rc=$?"; grep -E "tuned|intra|whole" "$OUT/gpu_kernel_profile_intra_log.txt"
    ;;
  profile-lite)
    # deg 2 kernels as tuned (no variants): times, peak memory above inputs/outputs/gradients, top torch ops; at
    # t = 65536 (h 8), then at issue 8's training shape (t 16384, h 12, Q/K/V views of one projection)
    timeout "$(limit 150)" python3 benchmarks/gpu_kernel_profile.py --no-sweep --out "$OUT" > "$OUT/gpu_kernel_profile_log.txt" 2>&1
    echo "profile deg 2 rc=$?"; grep -vE "Warning|_warn_once" "$OUT/gpu_kernel_profile_log.txt" | head -30
    timeout "$(limit 90)" python3 benchmarks/gpu_kernel_profile.py --no-sweep --strided --t 16384 --heads 12 --out "$OUT" \
      > "$OUT/gpu_kernel_profile_t16384_h12_log.txt" 2>&1
    echo "profile 16k rc=$?"; grep -vE "Warning|_warn_once" "$OUT/gpu_kernel_profile_t16384_h12_log.txt" | head -30
    ;;
  profile1)
    # deg 1 at t = 65536: the whole fwd+bwd, its peak memory and the top operations
    timeout "$(limit 90)" python3 benchmarks/gpu_kernel_profile.py --deg 1 --out "$OUT" > "$OUT/gpu_kernel_profile_deg1_log.txt" 2>&1
    echo "profile deg 1 rc=$?"; grep -vE "Warning|_warn_once" "$OUT/gpu_kernel_profile_deg1_log.txt" | head -20
    ;;
  ratios)
    # the standard problem's ratios (d 64, h 8, bf16, gates, b t = 65536) at 4k / 16k / 64k, deg 2 and deg 1
    timeout "$(limit 230)" python3 benchmarks/suite.py --quick --methods 'retention[triton],sdpa[cudnn]' --degs 2,1 \
      --head-dims 64 --contexts 4096,16384,65536 --passes fwd,fwd+bwd --no-decode --no-breakdown --no-plots \
      --time-budget "$(( $(limit 230) - 30 ))" --tag ratios --out "$OUT" > "$OUT/suite_ratios_log.txt" 2>&1
    echo "ratios rc=$?"; grep -E "retention\[triton\]|sdpa" "$OUT/suite_ratios_log.txt" | tail -14
    ;;
  chunk-sweep)
    # deg 2 fwd and fwd+bwd with chunks 256-2048 at 4k / 16k / 64k, SDPA in the same run: default_chunk_size's
    # evidence (times, ratios, peak memory)
    timeout "$(limit 420)" python3 benchmarks/gpu_triton.py --skip-checks --degs 2 --ts 4096,16384,65536 \
      --chunks "${SWEEP_CHUNKS:-256,512,1024,2048}" --json "$OUT/gpu_chunk_sweep.json" > "$OUT/gpu_chunk_sweep_log.txt" 2>&1
    echo "chunk-sweep rc=$?"; grep -E "^\|" "$OUT/gpu_chunk_sweep_log.txt"
    ;;
  d128-checks)
    timeout "$(limit 300)" python3 benchmarks/gpu_triton.py --checks-only --only d128 > "$OUT/checks_d128_log.txt" 2>&1
    echo "d128 checks rc=$?"; grep -E "^\[|FAIL|Error|checks" "$OUT/checks_d128_log.txt" | cut -c1-160
    ;;
  throughput)
    # issue 8: the 12-layer 768-wide GPT at context 16k, sdpa against power deg 1 / deg 2 (and deg 2 at chunk 512)
    timeout "$(limit 240)" python3 benchmarks/train_gpu.py throughput --sweep_deg1 256 --sweep_deg2 512 --out "$OUT" \
      > "$OUT/train_throughput_log.txt" 2>&1
    echo "throughput rc=$?"; tail -12 "$OUT/train_throughput_log.txt"
    ;;
  host|host-ab)
    # the host's time to issue one fwd+bwd against the GPU's (graph replay), syncs, top host functions: deg 1 and
    # 2; host-ab: dist/ab-ref's kernels first, then the working tree's (one call: host speed varies between calls)
    sides=tree; [ "$stage" = host-ab ] && sides="ab-ref tree"
    for side in $sides; do
      kernels=packages/retention-kernels/src
      [ "$side" = ab-ref ] && kernels=dist/ab-ref/packages/retention-kernels/src
      mkdir -p "$OUT/host-$side"
      for deg in 1 2; do
        PYTHONPATH=packages/retention-core/src:$kernels timeout "$(limit 120)" python3 benchmarks/host_overhead.py \
          --deg $deg --out "$OUT/host-$side" > "$OUT/host-$side/deg${deg}_log.txt" 2>&1
        echo "host $side deg $deg rc=$?"; grep -E "^deg|^synchron" "$OUT/host-$side/deg${deg}_log.txt" | cut -c1-200
      done
    done
    ;;
  ab)
    # the working tree's kernels against an earlier version's, timed in this one call: carry "dist" with
    # dist/ab-ref made by `git archive REF packages/retention-kernels/src | tar -x -C dist/ab-ref`; AB_CASES
    # (deg:t:b, comma-separated) narrows the cases when the call has little time left; AB_VARIANTS (folders made
    # the same way from other branches, comma-separated) are timed beside the two, in AB_VARIANT_CASES (default:
    # every case)
    timeout "$(limit 500)" python3 benchmarks/gpu_ab.py --cases "${AB_CASES:-2:65536:1,1:4096:16}" \
      --variants "${AB_VARIANTS:-}" --variant-cases "${AB_VARIANT_CASES:-${AB_CASES:-2:65536:1,1:4096:16}}" \
      --out "$OUT" > "$OUT/gpu_ab_log.txt" 2>&1
    echo "ab rc=$?"; grep -vE "Warning|_warn_once" "$OUT/gpu_ab_log.txt" | tail -30
    ;;
  asm)
    # registers, spills, shared memory and MMA kind of every deg-2 config, as this machine's Triton compiles them
    timeout "$(limit 200)" python3 benchmarks/kernel_asm.py --all-configs --kernels pair_ --t 65536 --out "$OUT" \
      > "$OUT/kernel_asm_log.txt" 2>&1
    echo "asm rc=$?"; grep -vE "Warning|warn_once" "$OUT/kernel_asm_log.txt" | cut -c1-220 | tail -30
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh STAGE... (decode checks checks:PARTS compile suite1 suite2 short large span-checks span-time quick-checks profile profile-lite intra-sweep profile1 ratios chunk-sweep d128-checks throughput ab asm)" >&2
    exit 2
    ;;
esac
done
