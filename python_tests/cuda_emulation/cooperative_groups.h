// CPU emulation (see cuda_runtime.h): the thread-block cluster of cooperative groups.
#pragma once
#include "cuda_runtime.h"

namespace cooperative_groups {
struct cluster_group {
  unsigned block_rank() const { return kdk_emu::rank; }
  unsigned num_blocks() const { return static_cast<unsigned>(kdk_emu::cluster->blocks.size()); }
  void sync() const { kdk_emu::cluster->barrier.arrive_and_wait(); }
  // The same address in block `r`'s dynamic shared memory.
  template <typename T>
  T* map_shared_rank(T* addr, unsigned r) const {
    const auto offset = reinterpret_cast<unsigned char*>(addr) - kdk_emu::block->smem.get();
    return reinterpret_cast<T*>(kdk_emu::cluster->blocks.at(r)->smem.get() + offset);
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups
