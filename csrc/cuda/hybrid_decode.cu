// CUDA decode kernel (1-16 rows of x, fp16 / bf16, B = 16) on the prepared execution layout of
// csrc/cuda/decode_layout.cuh: built to stream the packed bytes at the memory's bandwidth.
//
//  * One warp = one task (a block-row over a byte-balanced segment of its columns); warps share
//    nothing but the CTA's shared memory, in which each owns a ring of kRingChunks x 512 bytes.
//    The grid is one wave (the layout has about kWarpsPerCta * kCtasPerSm tasks per SM), so every
//    SM keeps 32 warps x 3.5 KB = 112 KB of cp.async copies in flight.
//  * The walk (sk_decode::walk_task, shared with the host replay in tests/) copies the task's
//    stream chunk by chunk with cp.async and multiplies each block as soon as its last byte has
//    landed: dense -> one 16-byte shared load per lane + mma.sync; 2:4 -> one 8-byte load and the
//    ready metadata word + mma.sp; top-K -> the K values scattered into the warp's zeroed
//    512-byte tile at their slots, then loaded as a dense block + mma.sync.
//  * x: each lane loads, two blocks ahead, the 4-column run of its token a dense B register pair
//    needs (through L1: x is read by every task of its columns); a 2:4 block's B registers are
//    shuffled out of the same runs.
//  * Split K in the same launch: a block-row with one task stores y directly; otherwise each
//    task stores fp32 partials, and the row's last task (sk_decode::arrive on a tagged 64-bit
//    word per block-row, applied by a CAS loop) sums them in a fixed order (deterministic), adds
//    bias and stores y. Every launch carries a new tag, so a count left by a launch that stopped
//    part-way is discarded rather than trusted.
#include "cuda/decode_layout.cuh"
#include "cuda/launch.h"
#include "cuda/mma_layout.cuh"
#include "cuda/mma_ops.cuh"

#include <algorithm>
#include <atomic>
#include <type_traits>

namespace sparse_kernels_cuda {
namespace {

using sk_decode::kChunkBytes;
using sk_decode::kRingBytes;
using sk_decode::kRingChunks;
using sk_decode::kWarpsPerCta;
using sk_decode::Task;
using sk_mma::kBlock;
using sk_mma::kTokensPerTile;

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct DecodeArgs {
  const T* x;
  const T* bias;           // null: no bias
  T* y;
  float* partials;         // [n_tasks][rows][16], used by rows with several tasks
  const uint8_t* stream;
  const int32_t* tasks;
  const uint32_t* codes;
  unsigned long long* counters;
  uint32_t tag;            // this launch's tag in the split-K words (sk_decode::arrive)
  int64_t rows;
  int64_t out;
  int64_t in;
  int topk;
  int n_tasks;
};

// The ring seen by sk_decode's register builders: stream offsets masked into this warp's ring.
struct SharedRing {
  const uint8_t* base;
  __device__ sk_decode::Words4 load16(int off) const {
    return *reinterpret_cast<const sk_decode::Words4*>(base + sk_decode::ring_offset(off));
  }
  __device__ sk_decode::Words2 load8(int off) const {
    return *reinterpret_cast<const sk_decode::Words2*>(base + sk_decode::ring_offset(off));
  }
  __device__ uint32_t load4(int off) const {
    return *reinterpret_cast<const uint32_t*>(base + sk_decode::ring_offset(off));
  }
  __device__ uint32_t load2(int off) const {
    return *reinterpret_cast<const uint16_t*>(base + sk_decode::ring_offset(off));
  }
  __device__ uint32_t load1(int off) const { return base[sk_decode::ring_offset(off)]; }
};

// The warp's top-K tile seen by sk_decode's top-K phases.
struct SharedTile {
  uint8_t* base;
  __device__ void store16(int off, sk_decode::Words4 v) {
    *reinterpret_cast<sk_decode::Words4*>(base + off) = v;
  }
  __device__ void store2(int off, uint32_t v) {
    *reinterpret_cast<uint16_t*>(base + off) = static_cast<uint16_t>(v);
  }
  __device__ sk_decode::Words4 load16(int off) const {
    return *reinterpret_cast<const sk_decode::Words4*>(base + off);
  }
};

// One warp working on one task: what sk_decode::walk_task calls.
template <typename T, int NT>
struct DecodeWarp {
  static constexpr int kAhead = 2;  // blocks of x loaded ahead of the one multiplied

