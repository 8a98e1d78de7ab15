// Unpacks a packed three-tier weight (sparse_kernels/format.py) into its dense [out, in] matrix
// on the GPU, bit for bit (low-bit values: fp32 codes times their group scales): one warp per
// block of any tier, each lane writing whole runs of a block row (consecutive lanes, consecutive
// addresses). Prefill of many tokens multiplies that
// matrix with cuBLAS (the binding), where a GEMM's tensor-core rate matters more than the bytes
// the sparse kernels save; the packed weight is what stays in memory between calls.
#include "cuda/launch.h"

#include <cuda_fp16.h>

#include <cstdint>

namespace sparse_kernels_cuda {
namespace {

constexpr int kWarpsPerCta = 8;

// Block-row of entry e of a tier's CSR: the last r with rowptr[r] <= e (warp-uniform search).
__device__ int block_row_of(const int32_t* rowptr, int n_block_rows, int e) {
  int lo = 0, hi = n_block_rows;  // rowptr[lo] <= e < rowptr[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (rowptr[mid] <= e) lo = mid; else hi = mid;
  }
  return lo;
}

// Where entry `entry` of the three tiers' blocks (dense, then 2:4, then top-K) sits: its tier,
// its index in that tier and its top-left weight coordinates.
struct BlockAt {
  int tier;
  int64_t e, row0, col0;
};

__device__ BlockAt locate_block(const PackedWeight& w, int64_t entry) {
  const int b = w.block_size;
  const int n_block_rows = static_cast<int>((w.out_features + b - 1) / b);
  BlockAt at{0, entry, 0, 0};
  if (at.e >= w.n_dense) { at.e -= w.n_dense; at.tier = 1; }
  if (at.tier == 1 && at.e >= w.n_s24) { at.e -= w.n_s24; at.tier = 2; }
  const int32_t* rowptr = at.tier == 0 ? w.dense_rowptr : at.tier == 1 ? w.s24_rowptr
                                                                       : w.topk_rowptr;
  const int32_t* cols = at.tier == 0 ? w.dense_cols : at.tier == 1 ? w.s24_cols : w.topk_cols;
  const int ie = static_cast<int>(at.e);
  at.row0 = int64_t{block_row_of(rowptr, n_block_rows, ie)} * b;
  at.col0 = int64_t{cols[ie]} * b;
  return at;
}

// Index of block position k = r * B + c among the values of its tier's tensor (flat, counting
// `topk_stride` slots per top-K block), or -1 where the block keeps nothing there.
//  dense: every position, row-major. 2:4: slots 2g, 2g + 1 of row r hold the kept values of
//  group g = c / 4, at the positions the row's meta gives (2 bits per slot). top-K: the index of
//  k among the block's ascending positions.
__device__ int64_t value_index(const PackedWeight& w, const BlockAt& at, int k, int topk_stride) {
  const int b = w.block_size, r = k / b, c = k % b;
  if (at.tier == 0) return at.e * b * b + k;
  if (at.tier == 1) {
    const uint32_t meta = static_cast<uint16_t>(w.s24_meta[at.e * b + r]);
    const int g = c / 4;
    const int64_t row_slots = (at.e * b + r) * (b / 2);
    if (static_cast<int>((meta >> (4 * g)) & 3u) == c % 4) return row_slots + 2 * g;
    if (static_cast<int>((meta >> (4 * g + 2)) & 3u) == c % 4) return row_slots + 2 * g + 1;
    return -1;
  }
  const uint8_t* pos = w.topk_pos + at.e * w.topk;
  int lo = 0, hi = w.topk;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (pos[mid] < k) lo = mid + 1; else hi = mid;
  }
  return lo < w.topk && pos[lo] == k ? at.e * topk_stride + lo : -1;
}

__device__ const void* tier_values(const PackedWeight& w, int tier) {
  return tier == 0 ? w.dense_vals : tier == 1 ? w.s24_vals : w.topk_vals;
}

// Bits of one value: the copy never converts, so -0.0, NaN payloads and subnormals survive.
template <int kBytes> struct Bits;
template <> struct Bits<2> { using type = uint16_t; };
template <> struct Bits<4> { using type = uint32_t; };

