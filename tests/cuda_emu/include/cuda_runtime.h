// CUDA emulation for tests: lets csrc/*.cu compile as plain C++ (g++ -std=c++20)
// and run its kernels on CPU threads, so kernel logic can be checked on
// machines without a GPU.  One std::thread per CUDA thread of a block; blocks
// run one after another; __syncthreads is a std::barrier over the block and
// warp intrinsics (ballot, shfl, syncwarp) exchange values through a per-warp
// barrier.  Dynamic shared memory is filled with 0xFF bytes (NaN) at every
// launch so that reads of never-written shared memory show up in results.
// Not a performance model; only the semantics the kernels rely on.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__
#define __restrict__ __restrict

using std::max;
using std::min;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace emu {
inline int sms = 3;                    // odd, small: exercises multi-row CTAs
inline int smem_optin = 227 * 1024;    // H100/H200
inline cudaError_t last_error = cudaSuccess;

struct Warp {
  std::barrier<> bar{32};
  uint64_t slot[32];
};
struct Block {
  explicit Block(int nthreads) : bar(nthreads), warps(nthreads / 32) {}
  std::barrier<> bar;
  std::vector<Warp> warps;
};
inline thread_local dim3 tIdx, bIdx;
inline thread_local Block* cur_block = nullptr;
inline dim3 bDim, gDim;
inline std::vector<unsigned char> smem;
inline std::mutex atomic_mu;

// A pool of persistent CPU threads, one per CUDA thread of a block; blocks of a
// launch run one after another on it.
struct Pool {
  explicit Pool(int n) : nthreads(n), start(n + 1), done(n + 1) {
    for (int t = 0; t < n; ++t) workers.emplace_back([this, t] { loop(t); });
  }
  ~Pool() {
    quit = true;
    start.arrive_and_wait();
    for (auto& w : workers) w.join();
  }
  void run_block(unsigned blk, const std::function<void()>& fn) {
    job = &fn;
    block_id = blk;
    Block block(nthreads);
    cur = &block;
    start.arrive_and_wait();
    done.arrive_and_wait();
  }
  void loop(int t) {
    for (;;) {
      start.arrive_and_wait();
      if (quit) return;
      tIdx = dim3(t);
      bIdx = dim3(block_id);
      cur_block = cur;
      (*job)();
      done.arrive_and_wait();
    }
  }
  int nthreads;
  std::barrier<> start, done;
  std::vector<std::thread> workers;
  const std::function<void()>* job = nullptr;
  unsigned block_id = 0;
  Block* cur = nullptr;
  bool quit = false;
};

inline Pool& pool_for(int n) {
  static std::unique_ptr<Pool> pool;
  if (!pool || pool->nthreads != n) {
    pool.reset();
    pool = std::make_unique<Pool>(n);
  }
  return *pool;
}

struct Launch {
  dim3 g, b;
  size_t sm;
  Launch(dim3 g_, dim3 b_, size_t sm_, cudaStream_t) : g(g_), b(b_), sm(sm_) {}
  template <class K>
  auto operator()(K kernel) const {
    const Launch cfg = *this;
    return [cfg, kernel](auto... args) {
      if (cfg.b.y != 1 || cfg.b.z != 1 || cfg.g.y != 1 || cfg.g.z != 1 || cfg.b.x % 32 != 0 ||
          cfg.b.x == 0 || cfg.g.x == 0 || cfg.sm > static_cast<size_t>(smem_optin)) {
        last_error = cudaErrorInvalidValue;
        return;
      }
      static std::mutex launch_mu;  // one launch at a time
      std::lock_guard<std::mutex> lock(launch_mu);
      bDim = cfg.b;
      gDim = cfg.g;
      Pool& pool = pool_for(static_cast<int>(cfg.b.x));
      const std::function<void()> fn = [&] { kernel(args...); };
      for (unsigned blk = 0; blk < cfg.g.x; ++blk) {
        smem.assign(cfg.sm + 128, 0xFF);
        pool.run_block(blk, fn);
      }
    };
  }
};

inline Warp& my_warp() { return cur_block->warps[tIdx.x / 32]; }
}  // namespace emu

#define threadIdx (::emu::tIdx)
#define blockIdx (::emu::bIdx)
#define blockDim (::emu::bDim)
#define gridDim (::emu::gDim)
#define DIN_LAUNCH(grid, block, smem_bytes, stream, ...) \
  ::emu::Launch(dim3(grid), dim3(block), smem_bytes, stream)(__VA_ARGS__)
#define DIN_SMEM \
  (reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(::emu::smem.data()) + 127) & ~uintptr_t(127)))

inline void __syncthreads() { emu::cur_block->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::my_warp().bar.arrive_and_wait(); }
inline unsigned __ballot_sync(unsigned, int pred) {
  auto& w = emu::my_warp();
  const int lane = emu::tIdx.x % 32;
  w.slot[lane] = pred ? 1 : 0;
  w.bar.arrive_and_wait();
  unsigned r = 0;
  for (int i = 0; i < 32; ++i)
    if (w.slot[i]) r |= 1u << i;
  w.bar.arrive_and_wait();
  return r;
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
  static_assert(sizeof(T) <= 8, "shfl of >8 bytes");
  auto& w = emu::my_warp();
  const int lane = emu::tIdx.x % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slot[lane] = bits;
  w.bar.arrive_and_wait();
  bits = w.slot[(lane ^ mask) & 31];
  w.bar.arrive_and_wait();
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src) {
  auto& w = emu::my_warp();
  const int lane = emu::tIdx.x % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slot[lane] = bits;
  w.bar.arrive_and_wait();
  bits = w.slot[src & 31];
  w.bar.arrive_and_wait();
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }

template <class T>
inline T atomicAdd(T* p, T v) {
  std::lock_guard<std::mutex> g(emu::atomic_mu);
  T old = *p;
  *p = old + v;
  return old;
}

inline cudaError_t cudaGetLastError() {
  cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu::last_error; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? emu::sms
      : a == cudaDevAttrMaxSharedMemoryPerMultiprocessor ? emu::smem_optin + 1024
      : emu::smem_optin;
  return cudaSuccess;
}
template <class K>
inline cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int v) {
  return v > emu::smem_optin ? cudaErrorInvalidValue : cudaSuccess;
}
