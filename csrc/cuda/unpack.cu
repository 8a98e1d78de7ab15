// Unpacks a packed three-tier weight (sparse_kernels/format.py) into its dense [out, in] matrix
// on the GPU, bit for bit: one warp per block of any tier, each lane writing whole runs of a
// block row (consecutive lanes, consecutive addresses). Prefill of many tokens multiplies that
// matrix with cuBLAS (the binding), where a GEMM's tensor-core rate matters more than the bytes
// the sparse kernels save; the packed weight is what stays in memory between calls.
#include "cuda/launch.h"

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

// Bits of one value: the copy never converts, so -0.0, NaN payloads and subnormals survive.
template <int kBytes> struct Bits;
template <> struct Bits<2> { using type = uint16_t; };
template <> struct Bits<4> { using type = uint32_t; };

template <int kBytes>
__global__ void unpack_kernel(const PackedWeight w, void* dense_out) {
  using V = typename Bits<kBytes>::type;
  const int b = w.block_size, lane = threadIdx.x & 31;
  const int64_t entry = int64_t{blockIdx.x} * kWarpsPerCta + (threadIdx.x >> 5);
  const int64_t n_blocks = w.n_dense + w.n_s24 + w.n_topk;
  if (entry >= n_blocks) return;
  const int n_block_rows = static_cast<int>((w.out_features + b - 1) / b);
  V* out = static_cast<V*>(dense_out);

  int tier = 0;
  int64_t e = entry;
  if (e >= w.n_dense) { e -= w.n_dense; tier = 1; }
  if (tier == 1 && e >= w.n_s24) { e -= w.n_s24; tier = 2; }
  const int32_t* rowptr = tier == 0 ? w.dense_rowptr : tier == 1 ? w.s24_rowptr : w.topk_rowptr;
  const int32_t* cols = tier == 0 ? w.dense_cols : tier == 1 ? w.s24_cols : w.topk_cols;
  const int ie = static_cast<int>(e);
  const int64_t row0 = int64_t{block_row_of(rowptr, n_block_rows, ie)} * b;
  const int64_t col0 = int64_t{cols[ie]} * b;

  for (int k = lane; k < b * b; k += 32) {
    const int r = k / b, c = k % b;
    const int64_t o = row0 + r, i = col0 + c;
    if (o >= w.out_features || i >= w.in_features) continue;
    V v = 0;
    if (tier == 0) {
      v = static_cast<const V*>(w.dense_vals)[e * b * b + k];
    } else if (tier == 1) {
      // Slots 2g, 2g + 1 of row r hold the kept values of group g = c / 4, at the positions
      // the row's meta gives (2 bits per slot).
      const uint32_t meta = static_cast<uint16_t>(w.s24_meta[e * b + r]);
      const int g = c / 4;
      const V* vals = static_cast<const V*>(w.s24_vals) + (e * b + r) * (b / 2);
      if (static_cast<int>((meta >> (4 * g)) & 3u) == c % 4) v = vals[2 * g];
      else if (static_cast<int>((meta >> (4 * g + 2)) & 3u) == c % 4) v = vals[2 * g + 1];
    } else {
      // Positions are ascending within a block: binary search for k.
      const uint8_t* pos = w.topk_pos + e * w.topk;
      int lo = 0, hi = w.topk;
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (pos[mid] < k) lo = mid + 1; else hi = mid;
      }
      if (lo < w.topk && pos[lo] == k) v = static_cast<const V*>(w.topk_vals)[e * w.topk + lo];
    }
    out[o * w.in_features + i] = v;
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

}  // namespace sparse_kernels_cuda
