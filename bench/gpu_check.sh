#!/usr/bin/env bash
# GPU check for a lent GPU machine (the device tool's `run`: one H200, 16 CPU cores, python 3.12,
# torch 2.11+cu130, triton 3.6, pytest, pytest-xdist, pytest-timeout, pytest-benchmark there).
# The whole script is capped at 330 s: every stage runs under its own timeout and the stage
# budgets below add up to 330 s, the build included, so that a session's 15 minutes of device
# time hold one run (start-up 1-2 min + 330 s) AND a rerun. A pytest stage gets SIGINT at its
# budget (`timeout -s INT -k 10`): pytest then prints its summary and durations; only a stage
# that ignores SIGINT (a hung CUDA call) runs up to 10 s more before SIGKILL.
#
#   stage           budget  runs                                                       tests (GPU ids)
#   setup             10 s  torch + GPU check, nvidia-smi, carried wheels (in parallel)     -
#   build             75 s  setup.py build_ext --inplace (MAX_JOBS=8) | CMake + the         -
#                           standalone divergence_example | warm-up of the benchmarks'
#                           Triton and torch.compile caches (the bench ids marked [w] below,
#                           KDKERNELS_DISABLE_EXTENSION=1), all side by side; backend_info
#   cuda              20 s  test_divergence.py, CUDA backend, both kernels                  397
#                           (-k "(cuda and not triton) or devices_differ": ids cuda and
#                           cuda-cluster, 198 each, + test_devices_differ)
#   triton            35 s  test_divergence.py on Triton on the GPU (-k triton-cuda, less   183 of 198
#                           the 15 cases listed under "left out"; KDK_GPU_FULL=1: all 198)
#   families          45 s  test_dac_kl.py, test_mixing_matrix.py, test_token_relation.py,  219 (38+81+100)
#                           -k triton-cuda (all of them; MOHAWK's two torch.compile tests
#                           first, token relations' test_nan_rule_per_sequence (32) last)
#   fused             20 s  test_fused_linear.py -k "cuda and not emulated": triton-cuda,    162 (54 each)
#                           cuda, cuda-cluster
#   tp                15 s  test_vocab_parallel.py -k "world_of_one and cuda" (NCCL, one       3
#                           rank: cuda-triton, cuda-cuda, cuda-reference), no xdist
#   sparse            20 s  test_sparse.py -k "cuda and not cluster": triton-cuda (143) and  285
#                           cuda (142: ATen ops on the GPU; cuda-cluster would repeat them,
#                           the sparse family does not run the CUDA divergence kernel)
#   bench             30 s  divergence fwd+bwd, bf16 N=8192 V=128256, fkl and jsd: ours      12
#                           (cuda, triton[w]), Liger[w], torch.compile[w], eager, then the
#                           opt-in cuda-cluster kernel
#   bench_families    30 s  MOHAWK bf16 H=32 T=4096 (triton[w], reference), token relations  10
#                           kl bf16 batch 8 R=12 T=4096 d=64 (triton[w], reference), DAC-KL
#                           bf16 N=8192 V=128256 (triton[w], reference), MOHAWK triton at
#                           T=16384 and 32768, then torch.compile of the token-relation[w] and
#                           the sort-based DAC-KL[w] references (compile rows last: the ones
#                           a cold inductor cache may push past the budget)
#   bench_fused       15 s  fused linear fkl bf16 N=8192 H=4096 V=128256, 3 rounds: ours      5
#                           (cuda, triton[w]), bare matmuls, Liger's Triton[w] and chunked
#   bench_sparse      12 s  sparse teacher fkl fp32 N=8192 V=151936 K=64, 3 rounds: ours      7
#                           (renormalize, bucket), DistillKit, TRL top-k; fused linear H=896:
#                           ours, bare matmuls, DistillKit
#   finish             3 s  bench.json merged, file count                                   -
#                   ------
#                    330 s
# The test counts are those a GPU machine collects (the dry run below counts them with
# torch.cuda.is_available patched; helpers.kernel_cases and the families' KERNELS lists add the
# ids triton-cuda, cuda and cuda-cluster where a GPU is visible, and drop triton-interp).
# Test stages run with pytest-xdist (-n 8 --dist load, where `import xdist` works; KDK_GPU_XDIST
# sets -n, 0 = none) and share TRITON_CACHE_DIR=/tmp/kdk-triton-cache: those stages' time is the
# Triton JIT, one compile per specialization (measured under the interpreter with the GPU's
# block cap: triton 114 distinct kernels (136 for all 198), families ~92, fused 30, sparse 13;
# 0.4-1.7 s each on one core). A small plugin written to $WORK (kdk_order.py) moves the slow
# tests (torch.compile) to the front and test_nan_rule_per_sequence to the back; -v puts each
# test's result in the log as it completes, so a stage that is CUT still reports.
# Left out on the GPU: test_divergence.py's CPU cases (cpu, reference: CI's) and
# test_triton_kernels_compile_for_gpus (CI runs it without a GPU; here it alone compiled 96+
# kernels); from the triton stage (back with KDK_GPU_FULL=1): test_neg_inf_in_both (6),
# test_opcheck, test_incoming_gradient_scales, test_second_backward_raises,
# test_double_backward_is_refused, test_identical_distributions, test_taid_with_ties,
# test_large_logits_at_large_temperature (3) — 22 of the 136 kernels; the one-sided gradient
# kernels stay in (test_no_grad_and_teacher_without_grad, test_nan_rule_taid_and_one_sided_*).
# Also out: the vocabulary-parallel world-2/3 tests (gloo, CPU), the families' reference and cpu
# cases, the benchmarks' other shapes (bf16 V=32000/262144, fp32; MOHAWK's reference beyond
# T=4096, which runs out of memory; fused-linear jsd, N=1024, eager, torch.compile, TRL; sparse
# top-k groups) and the token-relation mse loss. KDK_GPU_ONLY="triton families" with
# KDK_GPU_T_triton=90 etc. reruns a stage that was CUT with more time.
# Bench knobs that would help and do not exist: KDK_BENCH_ROUNDS for bench_divergence.py (fixed
# at 10 rounds + 2 warm-ups), an impl list for bench_divergence.py, bench_mixing_matrix.py and
# bench_fused_linear.py (KDK_BENCH_IMPLS; node ids select them here, so renaming a case id breaks
# this script: the dry run catches that) and MOHAWK's reference only up to a T.
#
# Knobs: KDK_GPU_ONLY="s1 s2" runs only those stages, KDK_GPU_SKIP="s1 s2" drops them (setup and
# finish always run; "warm" skips the warm-up inside build); KDK_GPU_T_<stage>=SECS overrides a
# budget; KDK_GPU_FULL=1 (all triton-cuda divergence tests); KDK_GPU_XDIST (8);
# KDK_HBM_GBPS (4800, the H200's) sets the roofline column; OUT (/tmp/kdkernels-gpu-check).
# KDK_GPU_DRY=1 (a machine without a GPU): no CUDA check, the build only if the CPU extension is
# missing (CMake configures only), every pytest stage with --collect-only -q under a patched
# torch.cuda.is_available (so the GPU ids collect), and the same logs, summary and file count.
#
# Prepare here (no GPU needed), once:   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl liger-kernel==0.8.5
# Then run there:   bash bench/gpu_check.sh        (carry: [".whl"]; timeout_s 360 or more)
# A rerun on the same (still warm) machine reuses build/, /tmp/kdk-cmake and the Triton and
# inductor caches under /tmp, so its build and compile times are short.
# $OUT gets 5 files (the device tool brings back 8): summary.txt (nvidia-smi's header, every
# stage's one-line result with pass/fail counts, "CUT at N s" where a stage ran out, failures,
# every benchmark result as it is measured (KDK_BENCH_RECORD) and the closing tables), build.log
# (setup.py, CMake + example, warm-up, nvidia-smi), tests.log (all test stages), bench.txt (all
# benchmark stages), bench.json (their pytest-benchmark JSON, merged). Copy the numbers into
# bench/results/DATE-GPU.md and the README table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kdkernels-gpu-check}
WORK=${KDK_GPU_WORK:-/tmp/kdk-gpu-work}
DRY=${KDK_GPU_DRY:-0}
mkdir -p "$OUT"
rm -f "$OUT/summary.txt" "$OUT/build.log" "$OUT/tests.log" "$OUT/bench.txt" "$OUT/bench.json"
rm -rf "$WORK" && mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/kdk-triton-cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/kdk-inductor-cache}
export PYTHONPATH=$PWD:$WORK${PYTHONPATH:+:$PYTHONPATH}
export KDK_HBM_GBPS=${KDK_HBM_GBPS:-4800}
# The benchmarks' cases (the warm-up and the bench stages must see the same: the ids depend on them)
export KDK_BENCH_CASES=bfloat16:8192x128256 KDK_BENCH_KINDS=fkl,jsd KDK_BENCH_MODES=fwd+bwd
export KDK_MM_T=4096,16384,32768 KDK_MM_H=32
export KDK_TR_T=4096 KDK_TR_LOSS=kl KDK_TR_IMPLS=ours,reference,compile
export KDK_DAC_N=8192 KDK_DAC_V=128256 KDK_DAC_IMPLS=ours,reference,compile
export KDK_FL_CASES=bfloat16:8192x4096x128256 KDK_FL_ROUNDS=3
export KDK_SP_CASES=float32:8192x151936x64 KDK_SP_GROUPS=sparse,fused KDK_SP_ROUNDS=3
start=$(date +%s)
now() { echo $(( $(date +%s) - start )); }
say() { echo "[$(now)s] $*" | tee -a "$OUT/summary.txt"; }
add() { tee -a "$OUT/summary.txt"; }  # stdin into the summary, unprefixed
want() {  # stage $1 selected by KDK_GPU_ONLY / KDK_GPU_SKIP?
  [[ -n ${KDK_GPU_ONLY:-} && " $KDK_GPU_ONLY " != *" $1 "* ]] && return 1
  [[ " ${KDK_GPU_SKIP:-} " == *" $1 "* ]] && return 1
  return 0
}
budget() { local v="KDK_GPU_T_$1"; echo "${!v:-$2}"; }

