// Which lane of a warp loads which elements of a canonical packed 16x16 block (and of the x tile)
// into which register of the m16n8k16 tensor-core instructions, and where each accumulator element
// lands in the output. Plain index functions, callable from the kernels and from a host test
// (tests/csrc/mma_layout_dump.cpp), which checks them against an emulator of the PTX fragment
// tables (tests/mma_emulator.py).
//
// Roles: the weight block is the A operand (16 out features x 16 input features), a tile of x^T is
// B (16 input features x 8 tokens), the accumulator is D (16 out features x 8 tokens, fp32).
// Every register of a 16-bit operand is one 32-bit word holding two elements, low half first.
//
// Dense blocks (and top-K blocks, expanded to a dense tile) use a permuted reduction axis: the PTX
// layout gives a lane the logical k = {2t, 2t+1, 2t+8, 2t+9} (t = lane % 4) of its rows; mapping
// them to block columns {4t .. 4t+3} lets a lane fetch each of its two rows (g and g+8) with one
// 8-byte load. The B operand uses the same mapping, so the dot product is unchanged.
// 2:4 blocks keep the identity axis: the instruction's metadata indexes columns inside aligned
// groups of 4, and the canonical s24 layout already is the instruction's compressed A.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define SK_HD __host__ __device__ __forceinline__
#else
#define SK_HD inline
#endif

namespace sk_mma {

constexpr int kBlock = 16;        // B: rows and columns of a block
constexpr int kHalfBlock = 8;     // kept values per row of a 2:4 block
constexpr int kTokensPerTile = 8;  // n of m16n8k16
// Sparsity selector of mma.sp: lane 4g + selector of each quad supplies the metadata. Every lane
// builds the same register (meta_register), so any selector would do; 0 is fixed here.
constexpr int kMetaSelector = 0;

SK_HD int group_of(int lane) { return lane >> 2; }
SK_HD int thread_in_group(int lane) { return lane & 3; }

// ---- dense A: two runs of 4 consecutive elements, rows g (run 0) and g + 8 (run 1).
SK_HD int dense_a_run_offset(int lane, int run) {
  return (group_of(lane) + 8 * run) * kBlock + 4 * thread_in_group(lane);
}
// A register r is 32-bit word dense_a_reg_word(r) of run dense_a_reg_run(r).
SK_HD int dense_a_reg_run(int reg) { return reg & 1; }
SK_HD int dense_a_reg_word(int reg) { return reg >> 1; }

// ---- B (x^T tile) for dense / top-K blocks: token g, one run of 4 block columns; B register r
// is word r of that run.
SK_HD int b_token(int lane) { return group_of(lane); }
SK_HD int dense_b_run_col(int lane) { return 4 * thread_in_group(lane); }

// ---- 2:4 A: register r holds slots 2t, 2t+1 (one aligned group of 4 columns) of row g + 8r,
// i.e. 32-bit word at this element offset of the [16][8] values.
SK_HD int s24_a_offset(int lane, int reg) {
  return (group_of(lane) + 8 * reg) * kHalfBlock + 2 * thread_in_group(lane);
}
// B for 2:4 blocks: register r is the pair of block columns starting here.
SK_HD int s24_b_col(int lane, int reg) { return 2 * thread_in_group(lane) + 8 * reg; }
// Metadata: the int16 meta of rows g (low half) and g + 8 (high half). The canonical meta of a row
// already is the instruction's per-row order: group c in bits 4c..4c+3, the first kept column's
// position in the lower two bits.
SK_HD int s24_meta_row(int lane, int half) { return group_of(lane) + 8 * half; }
SK_HD uint32_t meta_register(int16_t row_g, int16_t row_g8) {
  return static_cast<uint32_t>(static_cast<uint16_t>(row_g)) |
         (static_cast<uint32_t>(static_cast<uint16_t>(row_g8)) << 16);
}

// ---- top-K: position byte row * 16 + col is the element offset in a dense 16x16 tile.
SK_HD int topk_tile_offset(uint8_t pos) { return pos; }

// ---- accumulator element i (0..3) of a lane: block row (out feature) and token in the n-tile.
SK_HD int acc_row(int lane, int i) { return group_of(lane) + 8 * (i >> 1); }
SK_HD int acc_token(int lane, int i) { return 2 * thread_in_group(lane) + (i & 1); }

}  // namespace sk_mma
