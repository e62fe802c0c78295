// One parameter block shared by every DIN kernel (CPU and CUDA).
//
// Python owns allocation, validation and autograd; C++ only sees raw pointers,
// sizes and strides.  Keys are addressed through a per-sequence start offset
// and length plus an optional row->sequence index, so padded [B,T,D] input,
// jagged [N,D] input and many candidates sharing one sequence are the same
// kernel:
//     key(row r, position t) = k + seq_start[s] + t * ldk,  s = row_seq ? row_seq[r] : r
//     (seq_start[s] = s * seq_stride when seq_start is nullptr: the padded layout)
//     valid(r, t)            = t < seq_len[s] && (!mask || mask[s * ld_mask + t])
#pragma once
#include <cstdint>
#include <vector>

namespace din {

constexpr int kMaxLayers = 4;    // hidden layers of the activation unit
constexpr int kMaxWidth = 256;   // widest hidden layer

enum class Act : int32_t { Sigmoid = 0, ReLU = 1, PReLU = 2, Dice = 3 };
enum class Norm : int32_t { None = 0, Softmax = 1 };
// dtype of q, k, out, dout, dq, dk.  Parameters, scores and all parameter
// gradients are in the accumulation type: double for F64, float otherwise.
enum class DType : int32_t { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

struct DinParams {
  // ---- sizes ---------------------------------------------------------------
  int64_t rows = 0;        // B, output rows (candidates)
  int64_t dim = 0;         // D
  int64_t max_len = 0;     // T, width of the scores/mask rows
  int32_t num_layers = 0;  // L, 1..kMaxLayers
  int32_t hidden[kMaxLayers] = {0, 0, 0, 0};
  Act act = Act::Sigmoid;
  Norm norm = Norm::None;
  double scale = 1.0;      // softmax temperature: softmax(scale * score)
  DType dtype = DType::F32;
  int32_t num_threads = 1; // CPU only
  // CPU forward: throw std::invalid_argument when a seq_len of rows 0..rows-1 is
  // out of range (the padded op's range check, without a separate pass in Python;
  // a CUDA caller checks on the device instead).  1: [0, max_len];  2: >= 0, a
  // length above max_len meaning max_len (DeepCTR-Torch's keys_length; the kernels
  // clamp every length to max_len anyway).  0: no check.
  int32_t check_lengths = 0;
  bool deterministic = true;  // CUDA only: false allows atomics for parameter grads
  // 1: training-mode Dice (batch statistics).  Its statistics, forward, reduction and
  // backward passes must see the same pre-activations, so the CPU computes them row
  // by row, as the pre-activation cache holds them, never in packed tiles of short
  // rows (din_cpu.cpp, Kernel::pack_add).  CUDA ignores it.
  int32_t batch_stats = 0;

  // ---- sequence addressing (int64, on the same device as k) ----------------
  const void* q = nullptr; int64_t ldq = 0;       // [rows, D]
  const void* k = nullptr; int64_t ldk = 0;       // see header comment
  const int64_t* seq_start = nullptr;             // [S] element offset into k (and dk),
  int64_t seq_stride = 0;                         // or nullptr: sequence s at s * seq_stride
  const int64_t* seq_len = nullptr;               // [S]
  const int64_t* row_seq = nullptr;               // [rows] or nullptr (identity)
  const uint8_t* mask = nullptr; int64_t ld_mask = 0;  // [S, T] or nullptr

  // ---- parameters (accumulation type), nn.Linear layout [out, in] ----------
  // W[l], b[l] for l < L are the hidden layers (W[0] is [H1, 4D], blocks
  // q | k | q-k | q*k); W[L] is the output layer [1, H_L], b[L] its bias [1].
  const void* W[kMaxLayers + 1] = {};
  const void* b[kMaxLayers + 1] = {};
  const void* alpha[kMaxLayers] = {};     // PReLU/Dice slope, per channel [H_l]
  const void* bn_gamma[kMaxLayers] = {};  // Dice BatchNorm affine [H_l]
  const void* bn_beta[kMaxLayers] = {};
  const void* bn_mean[kMaxLayers] = {};   // Dice: statistics in use (running or batch)
  const void* bn_invstd[kMaxLayers] = {}; // 1/sqrt(var + eps)
  // CPU, eval-mode Dice, in place of bn_invstd: the running variances and eps, from
  // which the kernel takes invstd = 1 / sqrt(var + T(eps)) itself, with the correctly
  // rounded operations of torch's add and rsqrt (bitwise Python's _eval_invstd), so a
  // small call runs no torch op for it.  CUDA needs bn_invstd.
  const void* bn_var[kMaxLayers] = {};
  double bn_eps = 0.0;

