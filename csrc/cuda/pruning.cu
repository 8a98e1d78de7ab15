// Pruning-side kernels: wanda_scores, block_topk_mask, nm_mask, compress_24. Semantics, bit for
// bit: sparse_kernels/reference.py (the block means of wanda_scores excepted: a sum of floats
// depends on its order, so they match the reference to rounding only).
//
// Shared selection rule: best = higher score; among equal scores the lower index wins (row-major
// inside a block, column inside a group). NaN counts as -inf; -0.0 equals +0.0. Every score is
// mapped to an int32 key whose signed order is that order (as csrc/cpu/select.cpp does), so the
// selections below are integer compares.
//
// Work split of the block kernels (wanda_scores, block_topk_mask): a warp owns one B x B block
// (entry i of the block, row-major, is held by lane i % 32 in slot i / 32, so slot-then-lane order
// is index order) and the warps of a CTA take neighbouring blocks of one block-row, so a CTA reads
// whole runs of each weight row. Each kernel reads its input once. Needs sm_80+
// (__reduce_*_sync).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "cuda/launch.h"

namespace sparse_kernels_cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kThreadsPerCta = 256;
constexpr int kWarpsPerCta = kThreadsPerCta / kWarpSize;
constexpr int kMaxGridY = 65535;

// ------------------------------------------------------------------------ element access

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// "Non-zero" on the bits, so neither flush-to-zero nor NaN compares can change the answer:
// -0.0 is zero, NaN and subnormals are non-zero.
__device__ __forceinline__ bool is_nonzero(float v) {
  return (__float_as_uint(v) & 0x7FFFFFFFu) != 0;
}
__device__ __forceinline__ bool is_nonzero(__half v) { return (__half_as_ushort(v) & 0x7FFF) != 0; }
__device__ __forceinline__ bool is_nonzero(__nv_bfloat16 v) {
  return (__bfloat16_as_ushort(v) & 0x7FFF) != 0;
}