# Test order inside a stage: KDK_ORDER_FIRST / KDK_ORDER_LAST name test functions (stable sort;
# every xdist worker sorts alike). The dry run's collector: torch.cuda.is_available patched, so
# the ids a GPU machine collects are collected here.
cat > "$WORK/kdk_order.py" <<'EOF'
import os


def pytest_collection_modifyitems(config, items):
    first = os.environ.get("KDK_ORDER_FIRST", "").split()
    last = os.environ.get("KDK_ORDER_LAST", "").split()
    if first or last:
        def rank(item):
            name = getattr(item, "originalname", None) or item.name.split("[")[0]
            return 0 if name in first else 2 if name in last else 1
        items[:] = sorted(items, key=rank)
EOF
cat > "$WORK/kdk_fake_cuda.py" <<'EOF'
import sys

import torch

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
torch.cuda.get_device_name = lambda *a, **k: "dry run (torch.cuda patched)"
import kdkernels  # noqa: E402

_info = kdkernels.backend_info
kdkernels.backend_info = lambda: {**_info(), "cuda": True}
import pytest  # noqa: E402

sys.exit(pytest.main(sys.argv[1:]))
EOF

# ----------------------------------------------------------------------------------- setup
b=$(budget setup 10)
say "kdkernels GPU check$([[ $DRY == 1 ]] && echo ' (DRY RUN: collection only)'), $(date -u '+%F %T UTC'), commit" \
    "$(git rev-parse --short HEAD 2>/dev/null || echo '?') ($(git status --porcelain 2>/dev/null | wc -l) changed files)"
