// Raw views of a packed three-tier weight for the C++ kernels (layout: sparse_kernels/format.py).
// No torch headers, so the per-ISA kernel files compile in a second.
#pragma once

#include <cstdint>

namespace sparse_kernels_cpu {

// Storage types of the 16-bit formats (bit-compatible with c10::BFloat16 / c10::Half).
struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

// Raw views of one weight's packed tensors; values typed T (float, bf16_t or fp16_t).
template <typename T>
struct PackedView {
  const int32_t* dense_rowptr;
  const int32_t* dense_cols;
  const T* dense_vals;
  const int32_t* s24_rowptr;
  const int32_t* s24_cols;
  const T* s24_vals;
  const int16_t* s24_meta;
  const int32_t* topk_rowptr;
  const int32_t* topk_cols;
  const T* topk_vals;
  const uint8_t* topk_pos;
  int64_t topk;
};

}  // namespace sparse_kernels_cpu