// One element of a tensor whose dtype is only known at run time (the activation norms, whose
// dtype may differ from the weight's). The branch is uniform across the grid.
__device__ __forceinline__ float load_as_float(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return to_float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// ------------------------------------------------------------------------ selection keys

// Below the key of every real score (key(-inf) = 0x807FFFFF): entries outside the weight.
constexpr int32_t kPaddingKey = INT_MIN;

// Order-preserving key: for non-NaN a, b: a < b <=> key(a) < key(b), a == b <=> key(a) == key(b);
// NaN gets the key of -inf and -0.0 that of +0.0. Works on the bits, so it is exact whatever the
// floating-point compile flags.
__device__ __forceinline__ int32_t score_key(float v) {
  int32_t bits = __float_as_int(v);
  if (isnan(v)) bits = __float_as_int(-INFINITY);
  if (bits == INT_MIN) bits = 0;                 // -0.0 -> +0.0
  return bits ^ ((bits >> 31) & 0x7FFFFFFF);     // negative floats: flip the magnitude bits
}

// ------------------------------------------------------------------------ warp-per-block tiles

// Where the calling lane's entries of its warp's B x B block lie in an [out_f, in_f] matrix.
template <int B>
struct BlockTile {
  static constexpr int kSlots = (B * B + kWarpSize - 1) / kWarpSize;  // entries per lane

  int64_t row0, col0;    // top-left corner of the block
  int rows, cols;        // its real extent (smaller than B at the ragged edges)
  int lane;

  __device__ int row_in_block(int slot) const { return (slot * kWarpSize + lane) / B; }
  __device__ int col_in_block(int slot) const { return (slot * kWarpSize + lane) % B; }
  __device__ bool is_real(int slot) const {
    return slot * kWarpSize + lane < B * B && row_in_block(slot) < rows &&
           col_in_block(slot) < cols;
  }
  __device__ int64_t offset(int slot, int64_t in_f) const {
    return (row0 + row_in_block(slot)) * in_f + col0 + col_in_block(slot);
  }
  __device__ int64_t column(int slot) const { return col0 + col_in_block(slot); }
  __device__ int real_entries() const { return rows * cols; }
};

// The block owned by the calling warp: consecutive warps take consecutive blocks of a block-row.
template <int B>
__device__ BlockTile<B> warp_block(int64_t block, int64_t out_f, int64_t in_f,
                                   int64_t n_block_cols) {
  BlockTile<B> t;
  t.row0 = block / n_block_cols * B;
  t.col0 = block % n_block_cols * B;
  t.rows = static_cast<int>(out_f - t.row0 < B ? out_f - t.row0 : B);
  t.cols = static_cast<int>(in_f - t.col0 < B ? in_f - t.col0 : B);
  t.lane = threadIdx.x % kWarpSize;
  return t;
}

__device__ __forceinline__ int64_t warp_block_index() {
  return static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / kWarpSize;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(kFullWarp, v, offset);
  return v;
}

// How many of the warp's keys are >= t.
template <int Slots>
__device__ __forceinline__ int warp_count_at_least(const int32_t (&key)[Slots], int32_t t) {
  int count = 0;
#pragma unroll
  for (int s = 0; s < Slots; ++s) count += key[s] >= t;
  return __reduce_add_sync(kFullWarp, count);
}

// How many of the warp's keys are > t.
template <int Slots>
__device__ __forceinline__ int warp_count_above(const int32_t (&key)[Slots], int32_t t) {
  int count = 0;
#pragma unroll
  for (int s = 0; s < Slots; ++s) count += __popc(__ballot_sync(kFullWarp, key[s] > t));
  return count;
}

// A threshold t for keeping the k best of the warp's keys, 1 <= k < real entries:
// |{key > t}| <= k <= |{key >= t}|. The k best are then every key > t plus the first
// k - |{key > t}| keys == t in index order. Bisection between the smallest and largest real key
// (each round one warp-wide count), stopping early once exactly k keys reach the probe: with
// distinct scores that happens long before the range closes.
template <int Slots>
__device__ int32_t select_threshold(const int32_t (&key)[Slots], const bool (&real)[Slots],
                                    int k) {
  int32_t lowest = INT_MAX, highest = INT_MIN;
#pragma unroll
  for (int s = 0; s < Slots; ++s) {
    if (real[s]) lowest = min(lowest, key[s]);
    highest = max(highest, key[s]);
  }
  int32_t lo = __reduce_min_sync(kFullWarp, lowest);   // invariant: count(>= lo) >= k
  int32_t hi = __reduce_max_sync(kFullWarp, highest);  // invariant: count(>= hi + 1) < k
  while (lo < hi) {
    const int32_t mid = static_cast<int32_t>(lo + (static_cast<int64_t>(hi) - lo + 1) / 2);
    const int count = warp_count_at_least(key, mid);
    if (count == k) return mid;
    if (count > k) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// ------------------------------------------------------------------------ kernels

template <typename T, int B>
__global__ void __launch_bounds__(kThreadsPerCta)
wanda_scores_kernel(const T* weight, const void* act_sq_norm, DType norm_dtype, int64_t out_f,
                    int64_t in_f, int64_t n_block_cols, int64_t n_blocks, float* scores,
                    float* block_scores) {
  const int64_t block = warp_block_index();
  if (block >= n_blocks) return;  // the whole warp leaves together
  const BlockTile<B> tile = warp_block<B>(block, out_f, in_f, n_block_cols);
  float sum = 0.0f;
#pragma unroll
  for (int s = 0; s < BlockTile<B>::kSlots; ++s) {
    if (!tile.is_real(s)) continue;
    const int64_t at = tile.offset(s, in_f);
    // Correctly rounded sqrt and product, as torch computes |W| * sqrt(norm) on a GPU.
    const float scale = __fsqrt_rn(load_as_float(act_sq_norm, norm_dtype, tile.column(s)));
    const float score = __fmul_rn(fabsf(to_float(weight[at])), scale);
    scores[at] = score;
    sum += score;
  }
  sum = warp_sum(sum);
  if (tile.lane == 0) {
    block_scores[block] = __fdiv_rn(sum, static_cast<float>(tile.real_entries()));
  }
}

template <typename T, int B>
__global__ void __launch_bounds__(kThreadsPerCta)
block_topk_mask_kernel(const T* scores, int64_t out_f, int64_t in_f, int64_t n_block_cols,
                       int64_t n_blocks, int k, uint8_t* mask) {
  constexpr int kSlots = BlockTile<B>::kSlots;
  const int64_t block = warp_block_index();
  if (block >= n_blocks) return;  // the whole warp leaves together
  const BlockTile<B> tile = warp_block<B>(block, out_f, in_f, n_block_cols);
  if (k >= tile.real_entries()) {  // every real entry survives
#pragma unroll
    for (int s = 0; s < kSlots; ++s)
      if (tile.is_real(s)) mask[tile.offset(s, in_f)] = 1;
    return;
  }
  int32_t key[kSlots];
  bool real[kSlots];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    real[s] = tile.is_real(s);
    key[s] = real[s] ? score_key(to_float(scores[tile.offset(s, in_f)])) : kPaddingKey;
  }
  const int32_t t = select_threshold(key, real, k);
  // Every key > t is kept; the places left go to the keys == t in index order: slot by slot,
  // lanes in order within a slot.
  const unsigned lanes_below = (1u << tile.lane) - 1u;
  int ties_left = k - warp_count_above(key, t);
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    const unsigned ties = __ballot_sync(kFullWarp, key[s] == t);
    const bool keep = key[s] > t || (key[s] == t && __popc(ties & lanes_below) < ties_left);
    ties_left -= __popc(ties);
    if (real[s]) mask[tile.offset(s, in_f)] = keep;
  }
}

// Whether the entry (key `other`, column `other_col`) beats the entry (`mine`, `col`).
__device__ __forceinline__ bool beats(int32_t other, int other_col, int32_t mine, int col) {
  return other > mine || (other == mine && other_col < col);
}

// One thread per element, kept iff fewer than n members of its group beat it. When m divides 32
// every group lies inside one warp (a warp's first column is a multiple of 32), and the members'
// keys come from their lanes by shuffles; otherwise they are loaded again (L1 hits: a warp covers
// consecutive columns). No thread leaves early: the shuffles need the whole warp.
template <typename T, bool kGroupsInWarp>
__global__ void __launch_bounds__(kThreadsPerCta)
nm_mask_kernel(const T* scores, int64_t out_f, int in_f, int n, int m, uint8_t* mask) {
  const int col = blockIdx.x * kThreadsPerCta + threadIdx.x;
  const bool in_row = col < in_f;
  const int group_start = col - col % m;
  const int group_end = min(group_start + m, in_f);
  const int group_lane = static_cast<int>(threadIdx.x % kWarpSize) - col % m;  // its first lane
  for (int64_t row = blockIdx.y; row < out_f; row += gridDim.y) {
    const T* srow = scores + row * in_f;
    const int32_t mine = in_row ? score_key(to_float(srow[col])) : kPaddingKey;
    int rank = 0;
    if constexpr (kGroupsInWarp) {
      for (int j = 0; j < m; ++j) {
        const int32_t other = __shfl_sync(kFullWarp, mine, group_lane + j);
        rank += group_start + j < group_end && beats(other, group_start + j, mine, col);
      }
    } else {
      for (int j = group_start; j < group_end && rank < n; ++j)
        rank += beats(score_key(to_float(srow[j])), j, mine, col);
    }
    if (in_row) mask[row * in_f + col] = rank < n;
  }
}

// The two kept columns (lo < hi) of a group of 4 whose non-zero columns are the set bits of
// `pattern`: the first two of [non-zero columns ascending] ++ [zero columns ascending].
__device__ __forceinline__ void kept_pair(unsigned pattern, int& lo, int& hi) {
  int first = -1, second = -1;
#pragma unroll
  for (int pass = 0; pass < 2; ++pass) {
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const bool nonzero = (pattern >> p) & 1u;
      if (nonzero != (pass == 0)) continue;
      if (first < 0) first = p;
      else if (second < 0) second = p;
    }
  }
  lo = min(first, second);
  hi = max(first, second);
}

