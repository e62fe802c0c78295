// Fused DIN attention pooling on CUDA: forward, Dice statistics and backward.
//
// Same contract as din_cpu.cpp (see din_params.h).  q/k/out/dout/dq/dk are in
// the storage type S (float, double, half, bfloat16); everything is computed
// in T = float (double for F64); parameters, scores and parameter gradients
// are in T.
//
// Algorithm
// ---------
// * Prep kernel (every call, a few microseconds): transposed copies of the
//   weights go into the workspace ("model" region):
//     W1sT [2D, H1] = [(Wk - Wd)^T ; Wm^T],  W1s [H1, 2D],  WqdT [D, H1] = (Wq + Wd)^T,
//     WT_l [H_{l-1}, H_l] for l >= 1.
// * Forward: one CTA (256 threads) per row, rows scheduled by the hardware
//   (grid = rows, grid-stride beyond 2^30).  Per row, the CTA folds the first
//   Linear into shared memory:  M^T = (Wk - Wd)^T + diag(q) Wm^T  [D, H1] and
//   c = (Wq + Wd) q + b1  [H1].  If M does not fit next to the tiles (large
//   D*H1), the unfolded form z1 = [k, q*k] W1sT + c is streamed from L2.
//   Warp 0 compacts the next TT valid positions (lengths clamped to [0, T],
//   mask bytes read, masked keys never read) with ballots; the CTA stages those
//   keys (converted to T) in shared memory and runs every hidden layer as a
//   small [TT x K] x [K x N] product on FFMA (4 keys x 1 channel per thread,
//   weights from smem or the read-only path, activations stay in smem).  The
//   scores s_t = w_out . h_L + b_out are parked in the scores row; the
//   weighted sum of keys is accumulated on chip with an online softmax (tile
//   max, rescale, as in flash attention).  A final sweep of the row
//   normalises the parked logits and zero-fills [len, T).
// * Stats (training-mode Dice): the forward recompute up to the pre-activation
//   of layer l; per-CTA double sums of s and s^2 over valid positions go to the
//   workspace and a second kernel adds them in a fixed order (deterministic).
// * Backward: a persistent grid (2 CTAs per SM, rows assigned round-robin, so
//   the assignment never depends on timing).  Per row: the softmax's row term
//   wdw = sum_t w_t dL/dw_t / sum_t w_t in double (one extra read of the valid
//   keys; see the backward kernel), then per tile of
//   valid keys the hidden layers are recomputed (nothing [B,T,H] is stored
//   in global memory), and the gradient runs back through the layers in
//   shared memory.  Layer 1 uses the unfolded form: with x~ = [k, q*k],
//   gx~ = dz1 W1s = [a, u]  ->  dk += a + q*u + w_t dout,  dq += sum_t k*u,
//   and per row dq += (Wq+Wd)^T e with e = sum_t dz1.  Parameter gradients
//   are accumulated in a per-CTA slot of the workspace (each element owned by
//   one thread, so no atomics); a second kernel sums the slots in a fixed
//   order (in double) and a third scatters them into dW/db/dalpha/dgamma/dbeta
//   (dW0 blocks: q: E q^T, k: G, q-k: E q^T - G, q*k: G_q).  Results are
//   bitwise reproducible run to run.  dk is read-modify-written in place;
//   when rows share sequences (row_seq), each row writes its share to dk_rows
//   at its weights' offsets and din_shared_dk_kernel adds a sequence's rows in
//   a fixed order (O(sum of row lengths * D) scratch), so dk is reproducible
//   too; without dk_rows, atomicAdd.
//
// Napkin math (first shape of issue 3: B=8192, T=200, D=64, H=(80,40), bf16,
// lengths uniform in 1..T, ~100 valid keys per row, 0.82 M valid keys):
//   bytes:  valid keys read once = 0.82M * 64 * 2 B = 105 MB  (~22 us at 4.8 TB/s);
//           scores row 8192*200*4 = 6.6 MB, q/out 2 MB.
//   FLOPs:  forward per key 2*(D*H1 + H1*H2 + H2 + D) = 17.0 k  -> 14 GFLOP;
//           the per-row fold adds 2*D*H1 per row (0.08 GFLOP).
//           backward ~ 3x the forward (recompute + two products per layer).
//   So the op is compute bound: FFMA at ~50 TFLOP/s on an H100/H200 gives
//   ~0.3 ms for the forward; reaching the 2x-memory-floor target needs the
//   hidden layers on tensor cores (bf16 mma, ~700 TFLOP/s dense).
//   Backward workspace: per CTA 2*D*H1 + D*H1 + sum H_{l-1}H_l + ... floats
//   (~80 KB here) times 2 x #SMs.
#include <cstdlib>

#include "din_cuda_common.cuh"