  const DecodeArgs<T>& p;
  const Task& task;
  uint8_t* ring;
  uint8_t* tile;          // kTileBytes for top-K blocks
  const uint8_t* stream;  // the task's first byte
  int lane;
  int length;             // bytes of the task's stream
  uint32_t codes = 0;     // tier-code word `lane` of the current window
  int code_window = -1;
  uint2 x_runs[kAhead][NT];
  float acc[NT][4] = {};

  __device__ DecodeWarp(const DecodeArgs<T>& args, const Task& t, uint8_t* warp_ring,
                        uint8_t* warp_tile, int l)
      : p(args), task(t), ring(warp_ring), tile(warp_tile),
        stream(args.stream + int64_t{t.stream16} * 16), lane(l), length(t.length16 * 16) {
    load_codes(0);  // with the first x runs, before the first chunk is waited for
#pragma unroll
    for (int a = 0; a < kAhead; ++a)
#pragma unroll
      for (int n = 0; n < NT; ++n) x_runs[a][n] = load_x(a, n);
  }

  __device__ void copy_chunk(int c) {
    const int off = c * kChunkBytes + 16 * lane;
    if (off >= length) return;
    const unsigned dst = static_cast<unsigned>(
        __cvta_generic_to_shared(ring + sk_decode::ring_offset(off)));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(stream + off)
                 : "memory");
  }
  __device__ void commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
  __device__ void wait_oldest() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kRingChunks - 2) : "memory");
    __syncwarp();  // the other lanes' copies are visible too
  }
  __device__ void release() { __syncwarp(); }

  // The lanes load the window's 32 code words, one each (warp-uniform).
  __device__ void load_codes(int window) {
    code_window = window;
    const int word = window * 32 + lane;
    codes = word * sk_decode::kCodesPerWord < task.n_blocks ? __ldg(p.codes + task.code_word + word)
                                                             : 0u;
  }

  __device__ int tier(int block) {
    const int window = block / sk_decode::kCodeWindow;
    if (window != code_window) load_codes(window);
    const int word = (block / sk_decode::kCodesPerWord) % 32;
    return sk_decode::tier_of(__shfl_sync(kFullMask, codes, word), block);
  }

  // This lane's run of 4 x values (token n*8 + g, block columns 4t..4t+3) of block `block`;
  // zero past the task, the tokens or in_features (in % 4 == 0: a run is all in or all out).
  __device__ uint2 load_x(int block, int n) const {
    const int64_t token = int64_t{n} * kTokensPerTile + sk_mma::b_token(lane);
    const int64_t col =
        int64_t{task.first_col + block} * kBlock + sk_mma::dense_b_run_col(lane);
    if (block >= task.n_blocks || token >= p.rows || col >= p.in) return make_uint2(0u, 0u);
    return __ldg(reinterpret_cast<const uint2*>(p.x + token * p.in + col));
  }

  __device__ void multiply(int tier, int block, int offset) {
    const SharedRing r{ring};
    if (tier == sk_decode::kTierS24) {
      uint32_t a[2], meta;
      sk_decode::s24_registers(r, offset, lane, a, meta);
      const int src0 = sk_decode::s24_b_source_lane(lane, 0);
      const int src1 = sk_decode::s24_b_source_lane(lane, 1);
      const bool high = sk_decode::s24_b_source_word(lane) == 1;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const uint2 run = x_runs[0][n];
        const uint32_t lo0 = __shfl_sync(kFullMask, run.x, src0);
        const uint32_t hi0 = __shfl_sync(kFullMask, run.y, src0);
        const uint32_t lo1 = __shfl_sync(kFullMask, run.x, src1);
        const uint32_t hi1 = __shfl_sync(kFullMask, run.y, src1);
        mma_sparse<T>(acc[n], a, make_uint2(high ? hi0 : lo0, high ? hi1 : lo1), meta);
      }
    } else {
      uint32_t a[4];
      if (tier == sk_decode::kTierDense) {
        sk_decode::dense_registers(r, offset, lane, a);
      } else {
        SharedTile t{tile};
        __syncwarp();  // every lane has loaded the previous top-K block from the tile
        sk_decode::topk_zero(t, lane);
        __syncwarp();
        sk_decode::topk_scatter(r, t, offset, p.topk, lane);
        __syncwarp();
        sk_decode::topk_load(t, lane, a);
      }
#pragma unroll
      for (int n = 0; n < NT; ++n) mma_dense<T>(acc[n], a, x_runs[0][n]);
    }
    // Slide the x window: the next block's runs are loaded, fetch the one kAhead ahead.
#pragma unroll
    for (int a = 0; a + 1 < kAhead; ++a)
