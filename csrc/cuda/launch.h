// Launch functions of the CUDA kernels. Raw device pointers and a stream, no torch types, so
// every kernel file compiles with nvcc alone in seconds; binding.cpp is the only file that sees
// torch. Each function returns the cudaError_t of its launch(es) (cudaGetLastError after each).
// All tensors are contiguous, row-major, on the current device.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace sparse_kernels_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A packed three-tier weight; layout contract in sparse_kernels/format.py. Values are in the
// `DType` passed beside it. CSR arrays are over block-rows (n_block_rows + 1 entries).
struct PackedWeight {
  int64_t out_features;
  int64_t in_features;
  int block_size;                 // B: 4, 8, 12 or 16
  int topk;                       // K: values per top-K block
  int64_t n_dense, n_s24, n_topk;  // blocks per tier
  const int32_t* dense_rowptr;
  const int32_t* dense_cols;
  const void* dense_vals;         // [n_dense, B, B]
  const int32_t* s24_rowptr;
  const int32_t* s24_cols;
  const void* s24_vals;           // [n_s24, B, B/2]
  const int16_t* s24_meta;        // [n_s24, B]: slot j's column = 4*(j/2) + ((meta >> 2j) & 3)
  const int32_t* topk_rowptr;
  const int32_t* topk_cols;
  const void* topk_vals;          // [n_topk, K]
  const uint8_t* topk_pos;        // [n_topk, K]: row * B + col, ascending
};

// y[rows, out] = x[rows, in] @ W^T (+ bias[out]); x, bias and y in `dtype`, fp32 accumulation.
// `workspace` must hold hybrid_linear_workspace_bytes(w, rows, dtype) bytes (null when 0).
size_t hybrid_linear_workspace_bytes(const PackedWeight& w, int64_t rows, DType dtype);
cudaError_t launch_hybrid_linear(const void* x, int64_t rows, const PackedWeight& w,
                                 const void* bias, void* y, DType dtype, void* workspace,
                                 cudaStream_t stream);

// dense[out, in] (in `dtype`) = the weight `w` stands for, bit for bit (zeros where nothing is
// kept); `dense` must hold out * in values.
cudaError_t launch_unpack_hybrid(const PackedWeight& w, DType dtype, void* dense,
                                 cudaStream_t stream);

// Low-bit values (`bits` 8: int8 codes; 4: int4 codes two per byte, top-K rows padded to an even
// count): dense[out, in] fp32 = code * scales[o][i / group_size] (fp16 scales
// [out, ceil(in / group_size)]), exactly as sparse_kernels.reference.unpack_blocks_q.
cudaError_t launch_unpack_hybrid_q(const PackedWeight& w, int bits, const void* scales,
                                   int64_t group_size, float* dense, cudaStream_t stream);

// The decode kernel (at most sk_decode::kMaxTokens rows of x, fp16 / bf16) on the execution layout
// prepared from a packed weight (csrc/cuda/decode_layout.cuh, sparse_kernels/decode_layout.py).
struct DecodeLayout {
  int64_t out_features;
  int64_t in_features;
  int topk;                       // K: values per top-K block
  int n_tasks;
  int n_block_rows;
  const uint8_t* stream;          // every task's block images back to back, 16-byte aligned
  const int32_t* tasks;           // [n_tasks, 8]: sk_decode::Task
  const uint32_t* codes;          // 2-bit tier codes, 16 per word
  unsigned long long* counters;   // [n_block_rows]: split-K words (sk_decode::arrive), any start
};

// y[rows, out] = x[rows, in] @ W^T (+ bias[out]); rows <= 16, in % 4 == 0, x 8-byte aligned.
// `workspace` must hold hybrid_decode_workspace_bytes(layout, rows) bytes (null when 0). Calls
// that share one layout must not run concurrently (they share its counters); a call after one
// that failed part-way is still correct (each launch tags its counts).
size_t hybrid_decode_workspace_bytes(const DecodeLayout& layout, int64_t rows);
cudaError_t launch_hybrid_decode(const void* x, int64_t rows, const DecodeLayout& layout,
                                 const void* bias, void* y, DType dtype, void* workspace,
                                 cudaStream_t stream);

// scores[out, in] = |W| * sqrt(act_sq_norm[in]) in fp32, and block_scores
// [ceil(out/B), ceil(in/B)] = mean of scores over each block's real entries.
cudaError_t launch_wanda_scores(const void* weight, DType weight_dtype, const void* act_sq_norm,
                                DType norm_dtype, int64_t out_features, int64_t in_features,
                                int block_size, float* scores, float* block_scores,
                                cudaStream_t stream);

// mask[out, in] (bytes 0/1) keeping min(k, real entries) best scores of each B x B block.
cudaError_t launch_block_topk_mask(const void* scores, DType dtype, int64_t out_features,
                                   int64_t in_features, int k, int block_size, uint8_t* mask,
                                   cudaStream_t stream);

// mask[out, in] (bytes 0/1) keeping the n best of every m consecutive input columns.
cudaError_t launch_nm_mask(const void* scores, DType dtype, int64_t out_features,
                           int64_t in_features, int n, int m, uint8_t* mask, cudaStream_t stream);

// blocks[n_blocks, B, B] (at most 2 non-zeros per group of 4) -> values [n_blocks, B, B/2]
// (same dtype) and meta [n_blocks, B], exactly as sparse_kernels.reference.compress_24.
cudaError_t launch_compress_24(const void* blocks, DType dtype, int64_t n_blocks, int block_size,
                               void* values, int16_t* meta, cudaStream_t stream);

}  // namespace sparse_kernels_cuda