namespace din {
namespace {
using namespace cuk;

// Y = X[n, K] @ W[K, N] + bias, each result handed to epi(t, j, value).
// X in shared memory with leading dimension ldx (rows up to round_up(n, kRT)
// must exist); W row-major [K, N] in shared or global memory.  Thread item =
// (group of kRT keys, one output channel); consecutive threads take
// consecutive channels, so W loads are coalesced and X loads broadcast.
template <typename T, typename Epi>
__device__ __forceinline__ void dense(int n, const T* X, int ldx, int K, const T* W, int N,
                                      const T* bias, Epi epi) {
  const int groups = (n + kRT - 1) / kRT;
  const int items = groups * N;
  for (int idx = threadIdx.x; idx < items; idx += kThreads) {
    const int g = idx / N;
    const int j = idx - g * N;
    const T b0 = bias ? bias[j] : T(0);
    T acc[kRT];
#pragma unroll
    for (int r = 0; r < kRT; ++r) acc[r] = b0;
    const T* x = X + g * kRT * ldx;
    const T* w = W + j;
#pragma unroll 4
    for (int kk = 0; kk < K; ++kk) {
      const T wv = w[static_cast<int64_t>(kk) * N];
#pragma unroll
      for (int r = 0; r < kRT; ++r) acc[r] += x[r * ldx + kk] * wv;
    }
#pragma unroll
    for (int r = 0; r < kRT; ++r) {
      const int t = g * kRT + r;
      if (t < n) epi(t, j, acc[r]);
    }
  }
}

// Warp 0 collects the next (up to TT) valid positions at or after *cursor into
// pos[], writes their count to *count and advances *cursor.  Masked positions
// it passes get a zero score when zero_row is given.  The caller syncs.
template <typename T>
__device__ void next_tile(const DinParams& p, const RowInfo& ri, int TT, int64_t* pos, int* count,
                          int64_t* cursor, T* zero_row) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  int64_t t0 = *cursor;
  __syncwarp();
  int n = 0;
  const uint8_t* mrow = p.mask ? p.mask + ri.s * p.ld_mask : nullptr;
  while (n < TT && t0 < ri.len) {
    const int64_t t = t0 + lane;
    const bool in = t < ri.len;
    const bool v = in && (!mrow || mrow[t] != 0);
    if (zero_row && in && !v) zero_row[t] = T(0);
    const unsigned bal = __ballot_sync(0xffffffffu, v);
    const int before = __popc(bal & ((1u << lane) - 1u));
    const int cnt = __popc(bal);
    const int take = min(cnt, TT - n);
    if (v && before < take) pos[n + before] = t;
    if (take < cnt) {
      const unsigned last = __ballot_sync(0xffffffffu, v && before == take - 1);
      t0 += __ffs(last);  // one past the last position taken
    } else {
      t0 += 32;
    }
    n += take;
  }
  if (lane == 0) {
    *count = n;
    *cursor = t0;
  }
}

// Stage keys of the tile into X [TTr, ldx] (converted to T); with unfold the
// columns D..2D hold q*k.
template <typename S, typename T>
__device__ __forceinline__ void load_tile(const S* kbase, int64_t ldk, const int64_t* pos, int n, int D,
                                          const T* q_s, bool unfold, T* X, int ldx) {
  for (int idx = threadIdx.x; idx < n * D; idx += kThreads) {
    const int t = idx / D;
    const int d = idx - t * D;
    const T kv = static_cast<T>(ldv(kbase + pos[t] * ldk + d));
    X[t * ldx + d] = kv;
    if (unfold) X[t * ldx + D + d] = q_s[d] * kv;
  }
}

// ---------------------------------------------------------------------------
// Prep: transposed weights into the workspace
// ---------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) din_prep_kernel(const Net<T> m) {
  const int D = m.D, H1 = m.H1;
  const int64_t n0 = int64_t(D) * H1;
  int64_t total = n0;
  for (int l = 1; l < m.L; ++l) total += int64_t(m.H[l - 1]) * m.H[l];
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    if (idx < n0) {
      const int j = static_cast<int>(idx / D), d = static_cast<int>(idx % D);
      const T* w = m.W[0] + int64_t(j) * 4 * D;
      const T wq = w[d], wk = w[D + d], wd = w[2 * D + d], wm = w[3 * D + d];
      m.W1sT[int64_t(d) * H1 + j] = wk - wd;
      m.W1sT[int64_t(D + d) * H1 + j] = wm;
      m.W1s[int64_t(j) * 2 * D + d] = wk - wd;
      m.W1s[int64_t(j) * 2 * D + D + d] = wm;
      m.WqdT[int64_t(d) * H1 + j] = wq + wd;
    } else {
      int64_t i2 = idx - n0;
      for (int l = 1; l < m.L; ++l) {
        const int64_t sz = int64_t(m.H[l - 1]) * m.H[l];
        if (i2 < sz) {
          const int in = m.H[l - 1];
          const int j = static_cast<int>(i2 / in), i = static_cast<int>(i2 % in);
          m.WT[l][int64_t(i) * m.H[l] + j] = m.W[l][i2];
          break;
        }
        i2 -= sz;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Shared-memory layouts (byte offsets), computed on the host
// ---------------------------------------------------------------------------
struct FwdLay {
  int TT = 0, TTr = 0, ldx = 0;
  bool fold = false;
  int q = 0, c = 0, MT = 0, X = 0, HA = 0, HB = 0, s = 0, e = 0, acc = 0, pos = 0, misc = 0;
  int64_t smem = 0;
  // stats pass: per-CTA double partials [2 * Hmax] in the workspace
  double* stats_part = nullptr;
  int64_t n_cta = 0;
};

template <typename T>
FwdLay make_fwd_lay(const DinParams& p, int TT, bool fold) {
  const int64_t D = p.dim;
  int Hmax = 0;
  for (int l = 0; l < p.num_layers; ++l) Hmax = std::max(Hmax, p.hidden[l]);
  FwdLay y;
  y.TT = TT;
  y.TTr = (TT + kRT - 1) / kRT * kRT;
  y.fold = fold;
  y.ldx = static_cast<int>(fold ? D : 2 * D);
  const int64_t es = sizeof(T);
  SmemAlloc a;
  y.q = a.take(es * D);
  y.c = a.take(es * p.hidden[0]);
  y.MT = fold ? a.take(es * D * p.hidden[0]) : 0;
  y.X = a.take(es * y.TTr * y.ldx);
  y.HA = a.take(es * y.TTr * Hmax);
  y.HB = a.take(es * y.TTr * Hmax);
  y.s = a.take(es * TT);
  y.e = a.take(es * TT);
  y.acc = a.take(8 * D);  // double: see the forward kernel
  y.pos = a.take(8 * TT);
  y.misc = a.take(16);
  y.smem = (a.off + 15) / 16 * 16;
  return y;
}

// ---------------------------------------------------------------------------
// Forward-side per-row setup: q, c and (fold) M^T in shared memory
// ---------------------------------------------------------------------------
template <typename S, typename T>
__device__ __forceinline__ void setup_row(const DinParams& p, const Net<T>& m, const FwdLay& y, int64_t r,
                                          T* q_s, T* c_s, T* MT) {
  const int D = m.D, H1 = m.H1;
  const S* q = static_cast<const S*>(p.q) + r * p.ldq;
  for (int d = threadIdx.x; d < D; d += kThreads) q_s[d] = static_cast<T>(ldv(q + d));
  __syncthreads();
  for (int j = threadIdx.x; j < H1; j += kThreads) {
    T c = m.b[0][j];
    for (int d = 0; d < D; ++d) c += m.WqdT[int64_t(d) * H1 + j] * q_s[d];
    c_s[j] = c;
  }
  if (y.fold)
    for (int idx = threadIdx.x; idx < D * H1; idx += kThreads) {
      const int d = idx / H1;
      MT[idx] = m.W1sT[idx] + q_s[d] * m.W1sT[int64_t(D) * H1 + idx];
    }
  __syncthreads();
}

// Hidden layers 0..last on the staged tile; layer `last` is activated iff
// act_last.  Returns the buffer holding the last layer's output [TTr, H_last].
template <typename T>
__device__ __forceinline__ T* forward_layers(const Net<T>& m, const FwdLay& y, int n, const T* X,
                                             const T* c_s, const T* MT, T* HA, T* HB, int last,
                                             bool act_last) {
  const T* in = X;
  T* outb = HA;
  for (int l = 0; l <= last; ++l) {
    const int N = m.H[l];
    const bool act = l < last || act_last;
    T* yb = (l & 1) ? HB : HA;
    auto epi = [&](int t, int j, T z) { yb[t * N + j] = act ? act_fwd(m, l, j, z) : z; };
    if (l == 0) {
      if (y.fold) dense(n, X, y.ldx, m.D, MT, N, c_s, epi);
      else dense(n, X, y.ldx, 2 * m.D, static_cast<const T*>(m.W1sT), N, c_s, epi);
    } else {
      dense(n, in, m.H[l - 1], m.H[l - 1], static_cast<const T*>(m.WT[l]), N, m.b[l], epi);
    }
    __syncthreads();
    in = yb;
    outb = yb;
  }
  return outb;
}

// ---------------------------------------------------------------------------
// Forward kernel
// ---------------------------------------------------------------------------
template <typename S, typename T>
__global__ void __launch_bounds__(kThreads) din_forward_kernel(const DinParams p, const Net<T> m,
                                                               const FwdLay y) {
  unsigned char* const din_smem = DIN_SMEM;
  T* q_s = reinterpret_cast<T*>(din_smem + y.q);
  T* c_s = reinterpret_cast<T*>(din_smem + y.c);
  T* MT = reinterpret_cast<T*>(din_smem + y.MT);
  T* X = reinterpret_cast<T*>(din_smem + y.X);
  T* HA = reinterpret_cast<T*>(din_smem + y.HA);
  T* HB = reinterpret_cast<T*>(din_smem + y.HB);
  T* s_s = reinterpret_cast<T*>(din_smem + y.s);
  T* e_s = reinterpret_cast<T*>(din_smem + y.e);
  double* acc = reinterpret_cast<double*>(din_smem + y.acc);
  int64_t* pos = reinterpret_cast<int64_t*>(din_smem + y.pos);
  int64_t* cursor = reinterpret_cast<int64_t*>(din_smem + y.misc);
  int* count = reinterpret_cast<int*>(din_smem + y.misc + 8);

  const int D = m.D, L = m.L, HL = m.H[L - 1];
  const bool softmax = p.norm == Norm::Softmax;
  const T scale = static_cast<T>(p.scale);
  const T* wout = m.W[L];
  const T bout = m.b[L][0];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const RowInfo ri = row_info(p, r);
    const S* kbase = static_cast<const S*>(p.k) + seq_off(p, ri.s);
    T* sr = static_cast<T*>(p.scores) + score_row(p, r, p.ld_scores);
    for (int d = threadIdx.x; d < D; d += kThreads) acc[d] = 0.0;
    if (threadIdx.x == 0) *cursor = 0;
    setup_row<S, T>(p, m, y, r, q_s, c_s, MT);  // ends with __syncthreads

    // The softmax denominator and the pooled keys are summed in double (per
    // tile, and carried across tiles), so for fp32 their error stays that of
    // the rounded terms at any T and any spread of weights (a plain fp32
    // running sum over 10^6 keys is ~100x less accurate than the reference,
    // and one dominant weight swallows the small ones).  Per tile that is
    // TT x D double FMAs against the MLP's TT x D x H1 in T.
    T mx = -INFINITY;
    double den = 0.0;
    int64_t total = 0;
    while (true) {
      next_tile<T>(p, ri, y.TT, pos, count, cursor, sr);
      __syncthreads();
      const int n = *count;
      if (n == 0) break;
      load_tile<S, T>(kbase, p.ldk, pos, n, D, q_s, !y.fold, X, y.ldx);
      __syncthreads();
      const T* h = forward_layers(m, y, n, X, c_s, MT, HA, HB, L - 1, true);
      // scores: one warp per key
      for (int t = warp; t < n; t += kWarps) {
        T v = T(0);
        for (int i = lane; i < HL; i += 32) v += wout[i] * h[t * HL + i];
        v = warp_sum(v) + bout;
        if (lane == 0) {
          const T x = softmax ? scale * v : v;
          s_s[t] = x;
          sr[pos[t]] = x;
        }
      }
      __syncthreads();
      if (softmax) {
        T tm = s_s[0];
        for (int t = 1; t < n; ++t) tm = max(tm, s_s[t]);
        const T nmx = max(mx, tm);
        const double f = (total == 0) ? 0.0 : exp(static_cast<double>(mx) - static_cast<double>(nmx));
        for (int t = threadIdx.x; t < n; t += kThreads) e_s[t] = ex(s_s[t] - nmx);
        __syncthreads();
        double es = 0.0;
        for (int t = 0; t < n; ++t) es += static_cast<double>(e_s[t]);
        den = den * f + es;
        mx = nmx;
        for (int d = threadIdx.x; d < D; d += kThreads) {
          double a = 0.0;
          for (int t = 0; t < n; ++t) a += static_cast<double>(e_s[t]) * static_cast<double>(X[t * y.ldx + d]);
          acc[d] = acc[d] * f + a;
        }
      } else {
        for (int d = threadIdx.x; d < D; d += kThreads) {
          double a = 0.0;
          for (int t = 0; t < n; ++t) a += static_cast<double>(s_s[t]) * static_cast<double>(X[t * y.ldx + d]);
          acc[d] += a;
        }
      }
      total += n;
      __syncthreads();
      if (n < y.TT) break;
    }
    const double inv = (softmax && total > 0) ? 1.0 / den : 1.0;
    S* out = static_cast<S*>(p.out) + r * p.ldo;
    for (int d = threadIdx.x; d < D; d += kThreads) stv(out + d, static_cast<T>(acc[d] * inv));
    if (softmax && total > 0) {
      const T invT = static_cast<T>(inv);
      for (int64_t t = threadIdx.x; t < ri.len; t += kThreads)
        if (is_valid(p, ri, t)) sr[t] = ex(sr[t] - mx) * invT;
    }
    if (!p.score_start)
      for (int64_t t = ri.len + threadIdx.x; t < p.max_len; t += kThreads) sr[t] = T(0);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Stats kernel (training-mode Dice): per-CTA count, mean and M2 (sum of squared
// deviations) of the pre-activation z of layer l, merged tile by tile with
// Chan's formula, so the variance never cancels as E[z^2] - E[z]^2 would.
// ---------------------------------------------------------------------------
template <typename S, typename T>
__global__ void __launch_bounds__(kThreads) din_stats_kernel(const DinParams p, const Net<T> m,
                                                             const FwdLay y) {
  unsigned char* const din_smem = DIN_SMEM;
  T* q_s = reinterpret_cast<T*>(din_smem + y.q);
  T* c_s = reinterpret_cast<T*>(din_smem + y.c);
  T* MT = reinterpret_cast<T*>(din_smem + y.MT);
  T* X = reinterpret_cast<T*>(din_smem + y.X);
  T* HA = reinterpret_cast<T*>(din_smem + y.HA);
  T* HB = reinterpret_cast<T*>(din_smem + y.HB);
  int64_t* pos = reinterpret_cast<int64_t*>(din_smem + y.pos);
  int64_t* cursor = reinterpret_cast<int64_t*>(din_smem + y.misc);
  int* count = reinterpret_cast<int*>(din_smem + y.misc + 8);

  const int l = p.stats_layer;
  const int Hl = m.H[l];
  double* part = y.stats_part + blockIdx.x * int64_t(3 * Hl);
  // Thread j owns channel j (widths <= 256 = kThreads).
  double cnt = 0.0, mean = 0.0, m2 = 0.0;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const RowInfo ri = row_info(p, r);
    const S* kbase = static_cast<const S*>(p.k) + seq_off(p, ri.s);
    if (threadIdx.x == 0) *cursor = 0;
    setup_row<S, T>(p, m, y, r, q_s, c_s, MT);
    while (true) {
      next_tile<T>(p, ri, y.TT, pos, count, cursor, static_cast<T*>(nullptr));
      __syncthreads();
      const int n = *count;
      if (n == 0) break;
      load_tile<S, T>(kbase, p.ldk, pos, n, m.D, q_s, !y.fold, X, y.ldx);
      __syncthreads();
      const T* z = forward_layers(m, y, n, X, c_s, MT, HA, HB, l, false);
      if (static_cast<int>(threadIdx.x) < Hl) {
        const int j = threadIdx.x;
        double s = 0.0;
        for (int t = 0; t < n; ++t) s += static_cast<double>(z[t * Hl + j]);
        const double nb = n, mb = s / nb, tot = cnt + nb;
        double m2b = 0.0;
        for (int t = 0; t < n; ++t) {
          const double d = static_cast<double>(z[t * Hl + j]) - mb;
          m2b += d * d;
        }
        const double delta = mb - mean;
        mean += delta * (nb / tot);
        m2 += m2b + delta * delta * (cnt * nb / tot);
        cnt = tot;
      }
      __syncthreads();
      if (n < y.TT) break;
    }
  }
  if (static_cast<int>(threadIdx.x) < Hl) {
    part[threadIdx.x] = cnt;
    part[Hl + threadIdx.x] = mean;
    part[2 * Hl + threadIdx.x] = m2;
  }
}

// Per-CTA (count, mean, M2) [n_cta][3][H] -> out [2][H] = mean, M2, merged with
// Chan's formula in CTA order (deterministic).
__global__ void __launch_bounds__(kThreads) din_chan_merge_kernel(const double* part, int64_t n_cta, int64_t H,
                                                                  double* out) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < H; j += int64_t(gridDim.x) * blockDim.x) {
    double n = 0.0, mean = 0.0, m2 = 0.0;
    for (int64_t c = 0; c < n_cta; ++c) {
      const double* pc = part + c * 3 * H;
      const double nb = pc[j];
      if (nb == 0.0) continue;
      const double tot = n + nb, delta = pc[H + j] - mean;
      mean += delta * (nb / tot);
      m2 += pc[2 * H + j] + delta * delta * (n * nb / tot);
      n = tot;
    }
    out[j] = mean;
    out[H + j] = m2;
  }
}

// out[j] = sum over c < n_cta of part[c * stride + j], in a fixed order.
__global__ void __launch_bounds__(kThreads) din_sum_double_kernel(const double* part, int64_t n_cta,
                                                                  int64_t stride, int64_t n, double* out) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n; j += int64_t(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int64_t c = 0; c < n_cta; ++c) s += part[c * stride + j];
    out[j] = s;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) din_sum_part_kernel(const T* part, int64_t n_cta, int64_t stride,
                                                                int64_t n, double* out) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n; j += int64_t(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int64_t c = 0; c < n_cta; ++c) s += static_cast<double>(part[c * stride + j]);
    out[j] = s;
  }
}

