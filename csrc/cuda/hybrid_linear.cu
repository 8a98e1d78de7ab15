// CUDA hybrid matmul: y = x @ W^T (+ bias) from the packed three-tier format
// (sparse_kernels/format.py), fp32 accumulation.
//
// Tensor-core path (B = 16, fp16 / bf16, sm_80+): a CTA of kWarps warps owns kWarps block-rows
// (16 out features each) x one tile of 8*NT tokens x one range of block columns ("split").
//  * The CTA stages x for XChunk<NT>::kBlocks block columns at a time in shared memory,
//    zero-padded past in_features and past the last token, so the inner loops never bound-check.
//    Every block-row has exactly one block (of some tier) in each block column, so the whole
//    staged chunk is used by every warp.
//  * Each warp walks its block-row's three CSR lists with one cursor each, in column order:
//    dense blocks -> mma.sync m16n8k16; 2:4 blocks -> mma.sp m16n8k16 straight from the canonical
//    values and meta (they already are the instruction's compressed A and per-row metadata);
//    top-K blocks -> scattered into a zeroed 16x16 tile in shared memory, then mma.sync.
//    Which lane loads what: mma_layout.cuh (checked on CPU by tests/test_mma_layout.py).
//  * Epilogue: one split -> bias + conversion, stored to y. Several splits (few tokens, so few
//    CTAs otherwise: decode) -> fp32 partial sums to the workspace, [split][rows][out], then a
//    second kernel sums the splits in a fixed order (deterministic, no atomics, no zeroing pass),
//    adds bias and converts.
// CUDA-core path (fp32, B != 16, pre-sm_80): one thread per output element walks its block-row's
// CSR lists. Correct for every format the packed layout allows; not tuned.
#include "cuda/launch.h"
#include "cuda/mma_layout.cuh"
#include "cuda/mma_ops.cuh"

#include <algorithm>
#include <type_traits>

