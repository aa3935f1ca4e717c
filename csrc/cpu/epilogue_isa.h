// The fp32 epilogue, compiled for several instruction sets (see epilogue_rows.inc).
#pragma once
#include <cstdint>

namespace anydepth {
using RowsF32 = void (*)(float* out, const float* in, const float* scale, const float* bias,
                         const float* res, int64_t act, int64_t begin, int64_t end, int64_t C,
                         int64_t inner, bool channels_last);
#define ANYDEPTH_DECLARE_ROWS(ns)                                                             \
  namespace ns {                                                                              \
  void rows_f32(float* out, const float* in, const float* scale, const float* bias,          \
                const float* res, int64_t act, int64_t begin, int64_t end, int64_t C,         \
                int64_t inner, bool channels_last);                                           \
  }
ANYDEPTH_DECLARE_ROWS(isa_base)
ANYDEPTH_DECLARE_ROWS(isa_avx2)
ANYDEPTH_DECLARE_ROWS(isa_avx512)
#undef ANYDEPTH_DECLARE_ROWS
// The variant this machine runs (chosen once at load, ANYDEPTH_CPU_ISA forces one; conv_norm_act.cpp).
RowsF32 best_rows_f32();
}  // namespace anydepth
