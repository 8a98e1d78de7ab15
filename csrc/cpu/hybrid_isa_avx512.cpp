// The matmul kernels built for AVX-512 (F, VL, BW, DQ) + FMA + F16C (isa.h picks them at run
// time). The kernels' 256-bit vectors gain AVX-512's 32 registers and masked forms.
// Off x86-64 this is a plain copy of the generic kernels, never picked.
#include "cpu/isa.h"

#include <cstdint>
#include <cstring>

#define SK_ISA_NS avx512
#if SK_HAVE_X86_VARIANTS
#define SK_ISA_HAS_AVX2 1
#define SK_ISA_HAS_AVX512 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#endif
#endif
#include "cpu/hybrid_isa_entries.inc"
#if SK_HAVE_X86_VARIANTS && defined(__clang__)
#pragma clang attribute pop
#endif
