// Raw views of a packed three-tier weight for the C++ kernels (layout: sparse_kernels/format.py).
// No torch headers, so the per-ISA kernel files compile in a second.
#pragma once

#include <cstdint>

namespace sparse_kernels_cpu {

// Storage types of the 16-bit formats (bit-compatible with c10::BFloat16 / c10::Half).
struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };
// Low-bit codes (sparse_kernels/quant.py): one int8 code, or two int4 codes in a byte (element
// 2j in the low nibble). A tier's values are addressed by element, so a q4_t pointer covers two.
struct q8_t { int8_t code; };
struct q4_t { uint8_t pair; };

template <typename T>
constexpr bool is_low_bit = false;
template <>
constexpr bool is_low_bit<q8_t> = true;
template <>
constexpr bool is_low_bit<q4_t> = true;

// Raw views of one weight's packed tensors; values typed T (float, bf16_t, fp16_t, q8_t or
// q4_t). Value e of a tier is element e of its values (dense [n][B][B], 2:4 [n][B][B/2], top-K
// [n][topk_stride]); low-bit weights also carry their fp16 scales [out][n_groups], a group
// covering group_blocks block columns.
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
  int64_t topk_stride = 0;      // elements between top-K rows (topk; int4 rounds up to even)
  const uint16_t* scales = nullptr;
  int64_t n_groups = 0;
  int64_t group_blocks = 0;
  int64_t out_features = 0;     // rows of the scales (a ragged last block-row has fewer)
};

}  // namespace sparse_kernels_cpu
