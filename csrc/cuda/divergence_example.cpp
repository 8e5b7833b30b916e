// Calls the CUDA divergence kernels through their launcher API (no torch) and checks the loss
// and the student gradient of a few rows against a plain double-precision CPU computation.
// Built by CMakeLists.txt; runs where a GPU exists (exit 0 = match; 77 = no GPU, skipped).
//   ./divergence_example            # fkl and jsd, fp32 logits, V = 1271, 32000 and 128256,
//                                   # each through the streaming kernel and the cluster one (sm_90+)
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <cuda_runtime.h>

#include "divergence.cuh"

namespace kc = kdkernels::cuda;

#define CHECK_CUDA(call)                                                             \
  do {                                                                               \
    const cudaError_t e_ = (call);                                                   \
    if (e_ != cudaSuccess) {                                                         \
      std::fprintf(stderr, "%s failed: %s\n", #call, cudaGetErrorString(e_));        \
      return 1;                                                                      \
    }                                                                                \
  } while (0)

// One row: the loss and d loss / d student, in double, from the definitions.
static void reference_row(const float* s, const float* t, int V, double T, int mode, double beta,
                          double* loss, std::vector<double>& grad) {
  std::vector<double> lq(V), lp(V);
  double ms = -INFINITY, mt = -INFINITY, zs = 0, zt = 0;
  for (int j = 0; j < V; ++j) ms = std::fmax(ms, s[j] / T), mt = std::fmax(mt, t[j] / T);
  for (int j = 0; j < V; ++j) zs += std::exp(s[j] / T - ms), zt += std::exp(t[j] / T - mt);
  for (int j = 0; j < V; ++j) lq[j] = s[j] / T - ms - std::log(zs), lp[j] = t[j] / T - mt - std::log(zt);
  grad.assign(V, 0.0);
  double l = 0, kq = 0;
  std::vector<double> dq(V);
  for (int j = 0; j < V; ++j) {
    const double p = std::exp(lp[j]), q = std::exp(lq[j]);
    if (mode == kc::kKL) {  // KL(p‖q); d/ds = (q − p)/T
      l += p * (lp[j] - lq[j]);
      grad[j] = (q - p) / T;
    } else {  // JSD: β·KL(p‖m) + (1−β)·KL(q‖m); d/ds = (1−β)·q·(d − KL(q‖m))/T
      const double lm = std::log(beta * p + (1 - beta) * q);
      l += beta * p * (lp[j] - lm) + (1 - beta) * q * (lq[j] - lm);
      dq[j] = lq[j] - lm;
      kq += q * dq[j];
    }
  }
  if (mode == kc::kJSD) {
    for (int j = 0; j < V; ++j) grad[j] = (1 - beta) * std::exp(lq[j]) * (dq[j] - kq) / T;
  }
  *loss = l;
}

static int check(int mode, int rows, int V, float T, float beta, int64_t smem_row_budget) {
  std::mt19937 gen(1234);
  std::normal_distribution<float> nd(0.f, 3.f);
  std::vector<float> s(size_t(rows) * V), t(s.size()), w(rows, 1.f / rows), loss(rows), g(s.size());
  for (auto& x : s) x = nd(gen);
  for (auto& x : t) x = nd(gen);
  w[rows - 1] = 0.f;  // a dropped row: loss 0, zero gradient
  float *ds, *dt, *dw, *dl, *dg;
  CHECK_CUDA(cudaMalloc(&ds, s.size() * 4));
  CHECK_CUDA(cudaMalloc(&dt, t.size() * 4));
  CHECK_CUDA(cudaMalloc(&dw, w.size() * 4));
  CHECK_CUDA(cudaMalloc(&dl, loss.size() * 4));
  CHECK_CUDA(cudaMalloc(&dg, g.size() * 4));
  CHECK_CUDA(cudaMemcpy(ds, s.data(), s.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dt, t.data(), t.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dw, w.data(), w.size() * 4, cudaMemcpyHostToDevice));

  kc::DivergenceArgs a{};
  a.student = ds;
  a.teacher = dt;
  a.student_stride = a.teacher_stride = V;
  a.student_dtype = a.teacher_dtype = kc::DType::kFloat32;
  a.grad_student = dg;
  a.row_weight = dw;
  a.loss_rows = dl;
  a.n_rows = rows;
  a.vocab = V;
  a.mode = mode;
  a.mix = mode == kc::kJSD ? beta : 0.f;
  a.temperature = T;
  a.lam = 1.f;
  a.c_p = mode == kc::kJSD ? beta : 1.f;
  a.c_q = mode == kc::kJSD ? 1.f - beta : 1.f;
  a.gs_factor = 1.f / T;
  a.gt_factor = 1.f / T;
  a.smem_row_budget = smem_row_budget;  // 0: streaming; 98304: the cluster kernel on sm_90+
  CHECK_CUDA(kc::divergence_fwd(a, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaMemcpy(loss.data(), dl, loss.size() * 4, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(g.data(), dg, g.size() * 4, cudaMemcpyDeviceToHost));
  cudaFree(ds), cudaFree(dt), cudaFree(dw), cudaFree(dl), cudaFree(dg);

  double worst_loss = 0, worst_grad = 0;
  std::vector<double> ref_g;
  for (int r = 0; r < rows; ++r) {
    double ref_l;
    reference_row(&s[size_t(r) * V], &t[size_t(r) * V], V, T, mode, beta, &ref_l, ref_g);
    const double wr = w[r];
    worst_loss = std::fmax(worst_loss, std::fabs(loss[r] - wr * ref_l) / (wr * std::fabs(ref_l) + 1e-12 + (wr == 0)));
    for (int j = 0; j < V; ++j) {
      worst_grad = std::fmax(worst_grad, std::fabs(g[size_t(r) * V + j] - wr * ref_g[j]));
    }
  }
  const bool ok = worst_loss < 1e-4 && worst_grad < 1e-6;
  std::printf("%s mode=%d rows=%d V=%d T=%g %s: loss rel. error %.2e, grad abs. error %.2e\n",
              ok ? "ok  " : "FAIL", mode, rows, V, T, smem_row_budget > 0 ? "cluster" : "streaming",
              worst_loss, worst_grad);
  return ok ? 0 : 1;
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: nothing to check (built fine)\n");
    return 77;
  }
  int failures = 0;
  for (const int64_t budget : {0, 98304}) {
    failures += check(kc::kKL, 5, 1271, 2.f, 0.f, budget);
    failures += check(kc::kKL, 3, 32000, 1.f, 0.f, budget);
    failures += check(kc::kKL, 2, 128256, 1.f, 0.f, budget);
    failures += check(kc::kJSD, 5, 1271, 2.f, 0.3f, budget);
    failures += check(kc::kJSD, 3, 32000, 0.5f, 0.5f, budget);
  }
  return failures == 0 ? 0 : 1;
}
