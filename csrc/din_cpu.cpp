#ifndef DIN_CPU_KERNEL_BODY
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
// Performance structure:
//   * Every dense product of a tile is one call of a register-blocked GEMM
//     micro-kernel (RB rows x NB vectors of accumulators held in registers,
//     one broadcast of A and NB loads of B per k).  Weights are packed once per
//     call with every row zero-padded to the vector width, so the micro-kernels see
//     whole vectors; padded lanes carry zeros through every layer.
//   * Activations, their derivatives and the exp of the softmax are vectorised
//     (float: a Cephes-style exp with range reduction; double keeps std::exp so
//     float64 results stay within 1e-12 of the reference).
//   * Everything is written once with GCC vector extensions and compiled three
//     times: AVX-512 (64-byte vectors), AVX2+FMA (32) and baseline x86-64 (16),
//     picked at run time (__builtin_cpu_supports; DIN_FUSED_CPU_ISA=avx512|avx2|
//     generic forces a lower one).  The package never needs -march=native.
//   * Threads come from our own small pool (Pool below), whose idle threads
//     block after a brief spin: on a machine shared with busy processes they do
//     not burn time slices the way spinning OpenMP waits do.
//   * Scratch is allocated once per thread per call, never per row.  The forward
//     schedules rows dynamically because lengths vary; passes that reduce across
//     rows (statistics, backward) hand rows out round-robin, statically, so their
//     results are bitwise reproducible for a given thread count.
//   * Short rows (up to 8 positions) share
//     packed tiles with other rows, layer 1 unfolded ([k, q*k] as a K = 2D
//     product plus c_r): no M_r per row, and full tiles through every layer.
//     A row's results do not depend on which rows share its tile.
//   * Rows sharing one longer sequence (a user against many candidates) run W at
//     a time, one row per vector lane (lanes_t): the history's tile is read once
//     for W rows, the score is FMAs, no layer pads its units to W.  Same
//     arithmetic in the same order as the row path, so bitwise its results.
//   * Fewer rows than threads (one user, a 100k history): rows are cut into parts
//     over positions (Plan); the parts' online-softmax partials (max, sum, pooled
//     sum) merge exactly, per row and in part order, forward and backward.
//   * Accuracy at any T: the pooled sum is summed per tile, tile sums accumulate in
//     double; the softmax denominator and the backward's row term are summed in double
//     throughout (WSum); the Dice statistics are (count, mean, M2) merged with Chan's
//     formula, never E[z^2] - E[z]^2.
//
// Napkin math (fp32, D=36, H=(80,40), 51k valid positions = B 1024 x mean len 50):
//   forward FLOPs/position = 2(D*H1 + H1*H2 + H2 + D) = 12.3k  -> 0.63 GFLOP/call;
//   bytes: keys read once = 51k*36*4 = 7.4 MB, so it is compute bound on CPU
//   (~3 ms at 190 GFLOP/s peak).  The backward costs about 2.5x the forward.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

#include <dlfcn.h>
#include <pthread.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "din_params.h"

// Vector-extension types cross no ABI boundary here (everything is inlined or
// internal), so the note about their calling convention is noise.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace din {
namespace {

#define DIN_INLINE inline __attribute__((always_inline))

constexpr int kTile = 32;  // valid keys per tile (multiple of every vector width)
// Rows of at most this many positions share tiles (Kernel::pack_add).  Measured
// break-even (AVX2, D=36, H=80-40, rows of equal length): ~7 positions in the
// forward, ~10 in the backward, whose per-row work is larger.  One limit for both,
// so that the backward recomputes exactly the forward's activations (with two, a
// pre-activation at a ReLU kink could take the other branch in the backward).
constexpr int kPack = 8;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DIN_X86 1
#else
#define DIN_X86 0
#endif

inline void cpu_relax() {
#if DIN_X86
  __builtin_ia32_pause();
#endif
}

// The pre-activation cache is written with non-temporal stores (Kernel::zcopy), which
// are weakly ordered: every thread of a pass fences before it reports done, so that
// the next pass's threads see them.
inline void store_fence() {
#if DIN_X86
  _mm_sfence();
#endif
}

// ---------------------------------------------------------------------------
// Torch's own OpenMP team, when the process has one (libgomp, or any OpenMP
// runtime that exports the GOMP entry points, such as LLVM's libomp).  Why:
// after every parallel torch op its OpenMP workers spin for milliseconds,
// waiting for the next region.  A kernel on a second set of threads then shares
// the cores with those spinners: the headline forward ran 1.33x slower right
// after a DeepCTR-Torch call than after a pause (docs/performance.md).  Run as
// the next OpenMP region instead, the same workers pick the kernel up at once,
// as they would an ATen op.  The entry points are found with dlsym, so _C links
// no OpenMP runtime and never loads a second one.
//   DIN_FUSED_CPU_THREADS=pool (read on every call) uses the Pool below instead;
// the ThreadSanitizer runs need it, since libgomp's synchronisation is invisible
// to TSan.  A forked child always uses the Pool: the parent's OpenMP workers do
// not exist there, and libgomp would wait for them.
// ---------------------------------------------------------------------------
class OmpTeam {
 public:
  static const OmpTeam* get() {
    static const OmpTeam* found = find();
    if (!found || forked()) return nullptr;
    const char* e = std::getenv("DIN_FUSED_CPU_THREADS");
    if (e && std::strcmp(e, "pool") == 0) return nullptr;
    return found;
  }

  // body(tid) for tid in [0, nt) on an OpenMP team of up to nt threads.  The
  // team's threads claim ids from a counter, so each id runs exactly once
  // whatever the team's size (a nested region or OMP_THREAD_LIMIT give fewer
  // threads) and without any other OpenMP entry point; every result depends on
  // the ids alone, i.e. on nt.  Unlike the Pool, concurrent callers are not
  // queued: each calling thread gets its own team, as with torch's own ops.
  void run(int nt, const std::function<void(int)>& body) const {
    Job job;
    job.body = &body;
    job.nt = nt;
    parallel_(&OmpTeam::member, &job, static_cast<unsigned>(nt), 0);
    if (job.error) std::rethrow_exception(job.error);
  }

  // Set in a forked child.  Registered when _C loads, so a fork after
  // `import din_fused` is covered; a child that first imports din_fused after
  // its parent ran OpenMP regions inherits libgomp's broken team, as torch's own
  // ops in that child do.
  static bool& forked() {
    static bool f = false;
    return f;
  }

 private:
  using ParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);
  struct Job {
    const std::function<void(int)>* body = nullptr;
    int nt = 0;
    std::atomic<int> next{0};
    std::mutex mu;
    std::exception_ptr error;  // an exception must not leave an OpenMP region
  };

  explicit OmpTeam(ParallelFn par) : parallel_(par) {}

  static const OmpTeam* find() {
    const auto par = reinterpret_cast<ParallelFn>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
    return par ? new OmpTeam(par) : nullptr;  // lives until the process exits
  }

  static void member(void* data) {
    Job& job = *static_cast<Job*>(data);
    for (int tid; (tid = job.next.fetch_add(1, std::memory_order_relaxed)) < job.nt;) {
      try {
        (*job.body)(tid);
      } catch (...) {
        std::lock_guard<std::mutex> lk(job.mu);
        if (!job.error) job.error = std::current_exception();
      }
    }
  }

  ParallelFn parallel_;
};

struct OmpForkGuard {
  OmpForkGuard() { pthread_atfork(nullptr, nullptr, [] { OmpTeam::forked() = true; }); }
};
const OmpForkGuard omp_fork_guard;

// ---------------------------------------------------------------------------
// Our own small, persistent thread pool, for a process without an OpenMP team
// (or DIN_FUSED_CPU_THREADS=pool).  Waiting threads spin only briefly (~200 us)
// and then block on a condition variable, so on a machine shared with other
// busy processes a thread that has finished its share gives its core to the
// straggler instead of burning its time slice.
// One job runs at a time: concurrent callers (Python threads, the GIL is
// released) queue on job_mu_, so every call gets the thread count it asked for
// and stays bitwise reproducible.
// ---------------------------------------------------------------------------
class Pool {
 public:
  // body(tid) for tid in [0, nt); the caller runs tid 0.  Returns when all are
  // done; rethrows the first exception a body threw.
  static void run(int nt, const std::function<void(int)>& body) {
    if (nt <= 1) {
      body(0);
      store_fence();  // a later call may read on more threads what this one wrote
      return;
    }
    const std::function<void(int)> fenced = [&body](int tid) {
      body(tid);
      store_fence();
    };
    if (const OmpTeam* team = OmpTeam::get()) {
      team->run(nt, fenced);
      return;
    }
    instance().run_job(nt, fenced);
  }

 private:
  // An idle worker spins this long before it blocks.  Long enough to span the
  // Python between two calls of a training or serving loop (~100 us), so a
  // follow-up call does not pay a futex wake-up (~50-100 us on a VM, more than a
  // B=128, T=10 kernel); short enough that a finished job leaves the cores to
  // other processes almost at once (libgomp's default spin is ~1,000x longer).
  static constexpr int64_t kSpinNs = 200000;
  template <class Done>
  static void spin(Done&& done) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(kSpinNs);
    for (int i = 1; !done(); ++i) {
      cpu_relax();
      if ((i & 63) == 0 && std::chrono::steady_clock::now() > until) return;
    }
  }

  static Pool& instance() {
    static std::once_flag once;
    std::call_once(once, [] {
      // A forked child has none of the parent's workers: it starts a fresh pool
      // (the parent's object is abandoned; its mutexes may be held by threads
      // that do not exist in the child).
      pthread_atfork(nullptr, nullptr, [] { current() = new Pool(); });
      current() = new Pool();
    });
    return *current();
  }
  static Pool*& current() {
    static Pool* p = nullptr;
    return p;
  }

  void run_job(int nt, const std::function<void(int)>& body) {
    std::lock_guard<std::mutex> job(job_mu_);
    {
      std::lock_guard<std::mutex> lk(mu_);
      while (static_cast<int>(workers_.size()) < nt - 1) {
        const int idx = static_cast<int>(workers_.size()) + 1;
        const uint64_t seen = gen_.load(std::memory_order_relaxed);
        workers_.emplace_back([this, idx, seen] { worker(idx, seen); });
        workers_.back().detach();  // the pool lives until the process exits
      }
      body_ = &body;
      active_ = nt;
      error_ = nullptr;
      pending_.store(nt - 1, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    try {
      body(0);
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu_);
      if (!error_) error_ = std::current_exception();
    }
    spin([this] { return pending_.load(std::memory_order_acquire) == 0; });
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return pending_.load(std::memory_order_acquire) == 0; });
    body_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

  void worker(int idx, uint64_t seen) {
    while (true) {
      spin([&] { return gen_.load(std::memory_order_acquire) != seen; });
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return gen_.load(std::memory_order_relaxed) != seen; });
      // gen_, active_ and body_ are read together under the lock, so a worker
      // that was idle in one job can never see the next job's body with a stale
      // generation.
      seen = gen_.load(std::memory_order_relaxed);
      if (idx >= active_) continue;
      const std::function<void(int)>* body = body_;
      lk.unlock();
      try {
        (*body)(idx);
      } catch (...) {
        std::lock_guard<std::mutex> g(mu_);
        if (!error_) error_ = std::current_exception();
      }
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> g(mu_);  // no lost wake-up: the waiter checks under mu_
        done_cv_.notify_one();
      }
    }
  }

  std::mutex job_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> pending_{0};
  int active_ = 0;
  const std::function<void(int)>* body_ = nullptr;
  std::exception_ptr error_;
};

// Every packed row is zero-padded to a whole number of the call's vector width
// (isa_bytes()), so the micro-kernels only see whole vectors and no lane is
// wasted: with AVX2, H=40 stays 40 wide (padding to 64 bytes made it 48, and the
// second layer's GEMM 20% longer).  The workspace size is queried before the
// ISA is known, so it assumes the widest padding, kMaxPadBytes.
constexpr int kMaxPadBytes = 64;
inline int padded(int n, int u) { return (n + u - 1) / u * u; }

// Zero-initialised, 64-byte aligned buffer.
template <typename T>
class ABuf {
 public:
  ABuf() = default;
  explicit ABuf(size_t n) { reset(n); }
  ABuf(const ABuf&) = delete;
  ABuf& operator=(const ABuf&) = delete;
  ~ABuf() { std::free(p_); }
  void reset(size_t n) {
    std::free(p_);
    const size_t bytes = (std::max<size_t>(n, 1) * sizeof(T) + 63) / 64 * 64;
    p_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (!p_) throw std::bad_alloc();
    std::memset(p_, 0, bytes);
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  T& operator[](size_t i) { return p_[i]; }
  const T& operator[](size_t i) const { return p_[i]; }

 private:
  T* p_ = nullptr;
};

// Per-thread scratch that outlives calls, grow-only, not zeroed: the lanes forward's buffers
// (Kernel::lanes_t; ~0.3 MB at D=36, H=(80, 40)), which a fresh allocation would map and fault in
// on every call, as DeepCTR-Torch's temporaries are (docs/performance.md, round 19).
inline unsigned char* thread_arena(size_t bytes) {
  struct Arena {
    unsigned char* p = nullptr;
    size_t n = 0;
    ~Arena() { std::free(p); }
  };
  thread_local Arena a;
  if (a.n < bytes) {
    std::free(a.p);
    a.n = 0;
    a.p = static_cast<unsigned char*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
    if (!a.p) throw std::bad_alloc();
    a.n = bytes;
  }
  return a.p;
}

// ---------------------------------------------------------------------------
// Parameters packed once per call (generic code, runs before the threads).
// ---------------------------------------------------------------------------
template <typename T>
struct Model {
  int pad_bytes, U;  // padding unit of the call (its vector width) in bytes and in elements
  int L = 0, D = 0, Dp = 0, Hmaxp = 0;
  int H[kMaxLayers] = {}, Hp[kMaxLayers] = {};
  Act act = Act::Sigmoid;
  bool keep_z = false;           // the backward needs pre-activations (prelu, dice)
  // [2D][H1p]: (Wk-Wd)^T, then Wm^T (AT and WmT point into it), so that packed short
  // rows (Kernel::pack_flush) run layer 1 unfolded as one K = 2D product.
  ABuf<T> AWmT;
  const T* AT = nullptr;
  const T* WmT = nullptr;
  ABuf<T> WqdT;                  // [D][H1p]: (Wq+Wd)^T
  ABuf<T> Ab, Wmb, Wqdb;         // [H1][Dp]: Wk-Wd, Wm, Wq+Wd (backward: M = A + Wm diag(q))
  ABuf<T> bias[kMaxLayers];      // [Hp_l]
  ABuf<T> WT[kMaxLayers];        // l >= 1: W_l^T  [H_{l-1}][Hp_l]
  ABuf<T> Wn[kMaxLayers];        // l >= 1: W_l    [H_l][Hp_{l-1}]
  ABuf<T> wout;                  // [Hp_{L-1}]
  T bout = T(0);
  ABuf<T> alpha[kMaxLayers], gamma[kMaxLayers], beta[kMaxLayers], mean[kMaxLayers],
      invstd[kMaxLayers], corr_a[kMaxLayers], corr_c[kMaxLayers];  // [Hp_l]
  bool has_corr[kMaxLayers] = {};
  const T* W0 = nullptr;