say "setup ($b s): torch and the GPU, nvidia-smi, carried wheels"
( timeout -k 2 "$((b - 2))" nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1 ) &
smi_job=$!
if ls .whl/*.whl > /dev/null 2>&1; then  # carried wheels (Liger)
  ( timeout -k 2 "$((b - 2))" python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
      .whl/*.whl > "$WORK/pip.log" 2>&1; echo "exit $?" >> "$WORK/pip.log" ) &
  pip_job=$!
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
info=$(timeout -k 2 "$((b - 2))" python3 - <<'EOF' 2>&1
import importlib.util as u, os, sys
import torch
cuda = torch.cuda.is_available()
cap = "".join(map(str, torch.cuda.get_device_capability())) if cuda else ""
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{torch.cuda.get_device_name() + ' sm_' + cap if cuda else 'no CUDA device'}, triton {tv}, "
      f"xdist {'yes' if u.find_spec('xdist') else 'no'}, {os.cpu_count()} cpus, python {sys.version.split()[0]}")
print(f"ARCH={cap} CUDA={int(cuda)} XDIST={int(u.find_spec('xdist') is not None)}")
EOF
)
echo "$info" | grep -v '^ARCH=' | tail -3 | add
ARCH=$(echo "$info" | sed -n 's/^ARCH=\([0-9]*\) .*/\1/p')
CUDA=$(echo "$info" | sed -n 's/.* CUDA=\([01]\) .*/\1/p')
HAVE_XDIST=$(echo "$info" | sed -n 's/.* XDIST=\([01]\)$/\1/p')
wait "$smi_job"
if [[ ${pip_job:-} ]]; then
  wait "$pip_job"
  say "carried wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')-> /tmp/site, pip $(tail -1 "$WORK/pip.log")"
