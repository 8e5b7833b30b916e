// CPU emulation of the few CUDA pieces kdkernels' kernels use, so that the kernel code of
// csrc/cuda/divergence.cu runs on a CPU in the tests (see test_cuda_emulated.py). Each CUDA
// thread is a std::thread; __syncthreads is a block barrier; a warp shuffle goes through a
// shared buffer between two barriers of that warp alone; blocks run one after another. It checks the kernels' logic
// (indexing, sweeps, reductions, vector/scalar paths, masks), not GPU timing or memory model.
#pragma once
#include <barrier>
#include <memory>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
using cudaStream_t = void*;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "invalid value";
}

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct KdkIndex {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local KdkIndex threadIdx, blockIdx;
inline dim3 blockDim;  // one block runs at a time

namespace kdk_emu {
inline std::barrier<>* barrier = nullptr;                      // the block's
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;  // one per warp
inline float shuffle[1024];
}  // namespace kdk_emu

inline void __syncthreads() { kdk_emu::barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  std::barrier<>& warp = *kdk_emu::warp_barriers[threadIdx.x / 32];
  kdk_emu::shuffle[threadIdx.x] = v;
  warp.arrive_and_wait();
  const float r = kdk_emu::shuffle[threadIdx.x ^ lane_mask];
  warp.arrive_and_wait();
  return r;
}

template <typename Kernel, typename Args>
void kdk_emulate_launch(Kernel kernel, dim3 grid, int threads, const Args& args) {
  blockDim = dim3(threads);
  for (unsigned b = 0; b < grid.x; ++b) {
    std::barrier<> bar(threads);
    kdk_emu::barrier = &bar;
    kdk_emu::warp_barriers.clear();
    for (int w = 0; w < threads / 32; ++w) {
      kdk_emu::warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    }
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx.x = t;
        blockIdx.x = b;
        kernel(args);
      });
    }
    for (auto& th : pool) th.join();
  }
}
