#!/usr/bin/env bash
# GPU check for a lent GPU machine (the device tool's `run`): ~8 minutes on an H200, every
# stage under its own timeout (100 (setup.py and CMake side by side) + 40 + 140 + 100 + 40 + 30 + 90
# + 25 + 30 + 30 + 45 + 40 = 710 s at most: more than one 10-minute call allows, so drop stages
# for a run (the newest: the two fused-linear and the two sparse-teacher stages; without them
# 555 s, inside one call; the vocabulary-parallel stage "tp" adds 30). KDK_GPU_SKIP="fused sparse"
# skips stages by name.
# On the H200 on 2026-11-29 the CUDA tests took 20 s, the divergence benchmarks 75 s, the MOHAWK
# benchmark 21 s; the Triton test stages and the token-relation / DAC-KL benchmarks ran out of
# their (then shorter) times. Return only $OUT's own files: the device tool brings back 8.
#
# Prepare here (no GPU needed), once:   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl liger-kernel==0.8.5 pytest-benchmark==5.2.3 py-cpuinfo
# Then run there:   bash bench/gpu_check.sh        (carry: [".whl"])
# Everything lands in $OUT: nvidia-smi.txt, install.log, cmake.log, tests.log, bench.txt,
# bench.json, bench_mm.txt (mixing matrix, token relations, DAC-KL), summary.txt (at most 8 files come back from the device tool;
# every benchmark result is also appended to summary.txt as it is measured, so a stage cut short still reports). KDK_HBM_GBPS (default 4800, the H200's) sets the roofline column. Copy the numbers into bench/results/DATE-GPU.md and the README table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kdkernels-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/summary.txt"; }

if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA device visible to torch: nothing to check"; exit 2
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/summary.txt"

if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (Liger, pytest-benchmark)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