  Model(const DinParams& p, bool backward, int pad) : pad_bytes(pad), U(pad / static_cast<int>(sizeof(T))) {
    L = p.num_layers;
    D = static_cast<int>(p.dim);
    Dp = padded(D, U);
    act = p.act;
    keep_z = act == Act::PReLU || act == Act::Dice;
    const T* W[kMaxLayers + 1] = {};
    const T* b[kMaxLayers + 1] = {};
    for (int l = 0; l <= L; ++l) {
      W[l] = static_cast<const T*>(p.W[l]);
      b[l] = static_cast<const T*>(p.b[l]);
      if (!W[l] || !b[l]) throw std::invalid_argument("missing weight or bias pointer");
    }
    W0 = W[0];
    for (int l = 0; l < L; ++l) {
      H[l] = p.hidden[l];
      if (H[l] < 1 || H[l] > kMaxWidth) throw std::invalid_argument("hidden widths must be 1..256");
      Hp[l] = padded(H[l], U);
      Hmaxp = std::max(Hmaxp, Hp[l]);
      const int h = H[l], hp = Hp[l];
      auto copy_vec = [&](ABuf<T>& dst, const void* src, bool required, const char* what) {
        dst.reset(hp);
        if (!src) {
          if (required) throw std::invalid_argument(what);
          return false;
        }
        std::memcpy(dst.data(), src, sizeof(T) * h);
        return true;
      };
      copy_vec(bias[l], b[l], true, "missing bias");
      if (act == Act::PReLU || act == Act::Dice)
        copy_vec(alpha[l], p.alpha[l], true, "prelu/dice need alpha for every layer");
      if (act == Act::Dice) {
        const char* msg = "dice needs gamma, beta, mean and invstd for every layer";
        copy_vec(gamma[l], p.bn_gamma[l], true, msg);
        copy_vec(beta[l], p.bn_beta[l], true, msg);
        copy_vec(mean[l], p.bn_mean[l], true, msg);
        if (!p.bn_invstd[l] && p.bn_var[l]) {  // eval: invstd from the running variance
          invstd[l].reset(hp);
          const T* var = static_cast<const T*>(p.bn_var[l]);
          const T eps = static_cast<T>(p.bn_eps);
          for (int j = 0; j < h; ++j) invstd[l].data()[j] = T(1) / std::sqrt(var[j] + eps);
        } else {
          copy_vec(invstd[l], p.bn_invstd[l], true, msg);
        }
        const bool a = copy_vec(corr_a[l], p.bn_corr_a[l], false, "");
        const bool c = copy_vec(corr_c[l], p.bn_corr_c[l], false, "");
        has_corr[l] = a && c;
      }
    }
    const int H1 = H[0], H1p = Hp[0];
    AWmT.reset(static_cast<size_t>(2 * D) * H1p);
    AT = AWmT.data();
    WmT = AWmT.data() + static_cast<size_t>(D) * H1p;
    WqdT.reset(static_cast<size_t>(D) * H1p);
    if (backward) {
      Ab.reset(static_cast<size_t>(H1) * Dp);
      Wmb.reset(static_cast<size_t>(H1) * Dp);
      Wqdb.reset(static_cast<size_t>(H1) * Dp);
    }
    for (int j = 0; j < H1; ++j) {
      const T* w = W[0] + static_cast<int64_t>(j) * 4 * D;
      for (int d = 0; d < D; ++d) {
        const T wq = w[d], wk = w[D + d], wd = w[2 * D + d], wm = w[3 * D + d];
        AWmT[static_cast<size_t>(d) * H1p + j] = wk - wd;
        AWmT[static_cast<size_t>(D + d) * H1p + j] = wm;
        WqdT[static_cast<size_t>(d) * H1p + j] = wq + wd;
        if (backward) {
          Ab[static_cast<size_t>(j) * Dp + d] = wk - wd;
          Wmb[static_cast<size_t>(j) * Dp + d] = wm;
          Wqdb[static_cast<size_t>(j) * Dp + d] = wq + wd;
        }
      }
    }
    for (int l = 1; l < L; ++l) {
      WT[l].reset(static_cast<size_t>(H[l - 1]) * Hp[l]);
      if (backward) Wn[l].reset(static_cast<size_t>(H[l]) * Hp[l - 1]);
      for (int i = 0; i < H[l]; ++i)
        for (int j = 0; j < H[l - 1]; ++j) {
          const T w = W[l][static_cast<int64_t>(i) * H[l - 1] + j];
          WT[l][static_cast<size_t>(j) * Hp[l] + i] = w;
          if (backward) Wn[l][static_cast<size_t>(i) * Hp[l - 1] + j] = w;
        }
    }
    wout.reset(Hp[L - 1]);
    std::memcpy(wout.data(), W[L], sizeof(T) * H[L - 1]);
    bout = b[L][0];
  }
};

// Layout of one thread's parameter-gradient partials (accumulation type), with
// every block padded like the packed weights.
struct GradLayout {
  int64_t GT = 0, GqT = 0, EqT = 0, e = 0, W[kMaxLayers + 1] = {}, b[kMaxLayers + 1] = {};
  int64_t alpha[kMaxLayers] = {}, gamma[kMaxLayers] = {}, beta[kMaxLayers] = {};
  int64_t total = 0;
  // pad_bytes: the Model's; kMaxPadBytes gives an upper bound for any ISA.
  explicit GradLayout(const DinParams& p, int pad_bytes = kMaxPadBytes) {
    const int u = static_cast<int>(pad_bytes / acc_size(p.dtype));
    const int L = p.num_layers;
    const int64_t D = p.dim;
    int64_t Hp[kMaxLayers] = {};
    for (int l = 0; l < L; ++l) Hp[l] = padded(p.hidden[l], u);
    int64_t o = 0;
    GT = o; o += D * Hp[0];
    GqT = o; o += D * Hp[0];
    EqT = o; o += D * Hp[0];
    e = o; o += Hp[0];
    for (int l = 1; l <= L; ++l) {
      const int64_t rows = l < L ? p.hidden[l] : 1;
      W[l] = o; o += rows * Hp[l - 1];
      b[l] = o; o += l < L ? Hp[l] : u;
    }
    for (int l = 0; l < L; ++l) {
      alpha[l] = o; o += Hp[l];
      gamma[l] = o; o += Hp[l];
      beta[l] = o; o += Hp[l];
    }
    total = o;
  }
};

struct Row {
  int64_t s, len;
};

inline Row row_of(const DinParams& p, int64_t r) {
  const int64_t s = p.row_seq ? p.row_seq[r] : r;
  return {s, seq_length(p, s)};
}

// Layout of the pre-activation cache (DinParams::zcache): one slot per row
// position t < len(r), slot(r, t) = base(r) + t with base the prefix sum of the
// row lengths, holding every hidden layer's pre-activation (bias included) at
// off[l], padded to the widest vector so that the layout does not depend on the
// ISA of the call.
struct ZLayout {
  int64_t off[kMaxLayers] = {}, stride = 0;
  int width[kMaxLayers] = {};
  explicit ZLayout(const DinParams& p) {
    const int u = static_cast<int>(kMaxPadBytes / acc_size(p.dtype));
    for (int l = 0; l < p.num_layers; ++l) {
      off[l] = stride;
      width[l] = padded(p.hidden[l], u);
      stride += width[l];
    }
  }
};

// Per-call, read-only context shared by the threads.
template <typename T>
struct Ctx {
  const DinParams* p = nullptr;
  const Model<T>* m = nullptr;
  bool softmax = false;
  T scale = T(1);
  int red = -1;             // backward reduction layer, or -1
  int stats_layer = -1;
  bool dk_assign = false;   // write dk (DinParams::dk_assign) instead of adding into it
  // Whole short rows may share packed tiles (Kernel::pack_add); not in training-mode
  // Dice (DinParams::batch_stats), whose passes keep the row by row path.
  bool pack = false;
  GradLayout lay;
  // Pre-activation cache: zc (nullptr: none), the layers already in it, and
  // each row's first slot.
  T* zc = nullptr;
  int zhave = 0;
  ZLayout zl;
  std::vector<int64_t> zbase;
  Ctx(const DinParams& pp, const Model<T>& mm) : p(&pp), m(&mm), lay(pp, mm.pad_bytes), zl(pp) {
    softmax = pp.norm == Norm::Softmax;
    scale = static_cast<T>(pp.scale);
    red = pp.reduce_layer;
    stats_layer = pp.stats_layer;
    // Rows that share keys add into per-thread partials: dk must hold zeros then.
    if (pp.dk_assign && pp.row_seq && pp.reduce_layer < 0)
      throw std::invalid_argument("backward: dk_assign needs rows with their own sequences (row_seq unset)");
    dk_assign = pp.dk_assign != 0;
    pack = !pp.batch_stats && !pp.zcache && pp.stats_layer < 0 && pp.reduce_layer < 0;
    if (pp.zcache && pp.rows > 0) {
      zbase.resize(static_cast<size_t>(pp.rows));
      int64_t slots = 0;
      for (int64_t r = 0; r < pp.rows; ++r) {
        zbase[r] = slots;
        slots += row_of(pp, r).len;
      }
      if (pp.zcache_bytes < slots * zl.stride * static_cast<int64_t>(sizeof(T)))
        throw std::invalid_argument("zcache too small: query workspace_bytes(params, 'zcache')");
      zc = static_cast<T*>(pp.zcache);
      zhave = pp.zcache_have;
    }
  }
};

// Per-thread scratch, allocated once per thread per call (never per row).
template <typename T>
struct Scratch {
  ABuf<T> MT, c, M, qp, dp, ktile, acc, GT, e, g1, g2, s, ds;
  ABuf<T> Z[kMaxLayers], Hb[kMaxLayers];
  ABuf<T> P[kMaxLayers];  // Dice gates of the tile, for the backward and the cache
  int64_t pos[kTile] = {};
  const T* qrow = nullptr;  // query of the current row (set by fold)
  // current tile: n keys, key i at A + i * sa
  int n = 0;
  const T* A = nullptr;
  int64_t sa = 0;
  T* gp = nullptr;       // parameter-gradient partials
  T* dk = nullptr;       // where this thread adds dk: p.dk, or its own partial when rows share keys
  double* rp = nullptr;  // Dice reduction partials [2][Hp]; statistics: mean, M2 [2][Hp]
  double count = 0.0;    // statistics: positions merged into rp so far
  // Pre-activation cache of the current row (zbind): its slot 0, or nullptr.
  T* zrow = nullptr;
  int zhave = 0;
  const ZLayout* zl = nullptr;
  // Pooled sum and softmax denominator of the current row (part) in double:
  // tiles are summed in T, tile sums in double, so the error does not grow with T.
  ABuf<double> racc;
  // The packed tile (Kernel::pack_add): up to kTile keys of whole short rows, as
  // rows x = [k, q*k] of X [kTile][2D]; tile row j is output row prow[j], with keys
  // kseg[j] .. kseg[j+1]-1 (kslot: the tile row of a key; ppos: its position).
  bool packed = false;  // hidden(): layer 0 of the packed tile
  ABuf<T> X, crow;      // crow [kTile][H1p]: c = b1 + (Wq+Wd) q of each tile row
  int pn = 0, prows = 0;
  int64_t prow[kTile] = {}, ppos[kTile] = {};
  int kseg[kTile + 1] = {}, kslot[kTile] = {};
  ABuf<T> Q;                // queries of the tile rows [kTile][D]
  ABuf<T> PE, PV, PDQ;      // backward: e [kTile][H1p], gz Wm and dq [kTile][Dp]

  // pack: this thread may gather packed tiles (Ctx::pack on a plan of whole rows);
  // their buffers are allocated only then.
  Scratch(const Model<T>& m, bool backward, bool pack = false) {
    const int D = m.D, Dp = m.Dp, H1p = m.Hp[0];
    MT.reset(static_cast<size_t>(D) * H1p);
    c.reset(H1p);
    qp.reset(Dp);
    dp.reset(Dp);
    ktile.reset(static_cast<size_t>(kTile) * D + Dp);
    acc.reset(Dp);
    racc.reset(Dp);
    if (pack) {
      X.reset(static_cast<size_t>(kTile) * 2 * D);
      Q.reset(static_cast<size_t>(kTile) * D);
      crow.reset(static_cast<size_t>(kTile) * H1p);
    }
    s.reset(kTile);
    ds.reset(kTile);
    for (int l = 0; l < m.L; ++l) {
      Z[l].reset(static_cast<size_t>(kTile) * m.Hp[l]);
      Hb[l].reset(static_cast<size_t>(kTile) * m.Hp[l]);
      if (m.act == Act::Dice) P[l].reset(static_cast<size_t>(kTile) * m.Hp[l]);
    }
    if (backward) {
      if (pack) {
        PE.reset(static_cast<size_t>(kTile) * H1p);
        PV.reset(static_cast<size_t>(kTile) * Dp);
        PDQ.reset(static_cast<size_t>(kTile) * Dp);
      }
      M.reset(static_cast<size_t>(m.H[0]) * Dp);
      GT.reset(static_cast<size_t>(D) * H1p);
      e.reset(H1p);
      const size_t w = std::max(m.Hmaxp, Dp);
      g1.reset(kTile * w);
      g2.reset(kTile * w);
    }
  }
};


// A row's positions [t0, t1) (the whole row, or one part of a long row).
struct Span {
  int64_t r, t0, t1;
};

// Online-softmax partial of one part of a row: running max, denominator and the
// pooled sum (scaled by exp(-mx)); without softmax mx stays -inf and den 0.
struct FwdPart {
  double mx, den;
  double* acc;  // [D]
};


// The softmax backward is ds_t = scale w_t (dL/dw_t - S) with S = sum_u w_u dL/dw_u.
// When one weight is ~1 the differences dL/dw_t - S are tiny, and S formed in the
// kernel's precision cancels catastrophically: at softmax scale 40, such rows' fp32 dq
// was off by more than its own size, here and in torch's own fp32 backward.  So S is
// formed in double, where a product of two floats is exact, and divided by the
// weights' own sum (1 up to their rounding): that makes it insensitive to the
// rounding of the dominant weight, to which sum_u w_u dL/dw_u alone is not.  Parts of
// a split row add their sums; row_term() divides once the row is complete.
struct WSum {
  double wdw = 0.0;  // sum_t w_t dL/dw_t
  double w = 0.0;    // sum_t w_t
  WSum& operator+=(const WSum& o) {
    wdw += o.wdw;
    w += o.w;
    return *this;
  }
};
inline double row_term(const WSum& s) { return s.w > 0.0 ? s.wdw / s.w : s.wdw; }

// Row functions of one ISA.
//   fwd:   out/scores of span (part == nullptr: the whole row, finished in place;
//          else the part's partial, its scores left as scaled logits).
//   norm:  softmax weights of a part from the merged row max and 1/den.
//   stats: merge the span's pre-activations into sc.rp/sc.count (Chan).
//   wdw:   sum_t w_t dL/dw_t and sum_t w_t over the span (the softmax backward's
//          row term, row_term()).
//   bwd:   backward of the span; wdw = nullptr computes it inline (whole row);
//          dq receives the span's share of dq (nullptr when reducing).
template <typename T>
struct RowFns {
  void (*fwd)(const Ctx<T>&, Scratch<T>&, const Span&, FwdPart*);
  // fwd_row: the forward of whole row r, possibly deferred to a packed tile;
  // fwd_flush: finish the thread's deferred rows.
  void (*fwd_row)(const Ctx<T>&, Scratch<T>&, int64_t r);
  void (*fwd_flush)(const Ctx<T>&, Scratch<T>&);
  // fwd_lanes: the forward of W rows sharing one sequence, one row per vector lane.
  void (*fwd_lanes)(const Ctx<T>&, Scratch<T>&, const int64_t* rows);
  void (*norm)(const Ctx<T>&, const Span&, T mx, T inv);
  void (*stats)(const Ctx<T>&, Scratch<T>&, const Span&);
  WSum (*wdw)(const Ctx<T>&, const Span&);
  void (*bwd)(const Ctx<T>&, Scratch<T>&, const Span&, const double* wdw, T* dq);
  // bwd_row: the backward of whole row r (dq into p.dq), possibly deferred to a
  // packed tile; bwd_flush: finish the thread's deferred rows.
  void (*bwd_row)(const Ctx<T>&, Scratch<T>&, int64_t r);
  void (*bwd_flush)(const Ctx<T>&, Scratch<T>&);
};

}  // namespace
}  // namespace din

// ---------------------------------------------------------------------------
// The kernels are written once (the DIN_CPU_KERNEL_BODY part at the end of this
// file) and compiled once per ISA: this file includes itself inside a
// `#pragma GCC target` region, so every helper, lambda and template in the
// body is compiled for that ISA from the start (an always_inline helper of the
// default target would otherwise build its vectors lane by lane).
// ---------------------------------------------------------------------------
#define DIN_CPU_KERNEL_BODY 1
#if DIN_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi,bmi2,popcnt")
#define DIN_VB 64
#define DIN_NS k512
#include "din_cpu.cpp"  // NOLINT: this file, see above
#undef DIN_VB
#undef DIN_NS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")
#define DIN_VB 32
#define DIN_NS k256
#include "din_cpu.cpp"  // NOLINT: this file, see above
#undef DIN_VB
#undef DIN_NS
#pragma GCC pop_options
#endif

#define DIN_VB 16
#define DIN_NS k128
#include "din_cpu.cpp"  // NOLINT: this file, see above
#undef DIN_VB
#undef DIN_NS
#undef DIN_CPU_KERNEL_BODY

namespace din {
namespace {
// Vector width in bytes: the best the CPU supports, lowered by
// DIN_FUSED_CPU_ISA=avx512|avx2|generic (read on every call, so tests can
// cover every path in one process).
int isa_bytes() {
  int best = 16;
#if DIN_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    best = 64;
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    best = 32;
#endif
  if (const char* e = std::getenv("DIN_FUSED_CPU_ISA")) {
    const std::string s(e);
    if (s == "avx2") best = std::min(best, 32);
    else if (s == "generic" || s == "sse2" || s == "default") best = 16;
  }
  return best;
}

template <typename T>
RowFns<T> row_fns(int vb) {
#if DIN_X86
  if (vb == 64) return k512::row_fns<T>();
  if (vb == 32) return k256::row_fns<T>();
#endif
  return k128::row_fns<T>();
}

// ---------------------------------------------------------------------------
// Work plan.  Rows are the unit of work while there are at least as many rows
// as threads.  With fewer rows (one user with a 100k-long history), every row of
// at least 2 * kMinPart positions is cut into up to nt parts of whole tiles, so
// that all threads get work; the parts' partials are merged per row, in part
// order.  The cuts depend only on the row length and the thread count, so the
// results are bitwise reproducible for a given thread count.
// ---------------------------------------------------------------------------
constexpr int64_t kMinPart = 256;

struct Plan {
  int nt = 1;                  // threads to use
  bool split = false;
  std::vector<Span> spans;     // split: the parts, rows in order, parts in order
  std::vector<int64_t> first;  // split: the parts of row r are [first[r], first[r + 1])

  explicit Plan(const DinParams& p) {
    const int req = std::max(1, p.num_threads);
    // Split rows into parts when there are too few to share out whole: rows go out
    // 4 at a time (forward) or in blocks of 4 (backward), so with fewer than 4 per
    // thread one thread could take them all (B=4 on 2 threads ran on one).
    split = p.rows > 0 && p.rows < 4 * static_cast<int64_t>(req);
    if (!split) {
      nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(req, p.rows)));
      return;
    }
    first.resize(static_cast<size_t>(p.rows) + 1);
    for (int64_t r = 0; r < p.rows; ++r) {
      first[r] = static_cast<int64_t>(spans.size());
      const int64_t len = row_of(p, r).len;
      const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(req, len / kMinPart));
      const int64_t chunk = ((len + parts - 1) / parts + kTile - 1) / kTile * kTile;
      for (int64_t t0 = 0;; t0 += chunk) {
        spans.push_back({r, t0, std::min(len, t0 + chunk)});
        if (t0 + chunk >= len) break;
      }
    }
    first[p.rows] = static_cast<int64_t>(spans.size());
    nt = static_cast<int>(std::min<int64_t>(req, static_cast<int64_t>(spans.size())));
  }
  int64_t size(const DinParams& p) const { return split ? static_cast<int64_t>(spans.size()) : p.rows; }
  Span span(const DinParams& p, int64_t i) const { return split ? spans[i] : Span{i, 0, row_of(p, i).len}; }
  // f(i, span) for this thread's items.  Static round-robin in blocks (whole
  // rows: 4, parts: 1): each thread always gets the same items, so per-thread
  // partial sums are reproducible.
  template <class F>
  void for_static(const DinParams& p, int tid, F&& f) const {
    const int64_t n = size(p), c = split ? 1 : 4;
    for (int64_t b = tid * c; b < n; b += static_cast<int64_t>(nt) * c)
      for (int64_t i = b; i < std::min(n, b + c); ++i) f(i, span(p, i));
  }
};

// Per-thread partials laid out [nt][2][Hp] (two sums per channel, padded
// width Hp) -> out [2][Hl], summed in thread order so the result is fixed.
inline void sum_thread_pairs(const double* part, int nt, int Hp, int Hl, double* out) {
  for (int j = 0; j < Hl; ++j) {
    double s0 = 0.0, s1 = 0.0;
    for (int t = 0; t < nt; ++t) {
      s0 += part[static_cast<size_t>(t) * 2 * Hp + j];
      s1 += part[static_cast<size_t>(t) * 2 * Hp + Hp + j];
    }
    out[j] = s0;
    out[Hl + j] = s1;
  }
}

