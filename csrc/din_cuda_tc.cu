// Tensor-core (WMMA) DIN attention pooling for fp16 / bf16 inputs.
//
// Same contract as din_cuda.cu (see din_params.h); din_cuda.cu decides when
// this path runs (fp16/bf16, the tiles fit in shared memory, not a Dice
// reduce pass) and falls back to the FFMA kernels otherwise.
//
// Algorithm
// ---------
// * Work unit: a chunk of R consecutive rows (R ~ 1024 / T, so short sequences
//   share tiles and long ones stream).  A tile is the next TM (64 or 32) valid
//   (row, position) pairs of the chunk, compacted by warp 0 with ballots
//   (lengths clamped, mask bytes read, masked keys never read).  A tile is cut
//   into segments, one per row.
// * The first Linear is used unfolded, x = [k, q-k, q*k] (3D wide) against
//   the shared weight [Wk | Wd | Wm]^T with a per-row bias c = Wq q + b1 (fp32),
//   so that one GEMM covers keys of different rows.  q-k and q*k are rounded
//   to the input precision exactly as a PyTorch fp16/bf16 model rounds them.
//   (A folded or error-compensated first layer is more accurate but rounds
//   differently from every fp16/bf16 reference: near ReLU/PReLU kinks, which
//   keys flip sign then differs from the reference's flips, and bf16 gradients
//   move by percents either way; mimicking the reference keeps the error
//   statistics of a plain bf16 model.  DIN_FUSED_CUDA_TC=0 selects the fp32
//   FFMA kernels for fp16/bf16 inputs too.)
// * Forward: per segment an online-softmax update of the row's running max,
//   denominator and fp32 accumulator (flash-attention style); logits are
//   parked in the scores row and normalised when the chunk is done.  CTAs are
//   persistent and take chunks from an atomic counter (the output does not
//   depend on which CTA computed a row).
// * Backward: the same tiles; the hidden layers are recomputed into shared
//   memory (z and h per layer, in the input precision), then per layer l, top
//   down: dz_l = act'(.) * dh_l in fp32 (per-channel sums for db, alpha, gamma,
//   beta: the tile's keys are dealt to groups of H_l threads and the groups' sums
//   added in a fixed order), rounded for the GEMMs
//       dW_l += dz_l^T h_{l-1}   (wmma, accumulated in place in the CTA's fp32
//                                 partial slot in global memory),
//       dh_{l-1} = dz_l W_l      (wmma into fp32 shared memory),
//   and for layer 1: dk = a - b + q*u + w dout and dq += sum_t b + k*u with
//   [a | b | u] = dz_1 [Wk | Wd | Wm]; per row dq += Wq^T e and dWq += E q^T.
//   CTAs take chunks round-robin (static), so the partial sums, added in a
//   fixed order by din_cuda.cu, are bitwise reproducible.
//
// Napkin math (B=8192, T=200, D=64, H=(80,40), bf16, 0.82 M valid keys):
//   forward MACs per key: 3D*H1 + H1*H2 + H2 = 18.6 k (the unfolded first layer
//   costs 2.2x the folded 8.4 k) -> 30 GFLOP of tensor-core work, ~60 us at a
//   realistic 50% of the H200's ~990 dense bf16 TFLOP/s; keys 105 MB -> 22 us at
//   4.8 TB/s.  The backward does ~3x the MACs.
//   Shared memory, TM=64: weights (3D x H1 + H1 x H2) bf16 = 40 KB (one copy,
//   read as W^T for the forward and as W for dz W), key tile 26 KB, activations
//   11 KB, fp32 scratch 22 KB -> ~100 KB (2 CTAs/SM on H100/H200); the backward
//   also keeps z and h per layer and picks TM = 64, 32 or 16 to stay at
//   2 CTAs/SM (TM = 32 for this shape, ~109 KB with the 4.7 KB of per-group
//   channel sums; a shape that fits only without them keeps a thread per channel).
#include <mma.h>

#include <type_traits>

#include "din_cuda_common.cuh"