#pragma unroll
      for (int n = 0; n < NT; ++n) x_runs[a][n] = x_runs[a + 1][n];
#pragma unroll
    for (int n = 0; n < NT; ++n) x_runs[kAhead - 1][n] = load_x(block + kAhead, n);
  }
};

template <typename T>
__device__ __forceinline__ void store_y(const DecodeArgs<T>& p, int64_t token, int64_t o,
                                        float v) {
  p.y[token * p.out + o] = from_float<T>(v + (p.bias ? to_float(p.bias[o]) : 0.f));
}

// y for the task's block-row: directly, or through the partials and the last task of the row.
template <typename T, int NT>
__device__ void finish_task(const DecodeArgs<T>& p, const Task& task, int task_id, int lane,
                            const float (&acc)[NT][4]) {
  const int64_t row0 = int64_t{task.block_row} * kBlock;
  if (task.n_segments == 1) {
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t o = row0 + sk_mma::acc_row(lane, i);
        const int64_t t = n * kTokensPerTile + sk_mma::acc_token(lane, i);
        if (o < p.out && t < p.rows) store_y(p, t, o, acc[n][i]);
      }
    return;
  }
  float* mine = p.partials + int64_t{task_id} * p.rows * kBlock;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t t = n * kTokensPerTile + sk_mma::acc_token(lane, i);
      if (t < p.rows) mine[t * kBlock + sk_mma::acc_row(lane, i)] = acc[n][i];
    }
  // The "last task reduces" handshake: the warp's stores before lane 0's release fence and
  // count; the last task's acquire fence before any lane reads the row's partials.
  __syncwarp();
  unsigned last = 0;
  if (lane == 0) {
    __threadfence();
    unsigned long long* word = p.counters + task.block_row;
    unsigned long long seen = *reinterpret_cast<volatile unsigned long long*>(word), assumed;
    sk_decode::Arrival arrival;
    do {  // the CAS returns the word as it was: retry until no other task counted in between
      assumed = seen;
      arrival = sk_decode::arrive(assumed, p.tag, task.n_segments);
      seen = atomicCAS(word, assumed, static_cast<unsigned long long>(arrival.word));
    } while (seen != assumed);
    last = arrival.last;
    if (last) __threadfence();
  }
  if (!__shfl_sync(kFullMask, last, 0)) return;
  __syncwarp();
  // Sum the row's partials (the plan and its order: decode_layout.cuh, lane_partial_sum).
  const int groups = static_cast<int>(p.rows) * kBlock / 4;
  const int spread = sk_decode::reduce_spread(groups);
  const int64_t stride = p.rows * kBlock;  // floats per task
  const float4* first =
      reinterpret_cast<const float4*>(p.partials + int64_t{task_id - task.segment} * stride);
  const auto load = [&](int seg, int q) {
    const float4 v = __ldcg(first + seg * stride / 4 + q);
    return sk_decode::Floats4{v.x, v.y, v.z, v.w};
  };
  for (int q0 = 0; q0 < groups; q0 += 32 / spread) {  // warp-uniform
    const int q = sk_decode::reduce_group(q0, lane, spread);
    sk_decode::Floats4 sum{0.f, 0.f, 0.f, 0.f};
    if (q < groups) sum = sk_decode::lane_partial_sum(load, q, lane, spread, task.n_segments);
    for (int off = spread / 2; off > 0; off /= 2) {
      sum.x += __shfl_xor_sync(kFullMask, sum.x, off);
      sum.y += __shfl_xor_sync(kFullMask, sum.y, off);
      sum.z += __shfl_xor_sync(kFullMask, sum.z, off);
      sum.w += __shfl_xor_sync(kFullMask, sum.w, off);
    }
    if (q >= groups || !sk_decode::reduce_stores(lane, spread)) continue;
    const int e = 4 * q;  // token e / 16, rows e % 16 .. + 3 of the block-row
    const float sums[4] = {sum.x, sum.y, sum.z, sum.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t o = row0 + (e + j) % kBlock;
      if (o < p.out) store_y(p, (e + j) / kBlock, o, sums[j]);
    }
  }
}