// Rows that share a sequence (row_seq set) must not add into the same dk
// elements from several threads: each thread adds into its own copy of the
// part of dk the rows address, and the copies are summed in thread order, so
// the shared gradient is a fixed-order sum (bitwise reproducible for a given
// thread count) without atomics.  Returns that part's length in elements.
int64_t shared_dk_extent(const DinParams& p) {
  if (!p.row_seq || p.reduce_layer >= 0 || p.rows <= 0) return 0;
  int64_t extent = 0;
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t s = p.row_seq[r];
    const int64_t len = seq_length(p, s);
    if (len > 0) extent = std::max(extent, seq_off(p, s) + (len - 1) * p.ldk + p.dim);
  }
  return extent;
}

// Rows by decreasing length when the longest row is over 4x the mean (else empty:
// the natural order balances well enough and sorting would only cost).
inline std::vector<int64_t> longest_first(const DinParams& p) {
  int64_t mx = 0, sum = 0;
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t len = row_of(p, r).len;
    mx = std::max(mx, len);
    sum += len;
  }
  if (mx * p.rows <= 4 * sum) return {};
  std::vector<std::pair<int64_t, int64_t>> by_len(static_cast<size_t>(p.rows));
  for (int64_t r = 0; r < p.rows; ++r) by_len[r] = {-row_of(p, r).len, r};
  std::sort(by_len.begin(), by_len.end());
  std::vector<int64_t> order(static_cast<size_t>(p.rows));
  for (int64_t i = 0; i < p.rows; ++i) order[i] = by_len[i].second;
  return order;
}

// The lanes forward (Kernel::lanes_t) keeps every lane's folded layer-1 weights, D x H1
// vectors; above this it leaves the rows to the row path, whose MT is one row's.
constexpr size_t kLaneMaxBytes = size_t{512} << 10;

// Rows for the lanes forward: of each sequence longer than kPack positions (shorter ones
// share packed tiles), as many whole groups of W rows as it serves.  units: those rows, W
// after W; rest: every other row.  Both empty when no sequence serves W rows.
struct LanePlan {
  std::vector<int64_t> units, rest;
};
template <typename T>
LanePlan lane_plan(const DinParams& p, const Ctx<T>& cx, const Model<T>& m, int W) {
  LanePlan lp;
  if (!p.row_seq || !cx.pack || p.rows < W ||
      static_cast<size_t>(m.D) * m.H[0] * W * sizeof(T) > kLaneMaxBytes)
    return lp;
  const size_t n = static_cast<size_t>(p.rows);
  std::vector<std::pair<int64_t, int64_t>> by_seq(n);
  bool sorted = true;
  for (size_t r = 0; r < n; ++r) {
    by_seq[r] = {p.row_seq[r], static_cast<int64_t>(r)};
    sorted = sorted && (r == 0 || p.row_seq[r - 1] <= p.row_seq[r]);
  }
  if (!sorted) std::sort(by_seq.begin(), by_seq.end());
  for (size_t i = 0, j; i < n; i = j) {
    for (j = i; j < n && by_seq[j].first == by_seq[i].first;) ++j;
    const size_t lanes = seq_length(p, by_seq[i].first) > kPack ? (j - i) / W * W : 0;
    for (size_t k = i; k < j; ++k) (k < i + lanes ? lp.units : lp.rest).push_back(by_seq[k].second);
  }
  if (lp.units.empty()) lp.rest.clear();
  return lp;
}

template <typename T>
void forward_impl(const DinParams& p) {
  if (p.rows <= 0) return;
  const int vb = isa_bytes();
  const Model<T> m(p, false, vb);
  const Ctx<T> cx(p, m);
  const RowFns<T> fn = row_fns<T>(vb);
  const Plan plan(p);
  const int W = vb / static_cast<int>(sizeof(T));
  const LanePlan lp = plan.split ? LanePlan{} : lane_plan(p, cx, m, W);
  if (!lp.units.empty()) {
    // Lane groups first, then the other rows one by one, all handed out dynamically: a group
    // is W rows' work, so the rows left over even out the threads' ends (with 100 candidates
    // on 2 threads and W = 16, four rows in a block of 4 left one thread ~5% behind).
    const int64_t units = static_cast<int64_t>(lp.units.size()) / W;
    const int64_t items = units + static_cast<int64_t>(lp.rest.size());
    std::atomic<int64_t> next{0};
    Pool::run(plan.nt, [&](int) {
      Scratch<T> sc(m, false, cx.pack);
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
        if (i < units) fn.fwd_lanes(cx, sc, lp.units.data() + i * W);
        else fn.fwd_row(cx, sc, lp.rest[i - units]);
      }
      fn.fwd_flush(cx, sc);
    });
    return;
  }
  if (!plan.split) {
    // Rows handed out dynamically, 4 at a time: lengths vary, and the forward
    // has no cross-row reduction, so the order does not change any result.  With
    // skewed lengths the longest rows go first, so that no thread is left with a
    // long row while the others idle at the end.
    const std::vector<int64_t> order = plan.nt > 1 ? longest_first(p) : std::vector<int64_t>();
    std::atomic<int64_t> next{0};
    Pool::run(plan.nt, [&](int) {
      Scratch<T> sc(m, false, cx.pack);
      for (int64_t r0; (r0 = next.fetch_add(4, std::memory_order_relaxed)) < p.rows;)
        for (int64_t i = r0; i < std::min(p.rows, r0 + 4); ++i) fn.fwd_row(cx, sc, order.empty() ? i : order[i]);
      fn.fwd_flush(cx, sc);
    });
    return;
  }
  const int64_t n = static_cast<int64_t>(plan.spans.size()), D = m.D;
  std::vector<double> accs(static_cast<size_t>(n * D), 0.0);
  std::vector<FwdPart> parts(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) parts[i] = {-INFINITY, 0.0, accs.data() + i * D};
  Pool::run(plan.nt, [&](int tid) {
    Scratch<T> sc(m, false);
    plan.for_static(p, tid, [&](int64_t i, const Span& sp) { fn.fwd(cx, sc, sp, &parts[i]); });
  });
  // Merge each row's parts in order: rescale to the row max (online softmax).
  std::vector<T> rmx(static_cast<size_t>(p.rows)), rinv(static_cast<size_t>(p.rows));
  std::vector<double> acc(static_cast<size_t>(D));
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t i0 = plan.first[r], i1 = plan.first[r + 1];
    // A part without valid positions has mx == -inf; a NaN score makes its part's
    // mx NaN, which must reach the whole row as in the reference (std::max would drop it).
    double mx = -INFINITY, den = 0.0;
    if (cx.softmax)
      for (int64_t i = i0; i < i1; ++i)
        mx = std::isnan(parts[i].mx) || std::isnan(mx) ? NAN : std::max(mx, parts[i].mx);
    std::fill(acc.begin(), acc.end(), 0.0);
    const bool any = mx != -INFINITY;
    for (int64_t i = i0; i < i1; ++i) {
      if (cx.softmax && parts[i].mx == -INFINITY) continue;  // a part without valid positions
      const double f = cx.softmax ? std::exp(parts[i].mx - mx) : 1.0;
      den += f * parts[i].den;
      for (int64_t d = 0; d < D; ++d) acc[d] += f * parts[i].acc[d];
    }
    const double inv = cx.softmax ? (any ? 1.0 / den : 0.0) : 1.0;
    T* out = static_cast<T*>(p.out) + r * p.ldo;
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(acc[d] * inv);
    rmx[r] = static_cast<T>(mx);
    rinv[r] = static_cast<T>(inv);
  }
  if (!cx.softmax) return;
  Pool::run(plan.nt, [&](int tid) {
    plan.for_static(p, tid, [&](int64_t, const Span& sp) {
      if (rmx[sp.r] != -INFINITY) fn.norm(cx, sp, rmx[sp.r], rinv[sp.r]);
    });
  });
}

template <typename T>
void stats_impl(const DinParams& p) {
  const int vb = isa_bytes();
  const Model<T> m(p, false, vb);
  const int l = p.stats_layer;
  if (l < 0 || l >= m.L || !p.stats_out) throw std::invalid_argument("stats: bad stats_layer");
  const Ctx<T> cx(p, m);
  const int Hl = m.H[l], Hp = m.Hp[l];
  const Plan plan(p);
  const int nt = plan.nt;
  std::vector<double> part(static_cast<size_t>(nt) * 2 * Hp, 0.0), count(nt, 0.0);
  const auto fn = row_fns<T>(vb).stats;
  Pool::run(nt, [&](int tid) {
    Scratch<T> sc(m, false);
    sc.rp = part.data() + static_cast<size_t>(tid) * 2 * Hp;
    plan.for_static(p, tid, [&](int64_t, const Span& sp) { fn(cx, sc, sp); });
    count[tid] = sc.count;
  });
  // Chan's merge of the per-thread (count, mean, M2), in thread order.
  for (int j = 0; j < Hl; ++j) {
    double n = 0.0, mean = 0.0, m2 = 0.0;
    for (int t = 0; t < nt; ++t) {
      const double nb = count[t];
      if (nb == 0.0) continue;
      const double mb = part[static_cast<size_t>(t) * 2 * Hp + j];
      const double m2b = part[static_cast<size_t>(t) * 2 * Hp + Hp + j];
      const double tot = n + nb, delta = mb - mean;
      mean += delta * (nb / tot);
      m2 += m2b + delta * delta * (n * nb / tot);
      n = tot;
    }
    p.stats_out[j] = mean;
    p.stats_out[Hl + j] = m2;
  }
}

template <typename T>
void backward_impl(const DinParams& p) {
  const int red = p.reduce_layer;
  const bool reducing = red >= 0;
  if (reducing && (red >= p.num_layers || !p.reduce_out)) throw std::invalid_argument("backward: bad reduce_layer");
  const int vb = isa_bytes();
  const Model<T> m(p, true, vb);
  const Ctx<T> cx(p, m);
  const int D = m.D, L = m.L, H1 = m.H[0], H1p = m.Hp[0];
  const int nt = std::max(1, p.num_threads);  // the workspace is sized for num_threads
  const GradLayout& lay = cx.lay;
  const int64_t dk_extent = shared_dk_extent(p);
  if (!reducing && p.workspace_bytes < static_cast<int64_t>(sizeof(T)) * (lay.total + dk_extent) * nt)
    throw std::invalid_argument("backward: workspace too small");
  const int Hr = reducing ? m.Hp[red] : 0;
  std::vector<double> red_part(reducing ? static_cast<size_t>(nt) * 2 * Hr : 0, 0.0);
  T* ws = static_cast<T*>(p.workspace);
  const RowFns<T> fn = row_fns<T>(vb);
  const Plan plan(p);
  const int used = plan.nt;
  const int64_t n = plan.size(p);
  T* dk_part = ws + static_cast<int64_t>(nt) * lay.total;  // [used][dk_extent] when rows share keys

  if (!reducing) {
    for (int t = 0; t < nt; ++t) std::fill(ws + static_cast<int64_t>(t) * lay.total, ws + (t + 1) * lay.total, T(0));
    std::fill(dk_part, dk_part + static_cast<int64_t>(used) * dk_extent, T(0));
  }
  // Split rows with softmax: the row term S of each row first (WSum; parts merged in order).
  std::vector<double> wdw;
  if (plan.split && cx.softmax) {
    std::vector<WSum> wp(static_cast<size_t>(n)), rows(static_cast<size_t>(p.rows));
    Pool::run(used, [&](int tid) {
      plan.for_static(p, tid, [&](int64_t i, const Span& sp) { wp[i] = fn.wdw(cx, sp); });
    });
    for (int64_t i = 0; i < n; ++i) rows[plan.spans[i].r] += wp[i];
    wdw.resize(rows.size());
    for (size_t r = 0; r < rows.size(); ++r) wdw[r] = row_term(rows[r]);
  }
  std::vector<T> dq_part(plan.split && !reducing ? static_cast<size_t>(n) * D : 0);
  if (p.rows > 0) {
    Pool::run(used, [&](int tid) {
      Scratch<T> sc(m, true, cx.pack && !plan.split);
      sc.gp = reducing ? nullptr : ws + static_cast<int64_t>(tid) * lay.total;
      sc.rp = reducing ? red_part.data() + static_cast<size_t>(tid) * 2 * Hr : nullptr;
      sc.dk = dk_extent > 0 ? dk_part + static_cast<int64_t>(tid) * dk_extent : static_cast<T*>(p.dk);
      plan.for_static(p, tid, [&](int64_t i, const Span& sp) {
        if (!plan.split && !reducing) return fn.bwd_row(cx, sc, sp.r);
        T* dq = nullptr;
        if (!reducing)
          dq = plan.split ? dq_part.data() + i * D : static_cast<T*>(p.dq) + sp.r * p.lddq;
        fn.bwd(cx, sc, sp, wdw.empty() ? nullptr : &wdw[sp.r], dq);
      });
      if (!plan.split && !reducing) fn.bwd_flush(cx, sc);
    });
  }

  if (reducing) {
    sum_thread_pairs(red_part.data(), nt, Hr, m.H[red], p.reduce_out);
    return;
  }
  if (dk_extent > 0) {
    // Each thread sums a contiguous block of dk over the partials in thread order.
    T* dk = static_cast<T*>(p.dk);
    const int64_t block = (dk_extent + used - 1) / used;
    Pool::run(used, [&](int tid) {
      const int64_t i1 = std::min(dk_extent, (tid + 1) * block);
      for (int64_t i = tid * block; i < i1; ++i) {
        T acc = dk[i];
        for (int t = 0; t < used; ++t) acc += dk_part[static_cast<int64_t>(t) * dk_extent + i];
        dk[i] = acc;
      }
    });
  }
  if (plan.split) {
    for (int64_t r = 0; r < p.rows; ++r) {
      T* dq = static_cast<T*>(p.dq) + r * p.lddq;
      for (int d = 0; d < D; ++d) {
        T s = T(0);
        for (int64_t i = plan.first[r]; i < plan.first[r + 1]; ++i) s += dq_part[i * D + d];
        dq[d] = s;
      }
    }
  }
  // Sum the per-thread partials into thread 0's slot, then scatter to outputs.
  for (int t = 1; t < used; ++t) {
    const T* src = ws + static_cast<int64_t>(t) * lay.total;
    for (int64_t i = 0; i < lay.total; ++i) ws[i] += src[i];
  }
  T* dW0 = static_cast<T*>(p.dW[0]);
  for (int j = 0; j < H1; ++j) {
    T* row = dW0 + static_cast<int64_t>(j) * 4 * D;
    for (int d = 0; d < D; ++d) {
      const int64_t o = static_cast<int64_t>(d) * H1p + j;
      const T g = ws[lay.GT + o], eq = ws[lay.EqT + o];
      row[d] = eq;
      row[D + d] = g;
      row[2 * D + d] = eq - g;
      row[3 * D + d] = ws[lay.GqT + o];
    }
  }
  std::copy(ws + lay.e, ws + lay.e + H1, static_cast<T*>(p.db[0]));
  for (int l = 1; l <= L; ++l) {
    const int rows = l < L ? m.H[l] : 1;
    const int in = m.H[l - 1], inp = m.Hp[l - 1];
    T* dW = static_cast<T*>(p.dW[l]);
    for (int i = 0; i < rows; ++i)
      std::copy(ws + lay.W[l] + static_cast<int64_t>(i) * inp, ws + lay.W[l] + static_cast<int64_t>(i) * inp + in,
                dW + static_cast<int64_t>(i) * in);
    std::copy(ws + lay.b[l], ws + lay.b[l] + rows, static_cast<T*>(p.db[l]));
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
  if (p.rows > 0 && (!p.q || !p.k || !p.seq_len))
    throw std::invalid_argument("missing q, k or seq_len pointer");
  // Feature-dim products (tile x D, H x D) are formed in int: bound D so that
  // none can overflow.  Lengths, offsets and positions are int64 throughout.
  if (p.dim < 1 || p.dim > (int64_t{1} << 20)) throw std::invalid_argument("dim must be in 1..2^20");
}

template <typename F32, typename F64>
void by_dtype(const DinParams& p, F32 f32, F64 f64) {
  check_common(p);
  if (p.dtype == DType::F32) f32(p);
  else if (p.dtype == DType::F64) f64(p);
  else throw std::invalid_argument("CPU kernels take float32 or float64 (half types are upcast in Python)");
}

}  // namespace

const char* cpu_threading() { return OmpTeam::get() ? "openmp" : "pool"; }

void forward_cpu(const DinParams& p) {
  if (p.rows > 0 && (!p.out || !p.scores)) throw std::invalid_argument("forward: missing out/scores");
  if (p.check_lengths && p.rows > 0) {
    if (!p.seq_len) throw std::invalid_argument("forward: missing seq_len");
    const bool above_ok = p.check_lengths == 2;
    for (int64_t s = 0; s < p.rows; ++s) {
      const int64_t n = p.seq_len[s];
      if (n < 0 || (n > p.max_len && !above_ok))
        throw std::invalid_argument("lengths must lie in [0, T] = [0, " + std::to_string(p.max_len) + "]" +
                                    (above_ok ? " (above T meaning T)" : "") + ", got lengths[" +
                                    std::to_string(s) + "] = " + std::to_string(n));
    }
  }
  by_dtype(p, forward_impl<float>, forward_impl<double>);
}

void stats_cpu(const DinParams& p) { by_dtype(p, stats_impl<float>, stats_impl<double>); }

void backward_cpu(const DinParams& p) {
  if (p.rows > 0 && (!p.dout || !p.scores)) throw std::invalid_argument("backward: missing dout/scores");
  if (p.reduce_layer < 0 && (!p.dq || !p.dk || !p.dW[0])) throw std::invalid_argument("backward: missing grads");
  by_dtype(p, backward_impl<float>, backward_impl<double>);
}

std::vector<RowPart> row_parts_cpu(const DinParams& p) {
  check_common(p);
  const Plan plan(p);
  std::vector<RowPart> parts;
  for (const Span& sp : plan.spans) parts.push_back({sp.r, sp.t0, sp.t1});
  return parts;
}

std::vector<int64_t> lane_rows_cpu(const DinParams& p) {
  std::vector<int64_t> rows;
  auto get = [&](auto one) {
    using T = decltype(one);
    const int vb = isa_bytes();
    const Model<T> m(p, false, vb);
    const Ctx<T> cx(p, m);
    if (!Plan(p).split) rows = lane_plan(p, cx, m, vb / static_cast<int>(sizeof(T))).units;
  };
  by_dtype(p, [&](const DinParams&) { get(float{}); }, [&](const DinParams&) { get(double{}); });
  return rows;
}

int64_t zcache_bytes_cpu(const DinParams& p) {
  check_common(p);
  int64_t slots = 0;
  for (int64_t r = 0; r < p.rows; ++r) slots += row_of(p, r).len;
  return slots * ZLayout(p).stride * acc_size(p.dtype);
}