template <int kBytes>
__global__ void unpack_kernel(const PackedWeight w, void* dense_out) {
  using V = typename Bits<kBytes>::type;
  const int b = w.block_size, lane = threadIdx.x & 31;
  const int64_t entry = int64_t{blockIdx.x} * kWarpsPerCta + (threadIdx.x >> 5);
  if (entry >= w.n_dense + w.n_s24 + w.n_topk) return;
  const BlockAt at = locate_block(w, entry);
  const V* vals = static_cast<const V*>(tier_values(w, at.tier));
  V* out = static_cast<V*>(dense_out);
  for (int k = lane; k < b * b; k += 32) {
    const int64_t o = at.row0 + k / b, i = at.col0 + k % b;
    if (o >= w.out_features || i >= w.in_features) continue;
    const int64_t v = value_index(w, at, k, w.topk);
    out[o * w.in_features + i] = v < 0 ? V{0} : vals[v];
  }
}

// Code at flat index v of a low-bit tier: int8 as stored; int4 two per byte (even index in the
// low nibble), sign-extended. Every int4 tier row holds an even number of codes except top-K,
// whose rows are padded to an even `topk_stride`, so flat index / 2 is the byte.
template <int kBits>
__device__ int code_at(const void* vals, int64_t v) {
  if constexpr (kBits == 8) {
    return static_cast<const int8_t*>(vals)[v];
  } else {
    const uint8_t byte = static_cast<const uint8_t*>(vals)[v >> 1];
    const int nibble = (v & 1) ? byte >> 4 : byte & 0xF;
    return (nibble ^ 8) - 8;
  }
}

template <int kBits>
__global__ void unpack_q_kernel(const PackedWeight w, const __half* scales, int64_t group_size,
                                float* out) {
  const int b = w.block_size, lane = threadIdx.x & 31;
  const int64_t entry = int64_t{blockIdx.x} * kWarpsPerCta + (threadIdx.x >> 5);
  if (entry >= w.n_dense + w.n_s24 + w.n_topk) return;
  const BlockAt at = locate_block(w, entry);
  const void* vals = tier_values(w, at.tier);
  const int topk_stride = kBits == 4 ? (w.topk + 1) / 2 * 2 : w.topk;
  const int64_t n_groups = (w.in_features + group_size - 1) / group_size;
  for (int k = lane; k < b * b; k += 32) {
    const int64_t o = at.row0 + k / b, i = at.col0 + k % b;
    if (o >= w.out_features || i >= w.in_features) continue;
    const int64_t v = value_index(w, at, k, topk_stride);
    // code * scale in fp32 is exact for |code| <= 128 times an fp16 scale (the reference's
    // product), so the two agree bit for bit.
    out[o * w.in_features + i] =
        v < 0 ? 0.f
              : static_cast<float>(code_at<kBits>(vals, v)) *
                    __half2float(scales[o * n_groups + i / group_size]);
  }
}

}  // namespace

cudaError_t launch_unpack_hybrid(const PackedWeight& w, DType dtype, void* dense,
                                 cudaStream_t stream) {
  const int64_t n_blocks = w.n_dense + w.n_s24 + w.n_topk;
  if (n_blocks == 0) return cudaSuccess;
  const unsigned ctas = static_cast<unsigned>((n_blocks + kWarpsPerCta - 1) / kWarpsPerCta);
  if (dtype == DType::kFloat32)
    unpack_kernel<4><<<ctas, kWarpsPerCta * 32, 0, stream>>>(w, dense);
  else
    unpack_kernel<2><<<ctas, kWarpsPerCta * 32, 0, stream>>>(w, dense);
  return cudaGetLastError();
}

cudaError_t launch_unpack_hybrid_q(const PackedWeight& w, int bits, const void* scales,
                                   int64_t group_size, float* dense, cudaStream_t stream) {
  const int64_t n_blocks = w.n_dense + w.n_s24 + w.n_topk;
  if (n_blocks == 0) return cudaSuccess;
  const unsigned ctas = static_cast<unsigned>((n_blocks + kWarpsPerCta - 1) / kWarpsPerCta);
  const __half* s = static_cast<const __half*>(scales);
  if (bits == 8)
    unpack_q_kernel<8><<<ctas, kWarpsPerCta * 32, 0, stream>>>(w, s, group_size, dense);
  else
    unpack_q_kernel<4><<<ctas, kWarpsPerCta * 32, 0, stream>>>(w, s, group_size, dense);
  return cudaGetLastError();
}

}  // namespace sparse_kernels_cuda
