// Serving demo: load an AOTInductor package (.pt2) of a din_fused DIN and score one batch.
// No Python and no din_fused: the package holds the model in aten ops (din_fused.serving).
//
//   din_serve MODEL.pt2 INPUTS.txt
//
// INPUTS.txt holds the model's int64 inputs in order (target [B, A], history [B, T, A],
// lengths [B], then context [B, F] if the model has context features), one per line:
//   ndim d0 d1 ... v0 v1 v2 ...        (row-major values)
// Prints one line per row: the click logit and its probability sigmoid(logit), with 9
// significant digits (a float32 round-trips exactly).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <ATen/ops/from_blob.h>
#include <ATen/ops/sigmoid.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

// One line "ndim d0 .. v0 .." -> an int64 tensor (owning a copy of the values).
at::Tensor parse_tensor(const std::string& line, int index) {
  std::istringstream in(line);
  int64_t ndim = 0;
  if (!(in >> ndim) || ndim < 0 || ndim > 8) {
    throw std::runtime_error("input " + std::to_string(index) + ": bad ndim");
  }
  std::vector<int64_t> shape(ndim);
  int64_t numel = 1;
  for (auto& d : shape) {
    if (!(in >> d) || d < 0) throw std::runtime_error("input " + std::to_string(index) + ": bad shape");
    numel *= d;
  }
  std::vector<int64_t> values(numel);
  for (auto& v : values) {
    if (!(in >> v)) {
      throw std::runtime_error("input " + std::to_string(index) + ": expected " + std::to_string(numel) +
                               " values");
    }
  }
  return at::from_blob(values.data(), shape, at::TensorOptions().dtype(at::kLong)).clone();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 INPUTS.txt\n";
    return 2;
  }
  try {
    std::ifstream file(argv[2]);
    if (!file) throw std::runtime_error(std::string("cannot open ") + argv[2]);
    std::vector<at::Tensor> inputs;
    for (std::string line; std::getline(file, line);) {
      if (!line.empty()) inputs.push_back(parse_tensor(line, static_cast<int>(inputs.size())));
    }
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    std::vector<at::Tensor> outputs = loader.run(inputs);
    at::Tensor logits = outputs.at(0).contiguous();
    at::Tensor probs = at::sigmoid(logits);
    const float* l = logits.data_ptr<float>();
    const float* p = probs.data_ptr<float>();
    for (int64_t i = 0; i < logits.numel(); ++i) std::printf("%.9g %.9g\n", l[i], p[i]);
  } catch (const std::exception& e) {
    std::cerr << "din_serve: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