int64_t backward_workspace_bytes_cpu(const DinParams& p) {
  return (GradLayout(p).total + shared_dk_extent(p)) * acc_size(p.dtype) * std::max(1, p.num_threads);
}

namespace {
// gw[idx[i]] += g[i] for every i in order, except at padding_idx's row.  One thread: the
// adds are bound by the random rows' memory traffic, and threads that own row ranges but
// must each scan every index mispredict their skips (2 threads ran 1.7x slower).
template <typename T>
void add_rows(T* gw, int64_t E, const int64_t* idx, int64_t sidx, int64_t n, const T* g, int64_t ldg,
              int64_t padding_idx) {
  typedef T V __attribute__((vector_size(16)));
  constexpr int64_t W = sizeof(V) / sizeof(T);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = idx[i * sidx];
    if (r == padding_idx) continue;
    T* dst = gw + r * E;
    const T* src = g + i * ldg;
    // 16-byte vectors written out: GCC does not vectorise the plain loop (dst and src
    // might overlap), which ran 2.8x slower.
    int64_t e = 0;
    for (; e + W <= E; e += W) {
      V a, b;
      std::memcpy(&a, dst + e, sizeof(V));
      std::memcpy(&b, src + e, sizeof(V));
      a += b;
      std::memcpy(dst + e, &a, sizeof(V));
    }
    for (; e < E; ++e) dst[e] += src[e];
  }
}

// Table lookups and their gradients refuse an index outside [0, rows) before they touch memory.
void check_indices(const int64_t* idx, int64_t sidx, int64_t n, int64_t rows) {
  for (int64_t i = 0; i < n; ++i)
    if (idx[i * sidx] < 0 || idx[i * sidx] >= rows)
      throw std::invalid_argument("indices must lie in [0, " + std::to_string(rows) + "), got indices[" +
                                  std::to_string(i) + "] = " + std::to_string(idx[i * sidx]));
}
}  // namespace

void embedding_grad_cpu(void* gw, int64_t rows, int64_t E, const int64_t* idx, int64_t sidx, int64_t n, const void* g,
                        int64_t ldg, int64_t padding_idx, DType dtype) {
  check_indices(idx, sidx, n, rows);
  if (dtype == DType::F32)
    add_rows(static_cast<float*>(gw), E, idx, sidx, n, static_cast<const float*>(g), ldg, padding_idx);
  else if (dtype == DType::F64)
    add_rows(static_cast<double*>(gw), E, idx, sidx, n, static_cast<const double*>(g), ldg, padding_idx);
  else
    throw std::invalid_argument("embedding_grad: float32 or float64 only");
}

namespace {
// Rows split into contiguous ranges over threads when there are enough: the copies are
// independent, and a big lookup's random table reads wait on the caches (the lookups of a
// B=1024, T=50 training step took 2-4x as long in the step as alone, after the attention
// has swept the caches).
template <typename T>
void gather_rows_impl(T* out, int64_t ldo, const T* table, int64_t E, const int64_t* idx, int64_t sidx, int64_t n,
                      int num_threads) {
  const int nt = n * E < 65536 ? 1 : static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n / 2048)));
  Pool::run(nt, [&](int tid) {
    for (int64_t i = n * tid / nt, end = n * (tid + 1) / nt; i < end; ++i)
      std::memcpy(out + i * ldo, table + idx[i * sidx] * E, sizeof(T) * E);
  });
}

// PReLU's backward, as aten's: gx = x > 0 ? g : w * g, and the slope's share
// x > 0 ? 0 : g * x (so a NaN x gives w * g and a NaN slope gradient).  Rows go in
// blocks whose shares sum per column in T, in order, into a double total.  The selects
// are written on 16-byte vectors: GCC leaves the plain loop scalar and branchy (the
// multiply it would hoist could trap), and on random signs that ran at ~5 ns an element,
// as aten's kernel does here, against ~0.3 ns.
template <typename T>
void prelu_backward_impl(T* gx, T* gw, const T* g, const T* x, const T* w, int64_t n, int64_t C, int64_t wC) {
  typedef T V __attribute__((vector_size(16)));
  constexpr int64_t W = sizeof(V) / sizeof(T);
  constexpr int64_t kBlock = 16;
  std::vector<double> total(static_cast<size_t>(C), 0.0);
  std::vector<T> part(static_cast<size_t>(C)), slope(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) slope[c] = w[wC == 1 ? 0 : c];
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    std::fill(part.begin(), part.end(), T(0));
    for (int64_t i = i0; i < std::min(n, i0 + kBlock); ++i) {
      const T* gi = g + i * C;
      const T* xi = x + i * C;
      T* gxi = gx + i * C;
      int64_t c = 0;
      for (; c + W <= C; c += W) {
        V gv, xv, sv, pv;
        std::memcpy(&gv, gi + c, sizeof(V));
        std::memcpy(&xv, xi + c, sizeof(V));
        std::memcpy(&sv, slope.data() + c, sizeof(V));
        std::memcpy(&pv, part.data() + c, sizeof(V));
        const auto pos = xv > V{};
        const V gxv = pos ? gv : sv * gv;
        pv += pos ? V{} : gv * xv;
        std::memcpy(gxi + c, &gxv, sizeof(V));
        std::memcpy(part.data() + c, &pv, sizeof(V));
      }
      for (; c < C; ++c) {
        const bool pos = xi[c] > T(0);
        gxi[c] = pos ? gi[c] : slope[c] * gi[c];
        part[c] += pos ? T(0) : gi[c] * xi[c];
      }
    }
    for (int64_t c = 0; c < C; ++c) total[c] += part[c];
  }
  if (wC == 1) {
    double s = 0.0;
    for (int64_t c = 0; c < C; ++c) s += total[c];
    gw[0] = static_cast<T>(s);
  } else {
    for (int64_t c = 0; c < C; ++c) gw[c] = static_cast<T>(total[c]);
  }
}
}  // namespace

void gather_rows_cpu(void* out, int64_t ldo, const void* table, int64_t rows, int64_t E, const int64_t* idx,
                     int64_t sidx, int64_t n, DType dtype, int num_threads) {
  check_indices(idx, sidx, n, rows);
  if (dtype == DType::F32)
    gather_rows_impl(static_cast<float*>(out), ldo, static_cast<const float*>(table), E, idx, sidx, n, num_threads);
  else if (dtype == DType::F64)
    gather_rows_impl(static_cast<double*>(out), ldo, static_cast<const double*>(table), E, idx, sidx, n,
                     num_threads);
  else
    throw std::invalid_argument("gather_rows: float32 or float64 only");
}

void prelu_backward_cpu(void* gx, void* gw, const void* g, const void* x, const void* w, int64_t n, int64_t C,
                        int64_t wC, DType dtype) {
  if (wC != 1 && wC != C) throw std::invalid_argument("prelu_backward: one slope, or one per channel");
  if (dtype == DType::F32)
    prelu_backward_impl(static_cast<float*>(gx), static_cast<float*>(gw), static_cast<const float*>(g),
                        static_cast<const float*>(x), static_cast<const float*>(w), n, C, wC);
  else if (dtype == DType::F64)
    prelu_backward_impl(static_cast<double*>(gx), static_cast<double*>(gw), static_cast<const double*>(g),
                        static_cast<const double*>(x), static_cast<const double*>(w), n, C, wC);
  else
    throw std::invalid_argument("prelu_backward: float32 or float64 only");
}

JaggedFacts jagged_layout_cpu(const int64_t* offsets, int64_t S, int64_t N, int64_t D, const int64_t* row_seq,
                              int64_t R, int64_t* out) {
  // The same checks, in the same order and words, as the torch ops of ops._jagged_layout
  // (which CUDA tensors still take): there they are a dozen small ops, ~80 us, more than a
  // serving-sized kernel.
  if (offsets[0] != 0)
    throw std::invalid_argument("offsets must start at 0, got offsets[0] = " + std::to_string(offsets[0]));
  for (int64_t s = 0; s < S; ++s)
    if (offsets[s + 1] < offsets[s])
      throw std::invalid_argument("offsets must not decrease, got offsets[" + std::to_string(s) + "] = " +
                                  std::to_string(offsets[s]) + " > offsets[" + std::to_string(s + 1) +
                                  "] = " + std::to_string(offsets[s + 1]));
  if (offsets[S] != N)
    throw std::invalid_argument("offsets must end at N = values.shape[0] = " + std::to_string(N) +
                                ", got offsets[-1] = " + std::to_string(offsets[S]));
  if (row_seq && R > 0) {
    const auto [lo, hi] = std::minmax_element(row_seq, row_seq + R);
    if (*lo < 0 || *hi >= S)
      throw std::invalid_argument("row_seq must lie in [0, S) = [0, " + std::to_string(S) + "), got values in [" +
                                  std::to_string(*lo) + ", " + std::to_string(*hi) + "]");
  }
  int64_t* seq_start = out;
  int64_t* seq_len = out + S;
  int64_t* lens = out + 2 * S;
  int64_t* starts = out + 2 * S + R;
  for (int64_t s = 0; s < S; ++s) {
    seq_start[s] = offsets[s] * D;
    seq_len[s] = offsets[s + 1] - offsets[s];
  }
  JaggedFacts f;
  std::vector<unsigned char> used(row_seq ? static_cast<size_t>(S) : 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t s = row_seq ? row_seq[r] : r;
    if (row_seq) {
      f.shared = f.shared || used[s];
      used[s] = 1;
    }
    lens[r] = seq_len[s];
    starts[r] = f.total;
    f.total += lens[r];
    f.max_len = std::max(f.max_len, lens[r]);
  }
  return f;
}

}  // namespace din

#else  // DIN_CPU_KERNEL_BODY: the per-ISA kernels, included once per ISA above.

namespace din {
namespace {
namespace DIN_NS {

constexpr int VB = DIN_VB;  // vector width in bytes

// ---------------------------------------------------------------------------
// Vector helpers for one ISA: T lanes in VB bytes.
// ---------------------------------------------------------------------------
template <typename T>
struct Vec {
  static constexpr int W = VB / static_cast<int>(sizeof(T));
  typedef T v __attribute__((vector_size(VB)));
  typedef int32_t vi __attribute__((vector_size(VB)));
  typedef uint32_t vu32 __attribute__((vector_size(VB)));