// dk of each shared sequence s += the sum of its rows' shares in dk_rows, row by
// row in the order of seq_rows (fixed, so dk is bitwise reproducible; the
// backward kernels wrote the shares without atomics).  The grid is seq_ctas x
// (gridDim.x / seq_ctas): CTAs walk the sequences in one direction and the
// elements of a sequence in the other (one user's history shared by every
// candidate is a single sequence: it must not land on one SM).
template <typename S, typename T>
__global__ void __launch_bounds__(kThreads) din_shared_dk_kernel(DinParams p, int64_t seq_ctas) {
  const T* rows = static_cast<const T*>(p.dk_rows);
  const int64_t D = p.dim;
  const int64_t part = blockIdx.x / seq_ctas, parts = gridDim.x / seq_ctas;
  for (int64_t s = blockIdx.x % seq_ctas; s < p.num_seqs; s += seq_ctas) {
    const int64_t a = p.seq_rows_start[s], b = p.seq_rows_start[s + 1];
    if (a == b) continue;
    const int64_t len = seq_length(p, s);
    S* dk = static_cast<S*>(p.dk) + seq_off(p, s);
    for (int64_t idx = part * kThreads + threadIdx.x; idx < len * D; idx += parts * kThreads) {
      const int64_t t = idx / D, d = idx - t * D;
      T acc = T(0);
      for (int64_t i = a; i < b; ++i) acc += rows[(p.score_start[p.seq_rows[i]] + t) * D + d];
      S* dst = dk + t * p.ldk + d;
      stv(dst, static_cast<T>(ldv(dst)) + acc);
    }
  }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------
struct BwdLay {
  int TT = 0, TTr = 0, Gw = 0;
  int q = 0, dout = 0, c = 0, e = 0, dq = 0, X = 0, Z[kMaxLayers] = {}, Hh[kMaxLayers] = {};
  int GA = 0, GB = 0, w = 0, dsv = 0, red = 0, pos = 0, misc = 0;
  int64_t smem = 0;
  PartLay part;
  void* part_base = nullptr;     // n_cta * part.stride elements of T
  double* red_part = nullptr;    // n_cta * 2 * Hmax doubles (reduce_layer)
  int64_t n_cta = 0;
  explicit BwdLay(const DinParams& p) : part(p, 1) {}
};

template <typename T>
BwdLay make_bwd_lay(const DinParams& p, int TT) {
  BwdLay y(p);
  const int64_t D = p.dim, es = sizeof(T);
  int Hmax = 0;
  for (int l = 0; l < p.num_layers; ++l) Hmax = std::max(Hmax, p.hidden[l]);
  y.TT = TT;
  y.TTr = (TT + kRT - 1) / kRT * kRT;
  y.Gw = static_cast<int>(std::max<int64_t>(Hmax, 2 * D));
  SmemAlloc a;
  y.q = a.take(es * D);
  y.dout = a.take(es * D);
  y.c = a.take(es * p.hidden[0]);
  y.e = a.take(es * p.hidden[0]);
  y.dq = a.take(es * D);
  y.X = a.take(es * y.TTr * 2 * D);
  for (int l = 0; l < p.num_layers; ++l) {
    y.Z[l] = a.take(es * y.TTr * p.hidden[l]);
    y.Hh[l] = a.take(es * y.TTr * p.hidden[l]);
  }
  y.GA = a.take(es * y.TTr * y.Gw);
  y.GB = a.take(es * y.TTr * y.Gw);
  y.w = a.take(es * TT);
  y.dsv = a.take(es * TT);
  y.red = a.take(8 * 2 * kWarps);  // double [2][kWarps]: the softmax row term's warp sums
  y.pos = a.take(8 * TT);
  y.misc = a.take(16);
  y.smem = (a.off + 15) / 16 * 16;
  return y;
}

template <typename S, typename T>
__global__ void __launch_bounds__(kThreads) din_backward_kernel(const DinParams p, const Net<T> m,
                                                                const BwdLay y) {
  unsigned char* const din_smem = DIN_SMEM;
  T* q_s = reinterpret_cast<T*>(din_smem + y.q);
  T* dout_s = reinterpret_cast<T*>(din_smem + y.dout);
  T* c_s = reinterpret_cast<T*>(din_smem + y.c);
  T* e_s = reinterpret_cast<T*>(din_smem + y.e);
  T* dq_s = reinterpret_cast<T*>(din_smem + y.dq);
  T* X = reinterpret_cast<T*>(din_smem + y.X);
  T* GA = reinterpret_cast<T*>(din_smem + y.GA);
  T* GB = reinterpret_cast<T*>(din_smem + y.GB);
  T* w_s = reinterpret_cast<T*>(din_smem + y.w);
  T* dsv_s = reinterpret_cast<T*>(din_smem + y.dsv);
  double* red_s = reinterpret_cast<double*>(din_smem + y.red);
  int64_t* pos = reinterpret_cast<int64_t*>(din_smem + y.pos);
  int64_t* cursor = reinterpret_cast<int64_t*>(din_smem + y.misc);
  int* count = reinterpret_cast<int*>(din_smem + y.misc + 8);

  const int D = m.D, L = m.L, H1 = m.H1, D2 = 2 * D, Gw = y.Gw;
  const int HL = m.H[L - 1];
  const bool softmax = p.norm == Norm::Softmax;
  const T scale = static_cast<T>(p.scale);
  const int red = p.reduce_layer;
  const bool reducing = red >= 0;
  const bool shared_seq = p.row_seq != nullptr;
  T* const dk_rows = static_cast<T*>(p.dk_rows);  // a shared sequence's rows: each its own share
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* wout = m.W[L];
  const PartLay& pl = y.part;

  T* part = static_cast<T*>(y.part_base) + blockIdx.x * y.part.stride;
  double* rpart = reducing ? y.red_part + blockIdx.x * int64_t(2 * m.H[red]) : nullptr;
  if (reducing) {
    for (int64_t i = threadIdx.x; i < 2 * m.H[red]; i += kThreads) rpart[i] = 0.0;
  } else {
    for (int64_t i = threadIdx.x; i < pl.total; i += kThreads) part[i] = T(0);
  }
  __syncthreads();

  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const RowInfo ri = row_info(p, r);
    const S* kbase = static_cast<const S*>(p.k) + seq_off(p, ri.s);
    S* dkbase = reducing ? nullptr : static_cast<S*>(p.dk) + seq_off(p, ri.s);
    const S* q = static_cast<const S*>(p.q) + r * p.ldq;
    const S* go = static_cast<const S*>(p.dout) + r * p.ld_dout;
    const T* wr = static_cast<const T*>(p.scores) + score_row(p, r, p.ld_scores);
    const T* gsr = p.dscores ? static_cast<const T*>(p.dscores) + score_row(p, r, p.ld_dscores) : nullptr;

    for (int d = threadIdx.x; d < D; d += kThreads) {
      q_s[d] = static_cast<T>(ldv(q + d));
      dout_s[d] = static_cast<T>(ldv(go + d));
      dq_s[d] = T(0);
    }
    for (int j = threadIdx.x; j < H1; j += kThreads) e_s[j] = T(0);
    if (threadIdx.x == 0) *cursor = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < H1; j += kThreads) {
      T c = m.b[0][j];
      for (int d = 0; d < D; ++d) c += m.WqdT[int64_t(d) * H1 + j] * q_s[d];
      c_s[j] = c;
    }
    // Softmax: the row term wdw = sum_t w_t dL/dw_t / sum_t w_t over valid t, dL/dw_t =
    // dout . k_t + dscores_t, in double as on the CPU (din_cpu.cpp, WSum): one weight
    // near 1 makes dL/dw_t - wdw tiny, and wdw in T cancels catastrophically there.
    double wdw = 0.0;
    if (softmax) {
      double part_w = 0.0, part_s = 0.0;
      for (int64_t t = warp; t < ri.len; t += kWarps) {
        if (!is_valid(p, ri, t)) continue;
        const S* kt = kbase + t * p.ldk;
        T v = T(0);
        for (int d = lane; d < D; d += 32) v += dout_s[d] * static_cast<T>(ldv(kt + d));
        v = warp_sum(v);
        if (gsr) v += gsr[t];
        part_w += static_cast<double>(wr[t]) * static_cast<double>(v);
        part_s += static_cast<double>(wr[t]);
      }
      if (lane == 0) {
        red_s[warp] = part_w;
        red_s[kWarps + warp] = part_s;
      }
      __syncthreads();
      double sw = 0.0;
      for (int w = 0; w < kWarps; ++w) {
        wdw += red_s[w];
        sw += red_s[kWarps + w];
      }
      if (sw > 0.0) wdw /= sw;
    }
    __syncthreads();

    bool seen = false;  // any valid key in the row
    while (true) {
      next_tile<T>(p, ri, y.TT, pos, count, cursor, static_cast<T*>(nullptr));
      __syncthreads();
      const int n = *count;
      if (n == 0) break;
      seen = true;
      load_tile<S, T>(kbase, p.ldk, pos, n, D, q_s, true, X, D2);
      __syncthreads();
      // ---- recompute: z_l and h_l for every layer ----
      for (int l = 0; l < L; ++l) {
        const int N = m.H[l];
        T* Z = reinterpret_cast<T*>(din_smem + y.Z[l]);
        T* Hh = reinterpret_cast<T*>(din_smem + y.Hh[l]);
        auto epi = [&](int t, int j, T z) {
          Z[t * N + j] = z;
          Hh[t * N + j] = act_fwd(m, l, j, z);
        };
        if (l == 0) {
          dense(n, X, D2, D2, static_cast<const T*>(m.W1sT), N, c_s, epi);
        } else {
          const T* Hp = reinterpret_cast<const T*>(din_smem + y.Hh[l - 1]);
          dense(n, Hp, m.H[l - 1], m.H[l - 1], static_cast<const T*>(m.WT[l]), N, m.b[l], epi);
        }
        __syncthreads();
      }
      // ---- dL/ds per key ----
      for (int t = warp; t < n; t += kWarps) {
        const int64_t pt = pos[t];
        T v = T(0);
        for (int d = lane; d < D; d += 32) v += dout_s[d] * X[t * D2 + d];
        v = warp_sum(v);
        if (lane == 0) {
          if (gsr) v += gsr[pt];
          const T wt = wr[pt];
          w_s[t] = wt;
          dsv_s[t] = softmax ? static_cast<T>(static_cast<double>(scale) * wt * (static_cast<double>(v) - wdw)) : v;
        }
      }
      __syncthreads();
      // ---- output layer ----
      const T* HLb = reinterpret_cast<const T*>(din_smem + y.Hh[L - 1]);
      if (!reducing) {
        for (int i = threadIdx.x; i < HL; i += kThreads) {
          T sacc = T(0);
          for (int t = 0; t < n; ++t) sacc += dsv_s[t] * HLb[t * HL + i];
          part[pl.W[L] + i] += sacc;
        }
        if (threadIdx.x == 0) {
          T sacc = T(0);
          for (int t = 0; t < n; ++t) sacc += dsv_s[t];
          part[pl.b[L]] += sacc;
        }
      }
      for (int idx = threadIdx.x; idx < n * HL; idx += kThreads) {
        const int t = idx / HL, i = idx - t * HL;
        GA[t * Gw + i] = dsv_s[t] * wout[i];
      }
      __syncthreads();
      // ---- hidden layers, top down ----
      T* cur = GA;
      T* oth = GB;
      for (int l = L - 1; l >= 0; --l) {
        const int Hl = m.H[l];
        const T* Z = reinterpret_cast<const T*>(din_smem + y.Z[l]);
        const T* Hh = reinterpret_cast<const T*>(din_smem + y.Hh[l]);
        for (int j = threadIdx.x; j < Hl; j += kThreads) {
          T sa = T(0), sg = T(0), sb = T(0);
          double r1 = 0.0, r2 = 0.0;
          for (int t = 0; t < n; ++t) {
            const T g = cur[t * Gw + j];
            const T zv = Z[t * Hl + j];
            T gz;
            switch (m.act) {
              case Act::Sigmoid: {
                const T h = Hh[t * Hl + j];
                gz = g * h * (T(1) - h);
                break;
              }
              case Act::ReLU:
                gz = zv <= T(0) ? T(0) : g;  // NaN z passes g, as torch.relu's backward
                break;
              case Act::PReLU:
                if (!(zv > T(0))) sa += g * zv;  // NaN z counts, as torch.where's backward
                gz = zv > T(0) ? g : m.alpha[l][j] * g;
                break;
              default: {  // Dice
                const T a = m.alpha[l][j];
                const T xhat = (zv - m.mean[l][j]) * m.invstd[l][j];
                const T pj = sigm(m.gamma[l][j] * xhat + m.beta[l][j]);
                const T dy = g * zv * (T(1) - a) * pj * (T(1) - pj);
                const T dxhat = dy * m.gamma[l][j];
                r1 += static_cast<double>(dxhat);
                r2 += static_cast<double>(dxhat * xhat);
                sa += g * zv * (T(1) - pj);
                sg += dy * xhat;
                sb += dy;
                T bn = dxhat;
                if (m.ca[l]) bn -= m.ca[l][j] + xhat * m.cc[l][j];
                gz = g * (a + (T(1) - a) * pj) + m.invstd[l][j] * bn;
                break;
              }
            }
            cur[t * Gw + j] = gz;
          }
          if (reducing) {
            if (l == red) {
              rpart[j] += r1;
              rpart[Hl + j] += r2;
            }
          } else {
            if (m.act == Act::PReLU || m.act == Act::Dice) part[pl.alpha[l] + j] += sa;
            if (m.act == Act::Dice) {
              part[pl.gamma[l] + j] += sg;
              part[pl.beta[l] + j] += sb;
            }
          }
        }
        __syncthreads();
        if (reducing && l == red) break;
        if (l > 0) {
          const int Hin = m.H[l - 1];
          const T* Hp = reinterpret_cast<const T*>(din_smem + y.Hh[l - 1]);
          if (!reducing) {
            for (int idx = threadIdx.x; idx < Hl * Hin; idx += kThreads) {
              const int j = idx / Hin, i = idx - j * Hin;
              T sacc = T(0);
              for (int t = 0; t < n; ++t) sacc += cur[t * Gw + j] * Hp[t * Hin + i];
              part[pl.W[l] + idx] += sacc;
            }
            for (int j = threadIdx.x; j < Hl; j += kThreads) {
              T sacc = T(0);
              for (int t = 0; t < n; ++t) sacc += cur[t * Gw + j];
              part[pl.b[l] + j] += sacc;
            }
          }
          // dL/dh_{l-1} = dz_l W_l  (W_l is [H_l, H_{l-1}] = row-major [K, N])
          T* o = oth;
          dense(n, cur, Gw, Hl, m.W[l], Hin, static_cast<const T*>(nullptr),
                [&](int t, int i, T v) { o[t * Gw + i] = v; });
          __syncthreads();
          T* tmp = cur;
          cur = oth;
          oth = tmp;
        } else {
          // layer 1 (never reached while reducing: red <= l for every l visited)
          for (int idx = threadIdx.x; idx < H1 * D2; idx += kThreads) {
            const int j = idx / D2, cidx = idx - j * D2;
            T sacc = T(0);
            for (int t = 0; t < n; ++t) sacc += cur[t * Gw + j] * X[t * D2 + cidx];
            part[pl.Ws + idx] += sacc;
          }
          for (int j = threadIdx.x; j < H1; j += kThreads) {
            T sacc = T(0);
            for (int t = 0; t < n; ++t) sacc += cur[t * Gw + j];
            e_s[j] += sacc;
          }
          T* o = oth;
          dense(n, cur, Gw, H1, static_cast<const T*>(m.W1s), D2, static_cast<const T*>(nullptr),
                [&](int t, int i, T v) { o[t * Gw + i] = v; });
          __syncthreads();
          for (int idx = threadIdx.x; idx < n * D; idx += kThreads) {
            const int t = idx / D, d = idx - t * D;
            const T v = oth[t * Gw + d] + q_s[d] * oth[t * Gw + D + d] + w_s[t] * dout_s[d];
            S* dst = dkbase + pos[t] * p.ldk + d;
            if (dk_rows) dk_rows[(p.score_start[r] + pos[t]) * D + d] = v;
            else if (shared_seq) atomic_addv(dst, v);
            else stv(dst, static_cast<T>(ldv(dst)) + v);
          }
          for (int d = threadIdx.x; d < D; d += kThreads) {
            T sacc = T(0);
            for (int t = 0; t < n; ++t) sacc += X[t * D2 + d] * oth[t * Gw + D + d];
            dq_s[d] += sacc;
          }
        }
      }
      __syncthreads();
      if (n < y.TT) break;
    }
    if (!reducing && !seen) {
      // A row without valid keys takes no part in the op (as in the reference):
      // dq = 0, and neither its query nor 0 * (Wq + Wd) reaches any gradient,
      // so a NaN/Inf there does not leak.
      S* dq = static_cast<S*>(p.dq) + r * p.lddq;
      for (int d = threadIdx.x; d < D; d += kThreads) stv(dq + d, T(0));
    } else if (!reducing) {
      // dq = (Wq + Wd)^T e + sum_t k_t * u_t ; E q^T and e into the partials.
      S* dq = static_cast<S*>(p.dq) + r * p.lddq;
      for (int d = threadIdx.x; d < D; d += kThreads) {
        T v = dq_s[d];
        const T* wq = m.WqdT + int64_t(d) * H1;
        for (int j = 0; j < H1; ++j) v += wq[j] * e_s[j];
        stv(dq + d, v);
      }
      for (int idx = threadIdx.x; idx < H1 * D; idx += kThreads) {
        const int j = idx / D, d = idx - j * D;
        part[pl.Wqd + idx] += e_s[j] * q_s[d];
      }
      for (int j = threadIdx.x; j < H1; j += kThreads) part[pl.b1 + j] += e_s[j];
    }
    __syncthreads();
  }
}

