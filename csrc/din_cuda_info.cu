// Tiny CUDA translation unit: proves the toolchain works and reports devices.
// Built whenever nvcc is found, even on machines without a GPU.
#include <cuda_runtime.h>

#include "din_params.h"

namespace din {

int cuda_device_count() {
  int n = 0;
  // No GPU or no driver is not an error here: it just means zero devices.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error state
    return 0;
  }
  return n;
}

}  // namespace din
