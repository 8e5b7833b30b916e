// CPU emulation of the few CUDA pieces kdkernels' kernels use, so that the kernel code of
// csrc/cuda/divergence.cu runs on a CPU in the tests (see test_cuda_emulated.py). Each CUDA
// thread is a std::thread; __syncthreads is a block barrier; a warp shuffle goes through a
// per-block buffer between two barriers of that warp alone. Clusters run one after another,
// the blocks of a cluster concurrently, each with its own dynamic shared memory, which the
// others reach through cooperative_groups.h's map_shared_rank (beside this file). It checks
// the kernels' logic (indexing, sweeps, reductions, cluster exchanges, vector/scalar paths,
// masks), not GPU timing or the memory model.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
using cudaStream_t = void*;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "invalid value";
}
[[noreturn]] inline void __trap() { std::abort(); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct KdkIndex {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local KdkIndex threadIdx, blockIdx;
inline dim3 blockDim;  // the same for every block of a launch

namespace kdk_emu {
struct Block {
  explicit Block(int threads, size_t smem_bytes)
      : barrier(threads),
        smem(static_cast<unsigned char*>(std::aligned_alloc(64, (smem_bytes + 64) / 64 * 64))) {
    for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  float shuffle[1024];
  struct Free {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  std::unique_ptr<unsigned char, Free> smem;  // dynamic shared memory, 64-byte aligned
};
struct Cluster {
  explicit Cluster(int threads) : barrier(threads) {}
  std::barrier<> barrier;  // every thread of every block of the cluster
  std::vector<std::unique_ptr<Block>> blocks;
};
inline thread_local Block* block = nullptr;
inline thread_local Cluster* cluster = nullptr;
inline thread_local unsigned rank = 0;

inline unsigned char* dynamic_smem() { return block->smem.get(); }
}  // namespace kdk_emu

inline void __syncthreads() { kdk_emu::block->barrier.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  kdk_emu::Block& b = *kdk_emu::block;
  std::barrier<>& warp = *b.warps[threadIdx.x / 32];
  b.shuffle[threadIdx.x] = v;
  warp.arrive_and_wait();
  const float r = b.shuffle[threadIdx.x ^ lane_mask];
  warp.arrive_and_wait();
  return r;
}

// kernel<<<grid, threads, smem_bytes>>>(args...) in clusters of `cluster_size` blocks.
template <typename Kernel, typename... Args>
void kdk_emulate_launch(Kernel kernel, dim3 grid, int threads, int cluster_size,
                        size_t smem_bytes, const Args&... args) {
  blockDim = dim3(threads);
  for (unsigned first = 0; first < grid.x; first += cluster_size) {
    kdk_emu::Cluster cl(threads * cluster_size);
    for (int r = 0; r < cluster_size; ++r) {
      cl.blocks.push_back(std::make_unique<kdk_emu::Block>(threads, smem_bytes));
    }
    std::vector<std::thread> pool;
    pool.reserve(threads * cluster_size);
    for (int r = 0; r < cluster_size; ++r) {
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, r, t] {
          threadIdx.x = t;
          blockIdx.x = first + r;
          kdk_emu::block = cl.blocks[r].get();
          kdk_emu::cluster = &cl;
          kdk_emu::rank = r;
          kernel(args...);
        });
      }
    }
    for (auto& th : pool) th.join();
  }
}