namespace sparse_kernels_cuda {
namespace {

using sk_mma::kBlock;
using sk_mma::kHalfBlock;
using sk_mma::kTokensPerTile;

constexpr int kWarps = 8;                        // block-rows per CTA
constexpr int kThreads = kWarps * 32;
constexpr int kMaxTileN = 16;                    // n-tiles of 8 tokens per warp, at most

// Block columns of x staged at a time for NT n-tiles: about 8 KiB of x whatever the token
// count, so few-token (decode) CTAs stage their whole column range at once and each warp then
// streams many weight blocks without a barrier in between.
template <int NT> struct XChunk {
  static constexpr int kBlocks = NT >= 8 ? 4 : 32 / NT;
  static constexpr int kCols = kBlocks * kBlock;
  // Row stride in elements: kCols / 2 words is a multiple of 32 banks; 16 more elements shift
  // consecutive tokens by 8 banks, so the 8-byte B reads of a half-warp (4 tokens x 32 bytes)
  // are conflict-free.
  static constexpr int kStride = kCols + 16;
  static constexpr int kTokens = NT * kTokensPerTile;
};
constexpr int kTargetCtasPerSm = 4;
constexpr int kMinSplitBlocks = 4;               // block columns per split, at least
constexpr int kSimtThreads = 256;

// ------------------------------------------------------------------------------ kernel arguments
template <typename T>
struct MmaArgs {
  const T* x;
  const T* bias;          // null: no bias
  T* y;                   // written when splits == 1
  float* partials;        // [splits][rows][out], written when splits > 1
  PackedWeight w;
  int64_t rows;
  int n_block_rows;
  int n_block_cols;
  int split_block_cols;   // block columns per split
};

// First index in [lo, hi) of the ascending cols whose block column is >= col. Warp-uniform.
__device__ __forceinline__ int lower_bound(const int32_t* cols, int lo, int hi, int col) {
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (cols[mid] < col) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// One warp's walk over one tier of its block-row, in column order: [next, end) of the tier's
// CSR arrays.
struct TierCursor {
  int next = 0, end = 0;

  TierCursor() = default;
  __device__ TierCursor(const int32_t* rowptr, const int32_t* cols, int br, int first_col)
      : next(lower_bound(cols, rowptr[br], rowptr[br + 1], first_col)), end(rowptr[br + 1]) {}

  // End of the run of blocks with column < limit. A block-row has at most one block per column,
  // so that run is at most `width` long.
  __device__ int stop_before(const int32_t* cols, int limit, int width) const {
    return lower_bound(cols, next, min(end, next + width), limit);
  }
};

// ------------------------------------------------------------------------------ x staging
// xs[token][c] = x[tok0 + token][col0 + c] for c < XChunk::kCols, 0 outside x. 16-byte loads when
// every 8-column group is either whole inside x or whole outside it, and aligned.
template <typename T, int NT>
__device__ void stage_x_chunk(const MmaArgs<T>& p, int64_t tok0, int64_t col0, T* xs,
                              bool vector_ok) {
  using C = XChunk<NT>;
  const int64_t in = p.w.in_features;
  if (vector_ok) {
    constexpr int kVec = 8, kVecPerRow = C::kCols / kVec;
    for (int v = threadIdx.x; v < C::kTokens * kVecPerRow; v += kThreads) {
      const int token = v / kVecPerRow, c = (v % kVecPerRow) * kVec;
      const int64_t row = tok0 + token, col = col0 + c;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (row < p.rows && col < in) val = *reinterpret_cast<const uint4*>(p.x + row * in + col);
      *reinterpret_cast<uint4*>(xs + token * C::kStride + c) = val;
    }
  } else {
    for (int e = threadIdx.x; e < C::kTokens * C::kCols; e += kThreads) {
      const int token = e / C::kCols, c = e % C::kCols;
      const int64_t row = tok0 + token, col = col0 + c;
      xs[token * C::kStride + c] =
          (row < p.rows && col < in) ? p.x[row * in + col] : from_float<T>(0.f);
    }
  }
}

// ------------------------------------------------------------------------------ per-tier blocks
// Each multiplies one block into the warp's accumulators acc[NT][4]; xc points at the staged x
// columns of the block (token 0, block column 0).
template <typename T, int NT>
__device__ __forceinline__ void multiply_dense_tile(const T* tile, const T* xc, int lane,
                                                    float (&acc)[NT][4]) {
  constexpr int kStride = XChunk<NT>::kStride;
  const uint2 runs[2] = {load_run(tile + sk_mma::dense_a_run_offset(lane, 0)),
                         load_run(tile + sk_mma::dense_a_run_offset(lane, 1))};
  uint32_t a[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const uint2 run = runs[sk_mma::dense_a_reg_run(r)];
    a[r] = sk_mma::dense_a_reg_word(r) == 0 ? run.x : run.y;
  }
  const T* xb = xc + sk_mma::b_token(lane) * kStride + sk_mma::dense_b_run_col(lane);
#pragma unroll
  for (int n = 0; n < NT; ++n) mma_dense<T>(acc[n], a, load_run(xb + n * kTokensPerTile * kStride));
}

template <typename T, int NT>
__device__ __forceinline__ void multiply_s24_block(const T* vals, const int16_t* meta,
                                                   const T* xc, int lane, float (&acc)[NT][4]) {
  constexpr int kStride = XChunk<NT>::kStride;
  const uint32_t a[2] = {load_word(vals + sk_mma::s24_a_offset(lane, 0)),
                         load_word(vals + sk_mma::s24_a_offset(lane, 1))};
  const uint32_t m = sk_mma::meta_register(meta[sk_mma::s24_meta_row(lane, 0)],
                                           meta[sk_mma::s24_meta_row(lane, 1)]);
  const T* xb = xc + sk_mma::b_token(lane) * kStride;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const T* xt = xb + n * kTokensPerTile * kStride;
    const uint2 b = make_uint2(load_word(xt + sk_mma::s24_b_col(lane, 0)),
                               load_word(xt + sk_mma::s24_b_col(lane, 1)));
    mma_sparse<T>(acc[n], a, b, m);
  }
}

// Expands a top-K block into the warp's zeroed 16x16 tile, then multiplies it as a dense block.
template <typename T, int NT>
__device__ __forceinline__ void multiply_topk_block(const T* vals, const uint8_t* pos, int k,
                                                    T* tile, const T* xc, int lane,
                                                    float (&acc)[NT][4]) {
  static_assert(kBlock * kBlock * sizeof(T) == 32 * sizeof(uint4), "one 16-byte store per lane");
  __syncwarp();  // every lane is done reading the previous block's tile
  reinterpret_cast<uint4*>(tile)[lane] = make_uint4(0, 0, 0, 0);
  __syncwarp();
  for (int s = lane; s < k; s += 32) tile[sk_mma::topk_tile_offset(pos[s])] = vals[s];
  __syncwarp();
  multiply_dense_tile<T, NT>(tile, xc, lane, acc);
}

// ------------------------------------------------------------------------------ epilogue
template <typename T, int NT>
__device__ void store_accumulators(const MmaArgs<T>& p, int br, int64_t tok0, int lane,
                                   const float (&acc)[NT][4]) {
  const int64_t out = p.w.out_features;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t o = int64_t{br} * kBlock + sk_mma::acc_row(lane, i);
      const int64_t t = tok0 + n * kTokensPerTile + sk_mma::acc_token(lane, i);
      if (o >= out || t >= p.rows) continue;
      if (gridDim.z == 1) {
        const float b = p.bias ? to_float(p.bias[o]) : 0.f;
        p.y[t * out + o] = from_float<T>(acc[n][i] + b);
      } else {
        p.partials[(int64_t{blockIdx.z} * p.rows + t) * out + o] = acc[n][i];
      }
    }
}

// ------------------------------------------------------------------------------ main kernel
// grid: x = token tiles of 8*NT tokens, y = groups of kWarps block-rows, z = column splits.
template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, 2)
hybrid_mma_kernel(const MmaArgs<T> p, bool vector_x) {
  using C = XChunk<NT>;
  __shared__ __align__(16) T xs[C::kTokens * C::kStride];
  __shared__ __align__(16) T topk_tiles[kWarps][kBlock * kBlock];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int br = blockIdx.y * kWarps + warp;
  const bool has_row = br < p.n_block_rows;  // warp-uniform; rowless warps still stage x
  const int64_t tok0 = int64_t{blockIdx.x} * C::kTokens;
  const int first_col = blockIdx.z * p.split_block_cols;
  const int last_col = min(first_col + p.split_block_cols, p.n_block_cols);
  const PackedWeight& w = p.w;
  const T* dense_vals = static_cast<const T*>(w.dense_vals);
  const T* s24_vals = static_cast<const T*>(w.s24_vals);
  const T* topk_vals = static_cast<const T*>(w.topk_vals);

  TierCursor dense, s24, topk;
  if (has_row) {
    dense = TierCursor(w.dense_rowptr, w.dense_cols, br, first_col);
    s24 = TierCursor(w.s24_rowptr, w.s24_cols, br, first_col);
    topk = TierCursor(w.topk_rowptr, w.topk_cols, br, first_col);
  }

  float acc[NT][4] = {};
  for (int chunk = first_col; chunk < last_col; chunk += C::kBlocks) {
    __syncthreads();  // the previous chunk is no longer read
    stage_x_chunk<T, NT>(p, tok0, int64_t{chunk} * kBlock, xs, vector_x);
    __syncthreads();
    const int limit = min(chunk + C::kBlocks, last_col), width = limit - chunk;
    const auto x_at = [&](const int32_t* cols, int e) { return xs + (cols[e] - chunk) * kBlock; };

    const int dense_stop = dense.stop_before(w.dense_cols, limit, width);
#pragma unroll 2
    for (int e = dense.next; e < dense_stop; ++e)
      multiply_dense_tile<T, NT>(dense_vals + int64_t{e} * kBlock * kBlock,
                                 x_at(w.dense_cols, e), lane, acc);
    dense.next = dense_stop;

    const int s24_stop = s24.stop_before(w.s24_cols, limit, width);
#pragma unroll 2
    for (int e = s24.next; e < s24_stop; ++e)
      multiply_s24_block<T, NT>(s24_vals + int64_t{e} * kBlock * kHalfBlock,
                                w.s24_meta + int64_t{e} * kBlock, x_at(w.s24_cols, e), lane, acc);
    s24.next = s24_stop;

    const int topk_stop = topk.stop_before(w.topk_cols, limit, width);
    for (int e = topk.next; e < topk_stop; ++e)
      multiply_topk_block<T, NT>(topk_vals + int64_t{e} * w.topk, w.topk_pos + int64_t{e} * w.topk,
                                 w.topk, topk_tiles[warp], x_at(w.topk_cols, e), lane, acc);
    topk.next = topk_stop;
  }
  if (has_row) store_accumulators<T, NT>(p, br, tok0, lane, acc);
}

