// fp32 epilogue for the avx2 instruction set (chosen at run time; see conv_norm_act.cpp).
#include <cstdint>
#pragma GCC target("avx2,fma")
#define ANYDEPTH_ISA_NS isa_avx2
#include "epilogue_rows.inc"
