// The decode kernel's prepared execution layout (built once per weight by
// sparse_kernels/decode_layout.py) and the kernel's walk over it, written once for the GPU
// (csrc/cuda/hybrid_decode.cu) and for a host replay (tests/csrc/decode_replay.cpp) that runs the
// same walk with a checked, emulated ring buffer. Plain C++17 apart from SK_HD.
//
// Tasks. A task is one block-row (16 output features) over one segment of its block columns; the
// segments of a block-row are cut so that every task carries about the same number of bytes.
// Each task's blocks, in column order, are one contiguous, 16-byte aligned byte stream; the whole
// stream is the tasks' streams back to back (= every block in row-major order). A block's tier is
// a 2-bit code (16 per 32-bit word, block i of a task in bits 2*(i%16) of its word i/16), so the
// kernel finds each block by adding the previous block's size: no index searches at run time.
//
// Block images (16-bit values: fp16 / bf16), every size a multiple of 16 bytes:
//   dense  512 B: lane L's four A registers of mma.m16n8k16 (mma_layout.cuh's permuted k axis) at
//          bytes 16*L .. 16*L+15, one 16-byte load per lane.
//   2:4    288 B: the kept values, lane L's two sparse-A registers at 8*L (one 8-byte load; the
//          element order of s24_element), then 8 ready metadata registers (meta[g] | meta[g+8]
//          << 16) at 256 + 4*g.
//   top-K  round_up(3K, 16) B: K values, then K slot bytes, slot = 8 * lane + element, element e
//          = half e%2 of A register e/2 of that lane (the dense A order); padding after. The
//          lanes scatter the values into a zeroed 512-byte tile per warp at 2 * slot and then
//          load it as a dense image (a few instructions per lane, where picking them out of the K
//          pairs with selects costs about 20 per pair per lane).
//
// The walk. Each warp streams its task through its own ring of kRingChunks chunks of 512 bytes in
// shared memory (one 16-byte cp.async per lane per chunk, kRingChunks - 1 chunks in flight). At
// step c it waits for chunk c, multiplies every block whose last byte has landed, releases the
// ring and starts chunk c + kRingChunks - 1 into the slot chunk c - 1 used: a block spans at most
// two chunks (no image is larger than a chunk), so every block that touched chunk c - 1 has been
// multiplied by then.
#pragma once

#include <cstdint>

#include "cuda/mma_layout.cuh"

