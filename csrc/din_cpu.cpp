// Fused DIN attention pooling on CPU: forward, Dice statistics and backward.
//
// Algorithm (per output row r, sequence s, valid positions t):
//   The first Linear of the activation unit sees x_t = [q, k_t, q-k_t, q*k_t]
//   and folds to  z1_t = M_r k_t + c_r  with
//       M_r = (Wk - Wd) + Wm diag(q)      [H1, D]   formed once per row
//       c_r = (Wq + Wd) q + b1            [H1]      formed once per row
//   so the [B,T,4D] tensor never exists.  Hidden layers run on a tile of up to
//   kTile valid keys at a time; padding is never touched.  The score
//   s_t = wout . h_L + bout becomes the weight (none) or an online softmax of
//   scale*s (one pass, like flash attention), and out = sum_t w_t k_t.
//   The backward recomputes the activations tile by tile (nothing [B,T,H] is
//   stored); parameter gradients go to per-thread partials that are summed once.
//   Layer-1 gradients need only two per-row reductions, G = sum_t dz1_t k_t^T
//   and e = sum_t dz1_t:  dWq = e q^T, dWk = G, dWd = e q^T - G, dWm = G diag(q),
//   dq = (Wq + Wd)^T e + colsum(Wm * G).
//
// Napkin math (fp32, D=36, H=(80,40), 51k valid positions = B 1024 x mean len 50):
//   forward FLOPs/position = 2(D*H1 + H1*H2 + H2 + D) = 12.3k  -> 0.63 GFLOP/call;
//   bytes: keys read once = 51k*36*4 = 7.4 MB, so it is compute bound on CPU
//   (~3 ms at 190 GFLOP/s peak).  The backward costs about 2.5x the forward.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "din_params.h"

namespace din {
namespace {

constexpr int kTile = 8;  // valid keys per register/L1 tile

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// Runtime dispatch: the hot dense products get AVX-512 / AVX2 clones picked at
// load time, while the package itself stays portable x86-64.
#define DIN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DIN_CLONES
#endif

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Z[n, N] = bias + X[n, K] @ WT[K, N]   (WT row-major, K rows of N)
template <typename T>
DIN_CLONES void dense_tile(int n, int K, int N, const T* X, int ldx, const T* WT, const T* bias,
                           T* Z) {
  for (int tt = 0; tt < n; ++tt) {
    T* z = Z + tt * N;
    if (bias) {
      for (int j = 0; j < N; ++j) z[j] = bias[j];
    } else {
      for (int j = 0; j < N; ++j) z[j] = T(0);
    }
  }
  for (int kk = 0; kk < K; ++kk) {
    const T* w = WT + static_cast<int64_t>(kk) * N;
    for (int tt = 0; tt < n; ++tt) {
      const T x = X[tt * ldx + kk];
      T* z = Z + tt * N;
#pragma omp simd
      for (int j = 0; j < N; ++j) z[j] += x * w[j];
    }
  }
}

// G[K, N] += X[n, K]^T @ Y[n, N]
template <typename T>
DIN_CLONES void outer_acc(int n, int K, int N, const T* X, int ldx, const T* Y, T* G) {
  for (int tt = 0; tt < n; ++tt) {
    const T* y = Y + tt * N;
    for (int kk = 0; kk < K; ++kk) {
      const T x = X[tt * ldx + kk];
      T* g = G + static_cast<int64_t>(kk) * N;
#pragma omp simd
      for (int j = 0; j < N; ++j) g[j] += x * y[j];
    }
  }
}

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

// Read-only, per-call view of the parameters with the fold precomputed.
template <typename T>
struct Model {
  int L = 0, D = 0, Hmax = 0;
  int H[kMaxLayers] = {};
  int in[kMaxLayers] = {};      // fan-in of hidden layer l (l >= 1)
  Act act = Act::Sigmoid;
  std::vector<T> AT, WmT, WqdT;  // [D, H1]: (Wk-Wd)^T, Wm^T, (Wq+Wd)^T
  std::vector<T> WT[kMaxLayers];  // l >= 1: W_l^T [H_{l-1}, H_l]
  const T* W[kMaxLayers + 1] = {};
  const T* b[kMaxLayers + 1] = {};
  const T* alpha[kMaxLayers] = {};
  const T* gamma[kMaxLayers] = {};
  const T* beta[kMaxLayers] = {};
  const T* mean[kMaxLayers] = {};
  const T* invstd[kMaxLayers] = {};
  const T* corr_a[kMaxLayers] = {};
  const T* corr_c[kMaxLayers] = {};

