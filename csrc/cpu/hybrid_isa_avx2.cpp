// The matmul kernels built for AVX2 + FMA + F16C (isa.h picks them at run time).
// Off x86-64 this is a plain copy of the generic kernels, never picked.
#include "cpu/isa.h"

#include <cstdint>
#include <cstring>

#define SK_ISA_NS avx2
#if SK_HAVE_X86_VARIANTS
#define SK_ISA_HAS_AVX2 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#endif
#include "cpu/hybrid_isa_entries.inc"
#if SK_HAVE_X86_VARIANTS && defined(__clang__)
#pragma clang attribute pop
#endif
