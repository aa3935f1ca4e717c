// fp32 epilogue for the base instruction set (chosen at run time; see conv_norm_act.cpp).
#include <cstdint>

#define ANYDEPTH_ISA_NS isa_base
#include "epilogue_rows.inc"
