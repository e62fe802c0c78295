// WMMA emulation for tests/cuda_emu: every lane of a warp holds the whole 16x16
// tile (fragment layouts are opaque in the real API, so no kernel may depend on
// them).  Loads check the real API's alignment rules (pointer 256-bit aligned,
// ldm a multiple of 16 bytes) and abort on a violation; stores are done by lane
// 0 followed by a warp barrier.  Products are accumulated in float.
//
// The *_sync operations are warp-collective: no lane leaves one before every
// lane of the warp has entered it.  Here every lane reads the whole tile, so a
// load ends with a warp barrier: without it lane 0 could already be storing
// into the tile it just loaded (tc_gemm_tn_acc: load C, mma, store C) while
// another lane is still reading it, a race of the emulation alone that
// ThreadSanitizer reports.  There is no barrier on entry, so an ordinary
// access by one lane racing with a collective of the warp (a real race on a
// GPU, whatever the fragment layout) is still reported.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "emulation covers 16x16x16 only");
  float v[256];  // [row][col] of the tile this fragment represents
};

inline float emu_tof(float x) { return x; }
inline float emu_tof(__half x) { return __half2float(x); }
inline float emu_tof(__nv_bfloat16 x) { return __bfloat162float(x); }

inline void emu_check(const void* p, unsigned ldm, size_t esize, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * esize) % 16 != 0) {
    std::fprintf(stderr, "wmma emulation: %s: pointer %p (mod 32 = %u) or ldm %u (x%zu bytes) misaligned\n",
                 what, p, static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) % 32), ldm, esize);
    std::abort();
  }
}

template <class Use, class T, class L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout");
  emu_check(p, ldm, sizeof(T), "load_matrix_sync");
  constexpr bool row = std::is_same<L, row_major>::value;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r * 16 + c] = emu_tof(row ? p[r * ldm + c] : p[c * ldm + r]);
  __syncwarp();
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t l) {
  emu_check(p, ldm, 4, "load_matrix_sync(accumulator)");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r * 16 + c] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  __syncwarp();
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t l) {
  emu_check(p, ldm, 4, "store_matrix_sync");
  if (emu::tIdx.x % 32 == 0)
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r * 16 + c];
  __syncwarp();
}

template <class Use, class T, class L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float v) {
  for (float& x : f.v) x = v;
}

template <class TA, class LA, class TB, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += a.v[i * 16 + k] * b.v[k * 16 + j];
      out[i * 16 + j] = s;
    }
  for (int i = 0; i < 256; ++i) d.v[i] = out[i];
}
}  // namespace wmma
}  // namespace nvcuda
