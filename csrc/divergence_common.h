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

// Fills the scalar arguments every divergence launch takes (mode, swap, TAID, mixture weight,
// temperature, gradient coefficients and factors) into the CPU params or the CUDA args: both
// structs name these fields alike.
template <typename Params>
void fill_divergence_scalars(Params& p, int64_t mode, bool swap, double mix, double temperature,
                             double taid) {
  p.mode = static_cast<decltype(p.mode)>(mode);
  p.swap = swap;
  p.taid = taid != 1.0;
  p.mix = static_cast<float>(mix);
  p.temperature = static_cast<float>(temperature);
  p.lam = static_cast<float>(taid);
  const GradCoefficients coef = grad_coefficients(mode, p.mix);
  p.c_p = coef.c_p;
  p.c_q = coef.c_q;
  p.gs_factor = static_cast<float>(1.0 / temperature);  // d(logits/T)/d(logits)
  p.gt_factor = static_cast<float>(taid / temperature);  // × λ for TAID's teacher
}

}  // namespace kdkernels