// Scatter the summed partials (double) into the parameter gradients.
template <typename T>
__global__ void __launch_bounds__(kThreads) din_scatter_grads_kernel(const DinParams p, const PartLay pl,
                                                                     const double* tot) {
  const int64_t D = p.dim, H1 = p.hidden[0], L = p.num_layers;
  const int64_t n0 = H1 * 4 * D;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n0; idx += stride) {
    const int64_t j = idx / (4 * D), cidx = idx % (4 * D), blk = cidx / D, d = cidx % D;
    const double eq = tot[pl.Wqd + j * D + d];
    const double* ws = tot + pl.Ws + j * pl.ldWs;
    double v;
    if (pl.three) {  // [dWq | dWk | dWd | dWm]
      v = blk == 0 ? eq : ws[(blk - 1) * D + d];
    } else {         // dWq = E q^T, dWk = G, dWd = E q^T - G, dWm = G_q
      const double g = ws[d], gq = ws[D + d];
      v = blk == 0 ? eq : blk == 1 ? g : blk == 2 ? eq - g : gq;
    }
    static_cast<T*>(p.dW[0])[idx] = static_cast<T>(v);
  }
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < H1; j += stride)
    static_cast<T*>(p.db[0])[j] = static_cast<T>(tot[pl.b1 + j]);
  for (int l = 1; l <= L; ++l) {
    const int64_t out = l < L ? p.hidden[l] : 1, in = p.hidden[l - 1];
    const int64_t nw = out * in;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nw; i += stride)
      static_cast<T*>(p.dW[l])[i] = static_cast<T>(tot[pl.W[l] + (i / in) * pl.ldW[l] + i % in]);
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < out; i += stride)
      static_cast<T*>(p.db[l])[i] = static_cast<T>(tot[pl.b[l] + i]);
  }
  for (int l = 0; l < L; ++l) {
    const int64_t h = p.hidden[l];
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < h; i += stride) {
      if (p.dalpha[l]) static_cast<T*>(p.dalpha[l])[i] = static_cast<T>(tot[pl.alpha[l] + i]);
      if (p.dgamma[l]) static_cast<T*>(p.dgamma[l])[i] = static_cast<T>(tot[pl.gamma[l] + i]);
      if (p.dbeta[l]) static_cast<T*>(p.dbeta[l])[i] = static_cast<T>(tot[pl.beta[l] + i]);
    }
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

