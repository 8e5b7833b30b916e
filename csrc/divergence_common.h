// Host-side facts of the divergence family shared by the CPU and CUDA backends: the
// gradient coefficients c_P, c_Q of each canonical mode (KL 0, skew 1, JSD 2, TVD 3; see
// kdkernels/ops/divergence.py and the U_P / U_Q forms in kdkernels/triton_kernels/divergence.py,
// whose _coefficients is the Python copy of this table).
#pragma once
#include <cstdint>

namespace kdkernels {

struct GradCoefficients {
  float c_p, c_q;
};

inline GradCoefficients grad_coefficients(int64_t mode, float mix) {
  switch (mode) {
    case 0: return {1.f, 1.f};            // KL(P‖Q)
    case 1: return {1.f, -(1.f - mix)};   // KL(P ‖ mix·P + (1−mix)·Q)
    case 2: return {mix, 1.f - mix};      // generalized JSD
    default: return {0.5f, -0.5f};        // TVD
  }
}

}  // namespace kdkernels
