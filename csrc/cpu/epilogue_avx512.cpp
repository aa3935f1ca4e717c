// fp32 epilogue for the avx512 instruction set (chosen at run time; see conv_norm_act.cpp).
#include <cstdint>
#pragma GCC target("avx512f,avx512vl,avx2,fma")
#define ANYDEPTH_ISA_NS isa_avx512
#include "epilogue_rows.inc"