void check_common(const DinParams& p) {
  if (p.num_layers < 1 || p.num_layers > kMaxLayers)
    throw std::invalid_argument("din_fused cuda: num_layers must be 1..4");
  for (int l = 0; l < p.num_layers; ++l)
    if (p.hidden[l] < 1 || p.hidden[l] > kMaxWidth)
      throw std::invalid_argument("din_fused cuda: hidden widths must be 1..256");
  if (p.dim < 1) throw std::invalid_argument("din_fused cuda: dim must be >= 1");
  // The kernels keep D, and the smem offsets and leading dimensions derived
  // from it, in 32-bit ints; any D this large fails the shared-memory plans
  // anyway, but it must fail before a narrowed copy of it is used.
  if (p.dim > kMaxDim)
    throw std::invalid_argument("din_fused cuda: dim " + std::to_string(p.dim) + " exceeds the CUDA kernels' limit " +
                                std::to_string(kMaxDim));
  if (p.rows > 0 && (!p.q || !p.k || !p.seq_len))
    throw std::invalid_argument("din_fused cuda: missing q, k or seq_len pointer");
  if (p.rows < 0 || p.max_len < 0) throw std::invalid_argument("din_fused cuda: negative sizes");
}

// ---- forward / stats geometry ----
template <typename T>
FwdLay pick_fwd_lay(const DinParams& p, const DevInfo& di) {
  // Largest tile with the folded first layer; else the unfolded form.
  for (int fold = 1; fold >= 0; --fold)
    for (int TT = 64; TT >= 4; TT /= 2) {
      const FwdLay y = make_fwd_lay<T>(p, TT, fold != 0);
      if (y.smem <= di.smem_optin && (fold == 0 || TT >= 16)) return y;
    }
  throw std::invalid_argument("din_fused cuda: dim " + std::to_string(p.dim) +
                              " too large for the shared-memory tiles of this GPU");
}