  // ---- forward outputs -----------------------------------------------------
  void* out = nullptr; int64_t ldo = 0;        // [rows, D] dtype
  void* scores = nullptr; int64_t ld_scores = 0;  // [rows, T] acc type; weights w_t.
                                               // Written for t < T (0 where masked or
                                               // t >= len).  Backward reads it back.
  // Jagged weights: row r's weights start at element score_start[r] of scores
  // (and of dscores) and hold exactly its len positions, no tail; ld_scores and
  // ld_dscores are then unused.  A shared sequence's rows need no [rows, T]
  // buffer, only the sum of their lengths.  nullptr: rows of width T.
  const int64_t* score_start = nullptr;           // [rows] or nullptr

  // ---- backward ------------------------------------------------------------
  const void* dout = nullptr; int64_t ld_dout = 0;        // [rows, D] dtype
  const void* dscores = nullptr; int64_t ld_dscores = 0;  // [rows, T] acc, or nullptr
  void* dq = nullptr; int64_t lddq = 0;                   // [rows, D] dtype
  void* dk = nullptr;                                     // laid out like k (seq_start, ldk)
  // CPU: 1 when no two rows share keys and the rows' sequences cover dk (the padded
  // layout; a jagged one with one sequence per row): dk need not hold zeros, the
  // backward writes every element of it, zeros at padding and masked positions,
  // instead of adding into it (one pass over dk instead of a fill and an update).
  int32_t dk_assign = 0;
  // Rows sharing a sequence (row_seq), CUDA: the key gradient of a shared sequence
  // is the sum of its rows' shares.  With dk_rows, each row's share is written to
  // dk_rows [sum of row lengths, D] (acc type) at its weights' offsets
  // (score_start), and a second kernel adds each sequence's rows into dk in the
  // order of seq_rows, so dk is bitwise reproducible.  nullptr: atomics.
  // seq_rows [rows]: the rows grouped by sequence, ascending within a group;
  // seq_rows_start [num_seqs + 1]: the groups' bounds.  The CPU ignores these (its
  // threads keep per-thread partials of dk).
  void* dk_rows = nullptr;
  const int64_t* seq_rows = nullptr;
  const int64_t* seq_rows_start = nullptr;
  int64_t num_seqs = 0;
  // Parameter gradients, acc type, same shapes as the parameters; overwritten.
  void* dW[kMaxLayers + 1] = {};
  void* db[kMaxLayers + 1] = {};
  void* dalpha[kMaxLayers] = {};
  void* dgamma[kMaxLayers] = {};
  void* dbeta[kMaxLayers] = {};
  // Training-mode Dice: the batch statistics depend on every valid position, so
  // dL/ds_t = invstd * (dxhat_t - corr_a - xhat_t * corr_c), where corr_a and
  // corr_c are the means of dxhat and dxhat*xhat over valid positions.  nullptr
  // means "statistics are constants" (eval mode).
  const void* bn_corr_a[kMaxLayers] = {};
  const void* bn_corr_c[kMaxLayers] = {};
  // reduce_layer = l >= 0: instead of the full backward, only accumulate
  // sum(dxhat) and sum(dxhat * xhat) of Dice layer l into reduce_out [2, H_l]
  // (double).  Corrections of layers > l must already be set.
  int32_t reduce_layer = -1;
  double* reduce_out = nullptr;

  // ---- forward statistics pass (training-mode Dice) ------------------------
  // stats_layer = l: the mean and M2 = sum((s - mean)^2) of the pre-activation
  // s of layer l over valid positions, into stats_out [2, H_l] (double), merged
  // with Chan's formula (no E[s^2] - E[s]^2 cancellation).  Layers < l use
  // bn_mean/bn_invstd, which must already be the batch statistics.
  int32_t stats_layer = -1;
  double* stats_out = nullptr;

  // ---- CPU, training-mode Dice: pre-activations shared by the passes of a call --
  // The statistics passes and the forward (and the reductions and the backward)
  // each need the hidden layers' pre-activations.  With zcache, every pass
  // writes the pre-activations it computes (each layer's GEMM output plus its
  // bias) there, and finds the layers named in zcache_have (bit l: layer l)
  // there instead of recomputing them, bitwise the same values: each layer's
  // GEMM runs once per forward and once per backward, not once per pass.  Size
  // and layout are the kernels' (zcache_bytes_cpu); nothing outlives one call of
  // the op, so the backward still recomputes instead of storing.  CUDA ignores it.
  void* zcache = nullptr; int64_t zcache_bytes = 0;
  int32_t zcache_have = 0;

  // ---- scratch provided by the caller (CUDA: per-CTA partials) -------------
  void* workspace = nullptr; int64_t workspace_bytes = 0;

