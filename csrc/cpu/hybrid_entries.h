// The B = 16 matmul kernels' entry points, one set per instruction set (hybrid_isa_*.cpp). Each
// runs one thread's range [begin, end) of block-rows into y, the fp32 output [M][out_features]:
//  * row_dot_task16<T, M>: decode, M = 1..3 rows of x (xf [M][in_pad] and their pair tables);
//  * outer_task16<T>: M >= 4 rows of x as chunks of x^T, xt [ceil(M / 16)][in_pad][16].
// T: float, bf16_t, fp16_t, q8_t or q4_t (packed_view.h). All three sets exist in every build;
// off x86-64 the avx2 / avx512 ones are plain copies that are never picked.
#pragma once

#include <cstdint>

#include "cpu/isa.h"
#include "cpu/packed_view.h"

#define SK_DECLARE_HYBRID_ENTRIES(ns)                                                          \
  namespace sparse_kernels_cpu::ns {                                                           \
  template <typename T, int M>                                                                 \
  void row_dot_task16(const PackedView<T>& p, int64_t begin, int64_t end, const float* xf,     \
                      int64_t in_pad, const uint64_t* pairs, int64_t pair_stride, float* y,    \
                      int64_t out_features);                                                   \
  template <typename T>                                                                        \
  void outer_task16(const PackedView<T>& p, int64_t begin, int64_t end, const float* xt,       \
                    int64_t in_pad, int64_t M, float* y, int64_t out_features);                \
  }

SK_DECLARE_HYBRID_ENTRIES(generic)
SK_DECLARE_HYBRID_ENTRIES(avx2)
SK_DECLARE_HYBRID_ENTRIES(avx512)
#undef SK_DECLARE_HYBRID_ENTRIES

namespace sparse_kernels_cpu {

// The one of an entry point's three builds that active_isa() names (never avx2 / avx512 where
// the CPU lacks them, so on other architectures always the generic one).
template <typename Fn>
Fn for_active_isa(Fn generic_build, Fn avx2_build, Fn avx512_build) {
  switch (active_isa()) {
    case Isa::avx512: return avx512_build;
    case Isa::avx2: return avx2_build;
    default: return generic_build;
  }
}

}  // namespace sparse_kernels_cpu
