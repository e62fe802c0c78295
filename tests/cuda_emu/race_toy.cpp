// A toy kernel for tests/test_sanitizers.py: proves that ThreadSanitizer sees
// the emulator's __syncthreads / __syncwarp as synchronisation (so that the
// clean modes report nothing) and still reports a shared-memory race between
// two barriers (the racy modes), as compute-sanitizer's racecheck would.
//   race_toy MODE    MODE: sync | racy | warp-sync | warp-racy
#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda_runtime.h"

enum Mode { kSync, kRacy, kWarpSync, kWarpRacy };

// Every thread writes its slot, then reads a neighbour's: lane + 1 (inside
// the warp) or lane + 32 (the next warp).
__global__ void neighbour_kernel(float* out, int mode) {
  float* s = reinterpret_cast<float*>(DIN_SMEM);
  const int i = threadIdx.x, n = blockDim.x;
  s[i] = static_cast<float>(i + blockIdx.x);
  if (mode == kSync) __syncthreads();
  if (mode == kWarpSync || mode == kWarpRacy) __syncwarp();
  const int j = (mode == kWarpSync) ? (i / 32) * 32 + (i + 1) % 32 : (i + 32) % n;
  out[blockIdx.x * n + i] = s[j];
  __syncthreads();
}

int main(int argc, char** argv) {
  const char* names[] = {"sync", "racy", "warp-sync", "warp-racy"};
  int mode = -1;
  for (int m = 0; m < 4; ++m)
    if (argc > 1 && std::strcmp(argv[1], names[m]) == 0) mode = m;
  if (mode < 0) {
    std::fprintf(stderr, "usage: race_toy sync|racy|warp-sync|warp-racy\n");
    return 2;
  }
  const int blocks = 2, threads = 64;
  std::vector<float> out(blocks * threads, -1.0f);
  DIN_LAUNCH(blocks, threads, threads * sizeof(float), nullptr, neighbour_kernel)(out.data(), mode);
  if (cudaGetLastError() != cudaSuccess) return 3;
  double sum = 0;
  for (float v : out) sum += v;
  std::printf("sum %.1f\n", sum);
  return 0;
}
