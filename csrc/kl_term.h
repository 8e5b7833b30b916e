// y·φ(v) = x·v − x + y for probabilities x, y and v = log x − log y: the per-element term of
// KL(x‖y) = Σ x·log(x/y) plus y − x (which sums to 0 over a row), ≥ 0 everywhere, so a row's
// KL sums without cancellation as the two distributions approach each other (a large
// temperature). φ(v) = v·e^v − e^v + 1 = Σ_{n≥2} (n−1)/n!·vⁿ: the series for |v| < 1/2 (the
// truncation after v⁹ is below 3e-8 of φ), else x·(v − 1) + y; y where x == 0. The spec is
// kdkernels/reference/divergence.py kl_term; the vectorized CPU copy is in
// cpu/divergence_kernel.h, the Triton one in kdkernels/triton_kernels/_math.py.
#pragma once

#if defined(__CUDACC__)
#define KDK_HOST_DEVICE __host__ __device__
#else
#define KDK_HOST_DEVICE
#endif

namespace kdkernels {

// Σ_{n≥2} (n−1)/n!·vⁿ⁻² (Horner), for F = float, double or a SIMD vector of floats.
template <typename F>
KDK_HOST_DEVICE inline F phi_series(const F& v) {
  F poly = v * F(1.0f / 45360) + F(1.0f / 5760);
  poly = poly * v + F(1.0f / 840);
  poly = poly * v + F(1.0f / 144);
  poly = poly * v + F(1.0f / 30);
  poly = poly * v + F(1.0f / 8);
  poly = poly * v + F(1.0f / 3);
  return poly * v + F(0.5f);
}

// Both forms computed and one selected (no branches: on a GPU the lanes of a warp take both
// anyway); NaN v selects the direct form, which is NaN.
template <typename F>
KDK_HOST_DEVICE inline F kl_term(F x, F y, F v) {
  const F series = y * (v * v) * phi_series(v);
  const F direct = x * (v - F(1)) + y;
  const F term = (v < F(0.5) && v > F(-0.5)) ? series : direct;
  return x > F(0) ? term : y;
}

}  // namespace kdkernels