  explicit Model(const DinParams& p) {
    L = p.num_layers;
    D = static_cast<int>(p.dim);
    act = p.act;
    for (int l = 0; l <= L; ++l) {
      W[l] = static_cast<const T*>(p.W[l]);
      b[l] = static_cast<const T*>(p.b[l]);
      if (!W[l] || !b[l]) throw std::invalid_argument("missing weight or bias pointer");
    }
    for (int l = 0; l < L; ++l) {
      H[l] = p.hidden[l];
      Hmax = std::max(Hmax, H[l]);
      in[l] = l == 0 ? 4 * D : H[l - 1];
      alpha[l] = static_cast<const T*>(p.alpha[l]);
      gamma[l] = static_cast<const T*>(p.bn_gamma[l]);
      beta[l] = static_cast<const T*>(p.bn_beta[l]);
      mean[l] = static_cast<const T*>(p.bn_mean[l]);
      invstd[l] = static_cast<const T*>(p.bn_invstd[l]);
      corr_a[l] = static_cast<const T*>(p.bn_corr_a[l]);
      corr_c[l] = static_cast<const T*>(p.bn_corr_c[l]);
      if ((act == Act::PReLU || act == Act::Dice) && !alpha[l])
        throw std::invalid_argument("prelu/dice need alpha for every layer");
      if (act == Act::Dice && (!gamma[l] || !beta[l] || !mean[l] || !invstd[l]))
        throw std::invalid_argument("dice needs gamma, beta, mean and invstd for every layer");
    }
    const int H1 = H[0];
    AT.assign(static_cast<size_t>(D) * H1, T(0));
    WmT.assign(AT.size(), T(0));
    WqdT.assign(AT.size(), T(0));
    for (int j = 0; j < H1; ++j) {
      const T* w = W[0] + static_cast<int64_t>(j) * 4 * D;
      for (int d = 0; d < D; ++d) {
        const T wq = w[d], wk = w[D + d], wd = w[2 * D + d], wm = w[3 * D + d];
        AT[d * H1 + j] = wk - wd;
        WmT[d * H1 + j] = wm;
        WqdT[d * H1 + j] = wq + wd;
      }
    }
    for (int l = 1; l < L; ++l) {
      WT[l].assign(static_cast<size_t>(H[l - 1]) * H[l], T(0));
      for (int i = 0; i < H[l]; ++i)
        for (int j = 0; j < H[l - 1]; ++j) WT[l][j * H[l] + i] = W[l][i * H[l - 1] + j];
    }
  }

