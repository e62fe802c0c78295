#pragma once
#include "cuda_runtime.h"
struct __nv_bfloat16 {
  uint16_t x;
  __nv_bfloat16() = default;
  __nv_bfloat16 operator+(const __nv_bfloat16& o) const;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t b = static_cast<uint32_t>(h.x) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  __nv_bfloat16 h;
  if (std::isnan(v)) {
    h.x = 0x7FC0;
    return h;
  }
  b += 0x7FFFu + ((b >> 16) & 1u);
  h.x = static_cast<uint16_t>(b >> 16);
  return h;
}
inline __nv_bfloat16 __nv_bfloat16::operator+(const __nv_bfloat16& o) const {
  return __float2bfloat16_rn(__bfloat162float(*this) + __bfloat162float(o));
}
