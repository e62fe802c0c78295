// Shared by the CUDA translation units (din_cuda.cu: generic FFMA kernels and
// the entry points; din_cuda_tc.cu: tensor-core kernels for fp16/bf16).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "din_params.h"

namespace din {
namespace cuk {

constexpr int kThreads = 256;            // every kernel uses 256-thread CTAs
constexpr int kWarps = kThreads / 32;
constexpr int kRT = 4;                   // keys per thread in the small dense products
constexpr int64_t kMaxGrid = 1 << 30;    // grid-stride beyond this many rows
// Largest D the kernels accept.  D (and 3D, tile sizes and smem offsets
// derived from it) is held in int; lengths, positions, rows and element
// offsets into q/k/out/scores are int64 everywhere.
constexpr int64_t kMaxDim = 1 << 20;

// Hooks that let tests/cuda_emu compile this file as plain C++ (kernels run on
// CPU threads there); with nvcc they are the ordinary CUDA constructs.
#ifndef DIN_LAUNCH
#define DIN_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif
#ifndef DIN_SMEM
__device__ __forceinline__ unsigned char* din_smem_base() {
  extern __shared__ __align__(128) unsigned char din_smem_[];
  return din_smem_;
}
#define DIN_SMEM din_smem_base()
#endif

// ---------------------------------------------------------------------------
// Scalar helpers
// ---------------------------------------------------------------------------
__device__ __forceinline__ float ex(float x) { return expf(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }
template <typename T>
__device__ __forceinline__ T sigm(T x) { return T(1) / (T(1) + ex(-x)); }

__device__ __forceinline__ float ldv(const float* p) { return *p; }
__device__ __forceinline__ double ldv(const double* p) { return *p; }
__device__ __forceinline__ float ldv(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float ldv(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void stv(float* p, float v) { *p = v; }
__device__ __forceinline__ void stv(double* p, double v) { *p = v; }
__device__ __forceinline__ void stv(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void stv(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ void atomic_addv(float* p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void atomic_addv(double* p, double v) { atomicAdd(p, v); }
__device__ __forceinline__ void atomic_addv(__half* p, float v) { atomicAdd(p, __float2half_rn(v)); }
__device__ __forceinline__ void atomic_addv(__nv_bfloat16* p, float v) {
  atomicAdd(p, __float2bfloat16_rn(v));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------------------
// Model view passed by value to every kernel
// ---------------------------------------------------------------------------
template <typename T>
struct Net {
  int D = 0, L = 0, H1 = 0, Hmax = 0;
  int H[kMaxLayers] = {};
  Act act = Act::Sigmoid;
  const T* W[kMaxLayers + 1] = {};   // original nn.Linear layout [out, in]
  const T* b[kMaxLayers + 1] = {};
  const T* alpha[kMaxLayers] = {};
  const T* gamma[kMaxLayers] = {};
  const T* beta[kMaxLayers] = {};
  const T* mean[kMaxLayers] = {};
  const T* invstd[kMaxLayers] = {};
  const T* ca[kMaxLayers] = {};       // training-mode Dice corrections (or null)
  const T* cc[kMaxLayers] = {};
  // prepared copies in the workspace
  T* W1sT = nullptr;   // [2D, H1]
  T* W1s = nullptr;    // [H1, 2D]
  T* WqdT = nullptr;   // [D, H1]
  T* WT[kMaxLayers] = {};  // l >= 1: [H_{l-1}, H_l]
};

// Elements of the model region (T), each block 16-element aligned.
inline int64_t al16(int64_t n) { return (n + 15) / 16 * 16; }

template <typename T>
inline int64_t model_elems(const DinParams& p) {
  const int64_t D = p.dim, H1 = p.hidden[0];
  int64_t n = 2 * al16(2 * D * H1) + al16(D * H1);
  for (int l = 1; l < p.num_layers; ++l) n += al16(int64_t(p.hidden[l - 1]) * p.hidden[l]);
  return n;
}

template <typename T>
inline Net<T> make_net(const DinParams& p, T* model) {
  Net<T> m;
  m.D = static_cast<int>(p.dim);
  m.L = p.num_layers;
  m.act = p.act;
  for (int l = 0; l < m.L; ++l) {
    m.H[l] = p.hidden[l];
    m.Hmax = std::max(m.Hmax, m.H[l]);
  }
  m.H1 = m.H[0];
  for (int l = 0; l <= m.L; ++l) {
    m.W[l] = static_cast<const T*>(p.W[l]);
    m.b[l] = static_cast<const T*>(p.b[l]);
    if (!m.W[l] || !m.b[l]) throw std::invalid_argument("din_fused cuda: missing weight or bias pointer");
  }
  for (int l = 0; l < m.L; ++l) {
    m.alpha[l] = static_cast<const T*>(p.alpha[l]);
    m.gamma[l] = static_cast<const T*>(p.bn_gamma[l]);
    m.beta[l] = static_cast<const T*>(p.bn_beta[l]);
    m.mean[l] = static_cast<const T*>(p.bn_mean[l]);
    m.invstd[l] = static_cast<const T*>(p.bn_invstd[l]);
    m.ca[l] = static_cast<const T*>(p.bn_corr_a[l]);
    m.cc[l] = static_cast<const T*>(p.bn_corr_c[l]);
    if ((m.act == Act::PReLU || m.act == Act::Dice) && !m.alpha[l])
      throw std::invalid_argument("din_fused cuda: prelu/dice need alpha for every layer");
    if (m.act == Act::Dice && (!m.gamma[l] || !m.beta[l] || !m.mean[l] || !m.invstd[l]))
      throw std::invalid_argument("din_fused cuda: dice needs gamma, beta, mean and invstd for every layer");
    if ((m.ca[l] == nullptr) != (m.cc[l] == nullptr))
      throw std::invalid_argument("din_fused cuda: bn_corr_a and bn_corr_c must be given together");
  }
  const int64_t D = m.D, H1 = m.H1;
  int64_t o = 0;
  m.W1sT = model + o; o += al16(2 * D * H1);
  m.W1s = model + o;  o += al16(2 * D * H1);
  m.WqdT = model + o; o += al16(D * H1);
  for (int l = 1; l < m.L; ++l) {
    m.WT[l] = model + o;
    o += al16(int64_t(m.H[l - 1]) * m.H[l]);
  }
  return m;
}

template <typename T>
__device__ __forceinline__ T act_fwd(const Net<T>& m, int l, int j, T z) {
  switch (m.act) {
    case Act::Sigmoid:
      return sigm(z);
    // Written so that a NaN pre-activation stays NaN, as in torch.relu /
    // torch.where(z > 0, z, a z): a diverged model must not look healthy.
    case Act::ReLU:
      return z < T(0) ? T(0) : z;
    case Act::PReLU:
      return z > T(0) ? z : m.alpha[l][j] * z;
    default: {  // Dice
      const T a = m.alpha[l][j];
      const T xh = (z - m.mean[l][j]) * m.invstd[l][j];
      const T pj = sigm(m.gamma[l][j] * xh + m.beta[l][j]);
      return pj * z + ((T(1) - pj) * a) * z;  // the reference's form: NaN at an infinite z, as torch
    }
  }
}

struct RowInfo {
  int64_t s, len;
};

__device__ __forceinline__ RowInfo row_info(const DinParams& p, int64_t r) {
  const int64_t s = p.row_seq ? p.row_seq[r] : r;
  return {s, seq_length(p, s)};
}

__device__ __forceinline__ bool is_valid(const DinParams& p, const RowInfo& ri, int64_t t) {
  return !p.mask || p.mask[ri.s * p.ld_mask + t] != 0;
}

struct SmemAlloc {
  int64_t off = 0;
  int take(int64_t bytes) {
    off = (off + 15) / 16 * 16;
    const int64_t o = off;
    off += bytes;
    return static_cast<int>(o);
  }
};

// Per-CTA partial layout (elements of the accumulation type).  Weight blocks
// are row-major with a leading dimension (padded to 16 on the tensor-core
// path, where warps accumulate 16x16 tiles in place).  Layer 1:
//   FFMA path (three = false):
//     Ws  [H1, 2D]     cols 0..D: G = sum dz k^T = d(Wk - Wd),  D..2D: G_q = dWm
//     Wqd [H1, D]      E q^T = d(Wq + Wd)   ->  dWq = E q^T, dWk = G, dWd = E q^T - G
//   tensor-core path (three = true, inputs [k, q-k, q*k] as the reference forms them):
//     Ws  [H1p, ldWs]  cols 0..D: dWk, D..2D: dWd, 2D..3D: dWm;   Wqd [H1, D]: dWq = E q^T
// Hidden layers: W[l] [out_l, ldW[l]] for l = 1..L (l = L: the output layer, out = 1).
struct PartLay {
  int64_t Ws = 0, Wqd = 0, b1 = 0;
  int64_t ldWs = 0, rowsWs = 0;
  bool three = false;
  int64_t W[kMaxLayers + 1] = {}, b[kMaxLayers + 1] = {}, ldW[kMaxLayers + 1] = {};
  int64_t alpha[kMaxLayers] = {}, gamma[kMaxLayers] = {}, beta[kMaxLayers] = {};
  int64_t total = 0, stride = 0;
  PartLay() = default;
  // pad = 1: FFMA layout; pad = 16: tensor-core tiles (rows and columns rounded
  // up, three first-layer blocks)
  PartLay(const DinParams& p, int pad) {
    auto up = [pad](int64_t v) { return (v + pad - 1) / pad * pad; };
    const int64_t D = p.dim, H1 = p.hidden[0];
    three = pad > 1;
    int64_t o = 0;
    ldWs = up((three ? 3 : 2) * D);
    rowsWs = up(H1);
    Ws = o; o += rowsWs * ldWs;
    Wqd = o; o += H1 * D;
    b1 = o; o += H1;
    for (int l = 1; l <= p.num_layers; ++l) {
      const int64_t out = l < p.num_layers ? p.hidden[l] : 1;
      ldW[l] = l < p.num_layers ? up(p.hidden[l - 1]) : p.hidden[l - 1];
      o = (o + 63) / 64 * 64;  // 256-byte aligned blocks (WMMA needs 32)
      W[l] = o; o += (l < p.num_layers ? up(out) : out) * ldW[l];
      b[l] = o; o += out;
    }
    for (int l = 0; l < p.num_layers; ++l) {
      alpha[l] = o; o += p.hidden[l];
      gamma[l] = o; o += p.hidden[l];
      beta[l] = o; o += p.hidden[l];
    }
    total = o;
    stride = (o + 63) / 64 * 64;
  }
};

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("din_fused cuda: ") + what + ": " + cudaGetErrorString(e));
}

inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int dev) {
    if (dev < 0) return;
    int cur = -1;
    check(cudaGetDevice(&cur), "cudaGetDevice");
    if (cur != dev) {
      check(cudaSetDevice(dev), "cudaSetDevice");
      prev = cur;
    }
  }
  ~DeviceGuard() {
    if (prev >= 0) cudaSetDevice(prev);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
};

struct DevInfo {
  int device = 0;
  int sms = 1;
  int64_t smem_optin = 48 * 1024;     // per block, opt-in maximum
  int64_t smem_per_sm = 64 * 1024;
};

inline DevInfo dev_info(const DinParams& p) {
  int dev = p.device;
  if (dev < 0) check(cudaGetDevice(&dev), "cudaGetDevice");
  DevInfo di;
  di.device = dev;
  int v = 0;
  check(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute(SMs)");
  di.sms = std::max(1, v);
  check(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
        "cudaDeviceGetAttribute(smem)");
  di.smem_optin = std::max<int64_t>(v, 48 * 1024);
  check(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev),
        "cudaDeviceGetAttribute(smem per SM)");
  di.smem_per_sm = std::max<int64_t>(v, di.smem_optin);
  return di;
}

inline int64_t align256(int64_t n) { return (n + 255) / 256 * 256; }

// Raise a kernel's dynamic shared-memory limit once per (kernel, device), so
// that nothing but launches happens on later calls (CUDA-graph capture).
inline void set_smem(const void* kernel, int64_t bytes, int device, const char* name) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int64_t> done;
  std::lock_guard<std::mutex> lock(mu);
  int64_t& have = done[{kernel, device}];
  if (have >= bytes) return;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
        name);
  have = bytes;
}

// ---- tensor-core path (din_cuda_tc.cu) -------------------------------------
// fp16/bf16 forward and backward with WMMA.  *_plan returns false when the
// configuration does not fit the shared-memory budget (the caller then uses
// the FFMA kernels).
struct TcFwdPlan {
  int TM = 64, R = 1, device = 0;
  int64_t smem = 0, n_chunks = 0, grid = 0;
};
bool tc_forward_plan(const DinParams& p, const DevInfo& di, TcFwdPlan* plan);
void tc_forward(const DinParams& p, const Net<float>& m, const TcFwdPlan& plan, unsigned long long* counter,
                cudaStream_t st);

struct TcBwdPlan {
  int TM = 64, R = 1, device = 0;
  bool split = true;  // the per-channel pass splits a tile's keys among groups of threads
  int64_t smem = 0, n_chunks = 0, n_cta = 0;
  PartLay part;
};
bool tc_backward_plan(const DinParams& p, const DevInfo& di, TcBwdPlan* plan);
void tc_backward(const DinParams& p, const Net<float>& m, const TcBwdPlan& plan, float* part_base,
                 cudaStream_t st);

}  // namespace cuk
}  // namespace din