fi
if [[ $DRY != 1 ]]; then
  head -12 "$WORK/nvidia-smi.txt" | add
  if [[ $CUDA != 1 ]]; then
    say "no CUDA device visible to torch: nothing to check (KDK_GPU_DRY=1 for a dry run)"; exit 2
  fi
fi
XDIST=()
n_workers=${KDK_GPU_XDIST:-8}
if [[ $HAVE_XDIST == 1 && $n_workers != 0 ]]; then
  XDIST=(-n "$n_workers" --dist load)
fi

# ----------------------------------------------------------------------------------- build
count_results() {  # per-test lines of -v (plain: "id STATUS [ n%]"; xdist: "[gwN] [ n%] STATUS id")
  awk '{
    if (match($0, /^\[gw[0-9]+\] \[ *[0-9]+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) /)) {
      n = split(substr($0, RSTART, RLENGTH), a, " "); s = a[n]
    } else if (match($0, / (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) +\[ *[0-9]+%\]$/)) {
      split(substr($0, RSTART, RLENGTH), a, " "); s = a[1]
    } else next
    c[s]++; done++
  } END {
    printf "%d passed, %d failed, %d errors, %d skipped", c["PASSED"], c["FAILED"], c["ERROR"], c["SKIPPED"]
    if (c["XFAIL"] + c["XPASS"]) printf ", %d xfail/xpass", c["XFAIL"] + c["XPASS"]
    printf " (%d results)", done
  }' "$1"
}
selected() {
  local n
  n=$(grep -Eo '[0-9]+ selected' "$1" | head -1 | grep -Eo '[0-9]+')
  [[ $n ]] || n=$(grep -Eo 'workers \[[0-9]+ items?\]' "$1" | head -1 | grep -Eo '[0-9]+')
  [[ $n ]] || n=$(grep -Eo 'collected [0-9]+ items?' "$1" | head -1 | grep -Eo '[0-9]+')
  echo "${n:-?}"
}
CPU_BUILT=0 CUDA_BUILT=0
WARM_IDS=(
  "bench/bench_divergence.py::test_divergence[bfloat16-8192x128256-fkl-torch.compile-fwd+bwd]"
  "bench/bench_divergence.py::test_divergence[bfloat16-8192x128256-jsd-torch.compile-fwd+bwd]"
  "bench/bench_token_relation.py::test_token_relation[compile-kl-4096]"
  "bench/bench_dac_kl.py::test_dac_kl[compile-128256]"
  "bench/bench_divergence.py::test_divergence[bfloat16-8192x128256-fkl-kdkernels-triton-fwd+bwd]"
  "bench/bench_divergence.py::test_divergence[bfloat16-8192x128256-jsd-kdkernels-triton-fwd+bwd]"
  "bench/bench_divergence.py::test_divergence[bfloat16-8192x128256-fkl-liger-fwd+bwd]"
  "bench/bench_divergence.py::test_divergence[bfloat16-8192x128256-jsd-liger-fwd+bwd]"
  "bench/bench_mixing_matrix.py::test_mixing_matrix[triton-4096]"
  "bench/bench_token_relation.py::test_token_relation[triton-kl-4096]"
  "bench/bench_dac_kl.py::test_dac_kl[triton-128256]"
  "bench/bench_fused_linear.py::test_fused_linear[bfloat16-8192x4096x128256-fkl-kdkernels-triton]"
  "bench/bench_fused_linear.py::test_fused_linear[bfloat16-8192x4096x128256-fkl-liger-triton]"
)
if want build; then
  b=$(budget build 75)
  t0=$(now)
  say "build ($b s): setup.py build_ext --inplace | CMake + divergence_example | benchmark warm-up"
  inner=$((b - 8))  # 8 s left for backend_info
  if [[ $DRY == 1 ]]; then
    if timeout 30 python3 -c "import sys, kdkernels; sys.exit(0 if kdkernels.backend_info()['cpu'] else 1)" \
        > /dev/null 2>&1; then
      echo "dry run: the CPU extension is built already, setup.py not run" > "$WORK/setup_py.log"
    else
      ( s=$(date +%s); KDKERNELS_FORCE_CUDA=0 MAX_JOBS=2 timeout -k 5 "$inner" python3 setup.py build_ext --inplace \
          > "$WORK/setup_py.log" 2>&1; echo "exit $? after $(( $(date +%s) - s )) s" >> "$WORK/setup_py.log" )
    fi
    ( s=$(date +%s); timeout -k 5 "$inner" cmake -S . -B /tmp/kdk-cmake-dry -DCMAKE_BUILD_TYPE=Release \
        > "$WORK/cmake.log" 2>&1; echo "exit $? after $(( $(date +%s) - s )) s (dry run: configure only)" >> "$WORK/cmake.log" )
    if want warm; then
      timeout -s INT -k 5 "$inner" python3 "$WORK/kdk_fake_cuda.py" "${WARM_IDS[@]}" --collect-only -q \
        -p no:cacheprovider > "$WORK/warm.log" 2>&1
      echo "exit $?" >> "$WORK/warm.log"
    fi
  else
    ( s=$(date +%s); MAX_JOBS=8 timeout -k 5 "$inner" python3 setup.py build_ext --inplace > "$WORK/setup_py.log" 2>&1
      echo "exit $? after $(( $(date +%s) - s )) s" >> "$WORK/setup_py.log" ) &
    setup_job=$!
    ( s=$(date +%s); timeout -k 5 "$inner" bash -c "cmake -S . -B /tmp/kdk-cmake -DCMAKE_CUDA_ARCHITECTURES=$ARCH \
        -DCMAKE_BUILD_TYPE=Release && cmake --build /tmp/kdk-cmake -j4 && /tmp/kdk-cmake/divergence_example" \
        > "$WORK/cmake.log" 2>&1; echo "exit $? after $(( $(date +%s) - s )) s" >> "$WORK/cmake.log" ) &
    cmake_job=$!
    if want warm; then  # fills the Triton and inductor caches of the bench stages (no extension needed)
      ( s=$(date +%s); KDKERNELS_DISABLE_EXTENSION=1 TORCHINDUCTOR_COMPILE_THREADS=2 timeout -s INT -k 5 "$inner" \
          python3 -m pytest "${WARM_IDS[@]}" --benchmark-only -v -p no:cacheprovider > "$WORK/warm.log" 2>&1
        echo "exit $? after $(( $(date +%s) - s )) s" >> "$WORK/warm.log" ) &
      warm_job=$!
    fi
    wait "$setup_job"; wait "$cmake_job"; [[ ${warm_job:-} ]] && wait "$warm_job"
  fi
  for f in setup_py cmake warm nvidia-smi; do
    [[ -f $WORK/$f.log || -f $WORK/$f.txt ]] || continue
    { echo "===== $f"; cat "$WORK/$f.log" 2>/dev/null || cat "$WORK/$f.txt"; } >> "$OUT/build.log"
  done
  firsterr() { grep -m2 -E 'error:|CMake Error|FAILED:|Error [0-9]+' "$1" | cut -c1-200 | tr '\n' ' '; }
  say "  setup.py: $(tail -1 "$WORK/setup_py.log") $(firsterr "$WORK/setup_py.log")"
  say "  cmake + example: $(tail -1 "$WORK/cmake.log"); example: $(grep -c '^ok ' "$WORK/cmake.log") ok," \
      "$(grep -c '^FAIL' "$WORK/cmake.log") FAIL $(grep -E '^FAIL|nothing to check' "$WORK/cmake.log" | head -3 | tr '\n' ' ')$(firsterr "$WORK/cmake.log")"
  if [[ -f $WORK/warm.log ]]; then
    if [[ $DRY == 1 ]]; then warm_n="$(grep -c '::' "$WORK/warm.log") collected"
    else warm_n=$(count_results "$WORK/warm.log"); fi
    say "  warm-up: $warm_n of ${#WARM_IDS[@]} cases; $(tail -1 "$WORK/warm.log")"
  fi
  say "  build stage: $(( $(now) - t0 )) s (budget $b s)"