template <typename T>
__device__ __forceinline__ T pick(const T (&v)[4], int p) {
  return p == 0 ? v[0] : p == 1 ? v[1] : p == 2 ? v[2] : v[3];
}

// One thread per group of 4 columns; the B/4 threads of a block row sit in one warp, and the row's
// first thread ORs their meta bits together. A warp covers whole consecutive rows, so its loads
// and stores are contiguous.
template <typename T, int B>
__global__ void __launch_bounds__(kThreadsPerCta)
compress_24_kernel(const T* blocks, int64_t n_rows, T* values, int16_t* meta) {
  constexpr int kGroups = B / 4;
  constexpr int kRowsPerWarp = kWarpSize / kGroups;
  const int lane = threadIdx.x % kWarpSize;
  const int group = lane % kGroups;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / kWarpSize;
  const int64_t row = warp * kRowsPerWarp + lane / kGroups;
  const bool active = lane < kRowsPerWarp * kGroups && row < n_rows;
  unsigned bits = 0;
  if (active) {
    const T* src = blocks + row * B + 4 * group;
    T v[4];
    unsigned pattern = 0;
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      v[p] = src[p];
      pattern |= static_cast<unsigned>(is_nonzero(v[p])) << p;
    }
    int lo, hi;
    kept_pair(pattern, lo, hi);
    T* dst = values + row * (B / 2) + 2 * group;
    dst[0] = pick(v, lo);  // raw copies: -0.0 and NaN payloads survive
    dst[1] = pick(v, hi);
    bits = static_cast<unsigned>(lo | hi << 2) << (4 * group);
  }
  unsigned row_bits = bits;
