// CPU emulation (see cuda_runtime.h): float16 and its conversions (c10's, round to nearest).
#pragma once
#include <c10/util/Half.h>

struct __half {
  uint16_t bits;
};
inline float __half2float(__half h) { return c10::detail::fp16_ieee_to_fp32_value(h.bits); }
inline __half __float2half_rn(float f) { return {c10::detail::fp16_ieee_from_fp32_value(f)}; }