  // ---- CUDA ----------------------------------------------------------------
  bool is_cuda = false;
  int32_t device = -1;
  void* stream = nullptr;  // cudaStream_t of the caller's current stream
};

#if defined(__CUDACC__)
#define DIN_HOST_DEVICE __host__ __device__
#else
#define DIN_HOST_DEVICE
#endif

// Element offset of sequence s in k (and dk).
DIN_HOST_DEVICE inline int64_t seq_off(const DinParams& p, int64_t s) {
  return p.seq_start ? p.seq_start[s] : s * p.seq_stride;
}

// Length of sequence s clamped to [0, max_len]: Python validates the lengths, and the
// clamp keeps a bad value from ever reading out of bounds.
DIN_HOST_DEVICE inline int64_t seq_length(const DinParams& p, int64_t s) {
  const int64_t len = p.seq_len[s];
  return len < 0 ? 0 : (len > p.max_len ? p.max_len : len);
}

// Element offset of row r's weights in scores (ld = ld_scores) or dscores (ld_dscores).
DIN_HOST_DEVICE inline int64_t score_row(const DinParams& p, int64_t r, int64_t ld) {
  return p.score_start ? p.score_start[r] : r * ld;
}

inline int64_t acc_size(DType t) { return t == DType::F64 ? 8 : 4; }
inline int64_t elem_size(DType t) {
  return t == DType::F64 ? 8 : (t == DType::F32 ? 4 : 2);
}

// ---- entry points (din_cpu.cpp / din_cuda.cu) ------------------------------
// All throw std::invalid_argument / std::runtime_error on failure; none
// allocates device memory or synchronises.
void forward_cpu(const DinParams& p);      // out, scores
void stats_cpu(const DinParams& p);        // stats_out for stats_layer
void backward_cpu(const DinParams& p);     // dq, dk, dW... or reduce_out
int64_t backward_workspace_bytes_cpu(const DinParams& p);
int64_t zcache_bytes_cpu(const DinParams& p);  // bytes of zcache for these rows
// How the CPU kernels cut rows over positions for these params and num_threads: the
// parts (row, positions [t0, t1)) in order, a row too short to cut being one part
// (r, 0, len); none when rows are not cut (no rows, or at least 4 a thread).
struct RowPart {
  int64_t row, t0, t1;
};
std::vector<RowPart> row_parts_cpu(const DinParams& p);
// The rows the CPU forward runs in the vector lanes for these params, this ISA and
// num_threads (din_cpu.cpp, Kernel::lanes_t): W after W, each W sharing one sequence.
std::vector<int64_t> lane_rows_cpu(const DinParams& p);
// The jagged layout (ops._jagged_layout) from offsets [S+1] and row_seq [R] (null: row r
// uses sequence r, R == S), checked, all int64 on the host: out [2S + 2R] gets seq_start
// (element offsets), seq_len, the rows' lengths and their weights' starts (the sum of the
// lengths before each).  shared: some sequence serves two rows or more.
struct JaggedFacts {
  int64_t max_len = 0, total = 0;
  bool shared = false;
};
JaggedFacts jagged_layout_cpu(const int64_t* offsets, int64_t S, int64_t N, int64_t D, const int64_t* row_seq,
                              int64_t R, int64_t* out);
// An embedding table's gradient: gw [rows, E] += g [n, E] (row stride ldg) at rows
// idx[i * sidx], in index order, padding_idx's row (or none: -1) left alone.  Throws on an
// index outside [0, rows) before it writes anything.
void embedding_grad_cpu(void* gw, int64_t rows, int64_t E, const int64_t* idx, int64_t sidx, int64_t n, const void* g,
                        int64_t ldg, int64_t padding_idx, DType dtype);
// out[i, :] = table[idx[i * sidx], :] for i < n (out's row stride ldo, the table's E):
// lookups written straight into a wider tensor, on up to num_threads threads.  Throws
// on an index outside [0, rows) before it writes anything.
void gather_rows_cpu(void* out, int64_t ldo, const void* table, int64_t rows, int64_t E, const int64_t* idx,
                     int64_t sidx, int64_t n, DType dtype, int num_threads);
// PReLU's backward on contiguous x, g [n, C] with wC = 1 or C slopes w: gx [n, C] and the
// slopes' gradient gw [wC], summed over rows in order (in double for float32).
void prelu_backward_cpu(void* gx, void* gw, const void* g, const void* x, const void* w, int64_t n, int64_t C,
                        int64_t wC, DType dtype);
// "openmp" (torch's OpenMP team) or "pool" (the kernels' own threads): what the
// next multi-threaded CPU call will run on.
const char* cpu_threading();

#ifdef DIN_WITH_CUDA
void forward_cuda(const DinParams& p);
void stats_cuda(const DinParams& p);
void backward_cuda(const DinParams& p);
int64_t backward_workspace_bytes_cuda(const DinParams& p);
int64_t forward_workspace_bytes_cuda(const DinParams& p);
// Device query proving the toolchain: returns number of visible devices (0 if none).
int cuda_device_count();
#endif

}  // namespace din