int64_t stats_ctas(const DinParams& p) { return std::max<int64_t>(1, std::min<int64_t>(p.rows, 2048)); }

// forward/stats workspace: [model (acc type)] [stats partials (double)] [chunk counter]
struct FwdWs {
  int64_t model = 0, stats = 0, counter = 0, total = 0;
};

FwdWs fwd_ws(const DinParams& p) {
  int Hmax = 0;
  for (int l = 0; l < p.num_layers; ++l) Hmax = std::max(Hmax, p.hidden[l]);
  FwdWs w;
  int64_t o = 0;
  w.model = o; o += align256(model_elems<double>(p) * acc_size(p.dtype));
  w.stats = o; o += align256(stats_ctas(p) * 3 * Hmax * 8);
  w.counter = o; o += 256;
  w.total = o;
  return w;
}

// DIN_FUSED_CUDA_TC=0 turns the tensor-core kernels off (FFMA kernels for every dtype).
bool tc_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("DIN_FUSED_CUDA_TC");
    return !(e && e[0] == '0');
  }();
  return on;
}

// ---- backward geometry ----
template <typename T>
BwdLay pick_bwd_lay(const DinParams& p, const DevInfo& di) {
  // Prefer a tile that lets two CTAs share an SM; else the largest that fits.
  for (int TT = 32; TT >= 4; TT /= 2) {
    const BwdLay y = make_bwd_lay<T>(p, TT);
    if (y.smem <= di.smem_optin / 2 - 1024) return y;
  }
  for (int TT = 16; TT >= 4; TT /= 2) {
    const BwdLay y = make_bwd_lay<T>(p, TT);
    if (y.smem <= di.smem_optin) return y;
  }
  throw std::invalid_argument("din_fused cuda: dim/widths too large for the shared-memory tiles of this GPU");
}