namespace din {
namespace cuk {
namespace {
using namespace nvcuda;

__host__ __device__ __forceinline__ int up16(int v) { return (v + 15) / 16 * 16; }

// The flat index idx = t * W + c of a [rows, W] array, visited as
// `for (idx = threadIdx.x; ...; idx += kThreads)` is, but without a division per
// step: the per-element loops below are instruction-bound, and an integer division
// costs ~25 instructions, as much as the element's own work.
struct Walk {
  int t, c, dt, dc, W;
  __device__ __forceinline__ explicit Walk(int w) : W(w) {
    t = threadIdx.x / w;
    c = threadIdx.x - t * w;
    dt = kThreads / w;
    dc = kThreads - dt * w;
  }
  __device__ __forceinline__ void next() {
    t += dt;
    c += dc;
    if (c >= W) {
      c -= W;
      ++t;
    }
  }
};

template <typename S>
struct Frag {
  using A = wmma::fragment<wmma::matrix_a, 16, 16, 16, S, wmma::row_major>;
  using At = wmma::fragment<wmma::matrix_a, 16, 16, 16, S, wmma::col_major>;
  using B = wmma::fragment<wmma::matrix_b, 16, 16, 16, S, wmma::row_major>;
  using Bt = wmma::fragment<wmma::matrix_b, 16, 16, 16, S, wmma::col_major>;
  using C = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
};

// An A or B fragment from shared memory.  bf16 goes through wmma.load with the .shared
// state space: nvcc emits the bf16 load builtins with a generic address as four generic
// 32-bit loads per fragment (LD.E; address arithmetic and generic-to-shared resolution
// included), where the fp16 ones become ldmatrix.  Same PTX operation and fragment
// layout, only the state space is stated.  (The CPU emulation has no PTX: wmma there.)
template <class F, typename S>
__device__ __forceinline__ void frag_load(F& f, const S* p, unsigned ldm) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<S, __nv_bfloat16>::value) {
    using Fr = Frag<S>;
    assert(__isShared(p));  // (debug builds: every caller's tiles live in shared memory)
    unsigned* r = reinterpret_cast<unsigned*>(f.x);
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
#define DIN_WMMA_LD(USE, LAYOUT)                                                         \
  asm volatile("wmma.load." USE ".sync.aligned." LAYOUT ".m16n16k16.shared.bf16"             \
               " {%0, %1, %2, %3}, [%4], %5;"                                                \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                              \
               : "r"(a), "r"(ldm)                                                            \
               : "memory")
    if constexpr (std::is_same<F, typename Fr::A>::value) DIN_WMMA_LD("a", "row");
    else if constexpr (std::is_same<F, typename Fr::At>::value) DIN_WMMA_LD("a", "col");
    else if constexpr (std::is_same<F, typename Fr::B>::value) DIN_WMMA_LD("b", "row");
    else DIN_WMMA_LD("b", "col");
#undef DIN_WMMA_LD
    return;
  }
#endif
  wmma::load_matrix_sync(f, p, ldm);
}

// C[Mt*16, Nt*16] (fp32, ldc) = A[Mt*16, Kt*16] (ld lda) @ B, one 16x16 output
// tile per warp at a time.  BT = false: B is [Kt*16, Nt*16] row-major (ld ldb);
// BT = true: B is given transposed, [Nt*16, Kt*16] row-major (an nn.Linear
// weight [out, in]), read as a column-major B.
template <typename S, bool BT>
__device__ __forceinline__ void tc_gemm(int Mt, int Nt, int Kt, const S* A, int lda, const S* B, int ldb,
                                        float* C, int ldc) {
  using FragB = typename std::conditional<BT, typename Frag<S>::Bt, typename Frag<S>::B>::type;
  const int warp = threadIdx.x / 32;
  for (int tile = warp; tile < Mt * Nt; tile += kWarps) {
    const int mt = tile % Mt, nt = tile / Mt;
    typename Frag<S>::C acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int kt = 0; kt < Kt; ++kt) {
      typename Frag<S>::A a;
      FragB b;
      frag_load(a, A + mt * 16 * lda + kt * 16, lda);
      frag_load(b, BT ? B + nt * 16 * ldb + kt * 16 : B + kt * 16 * ldb + nt * 16, ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(C + mt * 16 * ldc + nt * 16, acc, ldc, wmma::mem_row_major);
  }
}

// P[Mt*16, Nt*16] (fp32, global, ldp) += G^T @ Bm, where G is [Kt*16, Mt*16]
// (ld ldg, read as a column-major A) and Bm is [Kt*16, Nt*16] (ld ldb).
template <typename S>
__device__ __forceinline__ void tc_gemm_tn_acc(int Mt, int Nt, int Kt, const S* G, int ldg, const S* Bm,
                                               int ldb, float* P, int64_t ldp) {
  const int warp = threadIdx.x / 32;
  for (int tile = warp; tile < Mt * Nt; tile += kWarps) {
    const int mt = tile % Mt, nt = tile / Mt;
    float* dst = P + int64_t(mt) * 16 * ldp + nt * 16;
    typename Frag<S>::C acc;
    wmma::load_matrix_sync(acc, dst, static_cast<unsigned>(ldp), wmma::mem_row_major);
    for (int kt = 0; kt < Kt; ++kt) {
      typename Frag<S>::At a;
      typename Frag<S>::B b;
      frag_load(a, G + kt * 16 * ldg + mt * 16, ldg);
      frag_load(b, Bm + kt * 16 * ldb + nt * 16, ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(dst, acc, static_cast<unsigned>(ldp), wmma::mem_row_major);
  }
}

// ---------------------------------------------------------------------------
// Geometry shared by the forward and backward kernels (host-computed)
// ---------------------------------------------------------------------------
struct TcGeo {
  int D = 0, L = 0, TM = 64, R = 1;
  int H[kMaxLayers] = {}, Hp[kMaxLayers] = {};
  int K0p = 0;                    // up16(3D): input width of layer 1 ([k, q-k, q*k])
  int K0o = 0;                    // up16(3D): backward output width of layer 1 ([a | b | u])
  int ldX = 0, ldC = 0, ldG = 0;  // key tile, fp32 scratch, gradient tile
  int ldWo[kMaxLayers] = {};      // weights W_l [Hp_l, Kp_l] (nn.Linear layout, one copy for both directions)
  int ldH[kMaxLayers] = {};       // per-layer activation tiles [TM, Hp_l]
  // shared-memory byte offsets
  int oWo[kMaxLayers] = {}, oX = 0, oHb = 0, oZ[kMaxLayers] = {}, oH[kMaxLayers] = {};
  int oG = 0, oC = 0;
  int oq = 0, oc = 0, oacc = 0, omx = 0, oden = 0, ocnt = 0, odout = 0, odq = 0, oe = 0, owdw = 0, owred = 0,
      oseen = 0, ored = 0;
  int opos = 0, orid = 0, osid = 0, oseg = 0, osegrow = 0, os = 0, oe2 = 0, osegf = 0, osegm = 0, ow = 0,
      odsv = 0, omisc = 0;
  int64_t smem = 0;
  int64_t n_chunks = 0;
  __host__ __device__ int Kp(int l) const { return l == 0 ? K0p : Hp[l - 1]; }
  __host__ __device__ int Ko(int l) const { return l == 0 ? K0o : Hp[l - 1]; }
};

struct Alloc128 {
  int64_t off = 0;
  int take(int64_t bytes) {
    off = (off + 127) / 128 * 128;
    const int64_t o = off;
    off += bytes;
    return static_cast<int>(o);
  }
};

TcGeo base_geo(const DinParams& p, int TM, int R) {
  TcGeo g;
  g.D = static_cast<int>(p.dim);
  g.L = p.num_layers;
  g.TM = TM;
  g.R = R;
  int Hmaxp = 0;
  for (int l = 0; l < g.L; ++l) {
    g.H[l] = p.hidden[l];
    g.Hp[l] = up16(g.H[l]);
    Hmaxp = std::max(Hmaxp, g.Hp[l]);
  }
  g.K0p = up16(3 * g.D);
  g.K0o = up16(3 * g.D);
  g.ldX = g.K0p + 8;
  g.ldC = std::max(Hmaxp, g.K0o) + 4;
  g.ldG = Hmaxp + 8;
  for (int l = 0; l < g.L; ++l) {
    g.ldWo[l] = g.Ko(l) + 8;
    g.ldH[l] = g.Hp[l] + 8;
  }
  g.n_chunks = (p.rows + R - 1) / R;
  return g;
}

void tile_arrays(TcGeo& g, Alloc128& a, bool backward) {
  const int TM = g.TM;
  g.opos = a.take(8 * TM);
  g.orid = a.take(4 * TM);
  g.osid = a.take(4 * TM);
  g.oseg = a.take(4 * (TM + 1));
  g.osegrow = a.take(4 * TM);
  if (backward) {
    g.ow = a.take(4 * TM);
    g.odsv = a.take(4 * TM);
  } else {
    g.os = a.take(4 * TM);
    g.oe2 = a.take(4 * TM);
    g.osegf = a.take(8 * TM);
    g.osegm = a.take(4 * TM);
  }
  g.omisc = a.take(64);
}

TcGeo fwd_geo(const DinParams& p, int TM, int R) {
  TcGeo g = base_geo(p, TM, R);
  Alloc128 a;
  g.ldC = g.ldG - 4;  // forward products are at most Hmaxp wide
  for (int l = 0; l < g.L; ++l) g.oWo[l] = a.take(2 * int64_t(g.Hp[l]) * g.ldWo[l]);
  g.oX = a.take(2 * int64_t(TM) * g.ldX);
  g.oHb = a.take(2 * int64_t(TM) * g.ldG);
  g.oC = a.take(4 * int64_t(TM) * g.ldC);
  g.oq = a.take(4 * int64_t(R) * g.D);
  g.oc = a.take(4 * int64_t(R) * g.H[0]);
  g.oacc = a.take(8 * int64_t(R) * g.D);  // double, see the forward kernel
  g.omx = a.take(4 * R);
  g.oden = a.take(8 * R);
  g.ocnt = a.take(8 * R);
  tile_arrays(g, a, false);
  g.smem = (a.off + 127) / 128 * 128;
  return g;
}

// split: room for the per-group channel sums of the backward's layer pass, where a
// layer is narrow enough for two or more groups (else ored = -1: a thread per channel).
TcGeo bwd_geo(const DinParams& p, int TM, int R, bool split) {
  TcGeo g = base_geo(p, TM, R);
  Alloc128 a;
  for (int l = 0; l < g.L; ++l) g.oWo[l] = a.take(2 * int64_t(g.Hp[l]) * g.ldWo[l]);
  g.oX = a.take(2 * int64_t(TM) * g.ldX);
  for (int l = 0; l + 1 < g.L; ++l) {  // the last hidden layer stays fp32 in C
    g.oZ[l] = a.take(2 * int64_t(TM) * g.ldH[l]);
    g.oH[l] = a.take(2 * int64_t(TM) * g.ldH[l]);
  }
  g.oG = a.take(2 * int64_t(TM) * g.ldG);
  g.oC = a.take(4 * int64_t(TM) * g.ldC);
  g.oq = a.take(4 * int64_t(R) * g.D);
  g.odout = a.take(4 * int64_t(R) * g.D);
  g.odq = a.take(4 * int64_t(R) * g.D);
  g.oc = a.take(4 * int64_t(R) * g.H[0]);
  g.oe = a.take(4 * int64_t(R) * g.H[0]);
  g.owdw = a.take(8 * R);                        // double: the softmax row term
  g.owred = a.take(16 * int64_t(R) * kWarps);    // double [R][2][kWarps]: its warp sums
  int red = 0;  // floats: [NG][5][H_l] for the layers with NG = kThreads / H_l >= 2
  for (int l = 0; l < g.L; ++l)
    if (kThreads / g.H[l] >= 2) red = std::max(red, 5 * (kThreads / g.H[l]) * g.H[l]);
  g.ored = split && red > 0 ? a.take(4 * int64_t(red)) : -1;
  g.oseen = a.take(4 * int64_t(R));
  tile_arrays(g, a, true);
  g.smem = (a.off + 127) / 128 * 128;
  return g;
}

// Rows per chunk: about 1024 scanned positions, bounded by shared memory and
// small enough to give every CTA slot (2 per SM) a chunk.
int pick_R(const DinParams& p, const DevInfo& di, int64_t per_row_bytes) {
  const int64_t T = std::max<int64_t>(p.max_len, 1);
  int64_t R = std::max<int64_t>(1, 1024 / T);
  R = std::min<int64_t>(R, std::max<int64_t>(1, (24 * 1024) / std::max<int64_t>(per_row_bytes, 1)));
  R = std::min<int64_t>(R, std::max<int64_t>(1, (p.rows + 2 * di.sms - 1) / (2 * di.sms)));
  R = std::min<int64_t>(R, 256);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(R, std::max<int64_t>(p.rows, 1))));
}

// ---------------------------------------------------------------------------
// Device pieces shared by both kernels
// ---------------------------------------------------------------------------
struct TileState {  // views into shared memory
  int64_t* pos;
  int* rid;
  int* sid;
  int* seg;      // [TM + 1] segment starts
  int* segrow;   // [TM] chunk-local row of each segment
  int* misc;     // [0] n, [1] nseg, [2] cur_row; cur_t at misc + 4, chunk at misc + 6 (int64)
  __device__ int64_t* cur_t() const { return reinterpret_cast<int64_t*>(misc + 4); }
  __device__ int64_t* chunk() const { return reinterpret_cast<int64_t*>(misc + 6); }
};

// Warp 0: the next (up to TM) valid (row, position) pairs of the chunk
// [r0, r0 + nr) from the cursor on; zero_scores: write 0 to the scores of the
// masked positions passed (forward).  The caller syncs.
__device__ void tc_next_tile(const DinParams& p, int64_t r0, int nr, int TM, const TileState& ts,
                             bool zero_scores) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  int crow = ts.misc[2];
  int64_t ct = *ts.cur_t();
  __syncwarp();
  int n = 0, nseg = 0, last = -1;
  while (n < TM && crow < nr) {
    const RowInfo ri = row_info(p, r0 + crow);
    if (ct >= ri.len) {
      ++crow;
      ct = 0;
      continue;
    }
    const uint8_t* mrow = p.mask ? p.mask + ri.s * p.ld_mask : nullptr;
    const int64_t t = ct + lane;
    const bool in = t < ri.len;
    const bool v = in && (!mrow || mrow[t] != 0);
    if (zero_scores && in && !v) static_cast<float*>(p.scores)[score_row(p, r0 + crow, p.ld_scores) + t] = 0.0f;
    const unsigned bal = __ballot_sync(0xffffffffu, v);
    const int before = __popc(bal & ((1u << lane) - 1u));
    const int cnt = __popc(bal);
    const int take = min(cnt, TM - n);
    if (take > 0 && crow != last) {
      if (lane == 0) {
        ts.seg[nseg] = n;
        ts.segrow[nseg] = crow;
      }
      ++nseg;
      last = crow;
    }
    if (v && before < take) {
      ts.pos[n + before] = t;
      ts.rid[n + before] = crow;
      ts.sid[n + before] = nseg - 1;
    }
    if (take < cnt) {
      const unsigned lastb = __ballot_sync(0xffffffffu, v && before == take - 1);
      ct += __ffs(lastb);
    } else {
      ct += 32;
    }
    n += take;
  }
  if (lane == 0) {
    ts.seg[nseg] = n;
    ts.misc[0] = n;
    ts.misc[1] = nseg;
    ts.misc[2] = crow;
    *ts.cur_t() = ct;
  }
}

// Eight fp16/bf16 values, for 16-byte loads and stores.
template <typename S>
struct alignas(16) Pack8 {
  S v[8];
};

// X [Mt*16, K0p] = [k, q-k, q*k] of the tile in the input precision (zero padded).
// With D % 8 == 0 a thread takes eight elements of a key: one 16-byte load where the
// key row is 16-byte aligned (the forward's key loads were a fifth of its stalls on an
// H200, one 2-byte load per element) and three 16-byte stores (X rows are 16-byte
// aligned: ldX = K0p + 8, K0p a multiple of 16).
template <typename S>
__device__ __forceinline__ void tc_load_x(const DinParams& p, const TcGeo& g, int64_t r0, int n, int Mt,
                                          const TileState& ts, const float* q_s, S* X) {
  const int D = g.D, K0p = g.K0p;
  const S* kb = static_cast<const S*>(p.k);
  if (D % 8 == 0) {
    for (Walk w(D / 8); w.t < n; w.next()) {
      const int t = w.t, d = w.c * 8;
      const int rr = ts.rid[t];
      const int64_t s = p.row_seq ? p.row_seq[r0 + rr] : r0 + rr;
      const S* src = kb + seq_off(p, s) + ts.pos[t] * p.ldk + d;
      Pack8<S> kv, a, b;
      if ((reinterpret_cast<uintptr_t>(src) & 15) == 0) {
        kv = *reinterpret_cast<const Pack8<S>*>(src);
      } else {
        for (int i = 0; i < 8; ++i) kv.v[i] = src[i];
      }
      for (int i = 0; i < 8; ++i) {
        const float kf = ldv(&kv.v[i]), qf = q_s[rr * D + d + i];
        stv(&a.v[i], qf - kf);
        stv(&b.v[i], qf * kf);
      }
      S* x = X + t * g.ldX + d;
      *reinterpret_cast<Pack8<S>*>(x) = kv;
      *reinterpret_cast<Pack8<S>*>(x + D) = a;
      *reinterpret_cast<Pack8<S>*>(x + 2 * D) = b;
    }
  } else {
    for (Walk w(D); w.t < n; w.next()) {  // one key element -> three columns
      const int t = w.t, d = w.c;
      const int rr = ts.rid[t];
      const int64_t s = p.row_seq ? p.row_seq[r0 + rr] : r0 + rr;
      const S kv = kb[seq_off(p, s) + ts.pos[t] * p.ldk + d];
      const float kf = ldv(&kv), qf = q_s[rr * D + d];
      S* x = X + t * g.ldX;
      x[d] = kv;
      stv(x + D + d, qf - kf);
      stv(x + 2 * D + d, qf * kf);
    }
  }
  const int padc = K0p - 3 * D;  // zero columns 3D..K0p of live rows, all columns of rows n..Mt*16
  if (padc > 0)
    for (Walk w(padc); w.t < n; w.next()) stv(X + w.t * g.ldX + 3 * D + w.c, 0.0f);
  for (Walk w(K0p); w.t < Mt * 16 - n; w.next()) stv(X + (n + w.t) * g.ldX + w.c, 0.0f);
}

// c = Wq q + b1 for the chunk's rows (Wq: columns 0..D of W0 [H1, 4D]).
__device__ __forceinline__ void tc_row_bias(const Net<float>& m, int nr, const float* q_s, float* c_s) {
  const int D = m.D, H1 = m.H1;
  for (int idx = threadIdx.x; idx < nr * H1; idx += kThreads) {
    const int rr = idx / H1, j = idx - rr * H1;
    const float* wq = m.W[0] + int64_t(j) * 4 * D;
    float c = m.b[0][j];
    for (int d = 0; d < D; ++d) c += wq[d] * q_s[rr * D + d];
    c_s[idx] = c;
  }
}

// Stage the padded weights of every layer in shared memory (input precision),
// in the nn.Linear layout W[l] [Hp_l, Kp_l] (l = 0: [Wk | Wd | Wm], the columns
// D..4D of W0).  The forward products read them as a column-major B (= W^T),
// the backward dz W products as a row-major B.
template <typename S>
__device__ void tc_stage_weights(const Net<float>& m, const TcGeo& g, unsigned char* sm) {
  for (int l = 0; l < g.L; ++l) {
    const int Np = g.Hp[l], N = g.H[l], Kp = g.Kp(l);
    const int K = l == 0 ? 3 * g.D : g.H[l - 1];
    const float* W = l == 0 ? m.W[0] + g.D : m.W[l];  // weight (j, k) at W[j * ldw + k]
    const int64_t ldw = l == 0 ? 4 * g.D : K;
    S* Wo = reinterpret_cast<S*>(sm + g.oWo[l]);
    for (int idx = threadIdx.x; idx < Np * Kp; idx += kThreads) {
      const int j = idx / Kp, k = idx - j * Kp;
      stv(Wo + j * g.ldWo[l] + k, (k < K && j < N) ? W[j * ldw + k] : 0.0f);
    }
  }
}

// ---------------------------------------------------------------------------
// Forward kernel
// ---------------------------------------------------------------------------
template <typename S>
__global__ void __launch_bounds__(kThreads, 2) din_tc_forward_kernel(const DinParams p, const Net<float> m,
                                                                     const TcGeo g,
                                                                     unsigned long long* counter) {
  unsigned char* const sm = DIN_SMEM;
  S* X = reinterpret_cast<S*>(sm + g.oX);
  S* Hb = reinterpret_cast<S*>(sm + g.oHb);
  float* C = reinterpret_cast<float*>(sm + g.oC);
  float* q_s = reinterpret_cast<float*>(sm + g.oq);
  float* c_s = reinterpret_cast<float*>(sm + g.oc);
  // The softmax denominator and the pooled keys of a row are summed in double
  // (per segment, and carried across tiles): the error stays that of the
  // rounded terms at any T and any spread of weights.
  double* acc = reinterpret_cast<double*>(sm + g.oacc);
  float* mx = reinterpret_cast<float*>(sm + g.omx);
  double* den = reinterpret_cast<double*>(sm + g.oden);
  int64_t* cnt = reinterpret_cast<int64_t*>(sm + g.ocnt);  // valid keys of a row: may exceed 2^31
  float* s_s = reinterpret_cast<float*>(sm + g.os);
  float* e_s = reinterpret_cast<float*>(sm + g.oe2);
  double* segf = reinterpret_cast<double*>(sm + g.osegf);
  float* segm = reinterpret_cast<float*>(sm + g.osegm);
  const TileState ts{reinterpret_cast<int64_t*>(sm + g.opos), reinterpret_cast<int*>(sm + g.orid),
                     reinterpret_cast<int*>(sm + g.osid),     reinterpret_cast<int*>(sm + g.oseg),
                     reinterpret_cast<int*>(sm + g.osegrow),  reinterpret_cast<int*>(sm + g.omisc)};

  const int D = g.D, L = g.L, H1 = g.H[0], HL = g.H[L - 1];
  const bool softmax = p.norm == Norm::Softmax;
  const float scale = static_cast<float>(p.scale);
  const float* wout = m.W[L];
  const float bout = m.b[L][0];

  tc_stage_weights<S>(m, g, sm);

  while (true) {
    if (threadIdx.x == 0) *ts.chunk() = static_cast<int64_t>(atomicAdd(counter, 1ull));
    __syncthreads();  // also orders the weight staging before the first GEMM
    const int64_t chunk = *ts.chunk();
    if (chunk >= g.n_chunks) break;
    const int64_t r0 = chunk * g.R;
    const int64_t rem = p.rows - r0;
    const int nr = static_cast<int>(rem < g.R ? rem : g.R);
    for (int idx = threadIdx.x; idx < nr * D; idx += kThreads) {
      const int rr = idx / D, d = idx - rr * D;
      q_s[idx] = ldv(static_cast<const S*>(p.q) + (r0 + rr) * p.ldq + d);
      acc[idx] = 0.0;
    }
    for (int rr = threadIdx.x; rr < nr; rr += kThreads) {
      mx[rr] = -INFINITY;
      den[rr] = 0.0;
      cnt[rr] = 0;
    }
    if (threadIdx.x == 0) {
      ts.misc[2] = 0;
      *ts.cur_t() = 0;
    }
    __syncthreads();
    tc_row_bias(m, nr, q_s, c_s);
    // (the first tile's build + sync orders c_s before its use)

    while (true) {
      tc_next_tile(p, r0, nr, g.TM, ts, true);
      __syncthreads();
      const int n = ts.misc[0], nseg = ts.misc[1];
      if (n == 0) break;
      const int Mt = (n + 15) / 16;
      tc_load_x<S>(p, g, r0, n, Mt, ts, q_s, X);
      __syncthreads();
      for (int l = 0; l < L; ++l) {
        const S* A = l == 0 ? X : Hb;
        const int lda = l == 0 ? g.ldX : g.ldG;
        tc_gemm<S, true>(Mt, g.Hp[l] / 16, g.Kp(l) / 16, A, lda, reinterpret_cast<const S*>(sm + g.oWo[l]),
                         g.ldWo[l], C, g.ldC);
        __syncthreads();
        const int N = g.H[l], Np = g.Hp[l];
        const bool last = l == L - 1;
        for (Walk w(Np); w.t < Mt * 16; w.next()) {
          const int t = w.t, j = w.c;
          const bool live = t < n && j < N;
          float h = 0.0f;
          if (live) {
            const float bias = l == 0 ? c_s[ts.rid[t] * H1 + j] : m.b[l][j];
            h = act_fwd(m, l, j, C[t * g.ldC + j] + bias);
          }
          if (last) {
            if (live) C[t * g.ldC + j] = h;
          } else {
            stv(Hb + t * g.ldG + j, h);
          }
        }
        __syncthreads();
      }
      // scores from the fp32 last hidden layer, four threads per key (4 TM <= kThreads;
      // a warp per key spent most of its time in the reduction), stored after the sync
      // by consecutive threads, so that a row's scores are written coalesced
      {
        const int t = threadIdx.x / 4, sub = threadIdx.x % 4;
        float v = 0.0f;
        if (t < n)
          for (int i = sub; i < HL; i += 4) v += wout[i] * C[t * g.ldC + i];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if (t < n && sub == 0) s_s[t] = softmax ? scale * (v + bout) : v + bout;
      }
      __syncthreads();
      for (int t = threadIdx.x; t < n; t += kThreads)
        static_cast<float*>(p.scores)[score_row(p, r0 + ts.rid[t], p.ld_scores) + ts.pos[t]] = s_s[t];
      if (softmax) {
        for (int sg = threadIdx.x; sg < nseg; sg += kThreads) {
          const int rr = ts.segrow[sg];
          float mseg = -INFINITY;
          for (int t = ts.seg[sg]; t < ts.seg[sg + 1]; ++t) mseg = max(mseg, s_s[t]);
          const float nm = max(mx[rr], mseg);
          segm[sg] = nm;
          segf[sg] = cnt[rr] == 0 ? 0.0 : exp(static_cast<double>(mx[rr]) - static_cast<double>(nm));
        }
        __syncthreads();
        for (int t = threadIdx.x; t < n; t += kThreads) e_s[t] = ex(s_s[t] - segm[ts.sid[t]]);
        __syncthreads();
        for (Walk w(D); w.t < nseg; w.next()) {
          const int sg = w.t, d = w.c;
          const int rr = ts.segrow[sg];
          double a = 0.0;
          for (int t = ts.seg[sg]; t < ts.seg[sg + 1]; ++t)
            a += static_cast<double>(e_s[t]) * static_cast<double>(ldv(X + t * g.ldX + d));
          acc[rr * D + d] = acc[rr * D + d] * segf[sg] + a;
        }
        for (int sg = threadIdx.x; sg < nseg; sg += kThreads) {
          const int rr = ts.segrow[sg];
          double es = 0.0;
          for (int t = ts.seg[sg]; t < ts.seg[sg + 1]; ++t) es += static_cast<double>(e_s[t]);
          den[rr] = den[rr] * segf[sg] + es;
          mx[rr] = segm[sg];
          cnt[rr] += ts.seg[sg + 1] - ts.seg[sg];
        }
      } else {
        for (Walk w(D); w.t < nseg; w.next()) {
          const int sg = w.t, d = w.c;
          const int rr = ts.segrow[sg];
          double a = 0.0;
          for (int t = ts.seg[sg]; t < ts.seg[sg + 1]; ++t)
            a += static_cast<double>(s_s[t]) * static_cast<double>(ldv(X + t * g.ldX + d));
          acc[rr * D + d] += a;
        }
        for (int sg = threadIdx.x; sg < nseg; sg += kThreads)
          cnt[ts.segrow[sg]] += ts.seg[sg + 1] - ts.seg[sg];
      }
      __syncthreads();
      if (n < g.TM) break;
    }
    // finish the chunk's rows: outputs, normalised scores, zero padding
    for (int idx = threadIdx.x; idx < nr * D; idx += kThreads) {
      const int rr = idx / D, d = idx - rr * D;
      const double inv = softmax && cnt[rr] > 0 ? 1.0 / den[rr] : 1.0;
      const float v = cnt[rr] > 0 ? static_cast<float>(acc[idx] * inv) : 0.0f;
      stv(static_cast<S*>(p.out) + (r0 + rr) * p.ldo + d, v);
    }
    for (int rr = 0; rr < nr; ++rr) {
      const RowInfo ri = row_info(p, r0 + rr);
      float* sr = static_cast<float*>(p.scores) + score_row(p, r0 + rr, p.ld_scores);
      if (softmax && cnt[rr] > 0) {
        const float inv = static_cast<float>(1.0 / den[rr]), m0 = mx[rr];
        for (int64_t t = threadIdx.x; t < ri.len; t += kThreads)
          if (is_valid(p, ri, t)) sr[t] = ex(sr[t] - m0) * inv;
      }
      if (!p.score_start)
        for (int64_t t = ri.len + threadIdx.x; t < p.max_len; t += kThreads) sr[t] = 0.0f;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Backward kernel
// ---------------------------------------------------------------------------
// A tile's per-channel sums of layer l into the CTA's partial slot: the slope (PReLU,
// Dice), the BatchNorm affine (Dice), the bias (l > 0; layer 1's goes with e) and the
// output weight (top layer).
__device__ __forceinline__ void add_channel_sums(const Net<float>& m, const PartLay& pl, int l, int L, int j,
                                                 float* part, float sa, float sg, float sb, float sz, float sw) {
  if (m.act == Act::PReLU || m.act == Act::Dice) part[pl.alpha[l] + j] += sa;
  if (m.act == Act::Dice) {
    part[pl.gamma[l] + j] += sg;
    part[pl.beta[l] + j] += sb;
  }
  if (l > 0) part[pl.b[l] + j] += sz;
  if (l == L - 1) part[pl.W[L] + j] += sw;
}

template <typename S>
__global__ void __launch_bounds__(kThreads, 2) din_tc_backward_kernel(const DinParams p, const Net<float> m,
                                                                      const TcGeo g, const PartLay pl,
                                                                      float* part_base) {
  unsigned char* const sm = DIN_SMEM;
  S* X = reinterpret_cast<S*>(sm + g.oX);
  S* G = reinterpret_cast<S*>(sm + g.oG);
  float* C = reinterpret_cast<float*>(sm + g.oC);
  float* q_s = reinterpret_cast<float*>(sm + g.oq);
  float* dout_s = reinterpret_cast<float*>(sm + g.odout);
  float* dq_s = reinterpret_cast<float*>(sm + g.odq);
  float* c_s = reinterpret_cast<float*>(sm + g.oc);
  float* e_s = reinterpret_cast<float*>(sm + g.oe);
  double* wdw_s = reinterpret_cast<double*>(sm + g.owdw);
  double* wred = reinterpret_cast<double*>(sm + g.owred);
  float* red = reinterpret_cast<float*>(sm + g.ored);
  int* seen = reinterpret_cast<int*>(sm + g.oseen);  // row of the chunk had a valid key
  float* w_s = reinterpret_cast<float*>(sm + g.ow);
  float* dsv_s = reinterpret_cast<float*>(sm + g.odsv);
  const TileState ts{reinterpret_cast<int64_t*>(sm + g.opos), reinterpret_cast<int*>(sm + g.orid),
                     reinterpret_cast<int*>(sm + g.osid),     reinterpret_cast<int*>(sm + g.oseg),
                     reinterpret_cast<int*>(sm + g.osegrow),  reinterpret_cast<int*>(sm + g.omisc)};

  const int D = g.D, L = g.L, H1 = g.H[0];
  const bool softmax = p.norm == Norm::Softmax;
  const float scale = static_cast<float>(p.scale);
  const float* wout = m.W[L];
  const bool shared_seq = p.row_seq != nullptr;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* part = part_base + int64_t(blockIdx.x) * pl.stride;

  for (int64_t i = threadIdx.x; i < pl.total; i += kThreads) part[i] = 0.0f;
  tc_stage_weights<S>(m, g, sm);
  __syncthreads();

  for (int64_t chunk = blockIdx.x; chunk < g.n_chunks; chunk += gridDim.x) {
    const int64_t r0 = chunk * g.R;
    const int64_t rem = p.rows - r0;
    const int nr = static_cast<int>(rem < g.R ? rem : g.R);
    for (int idx = threadIdx.x; idx < nr * D; idx += kThreads) {
      const int rr = idx / D, d = idx - rr * D;
      q_s[idx] = ldv(static_cast<const S*>(p.q) + (r0 + rr) * p.ldq + d);
      dout_s[idx] = ldv(static_cast<const S*>(p.dout) + (r0 + rr) * p.ld_dout + d);
      dq_s[idx] = 0.0f;
    }
    for (int idx = threadIdx.x; idx < nr * H1; idx += kThreads) e_s[idx] = 0.0f;
    for (int rr = threadIdx.x; rr < nr; rr += kThreads) seen[rr] = 0;
    if (threadIdx.x == 0) {
      ts.misc[2] = 0;
      *ts.cur_t() = 0;
    }
    __syncthreads();
    tc_row_bias(m, nr, q_s, c_s);
    // softmax: the row term wdw = sum_t w_t dL/dw_t / sum_t w_t, dL/dw_t = dout . k_t +
    // dscores_t, in double as in the FFMA kernel: next to a weight ~1, dL/dw_t - wdw is
    // tiny and a float wdw cancels catastrophically.  Warps split the positions.
    if (softmax) {
      for (int rr = 0; rr < nr; ++rr) {
        const RowInfo ri = row_info(p, r0 + rr);
        const S* kb = static_cast<const S*>(p.k) + seq_off(p, ri.s);
        const float* wr = static_cast<const float*>(p.scores) + score_row(p, r0 + rr, p.ld_scores);
        const float* gsr = p.dscores ? static_cast<const float*>(p.dscores) + score_row(p, r0 + rr, p.ld_dscores) : nullptr;
        double tot = 0.0, sw = 0.0;
        for (int64_t t = warp; t < ri.len; t += kWarps) {
          if (!is_valid(p, ri, t)) continue;
          float v = 0.0f;
          for (int d = lane; d < D; d += 32) v += dout_s[rr * D + d] * ldv(kb + t * p.ldk + d);
          v = warp_sum(v);
          if (gsr) v += gsr[t];
          tot += static_cast<double>(wr[t]) * static_cast<double>(v);
          sw += static_cast<double>(wr[t]);
        }
        if (lane == 0) {
          wred[(2 * rr) * kWarps + warp] = tot;
          wred[(2 * rr + 1) * kWarps + warp] = sw;
        }
      }
      __syncthreads();
      for (int rr = threadIdx.x; rr < nr; rr += kThreads) {
        double tot = 0.0, sw = 0.0;
        for (int w = 0; w < kWarps; ++w) {
          tot += wred[(2 * rr) * kWarps + w];
          sw += wred[(2 * rr + 1) * kWarps + w];
        }
        wdw_s[rr] = sw > 0.0 ? tot / sw : tot;
      }
    }
    // (ordered before use by the first tile's syncs)

    while (true) {
      tc_next_tile(p, r0, nr, g.TM, ts, false);
      __syncthreads();
      const int n = ts.misc[0], nseg = ts.misc[1];
      if (n == 0) break;
      for (int sg = threadIdx.x; sg < nseg; sg += kThreads) seen[ts.segrow[sg]] = 1;  // one segment per row
      const int Mt = (n + 15) / 16;
      tc_load_x<S>(p, g, r0, n, Mt, ts, q_s, X);
      __syncthreads();
      // ---- recompute: z_l, h_l (input precision), zero padded ----
      for (int l = 0; l < L; ++l) {
        const S* A = l == 0 ? X : reinterpret_cast<const S*>(sm + g.oH[l - 1]);
        const int lda = l == 0 ? g.ldX : g.ldH[l - 1];
        tc_gemm<S, true>(Mt, g.Hp[l] / 16, g.Kp(l) / 16, A, lda, reinterpret_cast<const S*>(sm + g.oWo[l]),
                         g.ldWo[l], C, g.ldC);
        __syncthreads();
        const int N = g.H[l], Np = g.Hp[l];
        if (l + 1 < L) {
          S* Z = reinterpret_cast<S*>(sm + g.oZ[l]);
          S* Hh = reinterpret_cast<S*>(sm + g.oH[l]);
          for (Walk w(Np); w.t < Mt * 16; w.next()) {
            const int t = w.t, j = w.c;
            float z = 0.0f, h = 0.0f;
            if (t < n && j < N) {
              z = C[t * g.ldC + j] + (l == 0 ? c_s[ts.rid[t] * H1 + j] : m.b[l][j]);
              h = act_fwd(m, l, j, z);
            }
            stv(Z + t * g.ldH[l] + j, z);
            stv(Hh + t * g.ldH[l] + j, h);
          }
        } else {  // last hidden layer: fp32 pre-activation kept in C
          for (Walk w(N); w.t < n; w.next()) {
            const int t = w.t, j = w.c;
            C[t * g.ldC + j] += l == 0 ? c_s[ts.rid[t] * H1 + j] : m.b[l][j];
          }
        }
        __syncthreads();
      }
      // ---- dL/ds per key ----
      for (int t = warp; t < n; t += kWarps) {
        const int rr = ts.rid[t];
        const int64_t pt = ts.pos[t];
        float v = 0.0f;
        for (int d = lane; d < D; d += 32) v += dout_s[rr * D + d] * ldv(X + t * g.ldX + d);
        v = warp_sum(v);
        if (lane == 0) {
          if (p.dscores) v += static_cast<const float*>(p.dscores)[score_row(p, r0 + rr, p.ld_dscores) + pt];
          const float wt = static_cast<const float*>(p.scores)[score_row(p, r0 + rr, p.ld_scores) + pt];
          w_s[t] = wt;
          dsv_s[t] = softmax ? static_cast<float>(static_cast<double>(scale) * wt * (static_cast<double>(v) - wdw_s[rr]))
                             : v;
        }
      }
      __syncthreads();
      // ---- output bias (the output weight is summed with the last layer below) ----
      if (threadIdx.x == 0) {
        float sacc = 0.0f;
        for (int t = 0; t < n; ++t) sacc += dsv_s[t];
        part[pl.b[L]] += sacc;
      }
      // ---- hidden layers, top down.  Last layer: C holds z (fp32), dL/dh = dsv w_out;
      //      below: C holds dL/dh_l (fp32) and z_l, h_l come from shared memory ----
      for (int l = L - 1; l >= 0; --l) {
        const int N = g.H[l], Np = g.Hp[l];
        const bool top = l == L - 1;
        const S* Z = reinterpret_cast<const S*>(sm + g.oZ[l]);
        const S* Hh = reinterpret_cast<const S*>(sm + g.oH[l]);
        const int ldh = g.ldH[l];
        // Thread (group, column j): the keys are dealt to NG groups of N threads, so that
        // every thread has work (a thread per column left 5/8 of the CTA idle, and each
        // column a serial loop over the tile).  A group sums its keys' per-channel terms;
        // the groups' sums are added in group order below, so results stay bitwise
        // reproducible.  Layer 1's dz goes back into C in fp32 for the per-row sums.
        const int NG = g.ored >= 0 ? kThreads / N : 1, grp = threadIdx.x / N, j = threadIdx.x - grp * N;
        const bool dice = m.act == Act::Dice, prelu = m.act == Act::PReLU;
        if (grp < NG) {
          float sa = 0.0f, sg = 0.0f, sb = 0.0f, sz = 0.0f, sw = 0.0f;
          const float wj = top ? wout[j] : 0.0f;
          float a = 0.0f, mu = 0.0f, is = 0.0f, gam = 0.0f, bet = 0.0f, ca = 0.0f, cc = 0.0f;
          if (dice || prelu) a = m.alpha[l][j];
          if (dice) {
            mu = m.mean[l][j];
            is = m.invstd[l][j];
            gam = m.gamma[l][j];
            bet = m.beta[l][j];
            if (m.ca[l]) {
              ca = m.ca[l][j];
              cc = m.cc[l][j];
            }
          }
          for (int t = grp; t < n; t += NG) {
            float gh, zv, h = 0.0f;
            if (top) {
              zv = C[t * g.ldC + j];
              gh = dsv_s[t] * wj;
              if (m.act == Act::Sigmoid) h = sigm(zv);
              sw += dsv_s[t] * (m.act == Act::Sigmoid ? h : act_fwd(m, l, j, zv));
            } else {
              gh = C[t * g.ldC + j];
              zv = ldv(Z + t * ldh + j);
              if (m.act == Act::Sigmoid) h = ldv(Hh + t * ldh + j);
            }
            float gz;
            switch (m.act) {
              case Act::Sigmoid: {
                gz = gh * h * (1.0f - h);
                break;
              }
              case Act::ReLU:
                gz = zv <= 0.0f ? 0.0f : gh;  // NaN z passes gh, as torch.relu's backward
                break;
              case Act::PReLU:
                if (!(zv > 0.0f)) sa += gh * zv;  // NaN z counts, as torch.where's backward
                gz = zv > 0.0f ? gh : a * gh;
                break;
              default: {  // Dice
                const float xhat = (zv - mu) * is;
                const float pj = sigm(gam * xhat + bet);
                const float dy = gh * zv * (1.0f - a) * pj * (1.0f - pj);
                const float dxhat = dy * gam;
                sa += gh * zv * (1.0f - pj);
                sg += dy * xhat;
                sb += dy;
                float bn = dxhat;
                if (m.ca[l]) bn -= ca + xhat * cc;
                gz = gh * (a + (1.0f - a) * pj) + is * bn;
                break;
              }
            }
            if (l == 0) C[t * g.ldC + j] = gz;
            else sz += gz;
            stv(G + t * g.ldG + j, gz);
          }
          if (NG == 1) {
            add_channel_sums(m, pl, l, L, j, part, sa, sg, sb, sz, sw);
          } else {
            float* r = red + grp * 5 * N + j;  // [NG][5][N]
            r[0] = sa;
            r[N] = sg;
            r[2 * N] = sb;
            r[3 * N] = sz;
            r[4 * N] = sw;
          }
        }
        // zero the padding of G (rows n..Mt*16, columns N..Np): the GEMMs sum over both
        for (Walk w(Np); w.t < Mt * 16; w.next())
          if (w.t >= n || w.c >= N) stv(G + w.t * g.ldG + w.c, 0.0f);
        __syncthreads();
        if (NG > 1)
          for (int jj = threadIdx.x; jj < N; jj += kThreads) {
            float v[5] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
            for (int q = 0; q < NG; ++q)
              for (int k = 0; k < 5; ++k) v[k] += red[(q * 5 + k) * N + jj];
            add_channel_sums(m, pl, l, L, jj, part, v[0], v[1], v[2], v[3], v[4]);
          }
        if (l == 0)  // e += dz_1 summed over each row's keys of the tile (C is rewritten below)
          for (Walk w(H1); w.t < nseg; w.next()) {
            float v = 0.0f;
            for (int t = ts.seg[w.t]; t < ts.seg[w.t + 1]; ++t) v += C[t * g.ldC + w.c];
            e_s[ts.segrow[w.t] * H1 + w.c] += v;
          }
        // dW_l += dz^T [h_{l-1} or x]  (accumulated in the partial slot, in place)
        const S* Bm = l == 0 ? X : reinterpret_cast<const S*>(sm + g.oH[l - 1]);
        const int ldb = l == 0 ? g.ldX : g.ldH[l - 1];
        const int64_t pw = l == 0 ? pl.Ws : pl.W[l];
        const int64_t ldp = l == 0 ? pl.ldWs : pl.ldW[l];
        tc_gemm_tn_acc<S>(Np / 16, g.Kp(l) / 16, Mt, G, g.ldG, Bm, ldb, part + pw, ldp);
        if (l == 0) __syncthreads();  // the per-row sums of dz_1 have read C
        // dL/d(input of layer l) = dz W_l  -> C [Mt*16, Ko_l]
        tc_gemm<S, false>(Mt, g.Ko(l) / 16, Np / 16, G, g.ldG, reinterpret_cast<const S*>(sm + g.oWo[l]),
                          g.ldWo[l], C, g.ldC);
        __syncthreads();
        if (l == 0) {
          // dk = a - b + q*u + w dout ; dq += sum_t b + k*u   ([a | b | u] = C[:, 0:D | D:2D | 2D:3D])
          S* dkb = static_cast<S*>(p.dk);
          for (Walk w(D); w.t < n; w.next()) {
            const int t = w.t, d = w.c;
            const int rr = ts.rid[t];
            const int64_t s = p.row_seq ? p.row_seq[r0 + rr] : r0 + rr;
            const float* cr = C + t * g.ldC;
            const float v = cr[d] - cr[D + d] + q_s[rr * D + d] * cr[2 * D + d] + w_s[t] * dout_s[rr * D + d];
            S* dst = dkb + seq_off(p, s) + ts.pos[t] * p.ldk + d;
            if (p.dk_rows)
              static_cast<float*>(p.dk_rows)[(p.score_start[r0 + rr] + ts.pos[t]) * D + d] = v;
            else if (shared_seq) atomic_addv(dst, v);
            else stv(dst, ldv(dst) + v);
          }
          for (Walk w(D); w.t < nseg; w.next()) {
            const int sg = w.t, d = w.c;
            const int rr = ts.segrow[sg];
            float a = dq_s[rr * D + d];
            for (int t = ts.seg[sg]; t < ts.seg[sg + 1]; ++t)
              a += C[t * g.ldC + D + d] + ldv(X + t * g.ldX + d) * C[t * g.ldC + 2 * D + d];
            dq_s[rr * D + d] = a;
          }
          __syncthreads();
        }
      }
      if (n < g.TM) break;
    }
    // per row: dq = dq_s + Wq^T e ; dWq += E q^T and db1 += e into the partials.
    // A row without valid keys takes no part (as in the reference): dq = 0 and
    // neither its query nor 0 * Wq reaches a gradient, so NaN/Inf there cannot leak.
    for (int idx = threadIdx.x; idx < nr * D; idx += kThreads) {
      const int rr = idx / D, d = idx - rr * D;
      float v = 0.0f;
      if (seen[rr]) {
        v = dq_s[idx];
        const float* wq = m.W[0] + d;
        for (int j = 0; j < H1; ++j) v += wq[int64_t(j) * 4 * D] * e_s[rr * H1 + j];
      }
      stv(static_cast<S*>(p.dq) + (r0 + rr) * p.lddq + d, v);
    }
    for (int idx = threadIdx.x; idx < H1 * D; idx += kThreads) {
      const int j = idx / D, d = idx - j * D;
      float v = 0.0f;
      for (int rr = 0; rr < nr; ++rr)
        if (seen[rr]) v += e_s[rr * H1 + j] * q_s[rr * D + d];
      part[pl.Wqd + idx] += v;
    }
    for (int j = threadIdx.x; j < H1; j += kThreads) {
      float v = 0.0f;
      for (int rr = 0; rr < nr; ++rr) v += e_s[rr * H1 + j];
      part[pl.b1 + j] += v;
    }
    __syncthreads();
  }
}

int blocks_per_sm(const DevInfo& di, int64_t smem) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(2, di.smem_per_sm / (smem + 1024))));
}

}  // namespace