  // Unaligned, aliasing vector accesses.  (memcpy said the same, but let GCC
  // turn a micro-kernel's stores of its accumulator array into a spill to the
  // stack and a 16-byte copy loop: ~10% of the GEMM's time.)
  typedef T vu __attribute__((vector_size(VB), aligned(alignof(T)), may_alias));
  static DIN_INLINE v load(const T* p) { return *reinterpret_cast<const vu*>(p); }
  static DIN_INLINE void store(T* p, const v& x) { *reinterpret_cast<vu*>(p) = x; }
  static DIN_INLINE v set1(T x) { return x - v{}; }
  // Whether load_first has a masked-load form here (float, AVX-512 or AVX2).
  static constexpr bool kMaskedLoad = DIN_X86 && sizeof(T) == 4 && (VB == 64 || VB == 32);
  // The first n (1..W) lanes at p, zero above, reading nothing past p + n: a masked
  // load, whose masked-off lanes do not fault.  Only where kMaskedLoad.
  static DIN_INLINE v load_first(const T* p, int n) {
#if DIN_X86 && DIN_VB == 64
    if constexpr (sizeof(T) == 4)
      return (v)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
#elif DIN_X86 && DIN_VB == 32
    if constexpr (sizeof(T) == 4)
      return (v)_mm256_maskload_ps(
          p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
#endif
    v r{};
    for (int k = 0; k < n; ++k) r[k] = p[k];
    return r;
  }
  // A store past the caches (p aligned to VB) for data written once and read back by a
  // later pass, the pre-activation cache: no read-for-ownership of lines that are all
  // overwritten, and no eviction of the weights and tiles.  Fenced by store_fence.
  static DIN_INLINE void stream(T* p, const v& x) {
#if DIN_X86 && DIN_VB == 64
    if constexpr (sizeof(T) == 4) _mm512_stream_ps(p, (__m512)x);
    else _mm512_stream_pd(p, (__m512d)x);
#elif DIN_X86 && DIN_VB == 32
    if constexpr (sizeof(T) == 4) _mm256_stream_ps(p, (__m256)x);
    else _mm256_stream_pd(p, (__m256d)x);
#elif DIN_X86 && DIN_VB == 16
    if constexpr (sizeof(T) == 4) _mm_stream_ps(p, (__m128)x);
    else _mm_stream_pd(p, (__m128d)x);
#else
    store(p, x);
#endif
  }
  // Sum of the lanes as a tree (halving), not a chain of W dependent adds.
  template <int Bytes>
  static DIN_INLINE T hsum_tree(const T* lanes) {
    if constexpr (Bytes == 2 * static_cast<int>(sizeof(T))) {
      return lanes[0] + lanes[1];
    } else {
      typedef T h __attribute__((vector_size(Bytes / 2)));
      h a, b;
      std::memcpy(&a, lanes, Bytes / 2);
      std::memcpy(&b, lanes + Bytes / 2 / sizeof(T), Bytes / 2);
      const h s = a + b;
      return hsum_tree<Bytes / 2>(reinterpret_cast<const T*>(&s));
    }
  }
  static DIN_INLINE T hsum(const v& x) { return hsum_tree<VB>(reinterpret_cast<const T*>(&x)); }
  // x clamped to [lo, hi], a NaN x staying NaN.  x86's max(lo, x) and min(hi, x)
  // return their second operand when either is NaN, as the ternaries below do; GCC
  // compiles the ternaries to a compare and a blend each, the intrinsics to one
  // instruction.  (Used by the float sigmoid, and the AVX2 and baseline float exp.)
  static DIN_INLINE v clamp(const v& x, T lo, T hi) {
#if DIN_X86 && DIN_VB == 64
    if constexpr (sizeof(T) == 4)
      return (v)_mm512_min_ps((__m512)set1(hi), _mm512_max_ps((__m512)set1(lo), (__m512)x));
#elif DIN_X86 && DIN_VB == 32
    if constexpr (sizeof(T) == 4)
      return (v)_mm256_min_ps((__m256)set1(hi), _mm256_max_ps((__m256)set1(lo), (__m256)x));
#elif DIN_X86 && DIN_VB == 16
    if constexpr (sizeof(T) == 4) return (v)_mm_min_ps((__m128)set1(hi), _mm_max_ps((__m128)set1(lo), (__m128)x));
#endif
    const v y = x < set1(lo) ? set1(lo) : x;
    return y > set1(hi) ? set1(hi) : y;
  }

  // e^r for |r| <= ln2/2 (float): a degree-6 polynomial, coefficients fitted here
  // for minimax relative error (1e-7 evaluated in float).  kNeg: e^-r, by the
  // same polynomial with its odd coefficients negated, which gives bitwise the
  // value of e^(-r) (every Horner step is the same one with its sign flipped).
  template <bool kNeg>
  static DIN_INLINE v exp_poly(const v& r) {
    constexpr float s = kNeg ? -1.0f : 1.0f;
    v p = set1(1.3846145011484623e-3f);
    p = p * r + set1(s * 8.37411917746067e-3f);
    p = p * r + set1(4.1667960584163666e-2f);
    p = p * r + set1(s * 1.6666431725025177e-1f);
    p = p * r + set1(4.999999403953552e-1f);
    p = p * r + set1(s * 1.0f);
    return p * r + set1(1.0f);
  }
  // 2^n from tm = 1.5 * 2^23 + 127 + n (the rounding sum), whose low mantissa bits
  // hold n + 127: shifted into the exponent field.  n + 127 = 255 gives +inf.
  static DIN_INLINE v pow2n(const v& tm) {
    vu32 bits;
    std::memcpy(&bits, &tm, sizeof(bits));
    bits <<= 23;
    v scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return scale;
  }

  // exp: float is vectorised (about 1 ulp on [-87.3, 88]; the input is clamped
  // to 88, so the result is always finite, and below -87.3 it is 0 when
  // kFlushUnder, else exp(-87.3)); NaN propagates.  double calls std::exp per
  // lane to keep full precision.
  template <bool kFlushUnder = true>
  static DIN_INLINE v exp(const v& x) {
#if DIN_VB == 64
    if constexpr (sizeof(T) == 4) {
      // AVX-512: exp(x) = 2^n * 2^f, n = round(x log2 e), f = x log2 e - n in
      // [-1/2, 1/2] (two FMAs with a split log2 e keep f accurate), 2^f by a
      // degree-6 polynomial, and vscalefps applies 2^n with correct overflow
      // (inf) and underflow (0) handling.  NaN propagates.
      v xc = x < set1(-104.0f) ? set1(-104.0f) : x;  // written so that NaN stays NaN
      xc = xc > set1(88.0f) ? set1(88.0f) : xc;
      const v t = xc * set1(1.44269504088896341f);
      const v n = (v)_mm512_roundscale_ps((__m512)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      // f = xc * log2e - n with one rounding (an explicit FMA: the compiler would
      // reuse the rounded product t), then the low part of log2 e.
      v f = (v)_mm512_fmsub_ps((__m512)xc, (__m512)set1(1.44269504088896341f), (__m512)n);
      f = xc * set1(1.925963033500011079e-8f) + f;
      v y = set1(1.535336188319500e-4f);
      y = y * f + set1(1.339887440266574e-3f);
      y = y * f + set1(9.618437357674640e-3f);
      y = y * f + set1(5.550332471162809e-2f);
      y = y * f + set1(2.402264791363012e-1f);
      y = y * f + set1(6.931472028550421e-1f);
      y = y * f + set1(1.0f);
      // x <= 88 keeps the result finite; scalef underflows to 0 below about -103.
      return (v)_mm512_scalef_ps((__m512)y, (__m512)n);
    }
#endif
    if constexpr (sizeof(T) == 4) {
      // 2^n e^r with n = round(x log2 e) and r = x - n ln2 in [-ln2/2, ln2/2]
      // (Cody-Waite: ln2 split so that n * ln2_hi is exact, hence r is accurate to
      // an ulp at any x); e^r is a degree-6 polynomial (coefficients fitted here
      // for minimax relative error, 1e-7 evaluated in float), and 2^n comes from
      // the rounding sum itself, whose low mantissa bits hold n + 127.  ~14
      // vector operations against ~19 for the Cephes form with a conversion.
      const v lo = set1(-87.33654f);
      const v xc = clamp(x, -87.33654f, 88.0f);  // a NaN lane stays NaN
      const v magic = set1(12582912.0f + 127.0f);  // 1.5 * 2^23 (+ the exponent bias)
      const v tm = xc * set1(1.44269504088896341f) + magic;
      const v n = tm - magic;
      v r = xc - n * set1(0.693359375f);
      r = r - n * set1(-2.12194440e-4f);
      const v res = exp_poly<false>(r) * pow2n(tm);
      if constexpr (kFlushUnder) return x < lo ? v{} : res;
      return res;
    } else {
      v r;
      for (int i = 0; i < W; ++i) r[i] = std::exp(x[i]);
      return r;
    }
  }

  // 1 / d, a true divide (1 / inf = 0, which the float sigmoid relies on).  An estimate
  // with one Newton step, the 12-bit AVX one, is ~2 ulp, which the fp32 gradient tests of
  // the Dice statistics notice; AVX-512's rcp14 and a step measured 1.04x slower than the
  // divide on Zen 5 and alike on a Xeon (docs/performance.md, round 23).
  static DIN_INLINE v recip(const v& d) {
    return set1(T(1)) / d;
  }
  // sigmoid(x) = 1 / (1 + e^-x), exactly 0 in float below about -88.4, where the true
  // value is a denormal, as torch:
  // sigmoid(-inf) must be 0 so that -inf * sigmoid(-inf) (Dice with alpha 0) is
  // NaN, not -inf.  NaN stays NaN.
  static DIN_INLINE v sigmoid(const v& x) {
    if constexpr (sizeof(T) == 4) {
      // exp(-x) written out for the sigmoid, ~17 vector operations instead of ~22:
      // the clamps are single min/max instructions, -x is folded into the FMAs and
      // the polynomial (exp_poly<true>), and 2^n comes from the rounding sum.
      // (Above 87.34 the exponential stays the smallest normal, so the result is 1.)
      // x is clamped below at -88.8 rather than at -88, so no final select is needed:
      // for x <= -88.38, n = 128 and 2^n is +inf, so 1 / (1 + inf) is exactly 0.
      const v xc = clamp(x, -88.8f, 87.33654f);
      const v magic = set1(12582912.0f + 127.0f);
      const v tm = magic - xc * set1(1.44269504088896341f);  // magic + round(-x log2 e)
      const v n = tm - magic;
      v r = xc + n * set1(0.693359375f);  // -(the r of exp(-x)), exact the same way
      r = r + n * set1(-2.12194440e-4f);
      return recip(set1(1.0f) + exp_poly<true>(r) * pow2n(tm));
    }
    return recip(set1(T(1)) + exp<false>(-x));
  }
};

// ---------------------------------------------------------------------------
// Register-blocked GEMM:  C[M, NV*W] (=|+=) sum_k A(i,k) B[k, :]
//   A(i,k) = A[i*sa + k*sk]   (so A or A^T, any strides)
//   B row-major with ldb >= NV*W, C row-major with ldc.
// ---------------------------------------------------------------------------
template <typename T>
struct Gemm {
  using X = Vec<T>;
  using v = typename X::v;
  static constexpr int W = X::W;
  static constexpr int kNbMax = VB == 64 ? 6 : 3;  // 32 vector registers vs 16
  template <int NB>
  static constexpr int rbmax() {
    if constexpr (VB == 64) return NB <= 3 ? 8 : (NB == 4 ? 6 : 4);
    else return NB == 1 ? 8 : (NB == 2 ? 6 : 4);
  }

  template <bool ACC, int NB, int RB>
  static DIN_INLINE void micro(int K, const T* A, int64_t sa, int64_t sk, const T* B, int64_t ldb, T* C,
                               int64_t ldc) {
    v acc[RB][NB];
    for (int i = 0; i < RB; ++i)
      for (int j = 0; j < NB; ++j) acc[i][j] = v{};
    for (int k = 0; k < K; ++k) {
      const T* b = B + k * ldb;
      v bv[NB];
      for (int j = 0; j < NB; ++j) bv[j] = X::load(b + j * W);
      const T* a = A + k * sk;
      for (int i = 0; i < RB; ++i) {
        const v av = X::set1(a[i * sa]);
        for (int j = 0; j < NB; ++j) acc[i][j] += av * bv[j];
      }
    }
    for (int i = 0; i < RB; ++i)
      for (int j = 0; j < NB; ++j) {
        T* cp = C + i * ldc + j * W;
        if constexpr (ACC) X::store(cp, X::load(cp) + acc[i][j]);
        else X::store(cp, acc[i][j]);
      }
  }

  template <bool ACC, int NB, int RB>
  static DIN_INLINE void rem(int r, int K, const T* A, int64_t sa, int64_t sk, const T* B, int64_t ldb,
                             T* C, int64_t ldc) {
    if constexpr (RB > 0) {
      if (r == RB) micro<ACC, NB, RB>(K, A, sa, sk, B, ldb, C, ldc);
      else rem<ACC, NB, RB - 1>(r, K, A, sa, sk, B, ldb, C, ldc);
    }
  }

  template <bool ACC, int NB>
  static DIN_INLINE void cols(int M, int K, const T* A, int64_t sa, int64_t sk, const T* B, int64_t ldb,
                              T* C, int64_t ldc) {
    if constexpr (NB <= kNbMax) {
      constexpr int R = rbmax<NB>();
      int i = 0;
      for (; i + R <= M; i += R) micro<ACC, NB, R>(K, A + i * sa, sa, sk, B, ldb, C + i * ldc, ldc);
      if (i < M) rem<ACC, NB, R - 1>(M - i, K, A + i * sa, sa, sk, B, ldb, C + i * ldc, ldc);
    }
  }

  // K is summed in nearly equal chunks of at most kKc: each chunk's products start from
  // zero in registers and are then added to C, so the rounding of a long K grows with
  // about kKc + K / kKc terms rather than K: fp32 logits behind a 250-wide layer went
  // from 1.65x to 1.2x the reference's own error (median).  The headline's K (36, 72,
  // 80) stays in one chunk, bitwise as before; chunks of 64 cost it 1-3%.
  static constexpr int kKc = 96;

  template <bool ACC>
  static __attribute__((noinline)) void run(int M, int NV, int K, const T* A, int64_t sa, int64_t sk, const T* B,
                             int64_t ldb, T* C, int64_t ldc) {
    if (M <= 0 || NV <= 0) return;
    const int nk = (K + kKc - 1) / kKc;
    if (nk <= 1) return blocks<ACC>(M, NV, K, A, sa, sk, B, ldb, C, ldc);
    int k0 = 0;
    for (int c = 0; c < nk; ++c) {
      const int kc = (K - k0 + (nk - c) - 1) / (nk - c);
      if (ACC || c > 0) blocks<true>(M, NV, kc, A + k0 * sk, sa, sk, B + k0 * ldb, ldb, C, ldc);
      else blocks<false>(M, NV, kc, A, sa, sk, B, ldb, C, ldc);
      k0 += kc;
    }
  }

  template <bool ACC>
  static DIN_INLINE void blocks(int M, int NV, int K, const T* A, int64_t sa, int64_t sk, const T* B,
                                int64_t ldb, T* C, int64_t ldc) {
    const int nblk = (NV + kNbMax - 1) / kNbMax;  // nearly equal column blocks
    int j0 = 0;
    for (int blk = 0; blk < nblk; ++blk) {
      const int left = nblk - blk;
      const int nb = (NV - j0 + left - 1) / left;
      const T* Bj = B + j0 * W;
      T* Cj = C + j0 * W;
      switch (nb) {
        case 1: cols<ACC, 1>(M, K, A, sa, sk, Bj, ldb, Cj, ldc); break;
        case 2: cols<ACC, 2>(M, K, A, sa, sk, Bj, ldb, Cj, ldc); break;
        case 3: cols<ACC, 3>(M, K, A, sa, sk, Bj, ldb, Cj, ldc); break;
        case 4: cols<ACC, 4>(M, K, A, sa, sk, Bj, ldb, Cj, ldc); break;
        case 5: cols<ACC, 5>(M, K, A, sa, sk, Bj, ldb, Cj, ldc); break;
        default: cols<ACC, 6>(M, K, A, sa, sk, Bj, ldb, Cj, ldc); break;
      }
      j0 += nb;
    }
  }
};

// ---------------------------------------------------------------------------
// Row kernels for one ISA.
// ---------------------------------------------------------------------------
template <typename T>
struct Kernel {
  using X = Vec<T>;
  using v = typename X::v;
  static constexpr int W = X::W;

  // Valid positions t0 <= t < t1 of a row in tiles of up to kTile keys; f(n)
  // sees sc.n, sc.A/sc.sa (the keys) and sc.pos.
  template <class F>
  static DIN_INLINE void for_tiles(const DinParams& p, const Model<T>& m, Scratch<T>& sc, const Row& row,
                                   int64_t t_begin, int64_t t_end, F&& f) {
    const T* kb = static_cast<const T*>(p.k) + seq_off(p, row.s);
    if (!p.mask) {
      for (int64_t t0 = t_begin; t0 < t_end; t0 += kTile) {
        const int n = static_cast<int>(std::min<int64_t>(kTile, t_end - t0));
        for (int i = 0; i < n; ++i) sc.pos[i] = t0 + i;
        sc.n = n;
        sc.A = kb + t0 * p.ldk;
        sc.sa = p.ldk;
        f(n);
      }
      return;
    }
    const uint8_t* mk = p.mask + row.s * p.ld_mask;
    int n = 0;
    sc.A = sc.ktile.data();
    sc.sa = m.D;
    for (int64_t t = t_begin; t < t_end; ++t) {
      if (!mk[t]) continue;
      sc.pos[n] = t;
      std::memcpy(sc.ktile.data() + static_cast<size_t>(n) * m.D, kb + t * p.ldk, sizeof(T) * m.D);
      if (++n == kTile) {
        sc.n = n;
        f(n);
        n = 0;
      }
    }
    if (n) {
      sc.n = n;
      f(n);
    }
  }

  // dst[0..D) (op)= a * x[0..D): full vectors then a scalar tail.
  static DIN_INLINE void axpy(int D, T a, const T* x, T* dst) {
    const v av = X::set1(a);
    int d = 0;
    for (; d + W <= D; d += W) X::store(dst + d, X::load(dst + d) + av * X::load(x + d));
    for (; d < D; ++d) dst[d] += a * x[d];
  }
  static DIN_INLINE T dot(int D, const T* x, const T* y) {
    v s = v{};
    int d = 0;
    for (; d + W <= D; d += W) s += X::load(x + d) * X::load(y + d);
    T r = X::hsum(s);
    for (; d < D; ++d) r += x[d] * y[d];
    return r;
  }

  // Folded first layer: c = b1 + (Wq+Wd) q, MT = (Wk-Wd)^T + diag(q) Wm^T, and for
  // the backward M = (Wk-Wd) + Wm diag(q) laid out [H1][Dp].  c is a one-row GEMM
  // (accumulators in registers, as pack_bias forms it for packed rows): summed into
  // c in memory, d by d, it was a store-to-load chain per vector (on an AVX-512 Xeon,
  // one thread: rows of 32 keys 216 -> 202 ns per key; A/B headline forward 1.03x,
  // rows of up to 50 keys 1.07-1.09x).
  // need_MT: false when the pass loads layer 1 from the cache instead of computing it
  // (computes_layer0), so that neither MT nor c is read.
  static DIN_INLINE void fold(const Model<T>& m, const T* q, Scratch<T>& sc, bool need_MT, bool need_M) {
    const int D = m.D, H1p = m.Hp[0], nv = H1p / W;
    sc.qrow = q;
    if (need_MT) {
      T* c = sc.c.data();
      std::memcpy(c, m.bias[0].data(), sizeof(T) * H1p);
      Gemm<T>::template run<true>(1, nv, D, q, D, 1, m.WqdT.data(), H1p, c, H1p);
      for (int d = 0; d < D; ++d) {
        const v qd = X::set1(q[d]);
        const size_t o = static_cast<size_t>(d) * H1p;
        const T* a = m.AT + o;
        const T* wm = m.WmT + o;
        T* mt = sc.MT.data() + o;
        for (int j = 0; j < nv; ++j) X::store(mt + j * W, X::load(a + j * W) + qd * X::load(wm + j * W));
      }
    }
    if (need_M) {
      std::memcpy(sc.qp.data(), q, sizeof(T) * D);
      const int Dp = m.Dp, nd = Dp / W;
      for (int j = 0; j < m.H[0]; ++j) {
        const size_t o = static_cast<size_t>(j) * Dp;
        for (int d = 0; d < nd; ++d)
          X::store(sc.M.data() + o + d * W, X::load(m.Ab.data() + o + d * W) +
                                                X::load(m.Wmb.data() + o + d * W) * X::load(sc.qp.data() + d * W));
      }
    }
  }

  // h = act(z) for one vector z of layer l's pre-activations.  par(buf) gives the values of the
  // per-channel parameter buf (alpha, mean, ...) for z's lanes: a vector load where the lanes are
  // channels (the row path), one channel broadcast where they are rows (the lanes path), so that
  // both paths run the same expressions and round alike.  Dice: the gate goes to *gate if given.
  template <Act A, class Par>
  static DIN_INLINE v act1(const Model<T>& m, int l, const v& z, Par&& par, v* gate) {
    if constexpr (A == Act::Sigmoid) {
      return X::sigmoid(z);
    } else if constexpr (A == Act::ReLU) {
      return z < v{} ? v{} : z;  // like torch.relu: NaN stays NaN
    } else if constexpr (A == Act::PReLU) {
      return z > v{} ? z : par(m.alpha[l]) * z;
    } else {  // Dice
      const v a = par(m.alpha[l]);
      const v xhat = (z - par(m.mean[l])) * par(m.invstd[l]);
      const v pr = X::sigmoid(par(m.gamma[l]) * xhat + par(m.beta[l]));
      if (gate) *gate = pr;
      // The reference's p z + (1 - p) alpha z, not z (alpha + (1 - alpha) p): at an
      // infinite z one of the two terms is 0 * inf, so the result is NaN, as in torch.
      return pr * z + ((X::set1(T(1)) - pr) * a) * z;
    }
  }

  // z (+ bias when kBias) -> h = act(z) for n rows of layer l; z + bias is
  // written back when keep_z.  Dice: the gate p = sigmoid(gamma * xhat + beta)
  // also goes to P when given, for the backward of the same tile.
  template <Act A, bool kBias>
  static DIN_INLINE void activate_t(const Model<T>& m, int l, int n, T* Z, T* Hh, T* P, const T* bias,
                                    bool keep_z) {
    const int Hp = m.Hp[l], nv = Hp / W;
    for (int i = 0; i < n; ++i) {
      T* zr = Z + static_cast<size_t>(i) * Hp;
      T* hr = Hh + static_cast<size_t>(i) * Hp;
      T* pr_row = P ? P + static_cast<size_t>(i) * Hp : nullptr;
      for (int j = 0; j < nv; ++j) {
        v z = X::load(zr + j * W);
        if constexpr (kBias) {
          z += X::load(bias + j * W);
          if (keep_z) X::store(zr + j * W, z);
        }
        v gate;
        const v h = act1<A>(m, l, z, [&](const ABuf<T>& par) { return X::load(par.data() + j * W); },
                            pr_row ? &gate : nullptr);
        if (pr_row) X::store(pr_row + j * W, gate);
        X::store(hr + j * W, h);
      }
    }
  }
  template <bool kBias>
  static DIN_INLINE void activate(const Model<T>& m, int l, int n, T* Z, T* Hh, T* P, const T* bias, bool keep_z) {
    switch (m.act) {
      case Act::Sigmoid: activate_t<Act::Sigmoid, kBias>(m, l, n, Z, Hh, P, bias, keep_z); break;
      case Act::ReLU: activate_t<Act::ReLU, kBias>(m, l, n, Z, Hh, P, bias, keep_z); break;
      case Act::PReLU: activate_t<Act::PReLU, kBias>(m, l, n, Z, Hh, P, bias, keep_z); break;
      default: activate_t<Act::Dice, kBias>(m, l, n, Z, Hh, P, bias, keep_z); break;
    }
  }

  // The fold computes z1 - c = (Wk - Wd + Wm diag(q)) k.  With Inf/NaN in a key
  // (or in q or W1) the reference's sum of the four input blocks q, k, q-k, q*k
  // gives NaN (inf - inf) where the folded product may give +-Inf, so rows with a
  // non-finite value are recomputed unfolded, as the reference does (the packed
  // tile's [k, q*k] product has the same problem).  The check is a few vector ORs
  // per tile; the slow path runs only on non-finite input.  key(i) gives key i's
  // query and key, and c: what the activation adds back (nullptr: nothing).
  struct KeyRef {
    const T* q;
    const T* k;
    const T* c;
  };
  template <class KeyOf>
  static DIN_INLINE void z1_nonfinite_fixup(const Model<T>& m, int n, T* Z, KeyOf&& key) {
    const int H1p = m.Hp[0], nv = H1p / W;
    // z * 0 is NaN exactly when z is Inf or NaN, so the sums below are NaN exactly when
    // some z is: one FMA per vector (a compare and a masked merge cost three), four
    // chains so that the FMA latency hides.
    const v zero{};
    v s0{}, s1{}, s2{}, s3{};
    const int nz = n * nv;
    int i = 0;
    for (; i + 4 <= nz; i += 4) {
      const T* z = Z + static_cast<size_t>(i) * W;
      s0 += X::load(z) * zero;
      s1 += X::load(z + W) * zero;
      s2 += X::load(z + 2 * W) * zero;
      s3 += X::load(z + 3 * W) * zero;
    }
    for (; i < nz; ++i) s0 += X::load(Z + static_cast<size_t>(i) * W) * zero;
    const v sum = (s0 + s1) + (s2 + s3);
    bool any = false;
    for (int k = 0; k < W; ++k) any |= sum[k] != sum[k];
    if (__builtin_expect(!any, 1)) return;
    const int D = m.D, H1 = m.H[0];
    for (int i = 0; i < n; ++i) {
      T* zr = Z + static_cast<size_t>(i) * H1p;
      bool row_bad = false;
      for (int j = 0; j < H1; ++j) row_bad |= !std::isfinite(zr[j]);
      if (!row_bad) continue;
      const KeyRef kr = key(i);
      const T *q = kr.q, *k = kr.k;
      for (int j = 0; j < H1; ++j) {
        const T* w = m.W0 + static_cast<int64_t>(j) * 4 * D;
        T acc = m.bias[0][j];
        for (int d = 0; d < D; ++d)
          acc += w[d] * q[d] + w[D + d] * k[d] + w[2 * D + d] * (q[d] - k[d]) + w[3 * D + d] * (q[d] * k[d]);
        zr[j] = kr.c ? acc - kr.c[j] : acc;  // the activation adds c back
      }
      for (int j = H1; j < H1p; ++j) zr[j] = T(0);  // padding lanes: 0 * Inf must not leak into the scores
    }
  }

  // Point the scratch at row r's slots of the pre-activation cache (if any).
  static DIN_INLINE void zbind(const Ctx<T>& cx, Scratch<T>& sc, int64_t r) {
    sc.zrow = cx.zc ? cx.zc + cx.zbase[r] * cx.zl.stride : nullptr;
    sc.zhave = cx.zhave;
    sc.zl = &cx.zl;
  }
  // The lowest layer a pass must compute when it needs the h of layers need..last:
  // layer `need` itself if the cache holds its pre-activation, else the nearest one
  // below it that the cache holds (0: from the keys).  The forward passes need only
  // layer last; a reduction for layer l, layers l..last; the full backward, every h.
  static DIN_INLINE int first_layer(const Scratch<T>& sc, int need) {
    if (!sc.zrow) return 0;
    for (int l = need; l > 0; --l)
      if (sc.zhave >> l & 1) return l;
    return 0;
  }
  // Whether a pass needing layers need.. computes layer 0 (from the keys, with the row's
  // fold) rather than loading it from the cache.
  static DIN_INLINE bool computes_layer0(const Scratch<T>& sc, int need) {
    return first_layer(sc, need) == 0 && !(sc.zrow && (sc.zhave & 1));
  }
  // Layer l's Hp values per key of the tile between buf [n, Hp] and the cache.  A
  // store zero-fills the slot up to its widest padding, so a pass on a wider ISA
  // (DIN_FUSED_CPU_ISA is read per call) never reads unwritten lanes.
  static DIN_INLINE void zcopy(const Scratch<T>& sc, int l, int Hp, int n, T* buf, bool load) {
    const int64_t off = sc.zl->off[l];
    const int width = sc.zl->width[l];  // a multiple of 64 bytes, as off and the stride
    // Every slot is 64-byte aligned when the cache is (a fresh torch buffer always is).
    const bool aligned = reinterpret_cast<uintptr_t>(sc.zrow) % kMaxPadBytes == 0;
    for (int i = 0; i < n; ++i) {
      T* slot = sc.zrow + sc.pos[i] * sc.zl->stride + off;
      T* bi = buf + static_cast<size_t>(i) * Hp;
      if (load) {
        for (int j = 0; j < Hp; j += W) X::store(bi + j, X::load(slot + j));
      } else if (aligned) {  // whole lines, so that no line is partly cached
        for (int j = 0; j < Hp; j += W) X::stream(slot + j, X::load(bi + j));
        for (int j = Hp; j < width; j += W) X::stream(slot + j, v{});
      } else {
        for (int j = 0; j < Hp; j += W) X::store(slot + j, X::load(bi + j));
        for (int j = Hp; j < width; ++j) slot[j] = T(0);
      }
    }
  }

  // Hidden layers first_layer..last of the current tile; layer `last` is
  // activated when activate_last, otherwise left as the pre-activation (plus
  // bias) in Z[last].  need: the lowest layer whose h is wanted (first_layer).
  // With a cache, a layer found there is loaded (its pre-activation with the
  // bias) instead of computed, and a computed one is stored.  (Keeping the Dice
  // gates too was tried: the extra memory traffic cost as much as the exps saved.)
  static DIN_INLINE void hidden(const Model<T>& m, Scratch<T>& sc, int n, int last, bool activate_last,
                                bool keep_z, int need) {
    for (int l = first_layer(sc, need); l <= last; ++l) {
      T* Z = sc.Z[l].data();
      const int Hp = m.Hp[l], nv = Hp / W;
      const bool act_l = l < last || activate_last;
      T* P = m.act == Act::Dice && keep_z ? sc.P[l].data() : nullptr;  // the backward's gates
      if (sc.zrow && (sc.zhave >> l & 1)) {
        zcopy(sc, l, Hp, n, Z, true);
        if (act_l) activate<false>(m, l, n, Z, sc.Hb[l].data(), P, nullptr, false);
        continue;
      }
      if (l == 0 && sc.packed) {
        packed_layer0(m, sc, n, Z);
        if (act_l) activate<false>(m, 0, n, Z, sc.Hb[0].data(), P, nullptr, false);
        continue;
      }
      if (l == 0) {
        Gemm<T>::template run<false>(n, nv, m.D, sc.A, sc.sa, 1, sc.MT.data(), Hp, Z, Hp);
        z1_nonfinite_fixup(m, n, Z, [&](int i) { return KeyRef{sc.qrow, sc.A + i * sc.sa, sc.c.data()}; });
      } else {
        Gemm<T>::template run<false>(n, nv, m.H[l - 1], sc.Hb[l - 1].data(), m.Hp[l - 1], 1, m.WT[l].data(), Hp,
                                     Z, Hp);
      }
      const T* bias = l == 0 ? sc.c.data() : m.bias[l].data();
      if (act_l) {
        activate<true>(m, l, n, Z, sc.Hb[l].data(), P, bias, keep_z || sc.zrow);
      } else {
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < nv; ++j) {
            T* zp = Z + static_cast<size_t>(i) * Hp + j * W;
            X::store(zp, X::load(zp) + X::load(bias + j * W));
          }
      }
      if (sc.zrow) zcopy(sc, l, Hp, n, Z, false);
    }
  }

  // s[i] = wout . h_L[i] + bout
  static DIN_INLINE void scores(const Model<T>& m, Scratch<T>& sc, int n) {
    const int HLp = m.Hp[m.L - 1], nv = HLp / W;
    const T* h = sc.Hb[m.L - 1].data();
    for (int i = 0; i < n; ++i) {
      v acc = v{};
      for (int j = 0; j < nv; ++j) acc += X::load(h + static_cast<size_t>(i) * HLp + j * W) * X::load(m.wout.data() + j * W);
      sc.s[i] = X::hsum(acc) + m.bout;
    }
  }

  // x[0..n) = exp(x - sub) * mul
  static DIN_INLINE void exp_scaled(T* x, int64_t n, T sub, T mul) {
    const v vs = X::set1(sub), vm = X::set1(mul);
    int64_t i = 0;
    for (; i + W <= n; i += W) X::store(x + i, X::exp(X::load(x + i) - vs) * vm);
    if (i < n) {
      T tmp[W];
      for (int k = 0; k < W; ++k) tmp[k] = i + k < n ? x[i + k] : sub;
      X::store(tmp, X::exp(X::load(tmp) - vs) * vm);
      for (int k = 0; i + k < n; ++k) x[i + k] = tmp[k];
    }
  }

  // Softmax weights of positions [t0, t1) from the row's logits (scaled scores
  // parked in the scores row), its max mx and 1/den; masked positions -> 0.
  static void normalise(const Ctx<T>& cx, const Span& sp, T mx, T inv) {
    const DinParams& p = *cx.p;
    const Row row = row_of(p, sp.r);
    T* sr = static_cast<T*>(p.scores) + score_row(p, sp.r, p.ld_scores);
    exp_scaled(sr + sp.t0, sp.t1 - sp.t0, mx, inv);
    if (p.mask) {
      const uint8_t* mk = p.mask + row.s * p.ld_mask;
      for (int64_t t = sp.t0; t < sp.t1; ++t)
        if (!mk[t]) sr[t] = T(0);
    }
  }

  // Online-softmax state of a row (part): running max mx and normaliser den;
  // sc.racc holds the pooled sum scaled by exp(-mx).  any: a tile was seen.
  struct RowState {
    T mx = -INFINITY;
    double den = 0.0;
    bool any = false;
  };

  // acc[0..D) = sum_i s[i] A[i sa + 0..D).  Where a key is at most 6 vectors (float,
  // AVX-512 or AVX2), the sums stay in registers (through acc in memory, each key's
  // add waited on the last one's store: 1.02-1.07x of the forward was pooling).  The
  // same FMAs in the same order either way, so the sums are bitwise the same.
  template <int NV>
  static DIN_INLINE void pool_regs(int n, const T* s, const T* A, int64_t sa, int D, T* acc) {
    const int last = D - (NV - 1) * W;  // lanes of the last vector, 1..W
    v r[NV];
    for (int j = 0; j < NV; ++j) r[j] = v{};
    for (int i = 0; i < n; ++i) {
      const T* x = A + i * sa;
      const v a = X::set1(s[i]);
      for (int j = 0; j < NV - 1; ++j) r[j] += a * X::load(x + j * W);
      r[NV - 1] += a * X::load_first(x + (NV - 1) * W, last);
    }
    for (int j = 0; j < NV - 1; ++j) X::store(acc + j * W, r[j]);
    for (int k = 0; k < last; ++k) acc[(NV - 1) * W + k] = r[NV - 1][k];
  }
  static DIN_INLINE void pool_keys(int n, const T* s, const T* A, int64_t sa, int D, T* acc) {
    if constexpr (X::kMaskedLoad) {
      switch ((D + W - 1) / W) {
        case 1: return pool_regs<1>(n, s, A, sa, D, acc);
        case 2: return pool_regs<2>(n, s, A, sa, D, acc);
        case 3: return pool_regs<3>(n, s, A, sa, D, acc);
        case 4: return pool_regs<4>(n, s, A, sa, D, acc);
        case 5: return pool_regs<5>(n, s, A, sa, D, acc);
        case 6: return pool_regs<6>(n, s, A, sa, D, acc);
        default: break;
      }
    }
    std::fill(acc, acc + D, T(0));
    for (int i = 0; i < n; ++i) axpy(D, s[i], A + i * sa, acc);
  }

  // One tile of a row: its n scores s become weights (in place), are written to
  // the scores row sr at positions pos (softmax: the logits, normalised at the
  // end), and the weighted sum of the keys A + i * sa is added to sc.racc.
  static DIN_INLINE void pool_tile(const Ctx<T>& cx, Scratch<T>& sc, T* s, int n, const T* A, int64_t sa,
                                   const int64_t* pos, T* sr, RowState& st) {
    const int D = cx.m->D;
    T* acc = sc.acc.data();  // pooled sum of the tile
    double* racc = sc.racc.data();
    st.any = true;
    if (!cx.softmax) {
      for (int i = 0; i < n; ++i) sr[pos[i]] = s[i];
      pool_keys(n, s, A, sa, D, acc);
    } else {
      T tmx = st.mx;
      for (int i = 0; i < n; ++i) {
        s[i] *= cx.scale;
        sr[pos[i]] = s[i];
        tmx = std::max(tmx, s[i]);
      }
      if (tmx > st.mx) {
        const double f = std::exp(static_cast<double>(st.mx) - static_cast<double>(tmx));  // 0 on the first tile
        st.den *= f;
        for (int d = 0; d < D; ++d) racc[d] *= f;
        st.mx = tmx;
      }
      exp_scaled(s, n, st.mx, T(1));
      // In double even within the tile: next to a weight of 1 (the row max), float
      // drops every term below half an ulp of 1, e^-17 and less, and a row whose
      // other weights are all that small would get exactly 1 for its max weight.
      double tden = 0.0;
      for (int i = 0; i < n; ++i) tden += static_cast<double>(s[i]);
      pool_keys(n, s, A, sa, D, acc);
      st.den += tden;
    }
    for (int d = 0; d < D; ++d) racc[d] += static_cast<double>(acc[d]);
  }

  // out of a whole row from its pooled sum, and its softmax weights.
  static DIN_INLINE void finish_row(const Ctx<T>& cx, Scratch<T>& sc, const Span& sp, const RowState& st) {
    const DinParams& p = *cx.p;
    const int D = cx.m->D;
    const double* racc = sc.racc.data();
    T* out = static_cast<T*>(p.out) + sp.r * p.ldo;
    if (cx.softmax && st.any) {
      const double inv = 1.0 / st.den;
      for (int d = 0; d < D; ++d) out[d] = static_cast<T>(racc[d] * inv);
      normalise(cx, sp, st.mx, static_cast<T>(inv));
    } else {
      for (int d = 0; d < D; ++d) out[d] = static_cast<T>(racc[d]);
    }
  }

  // Forward of positions [t0, t1) of row r.  part == nullptr: the whole row,
  // written to out and scores.  Otherwise the part's online-softmax state goes
  // to *part and its scores stay logits until normalise().
  static void forward_span(const Ctx<T>& cx, Scratch<T>& sc, const Span& sp, FwdPart* part) {
    const DinParams& p = *cx.p;
    const Model<T>& m = *cx.m;
    const int D = m.D;
    const int64_t r = sp.r;
    const Row row = row_of(p, r);
    const T* q = static_cast<const T*>(p.q) + r * p.ldq;
    T* sr = static_cast<T*>(p.scores) + score_row(p, r, p.ld_scores);
    // Scores: this span, plus the tail beyond the row's length for its last span.
    std::fill(sr + sp.t0, sr + (sp.t1 >= row.len && !p.score_start ? p.max_len : sp.t1), T(0));
    double* racc = sc.racc.data();  // of the span, in double
    std::fill(racc, racc + D, 0.0);
    RowState st;
    if (sp.t1 > sp.t0) {
      zbind(cx, sc, r);
      fold(m, q, sc, computes_layer0(sc, m.L - 1), false);
      for_tiles(p, m, sc, row, sp.t0, sp.t1, [&](int n) {
        hidden(m, sc, n, m.L - 1, true, false, m.L - 1);
        scores(m, sc, n);
        pool_tile(cx, sc, sc.s.data(), n, sc.A, sc.sa, sc.pos, sr, st);
      });
    }
    if (part) {
      // mx stays -inf when every score is NaN (std::max drops NaN), which the merge
      // would read as "no valid positions": a NaN sum marks the part NaN instead.
      part->mx = !(cx.softmax && st.any) ? -INFINITY : (std::isnan(st.den) ? NAN : static_cast<double>(st.mx));
      part->den = st.den;
      std::copy(racc, racc + D, part->acc);
      return;
    }
    finish_row(cx, sc, sp, st);
  }

  // ---- Packed short rows --------------------------------------------------
  // A row of a few keys costs more in per-row work than in per-key work: the fold
  // builds M_r and c_r ([H1, D] each) for it, and its partial tile runs the GEMMs
  // below their rate.  Whole rows of at most kPack positions are
  // therefore gathered into shared tiles of up to kTile keys, and layer 1 runs
  // unfolded on them: z1 = [k, q*k] [(Wk-Wd); Wm]^T + c_r, a K = 2D product, with
  // only c_r per row (Ctx::pack says when).  A key's and a row's results depend on
  // that row alone (each GEMM row accumulates in the same order whatever the tile
  // holds), so out, the weights, dq and dk do not depend on which rows share a
  // tile; the parameter gradients' per-thread partials add tiles in a fixed order
  // for a given thread count, as the row by row path adds rows.

  // Row r into the thread's packed tile; flush() first when it does not fit.
  template <class Flush>
  static DIN_INLINE void pack_add(const Ctx<T>& cx, Scratch<T>& sc, int64_t r, Flush&& flush) {
    const DinParams& p = *cx.p;
    const int D = cx.m->D;
    const Row row = row_of(p, r);
    if (sc.pn + row.len > kTile || sc.prows == kTile) flush();
    const T* q = static_cast<const T*>(p.q) + r * p.ldq;
    const T* kb = static_cast<const T*>(p.k) + seq_off(p, row.s);
    const uint8_t* mk = p.mask ? p.mask + row.s * p.ld_mask : nullptr;
    const int j = sc.prows++;
    int n = sc.pn;
    sc.prow[j] = r;
    std::memcpy(sc.Q.data() + static_cast<size_t>(j) * D, q, sizeof(T) * D);
    sc.kseg[j] = n;
    for (int64_t t = 0; t < row.len; ++t) {
      if (mk && !mk[t]) continue;
      const T* k = kb + t * p.ldk;
      T* x = sc.X.data() + static_cast<size_t>(n) * 2 * D;
      int d = 0;
      for (; d + W <= D; d += W) {
        const v kv = X::load(k + d);
        X::store(x + d, kv);
        X::store(x + D + d, X::load(q + d) * kv);
      }
      for (; d < D; ++d) {
        x[d] = k[d];
        x[D + d] = q[d] * k[d];
      }
      sc.ppos[n] = t;
      sc.kslot[n] = j;
      ++n;
    }
    sc.pn = n;
    sc.kseg[j + 1] = n;
  }

  // Layer 1 of the packed tile: Z = c of each key's row + [k, q*k] AWmT.
  static DIN_INLINE void packed_layer0(const Model<T>& m, Scratch<T>& sc, int n, T* Z) {
    const int D = m.D, H1p = m.Hp[0];
    for (int i = 0; i < n; ++i)
      std::memcpy(Z + static_cast<size_t>(i) * H1p, sc.crow.data() + static_cast<size_t>(sc.kslot[i]) * H1p,
                  sizeof(T) * H1p);
    Gemm<T>::template run<true>(n, H1p / W, 2 * D, sc.X.data(), 2 * D, 1, m.AT, H1p, Z, H1p);
    z1_nonfinite_fixup(m, n, Z, [&](int i) {
      const T* x = sc.X.data() + static_cast<size_t>(i) * 2 * D;
      return KeyRef{sc.Q.data() + static_cast<size_t>(sc.kslot[i]) * D, x, nullptr};
    });
  }

  // c = b1 + (Wq+Wd) q of each row of the packed tile: one product over its rows.
  static DIN_INLINE void pack_bias(const Ctx<T>& cx, Scratch<T>& sc) {
    const Model<T>& m = *cx.m;
    const int H1p = m.Hp[0];
    for (int j = 0; j < sc.prows; ++j)
      std::memcpy(sc.crow.data() + static_cast<size_t>(j) * H1p, m.bias[0].data(), sizeof(T) * H1p);
    Gemm<T>::template run<true>(sc.prows, H1p / W, m.D, sc.Q.data(), m.D, 1, m.WqdT.data(), H1p, sc.crow.data(),
                                H1p);
  }

  // Forward of the packed tile's rows, then an empty tile.
  static void pack_flush_fwd(const Ctx<T>& cx, Scratch<T>& sc) {
    if (sc.prows == 0) return;
    const DinParams& p = *cx.p;
    const Model<T>& m = *cx.m;
    const int D = m.D;
    if (sc.pn > 0) {
      pack_bias(cx, sc);
      sc.zrow = nullptr;
      sc.packed = true;
      hidden(m, sc, sc.pn, m.L - 1, true, false, m.L - 1);
      sc.packed = false;
      scores(m, sc, sc.pn);
    }
    for (int j = 0; j < sc.prows; ++j) {
      const int64_t r = sc.prow[j];
      const Row row = row_of(p, r);
      const int i0 = sc.kseg[j], i1 = sc.kseg[j + 1];
      T* sr = static_cast<T*>(p.scores) + score_row(p, r, p.ld_scores);
      std::fill(sr, sr + (p.score_start ? row.len : p.max_len), T(0));
      std::fill(sc.racc.data(), sc.racc.data() + D, 0.0);
      RowState st;
      if (i1 > i0)
        pool_tile(cx, sc, sc.s.data() + i0, i1 - i0, sc.X.data() + static_cast<size_t>(i0) * 2 * D, 2 * D,
                  sc.ppos + i0, sr, st);
      finish_row(cx, sc, Span{r, 0, row.len}, st);
    }
    sc.pn = sc.prows = 0;
  }

  static void forward_row(const Ctx<T>& cx, Scratch<T>& sc, int64_t r) {
    const int64_t len = row_of(*cx.p, r).len;
    if (cx.pack && is_short(len)) {
      pack_add(cx, sc, r, [&] { pack_flush_fwd(cx, sc); });
      return;
    }
    forward_span(cx, sc, Span{r, 0, len}, nullptr);
  }

  static DIN_INLINE bool is_short(int64_t len) { return len > 0 && len <= kPack; }

  // ---- Rows in the lanes ----------------------------------------------------
  // W rows that share one sequence (one user's history scored against many candidates)
  // run together, one row per vector lane, every layer's channels in loops: layer 2's 40
  // units do not pad to 48 lanes, the score is FMAs instead of a horizontal sum per key,
  // and a tile of keys is read once for W rows.  Each lane does the row path's arithmetic
  // in the row path's order: the same fold (c and MT), every product summed in the same
  // order by the same GEMM, the same activation code (act1) and the score's lane tree
  // rebuilt, so a row's results are bitwise the row path's, and the backward, which
  // recomputes on the row path, sees exactly the forward's activations.  Where the row
  // path would recompute layer 1 unfolded (a non-finite z1) or its padded lanes would
  // carry a NaN into the score (a non-finite last layer), the W rows go back to it.
  static constexpr int kLaneTb = 8;  // keys per pass through the layers

  struct LaneBufs {
    T *qT, *Cq, *MTc, *Z0, *S, *accT, *mx;  // [D][W], [H1][W], [D][H1][W], [kLaneTb][H1][W], [kTile][W], [D][W], [W]
    T* Hl[kMaxLayers];                      // [H_l][kLaneTb][W]
    double *racc, *den;                     // [W][D], [W]
  };
  static LaneBufs lane_bufs(const Model<T>& m) {
    const size_t D = m.D, H1 = m.H[0], vec = sizeof(T) * W;
    size_t off = 0;
    auto take = [&](size_t bytes) {
      const size_t o = off;
      off += (bytes + 63) / 64 * 64;
      return o;
    };
    const size_t oq = take(D * vec), oc = take(H1 * vec), omt = take(D * H1 * vec), oz = take(kLaneTb * H1 * vec),
                 os = take(kTile * vec), oa = take(D * vec), om = take(vec);
    size_t oh[kMaxLayers] = {};
    for (int l = 0; l < m.L; ++l) oh[l] = take(static_cast<size_t>(m.H[l]) * kLaneTb * vec);
    const size_t or_ = take(W * D * sizeof(double)), od = take(W * sizeof(double));
    unsigned char* base = thread_arena(off);
    LaneBufs b;
    auto at = [&](size_t o) { return reinterpret_cast<T*>(base + o); };
    b.qT = at(oq), b.Cq = at(oc), b.MTc = at(omt), b.Z0 = at(oz), b.S = at(os), b.accT = at(oa), b.mx = at(om);
    for (int l = 0; l < m.L; ++l) b.Hl[l] = at(oh[l]);
    b.racc = reinterpret_cast<double*>(base + or_);
    b.den = reinterpret_cast<double*>(base + od);
    return b;
  }

  // Whether any of rows x nv vectors (row i at Z + i * ld) is Inf or NaN (z * 0 is NaN
  // exactly then, as in z1_nonfinite_fixup).
  static DIN_INLINE bool any_nonfinite(const T* Z, int rows, int nv, int64_t ld) {
    const v zero{};
    v s0{}, s1{};
    for (int i = 0; i < rows; ++i) {
      const T* z = Z + i * ld;
      int j = 0;
      for (; j + 2 <= nv; j += 2) {
        s0 += X::load(z + j * W) * zero;
        s1 += X::load(z + (j + 1) * W) * zero;
      }
      if (j < nv) s0 += X::load(z + j * W) * zero;
    }
    const v s = s0 + s1;
    bool any = false;
    for (int k = 0; k < W; ++k) any |= s[k] != s[k];
    return any;
  }

  // The layers and scores of nb <= kLaneTb keys (key i at keys + i * sk) in every lane:
  // S[i] gets key i's scores.  True on a non-finite pre-activation (see above).
  template <Act A>
  static DIN_INLINE bool lane_block(const Ctx<T>& cx, const LaneBufs& b, const T* keys, int64_t sk, int nb, T* S) {
    const Model<T>& m = *cx.m;
    const int D = m.D, L = m.L, H1 = m.H[0];
    constexpr int64_t ld = kLaneTb * W;  // a channel's keys in Hl
    Gemm<T>::template run<false>(nb, H1, D, keys, sk, 1, b.MTc, H1 * W, b.Z0, H1 * W);
    if (any_nonfinite(b.Z0, 1, nb * H1, 0)) return true;
    for (int j = 0; j < H1; ++j) {
      const v bias = X::load(b.Cq + j * W);
      auto par = [&](const ABuf<T>& x) { return X::set1(x[j]); };
      for (int i = 0; i < nb; ++i)
        X::store(b.Hl[0] + j * ld + i * W, act1<A>(m, 0, X::load(b.Z0 + (i * H1 + j) * W) + bias, par, nullptr));
    }
    for (int l = 1; l < L; ++l) {
      const int H = m.H[l];
      T* Z = b.Hl[l];
      Gemm<T>::template run<false>(H, nb, m.H[l - 1], static_cast<const T*>(cx.p->W[l]), m.H[l - 1], 1,
                                   b.Hl[l - 1], ld, Z, ld);
      if (l == L - 1 && any_nonfinite(Z, H, nb, ld)) return true;
      for (int j = 0; j < H; ++j) {
        const v bias = X::set1(m.bias[l][j]);
        auto par = [&](const ABuf<T>& x) { return X::set1(x[j]); };
        for (int i = 0; i < nb; ++i) {
          T* zp = Z + j * ld + i * W;
          X::store(zp, act1<A>(m, l, X::load(zp) + bias, par, nullptr));
        }
      }
    }
    // The row path's score: lane k of its accumulator sums channels k, k + W, ... in
    // order, then a tree over the lanes (X::hsum).  Its padded channels add h * 0 = +0
    // (h = act(0) >= 0 there, the inputs being finite), which only turns a -0 into +0.
    const int HL = m.H[L - 1], nv = m.Hp[L - 1] / W;
    const T* h = b.Hl[L - 1];
    for (int i = 0; i < nb; ++i) {
      v lane[W];
      for (int k = 0; k < W; ++k) lane[k] = v{};
      for (int jv = 0; jv < nv; ++jv)
        for (int k = 0; k < W; ++k) {
          const int j = jv * W + k;
          if (j < HL) lane[k] += X::load(h + j * ld + i * W) * X::set1(m.wout[j]);
          else lane[k] = lane[k] + v{};
        }
      for (int w = W / 2; w >= 2; w /= 2)
        for (int k = 0; k < w; ++k) lane[k] = lane[k] + lane[k + w];
      X::store(S + i * W, (lane[0] + lane[1]) + X::set1(m.bout));
    }
    return false;
  }

  // pool_tile for every lane: the tile's n scores S [n][W] become weights, go to the
  // rows' scores (sr) and are pooled over the tile's keys (sc.A, sc.sa) into b.racc.
  static DIN_INLINE void lane_pool(const Ctx<T>& cx, const LaneBufs& b, const Scratch<T>& sc, int n,
                                   T* const* sr) {
    const int D = cx.m->D;
    T* S = b.S;
    const int64_t* pos = sc.pos;
    if (!cx.softmax) {
      for (int i = 0; i < n; ++i)
        for (int c = 0; c < W; ++c) sr[c][pos[i]] = S[i * W + c];
    } else {
      const v scale = X::set1(cx.scale);
      for (int i = 0; i < n; ++i) X::store(S + i * W, X::load(S + i * W) * scale);
      v mx;
      for (int c = 0; c < W; ++c) {
        T tmx = b.mx[c];
        for (int i = 0; i < n; ++i) {
          const T s = S[i * W + c];
          sr[c][pos[i]] = s;
          tmx = std::max(tmx, s);
        }
        if (tmx > b.mx[c]) {
          const double f = std::exp(static_cast<double>(b.mx[c]) - static_cast<double>(tmx));
          b.den[c] *= f;
          for (int d = 0; d < D; ++d) b.racc[c * D + d] *= f;
          b.mx[c] = tmx;
        }
        mx[c] = b.mx[c];
      }
      for (int i = 0; i < n; ++i) X::store(S + i * W, X::exp(X::load(S + i * W) - mx) * X::set1(T(1)));
      for (int c = 0; c < W; ++c) {
        double tden = 0.0;
        for (int i = 0; i < n; ++i) tden += static_cast<double>(S[i * W + c]);
        b.den[c] += tden;
      }
    }
    Gemm<T>::template run<false>(D, 1, n, sc.A, 1, sc.sa, S, W, b.accT, W);
    for (int c = 0; c < W; ++c)
      for (int d = 0; d < D; ++d) b.racc[c * D + d] += static_cast<double>(b.accT[d * W + c]);
  }

  template <Act A>
  static void lanes_t(const Ctx<T>& cx, Scratch<T>& sc, const int64_t* rows) {
    const DinParams& p = *cx.p;
    const Model<T>& m = *cx.m;
    const int D = m.D, H1 = m.H[0], H1p = m.Hp[0];
    const Row row = row_of(p, rows[0]);
    const LaneBufs b = lane_bufs(m);
    for (int c = 0; c < W; ++c) {
      const T* q = static_cast<const T*>(p.q) + rows[c] * p.ldq;
      for (int d = 0; d < D; ++d) b.qT[d * W + c] = q[d];
    }
    // fold's c = b1 + (Wq+Wd) q and MT = (Wk-Wd)^T + diag(q) Wm^T, lane by lane.
    for (int j = 0; j < H1; ++j) X::store(b.Cq + j * W, X::set1(m.bias[0][j]));
    Gemm<T>::template run<true>(H1, 1, D, m.WqdT.data(), 1, H1p, b.qT, W, b.Cq, W);
    for (int d = 0; d < D; ++d) {
      const v qd = X::load(b.qT + d * W);
      const T* a = m.AT + static_cast<size_t>(d) * H1p;
      const T* wm = m.WmT + static_cast<size_t>(d) * H1p;
      T* mt = b.MTc + static_cast<size_t>(d) * H1 * W;
      for (int j = 0; j < H1; ++j) X::store(mt + j * W, X::set1(a[j]) + qd * X::set1(wm[j]));
    }
    T* sr[W];
    for (int c = 0; c < W; ++c) {
      sr[c] = static_cast<T*>(p.scores) + score_row(p, rows[c], p.ld_scores);
      std::fill(sr[c], sr[c] + (p.score_start ? row.len : p.max_len), T(0));
      b.mx[c] = -INFINITY;
      b.den[c] = 0.0;
    }
    std::fill(b.racc, b.racc + W * D, 0.0);
    bool bad = false, any = false;
    for_tiles(p, m, sc, row, 0, row.len, [&](int n) {
      any = true;
      for (int t0 = 0; t0 < n && !bad; t0 += kLaneTb)
        bad = lane_block<A>(cx, b, sc.A + t0 * sc.sa, sc.sa, std::min(kLaneTb, n - t0), b.S + t0 * W);
      if (!bad) lane_pool(cx, b, sc, n, sr);
    });
    if (bad) {
      for (int c = 0; c < W; ++c) forward_span(cx, sc, Span{rows[c], 0, row.len}, nullptr);
      return;
    }
    for (int c = 0; c < W; ++c) {
      std::copy(b.racc + c * D, b.racc + (c + 1) * D, sc.racc.data());
      RowState st;
      st.mx = b.mx[c];
      st.den = b.den[c];
      st.any = any;
      finish_row(cx, sc, Span{rows[c], 0, row.len}, st);
    }
  }

  static void forward_lanes(const Ctx<T>& cx, Scratch<T>& sc, const int64_t* rows) {
    switch (cx.m->act) {
      case Act::Sigmoid: return lanes_t<Act::Sigmoid>(cx, sc, rows);
      case Act::ReLU: return lanes_t<Act::ReLU>(cx, sc, rows);
      case Act::PReLU: return lanes_t<Act::PReLU>(cx, sc, rows);
      default: return lanes_t<Act::Dice>(cx, sc, rows);
    }
  }

  // Pre-activations of layer stats_layer over [t0, t1), merged tile by tile
  // into the thread's (count, mean, M2) with Chan's formula: no E[z^2] - E[z]^2,
  // so nothing cancels however large the mean is against the spread.
  static void stats_span(const Ctx<T>& cx, Scratch<T>& sc, const Span& sp) {
    const DinParams& p = *cx.p;
    const Model<T>& m = *cx.m;
    const Row row = row_of(p, sp.r);
    if (sp.t1 <= sp.t0) return;
    const int l = cx.stats_layer, Hl = m.H[l], Hp = m.Hp[l];
    zbind(cx, sc, sp.r);
    fold(m, static_cast<const T*>(p.q) + sp.r * p.ldq, sc, computes_layer0(sc, l), false);
    double* mean = sc.rp;
    double* m2 = sc.rp + Hp;
    for_tiles(p, m, sc, row, sp.t0, sp.t1, [&](int n) {
      hidden(m, sc, n, l, false, false, l);  // layers < l use the batch statistics already known
      const T* z = sc.Z[l].data();
      const double na = sc.count, nb = n, tot = na + nb;
      // The tile's mean and M2 per channel, vectorised over channels, then merged
      // into the running double ones (Chan).  The sums are of z - shift, the shift
      // being the running mean (or the tile's first key), so that in float they
      // are of values the size of the spread, not of the mean; and M2 takes a
      // second pass over the tile: nothing cancels.
      const v inv_n = X::set1(T(1) / static_cast<T>(n));
      for (int j0 = 0; j0 < Hl; j0 += W) {
        v shift = X::load(z + j0);
        if (na > 0)
          for (int k = 0; k < W; ++k) shift[k] = j0 + k < Hl ? static_cast<T>(mean[j0 + k]) : T(0);
        v sum{};
        for (int i = 0; i < n; ++i) sum += X::load(z + static_cast<size_t>(i) * Hp + j0) - shift;
        const v mb = sum * inv_n;
        v m2b{};
        for (int i = 0; i < n; ++i) {
          const v d = (X::load(z + static_cast<size_t>(i) * Hp + j0) - shift) - mb;
          m2b += d * d;
        }
        for (int k = 0; k < W && j0 + k < Hl; ++k) {
          const int j = j0 + k;
          const double delta = static_cast<double>(shift[k]) + static_cast<double>(mb[k]) - mean[j];
          mean[j] += delta * (nb / tot);
          m2[j] += static_cast<double>(m2b[k]) + delta * delta * (na * nb / tot);
        }
      }
      sc.count = tot;
    });
  }

  // gh (dL/dh of layer l, [n, Hp]) -> gz = dL/dz in place.  bacc += sum_i gz
  // (the bias gradient, or e for layer 1) and the PReLU/Dice parameter partials
  // are accumulated in registers over the tile; a reduction pass (Dice in
  // training) instead accumulates sum(dxhat) and sum(dxhat * xhat) of layer red.
  template <Act A>
  static DIN_INLINE void act_backward_t(const Model<T>& m, Scratch<T>& sc, int l, int n, T* gh, T* bacc,
                                        T* gp, const GradLayout& lay, bool reducing, int red) {
    const int Hp = m.Hp[l], nv = Hp / W;
    const T* Z = sc.Z[l].data();
    const T* Hh = sc.Hb[l].data();
    const T* Pg = sc.P[l].data();
    const v one = X::set1(T(1));
    for (int j = 0; j < nv; ++j) {
      v sb = v{}, s1 = v{}, s2 = v{}, s3 = v{};
      v a{}, gam{}, inv{}, mu{}, ca{}, cc{};
      if constexpr (A == Act::PReLU || A == Act::Dice) a = X::load(m.alpha[l].data() + j * W);
      if constexpr (A == Act::Dice) {
        gam = X::load(m.gamma[l].data() + j * W);
        inv = X::load(m.invstd[l].data() + j * W);
        mu = X::load(m.mean[l].data() + j * W);
        if (m.has_corr[l]) {
          ca = X::load(m.corr_a[l].data() + j * W);
          cc = X::load(m.corr_c[l].data() + j * W);
        }
      }
      const bool red_here = reducing && l == red;
      v rs{}, rq{};  // the tile's sum(dxhat) and sum(dxhat * xhat); the row sums are in double
      for (int i = 0; i < n; ++i) {
        const size_t ix = static_cast<size_t>(i) * Hp + j * W;
        const v g = X::load(gh + ix);
        v gz;
        if constexpr (A == Act::Sigmoid) {
          const v h = X::load(Hh + ix);
          gz = g * h * (one - h);
        } else if constexpr (A == Act::ReLU) {
          gz = X::load(Hh + ix) <= v{} ? v{} : g;  // torch's threshold_backward: NaN h passes g
        } else if constexpr (A == Act::PReLU) {
          const v z = X::load(Z + ix);
          s1 += z > v{} ? v{} : g * z;  // NaN z contributes (NaN), as in torch
          gz = z > v{} ? g : a * g;
        } else {  // Dice
          const v z = X::load(Z + ix);
          const v xhat = (z - mu) * inv;
          const v pr = X::load(Pg + ix);  // the gate the activation computed (or the cache had)
          const v dy = g * z * (one - a) * pr * (one - pr);
          const v dxhat = dy * gam;
          if (red_here) {
            rs += dxhat;
            rq += dxhat * xhat;
          }
          s1 += g * z * (one - pr);
          s2 += dy * xhat;
          s3 += dy;
          const v bn = dxhat - (ca + xhat * cc);  // ca = cc = 0 without corrections
          gz = g * (a + (one - a) * pr) + inv * bn;
        }
        X::store(gh + ix, gz);
        sb += gz;
      }
      if (bacc) X::store(bacc + j * W, X::load(bacc + j * W) + sb);
      if (red_here) {
        double* rsum = sc.rp + j * W;
        double* rsq = sc.rp + Hp + j * W;
        for (int k = 0; k < W; ++k) {
          rsum[k] += static_cast<double>(rs[k]);
          rsq[k] += static_cast<double>(rq[k]);
        }
      }
      if (!reducing) {
        if constexpr (A == Act::PReLU || A == Act::Dice) {
          T* da = gp + lay.alpha[l] + j * W;
          X::store(da, X::load(da) + s1);
        }
        if constexpr (A == Act::Dice) {
          T* dg = gp + lay.gamma[l] + j * W;
          T* db = gp + lay.beta[l] + j * W;
          X::store(dg, X::load(dg) + s2);
          X::store(db, X::load(db) + s3);
        }
      }
    }
  }
  static DIN_INLINE void act_backward(const Model<T>& m, Scratch<T>& sc, int l, int n, T* gh, T* bacc, T* gp,
                                      const GradLayout& lay, bool reducing, int red) {
    switch (m.act) {
      case Act::Sigmoid: act_backward_t<Act::Sigmoid>(m, sc, l, n, gh, bacc, gp, lay, reducing, red); break;
      case Act::ReLU: act_backward_t<Act::ReLU>(m, sc, l, n, gh, bacc, gp, lay, reducing, red); break;
      case Act::PReLU: act_backward_t<Act::PReLU>(m, sc, l, n, gh, bacc, gp, lay, reducing, red); break;
      default: act_backward_t<Act::Dice>(m, sc, l, n, gh, bacc, gp, lay, reducing, red); break;
    }
  }

  // sum_t w_t dL/dw_t and sum_t w_t over the valid positions in [t0, t1), dL/dw_t =
  // dout . k_t + dscores_t, in double (WSum).
  static WSum wdw_span(const Ctx<T>& cx, const Span& sp) {
    const DinParams& p = *cx.p;
    const int D = cx.m->D;
    const Row row = row_of(p, sp.r);
    const T* go = static_cast<const T*>(p.dout) + sp.r * p.ld_dout;
    const T* wr = static_cast<const T*>(p.scores) + score_row(p, sp.r, p.ld_scores);
    const T* gsr = p.dscores ? static_cast<const T*>(p.dscores) + score_row(p, sp.r, p.ld_dscores) : nullptr;
    const T* kbase = static_cast<const T*>(p.k) + seq_off(p, row.s);
    const uint8_t* mk = p.mask ? p.mask + row.s * p.ld_mask : nullptr;
    WSum s;
    for (int64_t t = sp.t0; t < sp.t1; ++t)
      if (!mk || mk[t]) {
        const double w = wr[t];
        s.wdw += w * static_cast<double>(dot(D, go, kbase + t * p.ldk) + (gsr ? gsr[t] : T(0)));
        s.w += w;
      }
    return s;
  }

  // ds_t = scale w_t (dL/dw_t - S), the difference in double (see WSum).
  static DIN_INLINE T softmax_ds(T scale, T w, T dw, double S) {
    return static_cast<T>(static_cast<double>(scale) * w * (static_cast<double>(dw) - S));
  }

  // With dk_assign a row writes all of its part of dk: the span's masked positions
  // and, for its last span, the padding beyond its length are zeros.
  static DIN_INLINE void dk_zeros(const Ctx<T>& cx, Scratch<T>& sc, const Span& sp) {
    if (!cx.dk_assign) return;
    const DinParams& p = *cx.p;
    const int D = cx.m->D;
    const Row row = row_of(p, sp.r);
    T* kd = sc.dk + seq_off(p, row.s);
    if (p.mask) {
      const uint8_t* mk = p.mask + row.s * p.ld_mask;
      for (int64_t t = sp.t0; t < sp.t1; ++t)
        if (!mk[t]) std::fill(kd + t * p.ldk, kd + t * p.ldk + D, T(0));
    }
    if (sp.t1 >= row.len && !p.seq_start)
      for (int64_t t = row.len; t < p.max_len; ++t) std::fill(kd + t * p.ldk, kd + t * p.ldk + D, T(0));
  }

  // dk_t (= or +=) u + (vq ? vq * q : 0) + w dout: the key's gradient through layer 1
  // (u, and vq * q for a packed row) and through the pooling (w dout).
  static DIN_INLINE void store_dk(bool assign, int D, T* dst, const T* u, const T* vq, const T* q, T w,
                                  const T* go) {
    const v wv = X::set1(w);
    int d = 0;
    for (; d + W <= D; d += W) {
      v g = X::load(u + d);
      if (vq) g += X::load(vq + d) * X::load(q + d);
      X::store(dst + d, (assign ? g : X::load(dst + d) + g) + wv * X::load(go + d));
    }
    for (; d < D; ++d) {
      const T g = vq ? u[d] + vq[d] * q[d] : u[d];
      dst[d] = assign ? g + w * go[d] : dst[d] + (g + w * go[d]);
    }
  }

  // Key i's score gradient ds into dL/dh of the last hidden layer (gh row i), and
  // into the output layer's weight gradient (gp, unless nullptr).  Returns ds for
  // the output bias.
  static DIN_INLINE T out_grad(const Model<T>& m, Scratch<T>& sc, int i, T ds, T* gh, T* gp,
                                const GradLayout& lay) {
    const int L = m.L, HLp = m.Hp[L - 1], nvL = HLp / W;
    const v dsv = X::set1(ds);
    const T* h = sc.Hb[L - 1].data() + static_cast<size_t>(i) * HLp;
    for (int j = 0; j < nvL; ++j) {
      X::store(gh + static_cast<size_t>(i) * HLp + j * W, dsv * X::load(m.wout.data() + j * W));
      if (gp) {
        T* dwo = gp + lay.W[L] + j * W;
        X::store(dwo, X::load(dwo) + dsv * X::load(h + j * W));
      }
    }
    return ds;
  }

  // Hidden layers L-1 .. 1 of a tile: from dL/dh_l in gh to dL/dh_0 in gh (gh and
  // other swap), with their parameter gradients.  false: a reduction pass is done.
  static DIN_INLINE bool hidden_backward(const Model<T>& m, Scratch<T>& sc, int n, T*& gh, T*& other, T* gp,
                                         const GradLayout& lay, bool reducing, int red) {
    for (int l = m.L - 1; l >= 1; --l) {
      const int Hl = m.H[l], Hp = m.Hp[l], Hinp = m.Hp[l - 1];
      act_backward(m, sc, l, n, gh, reducing ? nullptr : gp + lay.b[l], gp, lay, reducing, red);
      if (reducing && l == red) return false;
      // dW_l [H_l, H_{l-1}] += gz^T h_{l-1}
      if (!reducing)
        Gemm<T>::template run<true>(Hl, Hinp / W, n, gh, 1, Hp, sc.Hb[l - 1].data(), Hinp, gp + lay.W[l], Hinp);
      // dL/dh_{l-1} = gz W_l   ([n, H_l] x [H_l, H_{l-1}])
      Gemm<T>::template run<false>(n, Hinp / W, Hl, gh, Hp, 1, m.Wn[l].data(), Hinp, other, Hinp);
      std::swap(gh, other);
    }
    return true;
  }

  static void backward_span(const Ctx<T>& cx, Scratch<T>& sc, const Span& sp, const double* wdw_row, T* dq) {
    const DinParams& p = *cx.p;
    const Model<T>& m = *cx.m;
    const GradLayout& lay = cx.lay;
    const int D = m.D, L = m.L, H1p = m.Hp[0];
    const int red = cx.red;
    const bool reducing = red >= 0;
    const int64_t r = sp.r;
    const Row row = row_of(p, r);
    const T* q = static_cast<const T*>(p.q) + r * p.ldq;
    if (!reducing) dk_zeros(cx, sc, sp);
    if (sp.t1 <= sp.t0) {
      if (dq) std::fill(dq, dq + D, T(0));
      return;
    }
    const T* go = static_cast<const T*>(p.dout) + r * p.ld_dout;
    const T* wr = static_cast<const T*>(p.scores) + score_row(p, r, p.ld_scores);
    const T* gsr = p.dscores ? static_cast<const T*>(p.dscores) + score_row(p, r, p.ld_dscores) : nullptr;
    T* dkbase = reducing ? nullptr : sc.dk + seq_off(p, row.s);
    T* gp = sc.gp;
    const T scale = cx.scale;

    // Softmax needs the row term S of the whole row (WSum): given for a part of a
    // split row, computed here for a whole row.
    double wdw = 0.0;
    if (cx.softmax) wdw = wdw_row ? *wdw_row : row_term(wdw_span(cx, sp));
    zbind(cx, sc, r);
    fold(m, q, sc, computes_layer0(sc, reducing ? red : 0), !reducing);
    if (!reducing) {
      std::fill(sc.GT.data(), sc.GT.data() + static_cast<size_t>(D) * H1p, T(0));
      std::fill(sc.e.data(), sc.e.data() + H1p, T(0));
    }

    for_tiles(p, m, sc, row, sp.t0, sp.t1, [&](int n) {
      // A reduction for layer red needs layers red..L-1 (the layers below feed it only
      // through the cache); the full backward reads every h.
      hidden(m, sc, n, L - 1, true, m.keep_z, reducing ? red : 0);
      T* gh = sc.g1.data();  // dL/dh of the current layer [n, Hp_l]
      T* other = sc.g2.data();
      T* ds = sc.ds.data();
      T dbout = T(0);
      for (int i = 0; i < n; ++i) {
        const int64_t t = sc.pos[i];
        const T dw = dot(D, go, sc.A + i * sc.sa) + (gsr ? gsr[t] : T(0));
        ds[i] = cx.softmax ? softmax_ds(scale, wr[t], dw, wdw) : dw;
        dbout += out_grad(m, sc, i, ds[i], gh, reducing ? nullptr : gp, lay);
      }
      if (!reducing) gp[lay.b[L]] += dbout;
      if (!hidden_backward(m, sc, n, gh, other, gp, lay, reducing, red)) return;  // the reduction is done
      act_backward(m, sc, 0, n, gh, reducing ? nullptr : sc.e.data(), gp, lay, reducing, red);
      if (reducing) return;  // red == 0
      // Layer 1: G^T [D, H1] += keys^T gz ; dk = gz M + w_t dout
      Gemm<T>::template run<true>(D, H1p / W, n, sc.A, 1, sc.sa, gh, H1p, sc.GT.data(), H1p);
      Gemm<T>::template run<false>(n, m.Dp / W, m.H[0], gh, H1p, 1, sc.M.data(), m.Dp, other, m.Dp);
      for (int i = 0; i < n; ++i) {
        const int64_t t = sc.pos[i];
        store_dk(cx.dk_assign, D, dkbase + t * p.ldk, other + static_cast<size_t>(i) * m.Dp, nullptr, nullptr,
                 wr[t], go);
      }
    });
    if (reducing) return;
    // Per-row layer-1 terms: dq and the folded weight gradients.
    const int nv = H1p / W;
    const T* e = sc.e.data();
    for (int d = 0; d < D; ++d) {
      const size_t o = static_cast<size_t>(d) * H1p;
      const T* gt = sc.GT.data() + o;
      const T* wqd = m.WqdT.data() + o;
      const T* wm = m.WmT + o;
      T* GT = gp + lay.GT + o;
      T* GqT = gp + lay.GqT + o;
      T* EqT = gp + lay.EqT + o;
      const v qd = X::set1(q[d]);
      v acc = v{};
      for (int j = 0; j < nv; ++j) {
        const v g = X::load(gt + j * W), ev = X::load(e + j * W);
        acc += X::load(wqd + j * W) * ev + X::load(wm + j * W) * g;
        X::store(GT + j * W, X::load(GT + j * W) + g);
        X::store(GqT + j * W, X::load(GqT + j * W) + qd * g);
        X::store(EqT + j * W, X::load(EqT + j * W) + qd * ev);
      }
      dq[d] = X::hsum(acc);
    }
    T* ge = gp + lay.e;
    for (int j = 0; j < nv; ++j) X::store(ge + j * W, X::load(ge + j * W) + X::load(e + j * W));
  }

  // Backward of row r: deferred to the packed tile when it is short (Ctx::pack).
  static void backward_row(const Ctx<T>& cx, Scratch<T>& sc, int64_t r) {
    const DinParams& p = *cx.p;
    const Span sp{r, 0, row_of(p, r).len};
    if (cx.pack && is_short(sp.t1)) {
      dk_zeros(cx, sc, sp);
      pack_add(cx, sc, r, [&] { pack_flush_bwd(cx, sc); });
      return;
    }
    backward_span(cx, sc, sp, nullptr, static_cast<T*>(p.dq) + r * p.lddq);
  }

  // Backward of the packed tile's rows, then an empty tile.  Layer 1 is unfolded
  // (dz1 = gz):  G = sum gz k^T and Gq = sum gz (q*k)^T are rank-n updates over the
  // tile's keys, Eq = sum_r e_r q_r^T one over its rows (e_r: the row's sum of gz);
  // dk = gz (Wk-Wd) + (gz Wm) * q + w dout and dq = (Wq+Wd)^T e_r + sum_t (gz_t Wm) * k_t.
  static void pack_flush_bwd(const Ctx<T>& cx, Scratch<T>& sc) {
    if (sc.prows == 0) return;
    const DinParams& p = *cx.p;
    const Model<T>& m = *cx.m;
    const GradLayout& lay = cx.lay;
    const int D = m.D, D2 = 2 * D, L = m.L, H1 = m.H[0], H1p = m.Hp[0], Dp = m.Dp, nv = H1p / W;
    const int n = sc.pn, nr = sc.prows;
    T* gp = sc.gp;
    T* E = sc.PE.data();
    std::fill(E, E + static_cast<size_t>(nr) * H1p, T(0));
    T* gh = sc.g1.data();  // dL/dh of the current layer [n, Hp_l]
    T* other = sc.g2.data();
    if (n > 0) {
      pack_bias(cx, sc);
      sc.zrow = nullptr;
      sc.packed = true;
      hidden(m, sc, n, L - 1, true, m.keep_z, 0);
      sc.packed = false;
      T* ds = sc.ds.data();
      T dbout = T(0);
      for (int j = 0; j < nr; ++j) {
        const int64_t r = sc.prow[j];
        const T* go = static_cast<const T*>(p.dout) + r * p.ld_dout;
        const T* wr = static_cast<const T*>(p.scores) + score_row(p, r, p.ld_scores);
        const T* gsr = p.dscores ? static_cast<const T*>(p.dscores) + score_row(p, r, p.ld_dscores) : nullptr;
        const double wdw = cx.softmax ? row_term(wdw_span(cx, Span{r, 0, row_of(p, r).len})) : 0.0;
        for (int i = sc.kseg[j]; i < sc.kseg[j + 1]; ++i) {
          const int64_t t = sc.ppos[i];
          const T dw = dot(D, go, sc.X.data() + static_cast<size_t>(i) * D2) + (gsr ? gsr[t] : T(0));
          ds[i] = cx.softmax ? softmax_ds(cx.scale, wr[t], dw, wdw) : dw;
          dbout += out_grad(m, sc, i, ds[i], gh, gp, lay);
        }
      }
      gp[lay.b[L]] += dbout;
      hidden_backward(m, sc, n, gh, other, gp, lay, false, -1);
      act_backward(m, sc, 0, n, gh, gp + lay.e, gp, lay, false, -1);
      for (int i = 0; i < n; ++i) {
        T* e = E + static_cast<size_t>(sc.kslot[i]) * H1p;
        const T* g = gh + static_cast<size_t>(i) * H1p;
        for (int j = 0; j < nv; ++j) X::store(e + j * W, X::load(e + j * W) + X::load(g + j * W));
      }
      Gemm<T>::template run<true>(D, nv, n, sc.X.data(), 1, D2, gh, H1p, gp + lay.GT, H1p);
      Gemm<T>::template run<true>(D, nv, n, sc.X.data() + D, 1, D2, gh, H1p, gp + lay.GqT, H1p);
      Gemm<T>::template run<true>(D, nv, nr, sc.Q.data(), 1, D, E, H1p, gp + lay.EqT, H1p);
      Gemm<T>::template run<false>(n, Dp / W, H1, gh, H1p, 1, m.Ab.data(), Dp, other, Dp);     // gz (Wk-Wd)
      Gemm<T>::template run<false>(n, Dp / W, H1, gh, H1p, 1, m.Wmb.data(), Dp, sc.PV.data(), Dp);  // gz Wm
    }
    T* DQ = sc.PDQ.data();
    Gemm<T>::template run<false>(nr, Dp / W, H1, E, H1p, 1, m.Wqdb.data(), Dp, DQ, Dp);  // (Wq+Wd)^T e
    for (int j = 0; j < nr; ++j) {
      const int64_t r = sc.prow[j];
      const Row row = row_of(p, r);
      const T* q = sc.Q.data() + static_cast<size_t>(j) * D;
      const T* go = static_cast<const T*>(p.dout) + r * p.ld_dout;
      const T* wr = static_cast<const T*>(p.scores) + score_row(p, r, p.ld_scores);
      T* dkbase = sc.dk + seq_off(p, row.s);
      T* dqr = DQ + static_cast<size_t>(j) * Dp;
      for (int i = sc.kseg[j]; i < sc.kseg[j + 1]; ++i) {
        const int64_t t = sc.ppos[i];
        const T* vi = sc.PV.data() + static_cast<size_t>(i) * Dp;
        const T* ki = sc.X.data() + static_cast<size_t>(i) * D2;
        store_dk(cx.dk_assign, D, dkbase + t * p.ldk, other + static_cast<size_t>(i) * Dp, vi, q, wr[t], go);
        int d = 0;
        for (; d + W <= D; d += W) X::store(dqr + d, X::load(dqr + d) + X::load(vi + d) * X::load(ki + d));
        for (; d < D; ++d) dqr[d] += vi[d] * ki[d];
      }
      std::copy(dqr, dqr + D, static_cast<T*>(p.dq) + r * p.lddq);
    }
    sc.pn = sc.prows = 0;
  }
};

template <typename T>
RowFns<T> row_fns() {
  return {&Kernel<T>::forward_span, &Kernel<T>::forward_row, &Kernel<T>::pack_flush_fwd,
          &Kernel<T>::forward_lanes, &Kernel<T>::normalise, &Kernel<T>::stats_span, &Kernel<T>::wdw_span,
          &Kernel<T>::backward_span, &Kernel<T>::backward_row, &Kernel<T>::pack_flush_bwd};
}

}  // namespace DIN_NS
}  // namespace
}  // namespace din

#endif  // DIN_CPU_KERNEL_BODY