template <typename T>
int64_t bwd_ctas(const DinParams& p, const DevInfo& di) {
  const PartLay pl(p, 1);
  const int64_t slot = pl.stride * static_cast<int64_t>(sizeof(T));
  int64_t n = 2 * int64_t(di.sms);
  const int64_t cap = std::max<int64_t>(di.sms, (int64_t(512) << 20) / std::max<int64_t>(slot, 1));
  n = std::min(n, cap);
  return std::max<int64_t>(1, std::min<int64_t>(n, p.rows));
}

// backward workspace: [model] [per-CTA partials] [summed partials (double)] [reduce partials]
// Sized for both the FFMA path and (fp16/bf16) the tensor-core path; the Dice
// reduce passes always take the FFMA path.
struct BwdWs {
  int64_t model = 0, part = 0, tot = 0, red = 0, total = 0;
  bool tc = false;
  TcBwdPlan plan;
};

template <typename T>
BwdWs bwd_ws(const DinParams& p, const DevInfo& di) {
  const PartLay pl(p, 1);
  int Hmax = 0;
  for (int l = 0; l < p.num_layers; ++l) Hmax = std::max(Hmax, p.hidden[l]);
  const int64_t nc = bwd_ctas<T>(p, di);
  BwdWs w;
  int64_t part_bytes = nc * pl.stride * int64_t(sizeof(T)), tot_elems = pl.stride;
  w.tc = tc_enabled() && tc_backward_plan(p, di, &w.plan);
  if (w.tc) {
    part_bytes = std::max(part_bytes, w.plan.n_cta * w.plan.part.stride * 4);
    tot_elems = std::max(tot_elems, w.plan.part.stride);
  }
  int64_t o = 0;
  w.model = o; o += align256(model_elems<T>(p) * int64_t(sizeof(T)));
  w.part = o;  o += align256(part_bytes);
  w.tot = o;   o += align256(tot_elems * 8);
  w.red = o;   o += align256(nc * 2 * Hmax * 8);
  w.total = o;
  return w;
}

unsigned grid_for(int64_t n, int64_t per = kThreads, int64_t cap = 4096) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + per - 1) / per, cap)));
}

template <typename T>
void launch_prep(const Net<T>& m, cudaStream_t st) {
  int64_t total = int64_t(m.D) * m.H1;
  for (int l = 1; l < m.L; ++l) total += int64_t(m.H[l - 1]) * m.H[l];
  DIN_LAUNCH(grid_for(total), kThreads, 0, st, din_prep_kernel<T>)(m);
  check_launch("din_prep_kernel");
}

template <typename S, typename T>
void run_forward(const DinParams& p, bool stats) {
  if (p.rows == 0 && !stats) return;
  const DevInfo di = dev_info(p);
  const FwdWs w = fwd_ws(p);
  if (!p.workspace || p.workspace_bytes < w.total)
    throw std::invalid_argument("din_fused cuda: forward/stats workspace too small (need " +
                                std::to_string(w.total) + " bytes from workspace_bytes(cfg, 'forward'))");
  cudaStream_t st = static_cast<cudaStream_t>(p.stream);
  char* ws = static_cast<char*>(p.workspace);
  const Net<T> m = make_net<T>(p, reinterpret_cast<T*>(ws + w.model));
  if (!stats && (!p.out || !p.scores)) throw std::invalid_argument("din_fused cuda: forward needs out and scores");
  if constexpr (sizeof(S) == 2) {
    TcFwdPlan plan;
    if (!stats && tc_enabled() && tc_forward_plan(p, di, &plan)) {
      auto* counter = reinterpret_cast<unsigned long long*>(ws + w.counter);  // chunks may exceed 2^31
      check(cudaMemsetAsync(counter, 0, sizeof(*counter), st), "cudaMemsetAsync(chunk counter)");
      tc_forward(p, m, plan, counter, st);
      return;
    }
  }
  FwdLay y = pick_fwd_lay<T>(p, di);
  launch_prep(m, st);
  if (!stats) {
    set_smem(reinterpret_cast<const void*>(&din_forward_kernel<S, T>), y.smem, di.device,
             "cudaFuncSetAttribute(din_forward_kernel)");
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(p.rows, kMaxGrid));
    DIN_LAUNCH(grid, kThreads, y.smem, st, din_forward_kernel<S, T>)(p, m, y);
    check_launch("din_forward_kernel");
    return;
  }
  const int l = p.stats_layer;
  if (l < 0 || l >= p.num_layers || !p.stats_out)
    throw std::invalid_argument("din_fused cuda: stats needs 0 <= stats_layer < num_layers and stats_out");
  y.stats_part = reinterpret_cast<double*>(ws + w.stats);
  y.n_cta = stats_ctas(p);
  set_smem(reinterpret_cast<const void*>(&din_stats_kernel<S, T>), y.smem, di.device,
           "cudaFuncSetAttribute(din_stats_kernel)");
  DIN_LAUNCH(static_cast<unsigned>(y.n_cta), kThreads, y.smem, st, din_stats_kernel<S, T>)(p, m, y);
  check_launch("din_stats_kernel");
  const int64_t Hl = p.hidden[l];
  DIN_LAUNCH(grid_for(Hl), kThreads, 0, st, din_chan_merge_kernel)(y.stats_part, y.n_cta, Hl, p.stats_out);
  check_launch("din_chan_merge_kernel(stats)");
}