namespace sk_decode {

using sk_mma::group_of;
using sk_mma::thread_in_group;

constexpr int kChunkBytes = 512;
constexpr int kRingChunks = 8;                       // a power of two
constexpr int kRingBytes = kChunkBytes * kRingChunks;
constexpr int kCodesPerWord = 16;
constexpr int kCodeWindow = 32 * kCodesPerWord;      // blocks whose codes a warp holds at once
constexpr int kMaxTokens = 16;                       // rows of x the decode kernel takes
// Warps per CTA and CTAs per SM the kernel is built for (__launch_bounds__); the layout builder
// sizes the tasks for kWarpsPerCta * kCtasPerSm warps per SM (one wave).
constexpr int kWarpsPerCta = 4;
constexpr int kCtasPerSm = 8;

constexpr int kTierDense = 0, kTierS24 = 1, kTierTopk = 2;
constexpr int kDenseBytes = 512;
constexpr int kS24ValueBytes = 256;
constexpr int kS24Bytes = kS24ValueBytes + 8 * 4;
constexpr int kMaxTopk = 170;                        // K whose image fits in one chunk
constexpr int kTileBytes = 512;                      // per warp, for top-K blocks

SK_HD constexpr int topk_bytes(int k) { return (3 * k + 15) / 16 * 16; }

static_assert((kRingChunks & (kRingChunks - 1)) == 0, "ring offsets are masked");
static_assert(kDenseBytes <= kChunkBytes && kS24Bytes <= kChunkBytes &&
                  topk_bytes(kMaxTopk) <= kChunkBytes,
              "a block must span at most two chunks: the walk refills a chunk's slot once the "
              "blocks that end in the next chunk are done");

// One task: 8 int32 (the tasks tensor is [n_tasks, 8] in this order).
struct Task {
  int32_t stream16;    // first byte of its stream / 16
  int32_t length16;    // bytes of its stream / 16
  int32_t first_col;   // block column of its first block
  int32_t n_blocks;
  int32_t block_row;
  int32_t code_word;   // index of its first tier-code word
  int32_t segment;     // 0 .. n_segments - 1 within the block-row; a row's tasks are consecutive
  int32_t n_segments;
};
static_assert(sizeof(Task) == 32, "tasks are read as two 16-byte words");

SK_HD int tier_bytes(int tier, int k) {
  return tier == kTierDense ? kDenseBytes : tier == kTierS24 ? kS24Bytes : topk_bytes(k);
}
SK_HD int tier_of(uint32_t code_word, int block) {
  return static_cast<int>((code_word >> (2 * (block % kCodesPerWord))) & 3u);
}
SK_HD int ring_offset(int stream_offset) { return stream_offset & (kRingBytes - 1); }

// ---- byte offsets inside a block image
SK_HD int dense_lane_offset(int lane) { return 16 * lane; }
SK_HD int s24_lane_offset(int lane) { return 8 * lane; }
SK_HD int s24_meta_offset(int lane) { return kS24ValueBytes + 4 * group_of(lane); }
SK_HD int topk_value_offset(int s) { return 2 * s; }
SK_HD int topk_slot_offset(int k, int s) { return 2 * k + s; }

// Element e (0..7) of a lane's dense A registers (half e % 2 of register e / 2) is this element
// (row * 16 + col) of the block: the order of the dense image and of top-K slots.
SK_HD int dense_element(int lane, int e) {
  const int reg = e >> 1;
  return sk_mma::dense_a_run_offset(lane, sk_mma::dense_a_reg_run(reg)) +
         2 * sk_mma::dense_a_reg_word(reg) + (e & 1);
}
// Element e (0..3) of a lane's 2:4 A registers is this element (row * 8 + slot) of the block's
// canonical [16][8] kept values: the order of the 2:4 image.
SK_HD int s24_element(int lane, int e) {
  return sk_mma::s24_a_offset(lane, e >> 1) + (e & 1);
}
// ---- x: every lane loads, per block and n-tile, the run of 4 block columns of its token that a
// dense B register pair needs (mma_layout.cuh: token g, columns 4t..4t+3). A 2:4 block's B
// register r is word s24_b_source_word of the run of lane s24_b_source_lane(lane, r): columns
// 2t, 2t+1 (r = 0) and 2t+8, 2t+9 (r = 1), fetched with warp shuffles.
SK_HD int s24_b_source_lane(int lane, int reg) {
  return 4 * group_of(lane) + (thread_in_group(lane) >> 1) + 2 * reg;
}
SK_HD int s24_b_source_word(int lane) { return thread_in_group(lane) & 1; }

// ---- building a lane's A registers from the ring. Ring provides load16/load8/load4/load2/load1
// at stream offsets (it masks them into the ring), returning the bytes as 32-bit words.
struct alignas(8) Words2 { uint32_t x, y; };
struct alignas(16) Words4 { uint32_t x, y, z, w; };

template <class Ring>
SK_HD void dense_registers(const Ring& ring, int offset, int lane, uint32_t (&a)[4]) {
  const Words4 v = ring.load16(offset + dense_lane_offset(lane));
  a[0] = v.x; a[1] = v.y; a[2] = v.z; a[3] = v.w;
}

template <class Ring>
SK_HD void s24_registers(const Ring& ring, int offset, int lane, uint32_t (&a)[2],
                         uint32_t& meta) {
  const Words2 v = ring.load8(offset + s24_lane_offset(lane));
  a[0] = v.x; a[1] = v.y;
  meta = ring.load4(offset + s24_meta_offset(lane));
}

// Top-K in three phases with a warp barrier between them (the host replay runs each phase for
// all 32 lanes before the next): zero the warp's tile, scatter the K values to their slots, load
// the lane's 16 bytes as a dense block's. Tile provides store16 / store2 / load16 at byte offsets.
template <class Tile>
SK_HD void topk_zero(Tile& tile, int lane) {
  tile.store16(dense_lane_offset(lane), Words4{0u, 0u, 0u, 0u});
}
template <class Ring, class Tile>
SK_HD void topk_scatter(const Ring& ring, Tile& tile, int offset, int k, int lane) {
  for (int s = lane; s < k; s += 32)
    tile.store2(2 * static_cast<int>(ring.load1(offset + topk_slot_offset(k, s))),
                ring.load2(offset + topk_value_offset(s)));
}
template <class Tile>
SK_HD void topk_load(const Tile& tile, int lane, uint32_t (&a)[4]) {
  const Words4 v = tile.load16(dense_lane_offset(lane));
  a[0] = v.x; a[1] = v.y; a[2] = v.z; a[3] = v.w;
}

// ---- the walk over one task (see the top of this file). Warp provides copy_chunk(c), commit(),
// wait_oldest() (chunk c of step c has landed and is visible to every lane), release() (every
// lane is done reading the ring), tier(block) and multiply(tier, block, stream offset).
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <class Warp>
SK_HD void walk_task(Warp& warp, const Task& task, int topk) {
  const int length = task.length16 * 16;
  const int chunks = (length + kChunkBytes - 1) / kChunkBytes;
  for (int c = 0; c < kRingChunks - 1; ++c) {
    if (c < chunks) warp.copy_chunk(c);
    warp.commit();  // one group per step, empty ones too: wait_oldest counts groups
  }
  int offset = 0, block = 0;
  for (int c = 0; c < chunks; ++c) {
    warp.wait_oldest();
    const int landed = (c + 1) * kChunkBytes < length ? (c + 1) * kChunkBytes : length;
    while (block < task.n_blocks) {
      const int tier = warp.tier(block);
      const int bytes = tier_bytes(tier, topk);
      if (offset + bytes > landed) break;
      warp.multiply(tier, block, offset);
      offset += bytes;
      ++block;
    }
    warp.release();
    if (c + kRingChunks - 1 < chunks) warp.copy_chunk(c + kRingChunks - 1);
    warp.commit();
  }
}

// ---- the split-K handshake: which task of a block-row is its last. Each row has one 64-bit word,
// the tag of the launch that last counted in it (high 32 bits) and that launch's finished tasks
// (low 32). A task arriving with a tag the word does not hold starts the count at one, so a count
// left by an earlier launch that stopped part-way can never make a later launch reduce early; the
// last task writes its count back to zero, so launches with one tag (replays of a CUDA graph that
// captured one call) count from zero too. The kernel applies this with a CAS loop.
struct Arrival {
  uint64_t word;  // what the row's word becomes
  bool last;      // this task finished the row for this launch
};
SK_HD Arrival arrive(uint64_t word, uint32_t tag, int n_segments) {
  const uint32_t done = (static_cast<uint32_t>(word >> 32) == tag ? static_cast<uint32_t>(word)
                                                                   : 0u) + 1u;
  const bool last = done == static_cast<uint32_t>(n_segments);
  return {(static_cast<uint64_t>(tag) << 32) | (last ? 0u : done), last};
}

// ---- the split-K reduction: a block-row's last task sums the fp32 partials [task][rows][16] of
// the row's n_segments tasks, 4 floats per load. With few tokens `spread` lanes share one float4
// of outputs (each takes every spread-th segment) and a butterfly of shuffles over those lanes
// adds their sums; the lane with lane % spread == 0 stores. A fixed order: the same bits on
// every call.
constexpr int kReduceInFlight = 4;  // loads in flight per lane
struct alignas(16) Floats4 { float x, y, z, w; };

SK_HD int reduce_spread(int groups) {  // groups: float4s of one task's partials (4 * rows)
  int spread = 1;
  while (2 * spread * groups <= 32) spread *= 2;
  return spread;
}
// The float4 this lane sums in the pass starting at float4 q0 (passes step by 32 / spread).
SK_HD int reduce_group(int q0, int lane, int spread) { return q0 + lane / spread; }
SK_HD bool reduce_stores(int lane, int spread) { return lane % spread == 0; }

// Sum of float4 q over this lane's segments; Load(segment, q) returns a Floats4.
template <class Load>
SK_HD Floats4 lane_partial_sum(const Load& load, int q, int lane, int spread, int n_segments) {
  Floats4 sum{0.f, 0.f, 0.f, 0.f};
  for (int s0 = lane % spread; s0 < n_segments; s0 += spread * kReduceInFlight) {
    Floats4 part[kReduceInFlight];
    for (int j = 0; j < kReduceInFlight; ++j) {  // independent loads first, then the adds
      const int seg = s0 + j * spread;
      part[j] = seg < n_segments ? load(seg, q) : Floats4{0.f, 0.f, 0.f, 0.f};
    }
    for (int j = 0; j < kReduceInFlight; ++j) {
      sum.x += part[j].x; sum.y += part[j].y; sum.z += part[j].z; sum.w += part[j].w;
    }
  }
  return sum;
}

}  // namespace sk_decode
