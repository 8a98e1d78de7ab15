// The matmul kernels built for AVX-512 (F, VL, BW, DQ) + FMA + F16C (isa.h picks them at run
// time). The kernels' 256-bit vectors gain AVX-512's 32 registers and masked forms.
#include "cpu/isa.h"
#if SK_HAVE_X86_VARIANTS
#include <cstdint>
#include <cstring>
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#endif
#define SK_ISA_NS avx512
#define SK_ISA_HAS_AVX2 1
#include "cpu/hybrid_isa_entries.inc"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
