// pybind11 module din_fused._C.  It does not link libtorch: Python hands over a
// dict of raw pointers (tensor.data_ptr()), sizes and strides, so one build
// serves every torch >= 2.4.  Kernels run with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "din_params.h"

namespace py = pybind11;
using namespace din;

namespace {

template <typename T>
T get(const py::dict& d, const char* key, T dflt) {
  return d.contains(key) ? d[key].cast<T>() : dflt;
}

template <typename P>
P ptr(const py::dict& d, const char* key) {
  return reinterpret_cast<P>(static_cast<uintptr_t>(get<uint64_t>(d, key, 0)));
}

// Lists of addresses, one per layer (0 / None meaning absent).
template <typename P, size_t N>
void ptrs(const py::dict& d, const char* key, P (&dst)[N]) {
  if (!d.contains(key)) return;
  auto lst = d[key].cast<py::list>();
  if (lst.size() > N) throw std::invalid_argument(std::string(key) + ": too many entries");
  for (size_t i = 0; i < lst.size(); ++i)
    dst[i] = lst[i].is_none() ? nullptr
                              : reinterpret_cast<P>(static_cast<uintptr_t>(lst[i].cast<uint64_t>()));
}

DinParams from_dict(const py::dict& d) {
  DinParams p;
  p.rows = get<int64_t>(d, "rows", 0);
  p.dim = get<int64_t>(d, "dim", 0);
  p.max_len = get<int64_t>(d, "max_len", 0);
  auto hidden = get<std::vector<int>>(d, "hidden", {});
  if (hidden.empty() || hidden.size() > static_cast<size_t>(kMaxLayers))
    throw std::invalid_argument("hidden: expected 1..4 layer widths");
  p.num_layers = static_cast<int32_t>(hidden.size());
  for (size_t i = 0; i < hidden.size(); ++i) {
    if (hidden[i] < 1 || hidden[i] > kMaxWidth)
      throw std::invalid_argument("hidden: widths must be in 1..256");
    p.hidden[i] = hidden[i];
  }
  p.act = static_cast<Act>(get<int>(d, "act", 0));
  p.norm = static_cast<Norm>(get<int>(d, "norm", 0));
  p.scale = get<double>(d, "scale", 1.0);
  p.dtype = static_cast<DType>(get<int>(d, "dtype", 0));
  p.num_threads = get<int>(d, "num_threads", 1);
  p.deterministic = get<bool>(d, "deterministic", true);

  p.q = ptr<const void*>(d, "q");                p.ldq = get<int64_t>(d, "ldq", 0);
  p.k = ptr<const void*>(d, "k");                p.ldk = get<int64_t>(d, "ldk", 0);
  p.seq_start = ptr<const int64_t*>(d, "seq_start");
  p.seq_len = ptr<const int64_t*>(d, "seq_len");
  p.row_seq = ptr<const int64_t*>(d, "row_seq");
  p.mask = ptr<const uint8_t*>(d, "mask");       p.ld_mask = get<int64_t>(d, "ld_mask", 0);

  ptrs(d, "W", p.W);           ptrs(d, "b", p.b);
  ptrs(d, "alpha", p.alpha);   ptrs(d, "bn_gamma", p.bn_gamma);
  ptrs(d, "bn_beta", p.bn_beta);
  ptrs(d, "bn_mean", p.bn_mean);
  ptrs(d, "bn_invstd", p.bn_invstd);

  p.out = ptr<void*>(d, "out");                  p.ldo = get<int64_t>(d, "ldo", 0);
  p.scores = ptr<void*>(d, "scores");            p.ld_scores = get<int64_t>(d, "ld_scores", 0);
  p.score_start = ptr<const int64_t*>(d, "score_start");

  p.dout = ptr<const void*>(d, "dout");          p.ld_dout = get<int64_t>(d, "ld_dout", 0);
  p.dscores = ptr<const void*>(d, "dscores");    p.ld_dscores = get<int64_t>(d, "ld_dscores", 0);
  p.dq = ptr<void*>(d, "dq");                    p.lddq = get<int64_t>(d, "lddq", 0);
  p.dk = ptr<void*>(d, "dk");
  ptrs(d, "dW", p.dW);         ptrs(d, "db", p.db);
  ptrs(d, "dalpha", p.dalpha); ptrs(d, "dgamma", p.dgamma);
  ptrs(d, "dbeta", p.dbeta);
  ptrs(d, "bn_corr_a", p.bn_corr_a);
  ptrs(d, "bn_corr_c", p.bn_corr_c);
  p.reduce_layer = get<int>(d, "reduce_layer", -1);
  p.reduce_out = ptr<double*>(d, "reduce_out");
  p.stats_layer = get<int>(d, "stats_layer", -1);
  p.stats_out = ptr<double*>(d, "stats_out");

  p.workspace = ptr<void*>(d, "workspace");
  p.workspace_bytes = get<int64_t>(d, "workspace_bytes", 0);

  p.is_cuda = get<bool>(d, "is_cuda", false);
  p.device = get<int>(d, "device", -1);
  p.stream = ptr<void*>(d, "stream");
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
  // The CPU kernels' own thread pool (blocking waits), sized per call by
  // torch.get_num_threads().
  info["threading"] = std::string("pool");
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
  // Bytes of caller-provided scratch for a phase ("forward", "stats", "backward").
  m.def("workspace_bytes", [](const py::dict& d, const std::string& phase) -> int64_t {
    DinParams p = from_dict(d);
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
  m.def("cuda_device_count", []() -> int {
#ifdef DIN_WITH_CUDA
    return cuda_device_count();
#else
    return 0;
#endif
  });
  m.def("build_info", &build_info);
}
