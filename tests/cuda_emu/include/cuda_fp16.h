#pragma once
#include "cuda_runtime.h"
struct __half {
  uint16_t x;
  __half() = default;
  __half operator+(const __half& o) const;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline __half __half::operator+(const __half& o) const {
  return __float2half_rn(__half2float(*this) + __half2float(o));
}