// y = sum over splits of partials (fixed order) + bias, converted.
template <typename T>
__global__ void reduce_splits_kernel(const float* partials, int splits, int64_t rows,
                                     int64_t out, const T* bias, T* y) {
  const int64_t n = rows * out;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < n;
       idx += int64_t{gridDim.x} * blockDim.x) {
    float s = bias ? to_float(bias[idx % out]) : 0.f;
    for (int k = 0; k < splits; ++k) s += partials[k * n + idx];
    y[idx] = from_float<T>(s);
  }
}

// ------------------------------------------------------------------------------ CUDA-core path
// One thread per y element: walks the block-row's dense, 2:4 and top-K blocks for its row.
template <typename T>
__global__ void hybrid_simt_kernel(const T* x, int64_t rows, const PackedWeight w, const T* bias,
                                   T* y) {
  const int64_t out = w.out_features, in = w.in_features;
  const int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (idx >= rows * out) return;
  const int64_t t = idx / out, o = idx % out;
  const int B = w.block_size, br = static_cast<int>(o / B), r = static_cast<int>(o % B);
  const T* xr = x + t * in;
  const auto x_at = [&](int block_col, int c) {
    const int64_t col = int64_t{block_col} * B + c;
    return col < in ? to_float(xr[col]) : 0.f;  // zero-padded edge blocks meet x's padding
  };
  float acc = bias ? to_float(bias[o]) : 0.f;

  const T* dense = static_cast<const T*>(w.dense_vals);
  for (int e = w.dense_rowptr[br]; e < w.dense_rowptr[br + 1]; ++e) {
    const T* row = dense + (int64_t{e} * B + r) * B;
    for (int c = 0; c < B; ++c) acc += to_float(row[c]) * x_at(w.dense_cols[e], c);
  }
  const T* s24 = static_cast<const T*>(w.s24_vals);
  for (int e = w.s24_rowptr[br]; e < w.s24_rowptr[br + 1]; ++e) {
    const T* row = s24 + (int64_t{e} * B + r) * (B / 2);
    const uint32_t bits = static_cast<uint16_t>(w.s24_meta[int64_t{e} * B + r]);
    for (int j = 0; j < B / 2; ++j) {
      const int c = 4 * (j / 2) + static_cast<int>((bits >> (2 * j)) & 3u);
      acc += to_float(row[j]) * x_at(w.s24_cols[e], c);
    }
  }
  const T* topk = static_cast<const T*>(w.topk_vals);
  for (int e = w.topk_rowptr[br]; e < w.topk_rowptr[br + 1]; ++e) {
    for (int s = 0; s < w.topk; ++s) {
      const int p = w.topk_pos[int64_t{e} * w.topk + s];
      if (p / B == r) acc += to_float(topk[int64_t{e} * w.topk + s]) * x_at(w.topk_cols[e], p % B);
    }
  }
  y[idx] = from_float<T>(acc);
}

