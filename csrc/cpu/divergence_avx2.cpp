// The divergence row kernel for AVX2 + FMA (chosen at run time when the CPU has it).
// The C++ library headers come before the target pragma: GCC 13 refuses to inline its
// always_inline library functions (std::allocator's destructor, ...) into code compiled for
// another target ("target specific option mismatch"; seen on the GPU machine's GCC 13.)
#include <algorithm>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#if defined(__x86_64__) && !defined(_MSC_VER)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// `#pragma GCC target` enables the instructions but not their feature macros, which
// sleef.h and ATen's vec headers test: define them for this file only.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define KD_ROWS_FN divergence_rows_avx2
#define KD_SHARD_ROWS_FN divergence_shard_rows_avx2
#include "divergence_kernel.h"
#else
#include "divergence.h"
namespace kdkernels::cpu {
void divergence_rows_avx2(const DivergenceParams& p, int64_t b, int64_t e) { divergence_rows_default(p, b, e); }
void divergence_shard_rows_avx2(const DivergenceParams& p, int64_t phase, double* st, int64_t b,
                          int64_t e) {
  divergence_shard_rows_default(p, phase, st, b, e);
}
}  // namespace kdkernels::cpu
#endif