// ---------------------------------------------------------------------------
// Host entry points (called by din_cuda.cu)
// ---------------------------------------------------------------------------
bool tc_forward_plan(const DinParams& p, const DevInfo& di, TcFwdPlan* plan) {
  static_assert(4 * 64 <= kThreads, "the forward's scores take four threads per key of a tile");
  if (p.dtype != DType::F16 && p.dtype != DType::BF16) return false;
  const int64_t per_row = 4 * p.dim + 8 * p.dim + 4 * p.hidden[0] + 4 + 8 + 8;  // q, acc, c, mx, den, cnt
  const int R = pick_R(p, di, per_row);
  for (int TM = 64; TM >= 16; TM /= 2) {
    const TcGeo g = fwd_geo(p, TM, R);
    if (g.smem > di.smem_optin) continue;
    plan->TM = TM;
    plan->R = R;
    plan->device = di.device;
    plan->smem = g.smem;
    plan->n_chunks = g.n_chunks;
    plan->grid = std::max<int64_t>(1, std::min<int64_t>(g.n_chunks, int64_t(di.sms) * blocks_per_sm(di, g.smem)));
    return true;
  }
  return false;
}

void tc_forward(const DinParams& p, const Net<float>& m, const TcFwdPlan& plan, unsigned long long* counter,
                cudaStream_t st) {
  const TcGeo g = fwd_geo(p, plan.TM, plan.R);
  if (p.dtype == DType::F16) {
    set_smem(reinterpret_cast<const void*>(&din_tc_forward_kernel<__half>), g.smem, plan.device,
             "cudaFuncSetAttribute(din_tc_forward_kernel<half>)");
    DIN_LAUNCH(static_cast<unsigned>(plan.grid), kThreads, g.smem, st, din_tc_forward_kernel<__half>)(
        p, m, g, counter);
  } else {
    set_smem(reinterpret_cast<const void*>(&din_tc_forward_kernel<__nv_bfloat16>), g.smem, plan.device,
             "cudaFuncSetAttribute(din_tc_forward_kernel<bf16>)");
    DIN_LAUNCH(static_cast<unsigned>(plan.grid), kThreads, g.smem, st, din_tc_forward_kernel<__nv_bfloat16>)(
        p, m, g, counter);
  }
  check_launch("din_tc_forward_kernel");
}

