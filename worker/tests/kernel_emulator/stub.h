// CPU emulation of the CUDA subset used by the kernels of worker/src/backend/cuda/kernel_src.rs,
// for tests/cuda_kernels_emulated.rs. It checks kernel *logic* (indexing, barriers, reductions,
// selection rules) on a machine without a GPU; it says nothing about device math accuracy
// (expf etc. here are the host libm's) or performance.
//
// Model: a launch runs its blocks one after another; each block runs one std::thread per CUDA
// thread. __syncthreads is a std::barrier over the block, __shfl_xor_sync a pair of per-warp
// barriers around a per-warp exchange buffer (so every lane of the warp must call it, as
// 0xffffffff promises). A barrier some thread never reaches hangs the run; the Rust test kills it
// after a timeout and fails.
//
// The test rewrites the generated source before including it after this header (see
// emulator_source in cuda_kernels_emulated.rs):
//   asm("cvt.X.Y %0, %1;" : "=c"(out) : "c"(in));  ->  out = ptx_cvt_X_Y(in);
//   extern __shared__ T name[];                      ->  T* name = (T*)emu_dynamic_shared;
// Everything else is handled by the macros and functions below.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
// Function-local statics are shared by every thread of the running block; blocks run one at a
// time, so that is per-block shared memory (uninitialised in CUDA too).
#define __shared__ static

struct uint3 { unsigned int x, y, z; };
inline thread_local uint3 threadIdx, blockIdx;
inline uint3 blockDim, gridDim;

namespace emu {
inline thread_local int lane, warp;
inline std::barrier<>* block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline float warp_exchange[32][32];
}  // namespace emu

// Dynamic shared memory of the running launch (the rewrite of `extern __shared__`).
inline void* emu_dynamic_shared;

inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  emu::warp_exchange[emu::warp][emu::lane] = v;
  emu::warp_barriers[emu::warp]->arrive_and_wait();
  const float r = emu::warp_exchange[emu::warp][emu::lane ^ lane_mask];
  emu::warp_barriers[emu::warp]->arrive_and_wait();
  return r;
}

// The PTX instructions the source uses, named ptx_ + mnemonic with '.' -> '_'. An instruction
// without a definition here fails the compile, never the numbers. Both round to nearest even.
inline float ptx_cvt_f32_f16(unsigned short h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
inline unsigned short ptx_cvt_rn_f16_f32(float f) {
  const _Float16 x = (_Float16)f;
  unsigned short h;
  std::memcpy(&h, &x, 2);
  return h;
}

using std::fmaxf;
using std::fminf;

inline uint3 dim(unsigned x, unsigned y = 1, unsigned z = 1) { return {x, y, z}; }

// kernel<<<grid, block, shared_bytes>>>(...) as launch(grid, block, shared_bytes, [&] { kernel(...); }).
// Dynamic shared memory starts as NaN bytes, so reading it before writing shows up in results.
template <class Kernel>
void launch(uint3 grid, uint3 block, size_t shared_bytes, Kernel kernel) {
  std::vector<std::max_align_t> dynamic(shared_bytes / sizeof(std::max_align_t) + 1);
  std::memset(dynamic.data(), 0xff, dynamic.size() * sizeof(std::max_align_t));
  emu_dynamic_shared = dynamic.data();
  blockDim = block;
  gridDim = grid;
  const int n_threads = (int)(block.x * block.y * block.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bar(n_threads);
        emu::block_barrier = &bar;
        emu::warp_barriers.clear();
        for (int w = 0; w < (n_threads + 31) / 32; ++w) emu::warp_barriers.emplace_back(new std::barrier<>(32));
        std::vector<std::thread> threads;
        for (int t = 0; t < n_threads; ++t)
          threads.emplace_back([=, &kernel] {
            threadIdx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
            blockIdx = {x, y, z};
            emu::lane = t & 31;
            emu::warp = t >> 5;
            kernel();
          });
        for (auto& t : threads) t.join();
      }
}