template <typename T, int NT>
__global__ void __launch_bounds__(kWarpsPerCta * 32, sk_decode::kCtasPerSm)
hybrid_decode_kernel(const DecodeArgs<T> p) {
  extern __shared__ uint4 rings[];  // kWarpsPerCta rings of kRingBytes, then their top-K tiles
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int task_id = blockIdx.x * kWarpsPerCta + warp;
  if (task_id >= p.n_tasks) return;  // the warps of a CTA never wait for each other
  const int4* words = reinterpret_cast<const int4*>(p.tasks) + 2 * int64_t{task_id};
  const int4 w0 = __ldg(words), w1 = __ldg(words + 1);
  const Task task{w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};

  uint8_t* shared = reinterpret_cast<uint8_t*>(rings);
  DecodeWarp<T, NT> walker(p, task, shared + warp * kRingBytes,
                           shared + kWarpsPerCta * kRingBytes + warp * sk_decode::kTileBytes, lane);
  sk_decode::walk_task(walker, task, p.topk);
  finish_task<T, NT>(p, task, task_id, lane, walker.acc);
}

constexpr size_t kSharedPerCta = size_t{kWarpsPerCta} * (kRingBytes + sk_decode::kTileBytes);

// Ask once per kernel and device for the shared-memory carveout of kCtasPerSm CTAs (plus the 1 KB
// per CTA the system keeps) and no more: the rest of the SM's 256 KB stays L1, which serves the
// x loads.
template <typename T, int NT>
cudaError_t prefer_carveout() {
  static std::atomic<uint64_t> configured{0};  // one bit per device index
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = dev < 64 ? uint64_t{1} << dev : 0;
  if (bit && (configured.load() & bit)) return cudaSuccess;
  int max_shared = 0;
  err = cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  if (err != cudaSuccess || max_shared <= 0) return err;
  const size_t needed = sk_decode::kCtasPerSm * (kSharedPerCta + 1024);
  const int percent = static_cast<int>(std::min<size_t>(100, (needed * 100 + max_shared - 1) /
                                                                 static_cast<size_t>(max_shared)));
  err = cudaFuncSetAttribute(hybrid_decode_kernel<T, NT>,
                             cudaFuncAttributePreferredSharedMemoryCarveout, percent);
  if (err == cudaSuccess) configured.fetch_or(bit);
  return err;
}

template <typename T, int NT>
cudaError_t launch_tile(const DecodeArgs<T>& args, cudaStream_t stream) {
  if (const cudaError_t err = prefer_carveout<T, NT>(); err != cudaSuccess) return err;
  const unsigned ctas = static_cast<unsigned>((args.n_tasks + kWarpsPerCta - 1) / kWarpsPerCta);
  hybrid_decode_kernel<T, NT><<<ctas, kWarpsPerCta * 32, kSharedPerCta, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const DecodeArgs<T>& args, cudaStream_t stream) {
  return args.rows <= kTokensPerTile ? launch_tile<T, 1>(args, stream)
                                     : launch_tile<T, 2>(args, stream);
}

}  // namespace

size_t hybrid_decode_workspace_bytes(const DecodeLayout& layout, int64_t rows) {
  if (layout.n_tasks <= layout.n_block_rows) return 0;  // one task per row: no partials
  return sizeof(float) * static_cast<size_t>(layout.n_tasks) * rows * kBlock;
}

cudaError_t launch_hybrid_decode(const void* x, int64_t rows, const DecodeLayout& layout,
                                 const void* bias, void* y, DType dtype, void* workspace,
                                 cudaStream_t stream) {
  if (rows == 0 || layout.out_features == 0) return cudaSuccess;
  if (rows > sk_decode::kMaxTokens || layout.in_features % 4 != 0 || layout.n_tasks <= 0)
    return cudaErrorInvalidValue;
  if (hybrid_decode_workspace_bytes(layout, rows) > 0 && workspace == nullptr)
    return cudaErrorInvalidValue;
  // A new tag per launch (sk_decode::arrive); a CUDA graph replays the tag it captured.
  static std::atomic<uint32_t> next_tag{1};
  const uint32_t tag = next_tag.fetch_add(1, std::memory_order_relaxed);
  const auto fill = [&](auto* typed_x) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(typed_x)>>;
    return DecodeArgs<T>{typed_x, static_cast<const T*>(bias), static_cast<T*>(y),
                         static_cast<float*>(workspace), layout.stream, layout.tasks,
                         layout.codes, layout.counters, tag, rows, layout.out_features,
                         layout.in_features, layout.topk, layout.n_tasks};
  };
  switch (dtype) {
    case DType::kFloat16: return launch_typed(fill(static_cast<const __half*>(x)), stream);
    case DType::kBFloat16:
      return launch_typed(fill(static_cast<const __nv_bfloat16*>(x)), stream);
    case DType::kFloat32: break;  // tensor cores only: fp32 takes the canonical kernel
  }
  return cudaErrorInvalidValue;
}

}  // namespace sparse_kernels_cuda