else
  say "build: skipped (KDK_GPU_ONLY/KDK_GPU_SKIP)"
fi
binfo=$(timeout -k 2 8 python3 -c "import kdkernels; print(kdkernels.backend_info())" 2>&1 | tail -1)
say "backend_info: $binfo"
[[ $binfo == *"'cpu': True"* ]] && CPU_BUILT=1
[[ $binfo == *"'cuda': True"* ]] && CUDA_BUILT=1
if [[ $CPU_BUILT != 1 ]]; then  # no JIT build of csrc/ in every test process: the fallbacks
  export KDKERNELS_DISABLE_EXTENSION=1
  say "  the extension is not built: KDKERNELS_DISABLE_EXTENSION=1 from here on"
fi

# ------------------------------------------------------------------------- pytest stages
# stage NAME DEFAULT_BUDGET KIND(xdist|serial|bench) "description" -- pytest arguments
stage() {
  local name=$1 b kind=$3 desc=$4 dest=tests.log log rc t0 el cut=""
  b=$(budget "$name" "$2")
  shift 5
  [[ $kind == bench ]] && dest=bench.txt
  if ! want "$name"; then say "$name: skipped (KDK_GPU_ONLY/KDK_GPU_SKIP)"; return; fi
  log=$WORK/$name.log
  t0=$(now)
  say "$name ($b s): $desc"
  local -a cmd
  if [[ $DRY == 1 ]]; then
    cmd=(python3 "$WORK/kdk_fake_cuda.py" "$@" --collect-only -q -p no:cacheprovider -p kdk_order)
  else
    cmd=(python3 -m pytest "$@" -v -rfE -p no:cacheprovider -p kdk_order)
    [[ $kind != bench ]] && cmd+=(--durations=10)
    [[ $kind == xdist ]] && cmd+=("${XDIST[@]}")
  fi
  timeout -s INT -k 10 "$b" "${cmd[@]}" > "$log" 2>&1
  rc=$?
  el=$(( $(now) - t0 ))
  [[ $rc == 124 || $rc == 137 ]] && cut=", CUT at $el s (budget $b s)"
  { echo "===== $name: ${cmd[*]}"; cat "$log"; echo "===== $name: rc=$rc, $el s$cut"; } >> "$OUT/$dest"
  if [[ $DRY == 1 ]]; then
    say "  $name: dry: $(grep -c '::' "$log") collected (GPU-side ids), rc=$rc, $el s$cut;" \
        "first: $(grep -m1 '::' "$log" | cut -c1-120)"
  else
    local final
    final=$(grep -E '^=+ .* in [0-9.]+s' "$log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')
    say "  $name: $(count_results "$log") of $(selected "$log") selected; rc=$rc; $el s$cut${final:+; pytest: $final}"
  fi
  grep -E '^(FAILED|ERROR) |^ERROR:|^E +(ModuleNotFound|Import)Error' "$log" | head -8 | cut -c1-240 | sed 's/^/    /' | add
  if [[ $kind == bench ]]; then  # the closing table (ratios, GB/s, % of HBM)
    awk '/kdkernels: time and peak memory/ {on = 1} /^-+ benchmark/ || /^=+ .* in [0-9.]+s/ {on = 0}
         on && NF' "$log" | add
  fi
}

if [[ $DRY == 1 || $CUDA_BUILT == 1 ]]; then
  TORCHINDUCTOR_COMPILE_THREADS=2 KDK_ORDER_FIRST="test_compile_fullgraph_training_step" \
  stage cuda 20 xdist "divergence on the CUDA backend, both kernels (ids cuda, cuda-cluster)" -- \
    python_tests/test_divergence.py -k "(cuda and not triton) or devices_differ"
elif want cuda; then
  say "cuda: skipped: the CUDA extension is not built (see build.log)"
fi

TRITON_K="triton-cuda and not (neg_inf_in_both or opcheck or incoming_gradient or second_backward or double_backward \
or identical_distributions or taid_with_ties or large_logits_at_large)"
[[ ${KDK_GPU_FULL:-0} == 1 ]] && TRITON_K="triton-cuda"
TORCHINDUCTOR_COMPILE_THREADS=2 KDK_ORDER_FIRST="test_compile_fullgraph_training_step" \
stage triton 35 xdist "divergence on Triton on the GPU (-k $TRITON_K)" -- \
  python_tests/test_divergence.py -k "$TRITON_K"

TORCHINDUCTOR_COMPILE_THREADS=2 KDK_ORDER_FIRST="test_compile_training_step test_compiled_positive_log_decay_is_nan" \
KDK_ORDER_LAST="test_nan_rule_per_sequence" \
stage families 45 xdist "DAC-KL, MOHAWK, token relations on Triton on the GPU (triton-cuda)" -- \
  python_tests/test_dac_kl.py python_tests/test_mixing_matrix.py python_tests/test_token_relation.py -k "triton-cuda"

TORCHINDUCTOR_COMPILE_THREADS=2 \
stage fused 20 xdist "fused linear + divergence on the GPU (triton-cuda, cuda, cuda-cluster)" -- \
  python_tests/test_fused_linear.py -k "cuda and not emulated"

stage tp 15 serial "vocabulary-parallel divergence, one rank on one GPU (NCCL)" -- \
  python_tests/test_vocab_parallel.py -k "world_of_one and cuda"

TORCHINDUCTOR_COMPILE_THREADS=2 \
stage sparse 20 xdist "sparse teachers on the GPU (triton-cuda; cuda: ATen ops)" -- \
  python_tests/test_sparse.py -k "cuda and not cluster"

# ------------------------------------------------------------------------ benchmark stages
export KDK_BENCH_RECORD="$OUT/summary.txt"  # each result appended as it is measured
BJ=(--benchmark-only --benchmark-columns=median,min,max,rounds)
D="bench/bench_divergence.py::test_divergence[bfloat16-8192x128256"
stage bench 30 bench "divergence fwd+bwd, bf16 N=8192 V=128256, fkl + jsd: ours vs Liger, torch.compile, eager" -- \
  "$D-fkl-kdkernels-cuda-fwd+bwd]" "$D-fkl-kdkernels-triton-fwd+bwd]" \
  "$D-jsd-kdkernels-cuda-fwd+bwd]" "$D-jsd-kdkernels-triton-fwd+bwd]" \
  "$D-fkl-liger-fwd+bwd]" "$D-jsd-liger-fwd+bwd]" "$D-fkl-torch.compile-fwd+bwd]" "$D-jsd-torch.compile-fwd+bwd]" \
  "$D-fkl-eager-fwd+bwd]" "$D-jsd-eager-fwd+bwd]" \
  "$D-fkl-kdkernels-cuda-cluster-fwd+bwd]" "$D-jsd-kdkernels-cuda-cluster-fwd+bwd]" \
  "${BJ[@]}" --benchmark-json="$WORK/bench.json"

M="bench/bench_mixing_matrix.py::test_mixing_matrix" TR="bench/bench_token_relation.py::test_token_relation"
DAC="bench/bench_dac_kl.py::test_dac_kl"
stage bench_families 30 bench "MOHAWK T=4096 (+16384, 32768), token relations, DAC-KL: ours vs reference (vs torch.compile)" -- \
  "$M[triton-4096]" "$M[reference-4096]" "$TR[triton-kl-4096]" "$TR[reference-kl-4096]" \
  "$DAC[triton-128256]" "$DAC[reference-128256]" "$M[triton-16384]" "$M[triton-32768]" \
  "$TR[compile-kl-4096]" "$DAC[compile-128256]" \
  "${BJ[@]}" --benchmark-json="$WORK/bench_families.json"

F="bench/bench_fused_linear.py::test_fused_linear[bfloat16-8192x4096x128256-fkl"
stage bench_fused 15 bench "fused linear fkl, bf16 N=8192 H=4096 V=128256: ours vs bare matmuls, Liger" -- \
  "$F-kdkernels-cuda]" "$F-kdkernels-triton]" "$F-bare-matmuls]" "$F-liger-triton]" "$F-liger]" \
  "${BJ[@]}" --benchmark-json="$WORK/bench_fused.json"

S="bench/bench_sparse.py::test_sparse[float32-8192x151936x64" SF="bench/bench_sparse.py::test_fused_linear_sparse[float32-8192x896x151936x64"
stage bench_sparse 12 bench "sparse teacher fkl, fp32 N=8192 V=151936 K=64: ours vs DistillKit, TRL; fused linear H=896" -- \
  "$S-kdkernels-auto-renorm]" "$S-kdkernels-auto-bucket]" "$S-distillkit]" "$S-trl-topk]" \
  "$SF-kdkernels-auto]" "$SF-bare-matmuls]" "$SF-distillkit]" \
  "${BJ[@]}" --benchmark-json="$WORK/bench_sparse.json"
unset KDK_BENCH_RECORD

# ---------------------------------------------------------------------------------- finish
jsons=()
for f in bench bench_families bench_fused bench_sparse; do [[ -s $WORK/$f.json ]] && jsons+=("$WORK/$f.json"); done
if [[ ${#jsons[@]} -gt 0 ]]; then
  nb=$(timeout 3 python3 - "$OUT/bench.json" "${jsons[@]}" <<'EOF'
import json, os, sys
merged = None
for path in sys.argv[2:]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        continue
    for b in data.get("benchmarks", []):
        b.setdefault("extra_info", {})["kdk_stage"] = os.path.basename(path)[:-5]
    if merged is None:
        merged = data
    else:
        merged["benchmarks"] += data.get("benchmarks", [])
if merged is not None and merged.get("benchmarks"):
    with open(sys.argv[1], "w") as f:
        json.dump(merged, f, indent=1)
print(0 if merged is None else len(merged.get("benchmarks", [])))
EOF
  )
  say "bench.json: ${nb:-?} benchmarks from ${#jsons[@]} stages"
fi
files=$(find "$OUT" -type f | wc -l)
say "done: $files files in $OUT ($(cd "$OUT" && ls | tr '\n' ' '))$([[ $files -gt 8 ]] && echo ' MORE THAN 8: the device tool brings back 8')"