// Rows sharing sequences with dk_rows: add each sequence's rows into dk.
template <typename S, typename T>
void launch_shared_dk(const DinParams& p, cudaStream_t st) {
  if (!p.dk_rows || p.rows <= 0 || p.num_seqs <= 0) return;
  if (!p.row_seq || !p.score_start || !p.seq_rows || !p.seq_rows_start)
    throw std::invalid_argument("din_fused cuda: dk_rows needs row_seq, score_start, seq_rows and seq_rows_start");
  // ~4096 CTAs in all: up to 4096 over the sequences, the rest over each one's max_len * D elements.
  const int64_t seq_ctas = std::min<int64_t>(p.num_seqs, 4096);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>((p.max_len * p.dim + kThreads - 1) / kThreads,
                                                               4096 / seq_ctas));
  DIN_LAUNCH(static_cast<unsigned>(seq_ctas * parts), kThreads, 0, st, din_shared_dk_kernel<S, T>)(p, seq_ctas);
  check_launch("din_shared_dk_kernel");
}

template <typename S, typename T>
void run_backward(const DinParams& p) {
  const DevInfo di = dev_info(p);
  const BwdWs w = bwd_ws<T>(p, di);
  if (!p.workspace || p.workspace_bytes < w.total)
    throw std::invalid_argument("din_fused cuda: backward workspace too small (need " +
                                std::to_string(w.total) +
                                " bytes from workspace_bytes(cfg, 'backward'); the reduce_layer passes "
                                "need it too)");
  const int red = p.reduce_layer;
  const bool reducing = red >= 0;
  if (reducing && (red >= p.num_layers || !p.reduce_out))
    throw std::invalid_argument("din_fused cuda: bad reduce_layer / reduce_out");
  if (p.rows > 0 && (!p.dout || !p.scores))
    throw std::invalid_argument("din_fused cuda: backward needs dout and scores");
  if (!reducing) {
    if (p.rows > 0 && (!p.dq || !p.dk)) throw std::invalid_argument("din_fused cuda: backward needs dq and dk");
    for (int l = 0; l <= p.num_layers; ++l)
      if (!p.dW[l] || !p.db[l]) throw std::invalid_argument("din_fused cuda: backward needs every dW and db");
  }
  cudaStream_t st = static_cast<cudaStream_t>(p.stream);
  char* ws = static_cast<char*>(p.workspace);
  const Net<T> m = make_net<T>(p, reinterpret_cast<T*>(ws + w.model));
  double* tot = reinterpret_cast<double*>(ws + w.tot);
  if constexpr (sizeof(S) == 2) {
    if (!reducing && w.tc) {  // reads the parameters directly; no prep needed
      float* part = reinterpret_cast<float*>(ws + w.part);
      tc_backward(p, m, w.plan, part, st);
      const PartLay& pl = w.plan.part;
      DIN_LAUNCH(grid_for(pl.total), kThreads, 0, st, din_sum_part_kernel<float>)(part, w.plan.n_cta, pl.stride,
                                                                                 pl.total, tot);
      check_launch("din_sum_part_kernel");
      DIN_LAUNCH(grid_for(int64_t(p.hidden[0]) * 4 * p.dim), kThreads, 0, st, din_scatter_grads_kernel<float>)(
          p, pl, tot);
      check_launch("din_scatter_grads_kernel");
      launch_shared_dk<S, float>(p, st);
      return;
    }
  }
  BwdLay y = pick_bwd_lay<T>(p, di);
  y.n_cta = bwd_ctas<T>(p, di);
  y.part_base = ws + w.part;
  y.red_part = reinterpret_cast<double*>(ws + w.red);
  launch_prep(m, st);
  set_smem(reinterpret_cast<const void*>(&din_backward_kernel<S, T>), y.smem, di.device,
           "cudaFuncSetAttribute(din_backward_kernel)");
  DIN_LAUNCH(static_cast<unsigned>(y.n_cta), kThreads, y.smem, st, din_backward_kernel<S, T>)(p, m, y);
  check_launch("din_backward_kernel");
  if (reducing) {
    const int64_t Hr = p.hidden[red];
    DIN_LAUNCH(grid_for(2 * Hr), kThreads, 0, st, din_sum_double_kernel)(y.red_part, y.n_cta, 2 * Hr, 2 * Hr,
                                                                p.reduce_out);
    check_launch("din_sum_double_kernel(reduce)");
    return;
  }
  DIN_LAUNCH(grid_for(y.part.total), kThreads, 0, st, din_sum_part_kernel<T>)(
      static_cast<const T*>(y.part_base), y.n_cta, y.part.stride, y.part.total, tot);
  check_launch("din_sum_part_kernel");
  DIN_LAUNCH(grid_for(int64_t(p.hidden[0]) * 4 * p.dim), kThreads, 0, st, din_scatter_grads_kernel<T>)(p, y.part, tot);
  check_launch("din_scatter_grads_kernel");
  launch_shared_dk<S, T>(p, st);
}

template <typename F>
void by_dtype(const DinParams& p, F&& f) {
  check_common(p);
  DeviceGuard guard(p.device);
  switch (p.dtype) {
    case DType::F32: f(float{}, float{}); break;
    case DType::F64: f(double{}, double{}); break;
    case DType::F16: f(__half{}, float{}); break;
    case DType::BF16: f(__nv_bfloat16{}, float{}); break;
    default: throw std::invalid_argument("din_fused cuda: unknown dtype");
  }
}

}  // namespace

void forward_cuda(const DinParams& p) {
  by_dtype(p, [&](auto s, auto t) { run_forward<decltype(s), decltype(t)>(p, false); });
}

void stats_cuda(const DinParams& p) {
  by_dtype(p, [&](auto s, auto t) { run_forward<decltype(s), decltype(t)>(p, true); });
}

void backward_cuda(const DinParams& p) {
  by_dtype(p, [&](auto s, auto t) { run_backward<decltype(s), decltype(t)>(p); });
}

int64_t forward_workspace_bytes_cuda(const DinParams& p) {
  check_common(p);
  return fwd_ws(p).total;
}

int64_t backward_workspace_bytes_cuda(const DinParams& p) {
  check_common(p);
  DeviceGuard guard(p.device);
  const DevInfo di = dev_info(p);
  if (p.dtype == DType::F64) return bwd_ws<double>(p, di).total;
  return bwd_ws<float>(p, di).total;
}

}  // namespace din