// ------------------------------------------------------------------------------ host side
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Everything the launch decides from the shapes; hybrid_linear_workspace_bytes and
// launch_hybrid_linear both use it, so the workspace always matches the launch.
struct LaunchPlan {
  bool tensor_cores = false;
  int tile_n = 1;          // NT: n-tiles of 8 tokens per warp
  int64_t token_tiles = 0;
  int64_t row_groups = 0;
  int splits = 1;
  int split_block_cols = 0;
  size_t workspace_bytes = 0;
};

cudaError_t device_info(int* major, int* sms) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev);
  return err;
}

cudaError_t make_plan(const PackedWeight& w, int64_t rows, DType dtype, LaunchPlan* plan) {
  int major = 0, sms = 0;
  if (const cudaError_t err = device_info(&major, &sms); err != cudaSuccess) return err;
  LaunchPlan p;
  p.tensor_cores = w.block_size == kBlock && dtype != DType::kFloat32 && major >= 8;
  if (!p.tensor_cores || rows == 0 || w.out_features == 0) {
    *plan = p;
    return cudaSuccess;
  }
  while (p.tile_n < kMaxTileN && p.tile_n * kTokensPerTile < rows) p.tile_n *= 2;
  p.token_tiles = ceil_div(rows, p.tile_n * kTokensPerTile);
  const int64_t n_block_rows = ceil_div(w.out_features, kBlock);
  const int64_t n_block_cols = ceil_div(w.in_features, kBlock);
  p.row_groups = ceil_div(n_block_rows, kWarps);
  // Split the reduction only when the grid would otherwise leave most SMs idle (decode).
  const int64_t ctas = p.row_groups * p.token_tiles, target = int64_t{kTargetCtasPerSm} * sms;
  int64_t splits = 1;
  if (2 * ctas < target)
    splits = std::clamp<int64_t>(ceil_div(target, ctas), 1,
                                 std::max<int64_t>(1, n_block_cols / kMinSplitBlocks));
  p.split_block_cols = static_cast<int>(std::max<int64_t>(1, ceil_div(n_block_cols, splits)));
  p.splits = static_cast<int>(std::max<int64_t>(1, ceil_div(n_block_cols, p.split_block_cols)));
  if (p.splits > 1)
    p.workspace_bytes = sizeof(float) * static_cast<size_t>(p.splits) * rows * w.out_features;
  *plan = p;
  return cudaSuccess;
}

