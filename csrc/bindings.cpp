// pybind11 module din_fused._C.  It does not link libtorch: Python hands over a
// dict of raw pointers (tensor.data_ptr()), sizes and strides, so one build
// serves every torch >= 2.4.  Kernels run with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "din_params.h"

namespace py = pybind11;
using namespace din;

namespace {

// The params dict is parsed in one pass over its items, each key looked up in a
// table of setters: a small call's whole kernel is a few microseconds, and two
// dict lookups per possible key (contains, then getitem) cost more than it.
template <typename P>
P as_addr(uint64_t v) {
  return reinterpret_cast<P>(static_cast<uintptr_t>(v));
}
template <typename P>
P as_ptr(py::handle v) {
  return v.is_none() ? nullptr : as_addr<P>(v.cast<uint64_t>());
}

// Lists of addresses, one per layer (0 / None meaning absent).
template <typename P, size_t N>
void as_ptrs(py::handle v, const char* key, P (&dst)[N]) {
  auto lst = v.cast<py::list>();
  if (lst.size() > N) throw std::invalid_argument(std::string(key) + ": too many entries");
  for (size_t i = 0; i < lst.size(); ++i) dst[i] = as_ptr<P>(lst[i]);
}

using Setter = void (*)(DinParams&, py::handle);
#define DIN_INT(field, T) [](DinParams& p, py::handle v) { p.field = static_cast<T>(v.cast<int64_t>()); }
#define DIN_PTR(field) [](DinParams& p, py::handle v) { p.field = as_ptr<decltype(p.field)>(v); }
#define DIN_PTRS(field) [](DinParams& p, py::handle v) { as_ptrs(v, #field, p.field); }

const std::unordered_map<std::string_view, Setter>& setters() {
  static const std::unordered_map<std::string_view, Setter> table = {
      {"rows", DIN_INT(rows, int64_t)}, {"dim", DIN_INT(dim, int64_t)},
      {"max_len", DIN_INT(max_len, int64_t)},
      {"hidden", [](DinParams& p, py::handle v) {
         auto hidden = v.cast<std::vector<int>>();
         if (hidden.empty() || hidden.size() > static_cast<size_t>(kMaxLayers))
           throw std::invalid_argument("hidden: expected 1..4 layer widths");
         p.num_layers = static_cast<int32_t>(hidden.size());
         for (size_t i = 0; i < hidden.size(); ++i) {
           if (hidden[i] < 1 || hidden[i] > kMaxWidth) throw std::invalid_argument("hidden: widths must be in 1..256");
           p.hidden[i] = hidden[i];
         }
       }},
      {"act", DIN_INT(act, Act)}, {"norm", DIN_INT(norm, Norm)},
      {"scale", [](DinParams& p, py::handle v) { p.scale = v.cast<double>(); }},
      {"dtype", DIN_INT(dtype, DType)}, {"num_threads", DIN_INT(num_threads, int32_t)},
      {"deterministic", [](DinParams& p, py::handle v) { p.deterministic = v.cast<bool>(); }},
      {"check_lengths", DIN_INT(check_lengths, int32_t)}, {"batch_stats", DIN_INT(batch_stats, int32_t)},
      {"q", DIN_PTR(q)}, {"ldq", DIN_INT(ldq, int64_t)}, {"k", DIN_PTR(k)}, {"ldk", DIN_INT(ldk, int64_t)},
      {"seq_start", DIN_PTR(seq_start)}, {"seq_stride", DIN_INT(seq_stride, int64_t)}, {"seq_len", DIN_PTR(seq_len)}, {"row_seq", DIN_PTR(row_seq)},
      {"mask", DIN_PTR(mask)}, {"ld_mask", DIN_INT(ld_mask, int64_t)},
      {"W", DIN_PTRS(W)}, {"b", DIN_PTRS(b)}, {"alpha", DIN_PTRS(alpha)}, {"bn_gamma", DIN_PTRS(bn_gamma)},
      {"bn_beta", DIN_PTRS(bn_beta)}, {"bn_mean", DIN_PTRS(bn_mean)}, {"bn_invstd", DIN_PTRS(bn_invstd)},
      {"bn_var", DIN_PTRS(bn_var)}, {"bn_eps", [](DinParams& p, py::handle v) { p.bn_eps = v.cast<double>(); }},
      {"out", DIN_PTR(out)}, {"ldo", DIN_INT(ldo, int64_t)},
      {"scores", DIN_PTR(scores)}, {"ld_scores", DIN_INT(ld_scores, int64_t)},
      {"score_start", DIN_PTR(score_start)},
      {"dout", DIN_PTR(dout)}, {"ld_dout", DIN_INT(ld_dout, int64_t)},
      {"dscores", DIN_PTR(dscores)}, {"ld_dscores", DIN_INT(ld_dscores, int64_t)},
      {"dq", DIN_PTR(dq)}, {"lddq", DIN_INT(lddq, int64_t)}, {"dk", DIN_PTR(dk)}, {"dk_assign", DIN_INT(dk_assign, int32_t)},
      {"dk_rows", DIN_PTR(dk_rows)}, {"seq_rows", DIN_PTR(seq_rows)}, {"seq_rows_start", DIN_PTR(seq_rows_start)},
      {"num_seqs", DIN_INT(num_seqs, int64_t)},
      {"dW", DIN_PTRS(dW)}, {"db", DIN_PTRS(db)}, {"dalpha", DIN_PTRS(dalpha)}, {"dgamma", DIN_PTRS(dgamma)},
      {"dbeta", DIN_PTRS(dbeta)}, {"bn_corr_a", DIN_PTRS(bn_corr_a)}, {"bn_corr_c", DIN_PTRS(bn_corr_c)},
      {"reduce_layer", DIN_INT(reduce_layer, int32_t)}, {"reduce_out", DIN_PTR(reduce_out)},
      {"stats_layer", DIN_INT(stats_layer, int32_t)}, {"stats_out", DIN_PTR(stats_out)},
      {"zcache", DIN_PTR(zcache)}, {"zcache_bytes", DIN_INT(zcache_bytes, int64_t)},
      {"zcache_have", DIN_INT(zcache_have, int32_t)},
      {"workspace", DIN_PTR(workspace)}, {"workspace_bytes", DIN_INT(workspace_bytes, int64_t)},
      {"is_cuda", [](DinParams& p, py::handle v) { p.is_cuda = v.cast<bool>(); }},
      {"device", DIN_INT(device, int32_t)}, {"stream", DIN_PTR(stream)},
  };
  return table;
}
#undef DIN_INT
#undef DIN_PTR
#undef DIN_PTRS

DinParams from_dict(const py::dict& d) {
  DinParams p;
  const auto& table = setters();
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(d.ptr(), &pos, &key, &value)) {
    Py_ssize_t n = 0;
    const char* s = PyUnicode_Check(key) ? PyUnicode_AsUTF8AndSize(key, &n) : nullptr;
    if (!s) throw std::invalid_argument("params: keys must be strings");
    auto it = table.find(std::string_view(s, static_cast<size_t>(n)));
    // An unknown key is a Python/C++ mismatch that would otherwise be ignored silently.
    if (it == table.end()) throw std::invalid_argument("params: unknown key '" + std::string(s, n) + "'");
    it->second(p, value);
  }
  if (p.num_layers == 0) throw std::invalid_argument("hidden: expected 1..4 layer widths");
  return p;
}

