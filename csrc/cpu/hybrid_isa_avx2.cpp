// The matmul kernels built for AVX2 + FMA + F16C (isa.h picks them at run time).
#include "cpu/isa.h"
#if SK_HAVE_X86_VARIANTS
#include <cstdint>
#include <cstring>
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#define SK_ISA_NS avx2
#define SK_ISA_HAS_AVX2 1
#include "cpu/hybrid_isa_entries.inc"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