say "build (setup.py: C++ CPU + CUDA kernels for this GPU), and beside it CMake + the standalone example"
arch=$(python3 -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")
( timeout 100 bash -c "cmake -S . -B /tmp/kdk-cmake -DCMAKE_CUDA_ARCHITECTURES=$arch -DCMAKE_BUILD_TYPE=Release \
    && cmake --build /tmp/kdk-cmake -j8 && /tmp/kdk-cmake/divergence_example" > "$OUT/cmake.log" 2>&1
  echo "exit $?" >> "$OUT/cmake.log" ) &
cmake_job=$!
if ! MAX_JOBS=8 timeout 100 python3 setup.py build_ext --inplace > "$OUT/install.log" 2>&1; then
  say "build FAILED (see install.log); the tests below use the fallbacks"
fi
wait $cmake_job
say "cmake + example (launcher API vs a CPU computation, both kernels): $(tail -12 "$OUT/cmake.log" | tr '\n' ' ')"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import kdkernels; print(kdkernels.backend_info())" | tee -a "$OUT/summary.txt"

say "tests: divergence on the CUDA backend (cases cuda and cuda-cluster: both kernels)"
timeout 40 python3 -m pytest python_tests/test_divergence.py -k "cuda and not triton" -q -rf \
  -p no:cacheprovider > "$OUT/tests.log" 2>&1
say "tests exit $? : $(tail -1 "$OUT/tests.log")"
say "tests: divergence on Triton on the GPU (the cpu backend is CI's)"
timeout 140 python3 -m pytest python_tests/test_divergence.py -k "not cpu and not (cuda and not triton)" -q -rf --durations=15 \
  -p no:cacheprovider >> "$OUT/tests.log" 2>&1
say "tests exit $? : $(tail -1 "$OUT/tests.log")"
say "tests: MOHAWK, token relations, DAC-KL (Triton on the GPU)"
timeout 100 python3 -m pytest -k "not cpu" --durations=15 python_tests/test_mixing_matrix.py python_tests/test_token_relation.py \
  python_tests/test_dac_kl.py -q -rf -p no:cacheprovider >> "$OUT/tests.log" 2>&1
say "tests exit $? : $(tail -1 "$OUT/tests.log")"

skip() { [[ " ${KDK_GPU_SKIP:-} " == *" $1 "* ]]; }
if ! skip fused; then
say "tests: fused linear + divergence on the GPU (triton and cuda backends; bf16 multi-chunk)"
timeout 40 python3 -m pytest python_tests/test_fused_linear.py -k "not cpu and not emulated and not readme" \
  -q -rf -p no:cacheprovider >> "$OUT/tests.log" 2>&1
say "tests exit $? : $(tail -1 "$OUT/tests.log")"
fi
if ! skip tp; then
say "tests: vocabulary-parallel divergence on one GPU (NCCL, one rank: the Triton split kernels)"
timeout 30 python3 -m pytest python_tests/test_vocab_parallel.py -k "world_of_one and cuda" -q -rf \
  -p no:cacheprovider >> "$OUT/tests.log" 2>&1
say "tests exit $? : $(tail -1 "$OUT/tests.log")"
fi
if ! skip sparse; then
say "tests: sparse teachers on the GPU (triton backend)"
timeout 30 python3 -m pytest python_tests/test_sparse.py -k "triton-cuda" -q -rf -p no:cacheprovider \
  >> "$OUT/tests.log" 2>&1
say "tests exit $? : $(tail -1 "$OUT/tests.log")"
fi

export KDK_BENCH_RECORD="$OUT/summary.txt"
say "divergence benchmarks (fwd+bwd, N=8192: bf16 V=32000/128256/262144, fp32 V=128256; fkl, jsd, tvd)"
KDK_HBM_GBPS=${KDK_HBM_GBPS:-4800} timeout 90 python3 -m pytest bench/bench_divergence.py \
  --benchmark-only --benchmark-json="$OUT/bench.json" -q > "$OUT/bench.txt" 2>&1
say "bench exit $?"
grep -B1 -A7 "impl  " "$OUT/bench.txt" | tee -a "$OUT/summary.txt"
say "mixing-matrix benchmarks (bf16, H=32, d=N=64, T=4096 and 16384; triton vs reference)"
timeout 25 python3 -m pytest bench/bench_mixing_matrix.py --benchmark-only -q > "$OUT/bench_mm.txt" 2>&1
say "bench_mm exit $?"
grep -B1 -A4 "impl  " "$OUT/bench_mm.txt" | tee -a "$OUT/summary.txt"
say "token-relation benchmarks (kl, bf16, batch 8, R=12, T=4096, d=64; triton vs reference)"
KDK_TR_LOSS=kl KDK_TR_IMPLS=ours,reference timeout 30 python3 -m pytest bench/bench_token_relation.py \
  --benchmark-only -q >> "$OUT/bench_mm.txt" 2>&1
say "bench_tr exit $?"
grep -A4 "token_relation kl" "$OUT/bench_mm.txt" | tee -a "$OUT/summary.txt"
say "dac-kl benchmarks (bf16, N=8192, V=128256; triton vs the sort-based reference)"
KDK_DAC_V=128256 KDK_DAC_IMPLS=ours,reference timeout 30 python3 -m pytest bench/bench_dac_kl.py \
  --benchmark-only -q >> "$OUT/bench_mm.txt" 2>&1
say "bench_dac exit $?"
grep -A3 "dac_kl fwd" "$OUT/bench_mm.txt" | tee -a "$OUT/summary.txt"
if ! skip fused; then
say "fused-linear benchmarks (bf16, N=8192 and 1024, H=4096, V=128256; fkl, jsd; vs bare matmuls, Liger, TRL)"
KDK_FL_ROUNDS=3 timeout 45 python3 -m pytest bench/bench_fused_linear.py --benchmark-only -q \
  -k "not compile and not eager" >> "$OUT/bench_mm.txt" 2>&1
say "bench_fl exit $?"
grep -A9 "fwd+bwd  N=" "$OUT/bench_mm.txt" | grep -v "^--" | tail -24 | tee -a "$OUT/summary.txt"
fi
if ! skip sparse; then
say "sparse-teacher benchmarks (fp32, N=8192, V=151936, K=64; triton vs the DistillKit-style formula, TRL)"
KDK_SP_CASES=float32:8192x151936x64 timeout 40 python3 -m pytest bench/bench_sparse.py --benchmark-only \
  -q -k "not compile" > "$OUT/bench_sparse.txt" 2>&1
say "bench_sparse exit $?"
grep -A7 "fwd.*N=" "$OUT/bench_sparse.txt" | grep -v "^--" | tail -30 | tee -a "$OUT/summary.txt"
fi
say "done"