[[noreturn, maybe_unused]] void no_cuda() {
  throw std::runtime_error(
      "din_fused was built without CUDA support. Rebuild with nvcc available, e.g. "
      "`DIN_FUSED_CUDA=1 pip install --no-build-isolation --force-reinstall .`");
}

template <typename Cpu, typename Cuda>
void dispatch(const py::dict& d, Cpu cpu, Cuda cuda) {
  DinParams p = from_dict(d);
  py::gil_scoped_release nogil;
  if (p.is_cuda) {
#ifdef DIN_WITH_CUDA
    cuda(p);
#else
    (void)cuda;
    no_cuda();
#endif
  } else {
    cpu(p);
  }
}

#ifdef DIN_WITH_CUDA
#define DIN_CUDA_FN(name) [](const DinParams& p) { name(p); }
#else
#define DIN_CUDA_FN(name) [](const DinParams&) {}
#endif

py::dict build_info() {
  py::dict info;
#ifdef DIN_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(DIN_CUDA_ARCHS);
  info["nvcc_version"] = std::string(DIN_NVCC_VERSION);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string("");
  info["nvcc_version"] = std::string("");
#endif
  info["cxx_compiler"] = std::string(DIN_CXX_COMPILER);
  // The CPU kernels' threads: torch's OpenMP team when the process has one, else
  // their own pool; sized per call by torch.get_num_threads().
  info["threading"] = std::string(cpu_threading());
  info["max_layers"] = kMaxLayers;
  info["max_width"] = kMaxWidth;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "din_fused kernels (raw-pointer interface; see din_fused/ops.py)";
  m.def("forward", [](const py::dict& d) {
    dispatch(d, forward_cpu, DIN_CUDA_FN(forward_cuda));
  });
  m.def("stats", [](const py::dict& d) {
    dispatch(d, stats_cpu, DIN_CUDA_FN(stats_cuda));
  });
  m.def("backward", [](const py::dict& d) {
    dispatch(d, backward_cpu, DIN_CUDA_FN(backward_cuda));
  });
  // Bytes of caller-provided scratch for a phase ("forward", "stats", "backward"),
  // or of the CPU's pre-activation cache ("zcache"; 0 on CUDA, which has none).
  m.def("workspace_bytes", [](const py::dict& d, const std::string& phase) -> int64_t {
    DinParams p = from_dict(d);
    if (phase == "zcache") return p.is_cuda ? 0 : zcache_bytes_cpu(p);
    if (p.is_cuda) {
#ifdef DIN_WITH_CUDA
      if (phase == "backward") return backward_workspace_bytes_cuda(p);
      return forward_workspace_bytes_cuda(p);
#else
      no_cuda();
#endif
    }
    return phase == "backward" ? backward_workspace_bytes_cpu(p) : 0;
  });
  m.def("row_parts", [](const py::dict& d) {
    const DinParams p = from_dict(d);  // the plan reads seq_len and row_seq on the host
    if (p.is_cuda) throw std::invalid_argument("row_parts: the CPU kernels' plan takes CPU params");
    py::list parts;
    for (const RowPart& rp : row_parts_cpu(p)) parts.append(py::make_tuple(rp.row, rp.t0, rp.t1));
    return parts;
  });
  m.def("lane_rows", [](const py::dict& d) {
    const DinParams p = from_dict(d);
    if (p.is_cuda) throw std::invalid_argument("lane_rows: the CPU kernels' plan takes CPU params");
    return lane_rows_cpu(p);
  });
  m.def("jagged_layout", [](uint64_t offsets, int64_t S, int64_t N, int64_t D, uint64_t row_seq, int64_t R,
                            uint64_t out) {
    // (An empty row_seq may have address 0: then R = 0 and no row is read.)
    if (S < 0 || R < 0 || (!row_seq && R > S)) throw std::invalid_argument("jagged_layout: bad sizes");
    JaggedFacts f;
    {
      py::gil_scoped_release nogil;
      f = jagged_layout_cpu(as_addr<const int64_t*>(offsets), S, N, D, as_addr<const int64_t*>(row_seq), R,
                            as_addr<int64_t*>(out));
    }
    return py::make_tuple(f.max_len, f.total, f.shared);
  });
  m.def("embedding_grad", [](uint64_t gw, int64_t rows, int64_t E, uint64_t idx, int64_t sidx, int64_t n, uint64_t g,
                             int64_t ldg, int64_t padding_idx, int dtype) {
    if (rows < 0 || E < 0 || n < 0) throw std::invalid_argument("embedding_grad: bad sizes");
    py::gil_scoped_release nogil;
    embedding_grad_cpu(as_addr<void*>(gw), rows, E, as_addr<const int64_t*>(idx), sidx, n, as_addr<const void*>(g),
                       ldg, padding_idx, static_cast<DType>(dtype));
  });
  m.def("gather_rows", [](uint64_t out, int64_t ldo, uint64_t table, int64_t rows, int64_t E, uint64_t idx,
                          int64_t sidx, int64_t n, int dtype, int num_threads) {
    if (rows < 0 || E < 0 || n < 0 || ldo < E) throw std::invalid_argument("gather_rows: bad sizes");
    py::gil_scoped_release nogil;
    gather_rows_cpu(as_addr<void*>(out), ldo, as_addr<const void*>(table), rows, E, as_addr<const int64_t*>(idx),
                    sidx, n, static_cast<DType>(dtype), num_threads);
  });
  m.def("prelu_backward", [](uint64_t gx, uint64_t gw, uint64_t g, uint64_t x, uint64_t w, int64_t n, int64_t C,
                             int64_t wC, int dtype) {
    if (n < 0 || C < 0) throw std::invalid_argument("prelu_backward: bad sizes");
    py::gil_scoped_release nogil;
    prelu_backward_cpu(as_addr<void*>(gx), as_addr<void*>(gw), as_addr<const void*>(g), as_addr<const void*>(x),
                       as_addr<const void*>(w), n, C, wC, static_cast<DType>(dtype));
  });
  m.def("cuda_device_count", []() -> int {
#ifdef DIN_WITH_CUDA
    return cuda_device_count();
#else
    return 0;
#endif
  });
  m.def("build_info", &build_info);
  // The CPU emulation of the CUDA kernels (tests/cuda_emu) stands in with emulates_cuda = true.
  // Present here too, because ops reads it on every call and a missing attribute costs an
  // AttributeError (~0.8 us) each time.
  m.attr("emulates_cuda") = false;
}