#pragma unroll
  for (int g = 1; g < kGroups; ++g) row_bits |= __shfl_down_sync(kFullWarp, bits, g);
  if (active && group == 0) meta[row] = static_cast<int16_t>(static_cast<uint16_t>(row_bits));
}

// ------------------------------------------------------------------------ host dispatch

// Calls fn(T{}) with the CUDA element type of `dtype`.
template <typename Fn>
cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat16: return fn(__half{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Calls fn(std::integral_constant<int, B>{}) for a block size of 4, 8, 12 or 16.
template <typename Fn>
cudaError_t dispatch_block_size(int block_size, Fn&& fn) {
  switch (block_size) {
    case 4: return fn(std::integral_constant<int, 4>{});
    case 8: return fn(std::integral_constant<int, 8>{});
    case 12: return fn(std::integral_constant<int, 12>{});
    case 16: return fn(std::integral_constant<int, 16>{});
  }
  return cudaErrorInvalidValue;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// CTAs for one warp per block.
unsigned ctas_for_warps(int64_t warps) {
  return static_cast<unsigned>(ceil_div(warps, kWarpsPerCta));
}

}  // namespace

cudaError_t launch_wanda_scores(const void* weight, DType weight_dtype, const void* act_sq_norm,
                                DType norm_dtype, int64_t out_features, int64_t in_features,
                                int block_size, float* scores, float* block_scores,
                                cudaStream_t stream) {
  const int64_t n_block_cols = ceil_div(in_features, block_size);
  const int64_t n_blocks = ceil_div(out_features, block_size) * n_block_cols;
  if (n_blocks == 0) return cudaSuccess;
  return dispatch_dtype(weight_dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_block_size(block_size, [&](auto b) {
      wanda_scores_kernel<T, decltype(b)::value>
          <<<ctas_for_warps(n_blocks), kThreadsPerCta, 0, stream>>>(
              static_cast<const T*>(weight), act_sq_norm, norm_dtype, out_features,
              in_features, n_block_cols, n_blocks, scores, block_scores);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_block_topk_mask(const void* scores, DType dtype, int64_t out_features,
                                   int64_t in_features, int k, int block_size, uint8_t* mask,
                                   cudaStream_t stream) {
  const int64_t n_block_cols = ceil_div(in_features, block_size);
  const int64_t n_blocks = ceil_div(out_features, block_size) * n_block_cols;
  if (n_blocks == 0) return cudaSuccess;
  if (k < 1) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_block_size(block_size, [&](auto b) {
      block_topk_mask_kernel<T, decltype(b)::value>
          <<<ctas_for_warps(n_blocks), kThreadsPerCta, 0, stream>>>(
              static_cast<const T*>(scores), out_features, in_features, n_block_cols, n_blocks,
              k, mask);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_nm_mask(const void* scores, DType dtype, int64_t out_features,
                           int64_t in_features, int n, int m, uint8_t* mask, cudaStream_t stream) {
  if (out_features == 0 || in_features == 0) return cudaSuccess;
  // Columns are 32-bit inside the kernel (a 64-bit modulo per element would dominate it).
  if (n < 1 || m < n || in_features > INT_MAX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(ceil_div(in_features, kThreadsPerCta)),
                  static_cast<unsigned>(out_features < kMaxGridY ? out_features : kMaxGridY));
  const bool groups_in_warp = kWarpSize % m == 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto kernel = groups_in_warp ? nm_mask_kernel<T, true> : nm_mask_kernel<T, false>;
    kernel<<<grid, kThreadsPerCta, 0, stream>>>(static_cast<const T*>(scores), out_features,
                                                static_cast<int>(in_features), n, m, mask);
    return cudaGetLastError();
  });
}

cudaError_t launch_compress_24(const void* blocks, DType dtype, int64_t n_blocks, int block_size,
                               void* values, int16_t* meta, cudaStream_t stream) {
  if (n_blocks == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_block_size(block_size, [&](auto b) {
      constexpr int B = decltype(b)::value;
      constexpr int kRowsPerWarp = kWarpSize / (B / 4);
      const int64_t n_rows = n_blocks * B;
      compress_24_kernel<T, B><<<ctas_for_warps(ceil_div(n_rows, kRowsPerWarp)), kThreadsPerCta,
                                 0, stream>>>(static_cast<const T*>(blocks), n_rows,
                                              static_cast<T*>(values), meta);
      return cudaGetLastError();
    });
  });
}

}  // namespace sparse_kernels_cuda