template <typename T, int NT>
cudaError_t launch_mma(const MmaArgs<T>& args, const LaunchPlan& plan, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.token_tiles), static_cast<unsigned>(plan.row_groups),
                  static_cast<unsigned>(plan.splits));
  const bool vector_x = args.w.in_features % 8 == 0 &&
                        reinterpret_cast<uintptr_t>(args.x) % 16 == 0;
  hybrid_mma_kernel<T, NT><<<grid, kThreads, 0, stream>>>(args, vector_x);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_tensor_cores(const T* x, int64_t rows, const PackedWeight& w, const T* bias,
                                T* y, void* workspace, const LaunchPlan& plan,
                                cudaStream_t stream) {
  MmaArgs<T> args{x, bias, y, static_cast<float*>(workspace), w, rows,
                  static_cast<int>(ceil_div(w.out_features, kBlock)),
                  static_cast<int>(ceil_div(w.in_features, kBlock)), plan.split_block_cols};
  cudaError_t err = cudaSuccess;
  switch (plan.tile_n) {
    case 1: err = launch_mma<T, 1>(args, plan, stream); break;
    case 2: err = launch_mma<T, 2>(args, plan, stream); break;
    case 4: err = launch_mma<T, 4>(args, plan, stream); break;
    case 8: err = launch_mma<T, 8>(args, plan, stream); break;
    default: err = launch_mma<T, kMaxTileN>(args, plan, stream); break;
  }
  if (err != cudaSuccess || plan.splits == 1) return err;
  const int64_t n = rows * w.out_features;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(n, kSimtThreads), 65535));
  reduce_splits_kernel<T><<<blocks, kSimtThreads, 0, stream>>>(
      static_cast<const float*>(workspace), plan.splits, rows, w.out_features, bias, y);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_simt(const T* x, int64_t rows, const PackedWeight& w, const T* bias, T* y,
                        cudaStream_t stream) {
  const int64_t blocks = ceil_div(rows * w.out_features, kSimtThreads);
  hybrid_simt_kernel<T><<<static_cast<unsigned>(blocks), kSimtThreads, 0, stream>>>(x, rows, w,
                                                                                    bias, y);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const void* x, int64_t rows, const PackedWeight& w, const void* bias,
                         void* y, void* workspace, const LaunchPlan& plan, cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  const T* bt = static_cast<const T*>(bias);
  T* yt = static_cast<T*>(y);
  if constexpr (std::is_same_v<T, float>) {
    return launch_simt(xt, rows, w, bt, yt, stream);
  } else {
    if (!plan.tensor_cores) return launch_simt(xt, rows, w, bt, yt, stream);
    return launch_tensor_cores(xt, rows, w, bt, yt, workspace, plan, stream);
  }
}

}  // namespace

size_t hybrid_linear_workspace_bytes(const PackedWeight& w, int64_t rows, DType dtype) {
  LaunchPlan plan;
  return make_plan(w, rows, dtype, &plan) == cudaSuccess ? plan.workspace_bytes : 0;
}

cudaError_t launch_hybrid_linear(const void* x, int64_t rows, const PackedWeight& w,
                                 const void* bias, void* y, DType dtype, void* workspace,
                                 cudaStream_t stream) {
  if (rows == 0 || w.out_features == 0) return cudaSuccess;
  LaunchPlan plan;
  if (const cudaError_t err = make_plan(w, rows, dtype, &plan); err != cudaSuccess) return err;
  if (plan.workspace_bytes > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return launch_typed<float>(x, rows, w, bias, y, workspace, plan, stream);
    case DType::kFloat16: return launch_typed<__half>(x, rows, w, bias, y, workspace, plan, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(x, rows, w, bias, y, workspace, plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace sparse_kernels_cuda