  // h = act(z) for n rows of width H[l]
  void activate(int l, int n, const T* z, T* h) const {
    const int Hl = H[l];
    for (int tt = 0; tt < n; ++tt) {
      const T* zr = z + tt * Hl;
      T* hr = h + tt * Hl;
      switch (act) {
        case Act::Sigmoid:
          for (int j = 0; j < Hl; ++j) hr[j] = sigmoid(zr[j]);
          break;
        case Act::ReLU:
          for (int j = 0; j < Hl; ++j) hr[j] = zr[j] > T(0) ? zr[j] : T(0);
          break;
        case Act::PReLU:
          for (int j = 0; j < Hl; ++j) hr[j] = zr[j] > T(0) ? zr[j] : alpha[l][j] * zr[j];
          break;
        case Act::Dice:
          for (int j = 0; j < Hl; ++j) {
            const T xhat = (zr[j] - mean[l][j]) * invstd[l][j];
            const T pj = sigmoid(gamma[l][j] * xhat + beta[l][j]);
            hr[j] = zr[j] * (alpha[l][j] + (T(1) - alpha[l][j]) * pj);
          }
          break;
      }
    }
  }
};

// Per-thread scratch, allocated once per thread per call (never per row).
template <typename T>
struct Scratch {
  std::vector<T> MT, M, c, keys, z, h, g, g2, GT, e;
  std::vector<const T*> kp;
  std::vector<int64_t> pos;
  Scratch(const Model<T>& m) {
    const size_t DH = static_cast<size_t>(m.D) * m.H[0];
    MT.resize(DH); M.resize(DH); GT.resize(DH);
    c.resize(m.H[0]); e.resize(m.H[0]);
    keys.resize(static_cast<size_t>(kTile) * m.D);
    z.resize(static_cast<size_t>(kTile) * m.Hmax * m.L);
    h.resize(z.size());
    g.resize(static_cast<size_t>(kTile) * std::max(m.Hmax, m.D));
    g2.resize(g.size());
    kp.resize(kTile);
    pos.resize(kTile);
  }
  T* zl(const Model<T>& m, int l) { return z.data() + static_cast<size_t>(l) * kTile * m.Hmax; }
  T* hl(const Model<T>& m, int l) { return h.data() + static_cast<size_t>(l) * kTile * m.Hmax; }
};

// Row geometry shared by every pass.
struct Row {
  int64_t s, len;
};

inline Row row_of(const DinParams& p, int64_t r) {
  const int64_t s = p.row_seq ? p.row_seq[r] : r;
  // Python validates lengths; clamping keeps a bad value from reading out of bounds.
  const int64_t len = std::min<int64_t>(std::max<int64_t>(p.seq_len[s], 0), p.max_len);
  return {s, len};
}

inline bool valid(const DinParams& p, const Row& row, int64_t t) {
  return !p.mask || p.mask[row.s * p.ld_mask + t];
}

// Iterates the valid positions of a row in tiles; calls f(n) after filling
// sc.pos[0..n) and sc.kp[0..n) and copying the keys into sc.keys [n, D].
template <typename T, typename F>
void for_each_tile(const DinParams& p, const Row& row, const Model<T>& m, Scratch<T>& sc, F&& f) {
  const T* kbase = static_cast<const T*>(p.k) + p.seq_start[row.s];
  int n = 0;
  for (int64_t t = 0; t < row.len; ++t) {
    if (!valid(p, row, t)) continue;
    const T* kt = kbase + t * p.ldk;
    sc.pos[n] = t;
    sc.kp[n] = kt;
    std::memcpy(sc.keys.data() + static_cast<size_t>(n) * m.D, kt, sizeof(T) * m.D);
    if (++n == kTile) {
      f(n);
      n = 0;
    }
  }
  if (n) f(n);
}

// Folded first layer for row r: MT = (Wk-Wd)^T + diag(q) Wm^T, c = (Wq+Wd) q + b1.
template <typename T>
void fold_row(const Model<T>& m, const T* q, Scratch<T>& sc, bool need_M) {
  const int D = m.D, H1 = m.H[0];
  for (int j = 0; j < H1; ++j) sc.c[j] = m.b[0][j];
  for (int d = 0; d < D; ++d) {
    const T qd = q[d];
    const T* a = m.AT.data() + d * H1;
    const T* wm = m.WmT.data() + d * H1;
    const T* wqd = m.WqdT.data() + d * H1;
    T* mt = sc.MT.data() + d * H1;
    for (int j = 0; j < H1; ++j) {
      mt[j] = a[j] + qd * wm[j];
      sc.c[j] += qd * wqd[j];
    }
  }
  if (need_M)
    for (int j = 0; j < H1; ++j)
      for (int d = 0; d < D; ++d) sc.M[j * D + d] = sc.MT[d * H1 + j];
}

// Hidden layers 0..last for a tile of n keys (keys already in sc.keys).
template <typename T>
void hidden_tile(const Model<T>& m, Scratch<T>& sc, int n, int last) {
  for (int l = 0; l <= last; ++l) {
    T* z = sc.zl(m, l);
    if (l == 0)
      dense_tile<T>(n, m.D, m.H[0], sc.keys.data(), m.D, sc.MT.data(), sc.c.data(), z);
    else
      dense_tile<T>(n, m.H[l - 1], m.H[l], sc.hl(m, l - 1), m.H[l - 1], m.WT[l].data(), m.b[l], z);
    if (l < m.L) m.activate(l, n, z, sc.hl(m, l));
  }
}

template <typename T>
inline T score_of(const Model<T>& m, Scratch<T>& sc, int tt) {
  const int HL = m.H[m.L - 1];
  const T* h = sc.hl(m, m.L - 1) + tt * HL;
  T s = m.b[m.L][0];
  for (int i = 0; i < HL; ++i) s += m.W[m.L][i] * h[i];
  return s;
}

int threads_of(const DinParams& p) { return std::max(1, p.num_threads); }

template <typename T>
void forward_impl(const DinParams& p) {
  const Model<T> m(p);
  const int D = m.D;
  const bool softmax = p.norm == Norm::Softmax;
  const T scale = static_cast<T>(p.scale);
#pragma omp parallel num_threads(threads_of(p))
  {
    Scratch<T> sc(m);
    std::vector<T> acc(D);
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < p.rows; ++r) {
      const Row row = row_of(p, r);
      const T* q = static_cast<const T*>(p.q) + r * p.ldq;
      T* out = static_cast<T*>(p.out) + r * p.ldo;
      T* sr = static_cast<T*>(p.scores) + r * p.ld_scores;
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(sr, sr + p.max_len, T(0));
      fold_row(m, q, sc, false);
      // Online softmax state: running max mx and normaliser den; acc is scaled
      // by exp(-mx).  Raw logits are parked in the scores row and normalised
      // at the end of the row.
      T mx = -INFINITY, den = T(0);
      bool any = false;
      for_each_tile(p, row, m, sc, [&](int n) {
        hidden_tile(m, sc, n, m.L - 1);
        for (int tt = 0; tt < n; ++tt) {
          const T s = score_of(m, sc, tt);
          const T* kt = sc.keys.data() + tt * D;
          any = true;
          if (!softmax) {
            sr[sc.pos[tt]] = s;
            for (int d = 0; d < D; ++d) acc[d] += s * kt[d];
          } else {
            const T x = scale * s;
            sr[sc.pos[tt]] = x;
            if (x > mx) {
              const T f = std::exp(mx - x);  // exp(-inf) = 0 on the first key
              den *= f;
              for (int d = 0; d < D; ++d) acc[d] *= f;
              mx = x;
            }
            const T e = std::exp(x - mx);
            den += e;
            for (int d = 0; d < D; ++d) acc[d] += e * kt[d];
          }
        }
      });
      if (softmax && any) {
        const T inv = T(1) / den;
        for (int d = 0; d < D; ++d) acc[d] *= inv;
        for (int64_t t = 0; t < row.len; ++t)
          if (valid(p, row, t)) sr[t] = std::exp(sr[t] - mx) * inv;
      }
      for (int d = 0; d < D; ++d) out[d] = acc[d];
    }
  }
}

template <typename T>
void stats_impl(const DinParams& p) {
  const Model<T> m(p);
  const int l = p.stats_layer;
  if (l < 0 || l >= m.L || !p.stats_out) throw std::invalid_argument("stats: bad stats_layer");
  const int Hl = m.H[l];
  const int nt = threads_of(p);
  std::vector<double> part(static_cast<size_t>(nt) * 2 * Hl, 0.0);
#pragma omp parallel num_threads(nt)
  {
    Scratch<T> sc(m);
    double* mine = part.data() + static_cast<size_t>(thread_id()) * 2 * Hl;
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < p.rows; ++r) {
      const Row row = row_of(p, r);
      fold_row(m, static_cast<const T*>(p.q) + r * p.ldq, sc, false);
      for_each_tile(p, row, m, sc, [&](int n) {
        // Only layers < l are activated (with batch stats already known).
        for (int ll = 0; ll <= l; ++ll) {
          T* z = sc.zl(m, ll);
          if (ll == 0)
            dense_tile<T>(n, m.D, m.H[0], sc.keys.data(), m.D, sc.MT.data(), sc.c.data(), z);
          else
            dense_tile<T>(n, m.H[ll - 1], m.H[ll], sc.hl(m, ll - 1), m.H[ll - 1], m.WT[ll].data(),
                          m.b[ll], z);
          if (ll < l) m.activate(ll, n, z, sc.hl(m, ll));
        }
        const T* z = sc.zl(m, l);
        for (int tt = 0; tt < n; ++tt)
          for (int j = 0; j < Hl; ++j) {
            const double v = z[tt * Hl + j];
            mine[j] += v;
            mine[Hl + j] += v * v;
          }
      });
    }
  }
  for (int j = 0; j < 2 * Hl; ++j) {
    double s = 0.0;
    for (int t = 0; t < nt; ++t) s += part[static_cast<size_t>(t) * 2 * Hl + j];
    p.stats_out[j] = s;
  }
}