bool tc_backward_plan(const DinParams& p, const DevInfo& di, TcBwdPlan* plan) {
  if (p.dtype != DType::F16 && p.dtype != DType::BF16) return false;
  // q, dout, dq, c, e (float); wdw (double); seen (int); wred (double [2][kWarps])
  const int64_t per_row = 4 * (3 * p.dim + 2 * p.hidden[0]) + 8 + 4 + 16 * kWarps;
  const int R = pick_R(p, di, per_row);
  // Prefer a tile with which two CTAs share an SM; else the largest that fits; at the same
  // occupancy, room for the per-group channel sums.
  for (int pass = 0; pass < 2; ++pass)
    for (int split = 1; split >= 0; --split)
      for (int TM = 64; TM >= 16; TM /= 2) {
        const TcGeo g = bwd_geo(p, TM, R, split != 0);
        const int64_t limit = pass == 0 ? std::min<int64_t>(di.smem_optin, di.smem_per_sm / 2 - 1024) : di.smem_optin;
        if (g.smem > limit) continue;
        plan->TM = TM;
        plan->R = R;
        plan->split = split != 0;
        plan->device = di.device;
        plan->smem = g.smem;
        plan->n_chunks = g.n_chunks;
        plan->part = PartLay(p, 16);
        const int64_t slot = plan->part.stride * 4;
        int64_t n = int64_t(di.sms) * blocks_per_sm(di, g.smem);
        n = std::min(n, std::max<int64_t>(di.sms, (int64_t(512) << 20) / std::max<int64_t>(slot, 1)));
        plan->n_cta = std::max<int64_t>(1, std::min<int64_t>(n, g.n_chunks));
        return true;
      }
  return false;
}

void tc_backward(const DinParams& p, const Net<float>& m, const TcBwdPlan& plan, float* part_base,
                 cudaStream_t st) {
  const TcGeo g = bwd_geo(p, plan.TM, plan.R, plan.split);
  if (p.dtype == DType::F16) {
    set_smem(reinterpret_cast<const void*>(&din_tc_backward_kernel<__half>), g.smem, plan.device,
             "cudaFuncSetAttribute(din_tc_backward_kernel<half>)");
    DIN_LAUNCH(static_cast<unsigned>(plan.n_cta), kThreads, g.smem, st, din_tc_backward_kernel<__half>)(
        p, m, g, plan.part, part_base);
  } else {
    set_smem(reinterpret_cast<const void*>(&din_tc_backward_kernel<__nv_bfloat16>), g.smem, plan.device,
             "cudaFuncSetAttribute(din_tc_backward_kernel<bf16>)");
    DIN_LAUNCH(static_cast<unsigned>(plan.n_cta), kThreads, g.smem, st, din_tc_backward_kernel<__nv_bfloat16>)(
        p, m, g, plan.part, part_base);
  }
  check_launch("din_tc_backward_kernel");
}

}  // namespace cuk
}  // namespace din