// Layout of one thread's parameter-gradient partials (accumulation type).
struct GradLayout {
  int64_t GT = 0, GqT = 0, EqT = 0, e = 0, W[kMaxLayers + 1] = {}, b[kMaxLayers + 1] = {};
  int64_t alpha[kMaxLayers] = {}, gamma[kMaxLayers] = {}, beta[kMaxLayers] = {};
  int64_t total = 0;
  explicit GradLayout(const DinParams& p) {
    const int64_t D = p.dim, H1 = p.hidden[0];
    int64_t o = 0;
    GT = o; o += D * H1;
    GqT = o; o += D * H1;
    EqT = o; o += D * H1;
    e = o; o += H1;
    for (int l = 1; l <= p.num_layers; ++l) {
      const int64_t out = l < p.num_layers ? p.hidden[l] : 1;
      W[l] = o; o += out * p.hidden[l - 1];
      b[l] = o; o += out;
    }
    for (int l = 0; l < p.num_layers; ++l) {
      alpha[l] = o; o += p.hidden[l];
      gamma[l] = o; o += p.hidden[l];
      beta[l] = o; o += p.hidden[l];
    }
    total = o;
  }
};

template <typename T>
void backward_impl(const DinParams& p) {
  const Model<T> m(p);
  const int D = m.D, L = m.L, H1 = m.H[0];
  const bool softmax = p.norm == Norm::Softmax;
  const T scale = static_cast<T>(p.scale);
  const int red = p.reduce_layer;
  const bool reducing = red >= 0;
  if (reducing && (red >= L || !p.reduce_out)) throw std::invalid_argument("backward: bad reduce_layer");
  const int nt = threads_of(p);
  const GradLayout lay(p);
  if (!reducing && p.workspace_bytes < static_cast<int64_t>(sizeof(T)) * lay.total * nt)
    throw std::invalid_argument("backward: workspace too small");
  std::vector<double> red_part(reducing ? static_cast<size_t>(nt) * 2 * m.H[red] : 0, 0.0);
  T* ws = static_cast<T*>(p.workspace);
  const bool shared_seq = p.row_seq != nullptr;  // rows may share keys: dk needs atomics

#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_id();
    Scratch<T> sc(m);
    T* gp = reducing ? nullptr : ws + static_cast<int64_t>(tid) * lay.total;
    if (gp) std::fill(gp, gp + lay.total, T(0));
    double* rp = reducing ? red_part.data() + static_cast<size_t>(tid) * 2 * m.H[red] : nullptr;
    std::vector<T> dw(kTile), dsv(kTile);

#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < p.rows; ++r) {
      const Row row = row_of(p, r);
      const T* q = static_cast<const T*>(p.q) + r * p.ldq;
      const T* go = static_cast<const T*>(p.dout) + r * p.ld_dout;
      const T* wr = static_cast<const T*>(p.scores) + r * p.ld_scores;
      const T* gsr = p.dscores ? static_cast<const T*>(p.dscores) + r * p.ld_dscores : nullptr;
      const T* kbase = static_cast<const T*>(p.k) + p.seq_start[row.s];
      T* dkbase = reducing ? nullptr : static_cast<T*>(p.dk) + p.seq_start[row.s];

      // dL/dw_t = dout . k_t + dscores_t; softmax needs sum_u w_u dL/dw_u first.
      auto dw_of = [&](int64_t t, const T* kt) {
        T v = gsr ? gsr[t] : T(0);
        for (int d = 0; d < D; ++d) v += go[d] * kt[d];
        return v;
      };
      T wdw = T(0);
      if (softmax)
        for (int64_t t = 0; t < row.len; ++t)
          if (valid(p, row, t)) wdw += wr[t] * dw_of(t, kbase + t * p.ldk);

      fold_row(m, q, sc, !reducing);
      std::fill(sc.GT.begin(), sc.GT.end(), T(0));
      std::fill(sc.e.begin(), sc.e.end(), T(0));

      for_each_tile(p, row, m, sc, [&](int n) {
        hidden_tile(m, sc, n, L - 1);
        const int HL = m.H[L - 1];
        T* gh = sc.g.data();  // dL/dh of the current layer [n, H_l]
        for (int tt = 0; tt < n; ++tt) {
          const int64_t t = sc.pos[tt];
          dw[tt] = dw_of(t, sc.kp[tt]);
          dsv[tt] = softmax ? scale * wr[t] * (dw[tt] - wdw) : dw[tt];
          for (int i = 0; i < HL; ++i) gh[tt * HL + i] = dsv[tt] * m.W[L][i];
          if (!reducing) {
            const T* h = sc.hl(m, L - 1) + tt * HL;
            T* dWo = gp + lay.W[L];
            for (int i = 0; i < HL; ++i) dWo[i] += dsv[tt] * h[i];
            gp[lay.b[L]] += dsv[tt];
            T* dkt = dkbase + t * p.ldk;  // direct term w_t * dout
            if (shared_seq) {
              for (int d = 0; d < D; ++d) {
#pragma omp atomic
                dkt[d] += wr[t] * go[d];
              }
            } else {
              for (int d = 0; d < D; ++d) dkt[d] += wr[t] * go[d];
            }
          }
        }
        for (int l = L - 1; l >= 0; --l) {
          const int Hl = m.H[l];
          const T* z = sc.zl(m, l);
          const T* h = sc.hl(m, l);
          T* gz = gh;  // in place: dL/dz overwrites dL/dh
          for (int tt = 0; tt < n; ++tt)
            for (int j = 0; j < Hl; ++j) {
              const int ix = tt * Hl + j;
              const T g = gh[ix], zv = z[ix];
              switch (m.act) {
                case Act::Sigmoid:
                  gz[ix] = g * h[ix] * (T(1) - h[ix]);
                  break;
                case Act::ReLU:
                  gz[ix] = zv > T(0) ? g : T(0);
                  break;
                case Act::PReLU:
                  if (!reducing && zv <= T(0)) gp[lay.alpha[l] + j] += g * zv;
                  gz[ix] = zv > T(0) ? g : m.alpha[l][j] * g;
                  break;
                case Act::Dice: {
                  const T a = m.alpha[l][j];
                  const T xhat = (zv - m.mean[l][j]) * m.invstd[l][j];
                  const T pj = sigmoid(m.gamma[l][j] * xhat + m.beta[l][j]);
                  const T dy = g * zv * (T(1) - a) * pj * (T(1) - pj);
                  const T dxhat = dy * m.gamma[l][j];
                  if (reducing && l == red) {
                    rp[j] += dxhat;
                    rp[Hl + j] += dxhat * xhat;
                  }
                  if (!reducing) {
                    gp[lay.alpha[l] + j] += g * zv * (T(1) - pj);
                    gp[lay.gamma[l] + j] += dy * xhat;
                    gp[lay.beta[l] + j] += dy;
                  }
                  T bn = dxhat;
                  if (m.corr_a[l]) bn -= m.corr_a[l][j] + xhat * m.corr_c[l][j];
                  gz[ix] = g * (a + (T(1) - a) * pj) + m.invstd[l][j] * bn;
                  break;
                }
              }
            }
          if (reducing && l == red) return;  // this tile is done for the reduction
          if (l > 0) {
            if (!reducing) {
              outer_acc<T>(n, Hl, m.H[l - 1], gz, Hl, sc.hl(m, l - 1), gp + lay.W[l]);
              for (int tt = 0; tt < n; ++tt)
                for (int j = 0; j < Hl; ++j) gp[lay.b[l] + j] += gz[tt * Hl + j];
            }
            // dL/dh_{l-1} = gz @ W_l  ([n,H_l] x [H_l,H_{l-1}])
            T* next = (gh == sc.g.data()) ? sc.g2.data() : sc.g.data();
            dense_tile<T>(n, Hl, m.H[l - 1], gz, Hl, m.W[l], nullptr, next);
            gh = next;
          } else {
            // Layer 1: accumulate G^T [D,H1] += keys^T gz, e += sum gz, dk += gz M.
            outer_acc<T>(n, D, H1, sc.keys.data(), D, gz, sc.GT.data());
            for (int tt = 0; tt < n; ++tt)
              for (int j = 0; j < H1; ++j) sc.e[j] += gz[tt * H1 + j];
            T* dkt = (gh == sc.g.data()) ? sc.g2.data() : sc.g.data();
            dense_tile<T>(n, H1, D, gz, H1, sc.M.data(), nullptr, dkt);
            for (int tt = 0; tt < n; ++tt) {
              T* dst = dkbase + sc.pos[tt] * p.ldk;
              const T* src = dkt + tt * D;
              if (shared_seq) {
                for (int d = 0; d < D; ++d) {
#pragma omp atomic
                  dst[d] += src[d];
                }
              } else {
                for (int d = 0; d < D; ++d) dst[d] += src[d];
              }
            }
          }
        }
      });
      if (reducing) continue;
      // Per-row layer-1 terms: dq and the folded weight gradients.
      T* dq = static_cast<T*>(p.dq) + r * p.lddq;
      for (int d = 0; d < D; ++d) {
        const T* gt = sc.GT.data() + d * H1;
        const T* wqd = m.WqdT.data() + d * H1;
        const T* wm = m.WmT.data() + d * H1;
        T* GT = gp + lay.GT + d * H1;
        T* GqT = gp + lay.GqT + d * H1;
        T* EqT = gp + lay.EqT + d * H1;
        const T qd = q[d];
        T v = T(0);
        for (int j = 0; j < H1; ++j) {
          v += wqd[j] * sc.e[j] + wm[j] * gt[j];
          GT[j] += gt[j];
          GqT[j] += qd * gt[j];
          EqT[j] += qd * sc.e[j];
        }
        dq[d] = v;
      }
      for (int j = 0; j < H1; ++j) gp[lay.e + j] += sc.e[j];
    }
  }

  if (reducing) {
    const int Hr = m.H[red];
    for (int j = 0; j < 2 * Hr; ++j) {
      double s = 0.0;
      for (int t = 0; t < nt; ++t) s += red_part[static_cast<size_t>(t) * 2 * Hr + j];
      p.reduce_out[j] = s;
    }
    return;
  }
  // Sum the per-thread partials into thread 0's slot, then scatter to outputs.
  for (int t = 1; t < nt; ++t) {
    const T* src = ws + static_cast<int64_t>(t) * lay.total;
    for (int64_t i = 0; i < lay.total; ++i) ws[i] += src[i];
  }
  T* dW0 = static_cast<T*>(p.dW[0]);
  for (int j = 0; j < H1; ++j) {
    T* row = dW0 + static_cast<int64_t>(j) * 4 * D;
    for (int d = 0; d < D; ++d) {
      const T g = ws[lay.GT + d * H1 + j], eq = ws[lay.EqT + d * H1 + j];
      row[d] = eq;
      row[D + d] = g;
      row[2 * D + d] = eq - g;
      row[3 * D + d] = ws[lay.GqT + d * H1 + j];
    }
  }
  std::copy(ws + lay.e, ws + lay.e + H1, static_cast<T*>(p.db[0]));
  for (int l = 1; l <= L; ++l) {
    const int64_t out = l < L ? m.H[l] : 1;
    std::copy(ws + lay.W[l], ws + lay.W[l] + out * m.H[l - 1], static_cast<T*>(p.dW[l]));
    std::copy(ws + lay.b[l], ws + lay.b[l] + out, static_cast<T*>(p.db[l]));
  }
  for (int l = 0; l < L; ++l) {
    if (p.dalpha[l]) std::copy(ws + lay.alpha[l], ws + lay.alpha[l] + m.H[l], static_cast<T*>(p.dalpha[l]));
    if (p.dgamma[l]) std::copy(ws + lay.gamma[l], ws + lay.gamma[l] + m.H[l], static_cast<T*>(p.dgamma[l]));
    if (p.dbeta[l]) std::copy(ws + lay.beta[l], ws + lay.beta[l] + m.H[l], static_cast<T*>(p.dbeta[l]));
  }
}

void check_common(const DinParams& p) {
  if (p.num_layers < 1 || p.num_layers > kMaxLayers)
    throw std::invalid_argument("num_layers must be 1..4");
  if (p.rows > 0 && (!p.q || !p.k || !p.seq_start || !p.seq_len))
    throw std::invalid_argument("missing q, k, seq_start or seq_len pointer");
  if (p.dim < 1) throw std::invalid_argument("dim must be >= 1");
}

template <typename F32, typename F64>
void by_dtype(const DinParams& p, F32 f32, F64 f64) {
  check_common(p);
  if (p.dtype == DType::F32) f32(p);
  else if (p.dtype == DType::F64) f64(p);
  else throw std::invalid_argument("CPU kernels take float32 or float64 (half types are upcast in Python)");
}

}  // namespace

void forward_cpu(const DinParams& p) {
  if (p.rows > 0 && (!p.out || !p.scores)) throw std::invalid_argument("forward: missing out/scores");
  by_dtype(p, forward_impl<float>, forward_impl<double>);
}

void stats_cpu(const DinParams& p) { by_dtype(p, stats_impl<float>, stats_impl<double>); }

void backward_cpu(const DinParams& p) {
  if (p.rows > 0 && (!p.dout || !p.scores)) throw std::invalid_argument("backward: missing dout/scores");
  if (p.reduce_layer < 0 && (!p.dq || !p.dk || !p.dW[0])) throw std::invalid_argument("backward: missing grads");
  by_dtype(p, backward_impl<float>, backward_impl<double>);
}

int64_t backward_workspace_bytes_cpu(const DinParams& p) {
  return GradLayout(p).total * acc_size(p.dtype) * std::max(1, p.num_threads);
}

}  // namespace din
