// Prints, for every lane of a warp, the registers the CUDA hybrid matmul builds from one packed
// block of each tier and one x tile, using only the index functions of csrc/cuda/mma_layout.cuh.
// tests/test_mma_layout.py feeds them to a PTX-layout emulator and compares the products.
//
// stdin (whitespace separated): dense block [16][16]; 2:4 values [16][8] and meta [16] (int16);
// K, then K top-K values and K positions; x tile [8 tokens][16 columns].
// stdout: one line per register, "<operand> <lane> <reg> <low> <high>" ("s24_meta <lane> <u32>",
// "acc <lane> <i> <row> <token>" for the accumulator store mapping).
#include "cuda/mma_layout.cuh"

#include <cstdio>
#include <iostream>
#include <vector>

using namespace sk_mma;

namespace {

constexpr int kLanes = 32;

std::vector<float> read_floats(size_t n) {
  std::vector<float> v(n);
  for (float& f : v) std::cin >> f;
  return v;
}

void print_word(const char* name, int lane, int reg, const float* pair) {
  std::printf("%s %d %d %.9g %.9g\n", name, lane, reg, pair[0], pair[1]);
}

// The A registers of a dense 16x16 tile (a dense block, or a top-K block expanded into one).
void print_dense_a(const char* name, const std::vector<float>& tile) {
  for (int lane = 0; lane < kLanes; ++lane)
    for (int reg = 0; reg < 4; ++reg) {
      const int off = dense_a_run_offset(lane, dense_a_reg_run(reg)) + 2 * dense_a_reg_word(reg);
      print_word(name, lane, reg, &tile[off]);
    }
}

}  // namespace

int main() {
  const std::vector<float> dense = read_floats(kBlock * kBlock);
  const std::vector<float> s24_vals = read_floats(kBlock * kHalfBlock);
  std::vector<int16_t> s24_meta(kBlock);
  for (int16_t& m : s24_meta) std::cin >> m;
  int k = 0;
  std::cin >> k;
  const std::vector<float> topk_vals = read_floats(k);
  std::vector<int> topk_pos(k);
  for (int& p : topk_pos) std::cin >> p;
  const std::vector<float> x = read_floats(kTokensPerTile * kBlock);
  if (!std::cin) {
    std::fprintf(stderr, "mma_layout_dump: malformed input\n");
    return 1;
  }

  print_dense_a("dense_a", dense);
  for (int lane = 0; lane < kLanes; ++lane)
    for (int reg = 0; reg < 2; ++reg) {
      const float* row = &x[b_token(lane) * kBlock];
      print_word("dense_b", lane, reg, row + dense_b_run_col(lane) + 2 * reg);
      print_word("s24_b", lane, reg, row + s24_b_col(lane, reg));
      print_word("s24_a", lane, reg, &s24_vals[s24_a_offset(lane, reg)]);
    }
  for (int lane = 0; lane < kLanes; ++lane)
    std::printf("s24_meta %d %u\n", lane,
                meta_register(s24_meta[s24_meta_row(lane, 0)], s24_meta[s24_meta_row(lane, 1)]));

  std::vector<float> topk_tile(kBlock * kBlock, 0.f);
  for (int s = 0; s < k; ++s)
    topk_tile[topk_tile_offset(static_cast<uint8_t>(topk_pos[s]))] = topk_vals[s];
  print_dense_a("topk_a", topk_tile);

  for (int lane = 0; lane < kLanes; ++lane)
    for (int i = 0; i < 4; ++i)
      std::printf("acc %d %d %d %d\n", lane, i, acc_row(lane, i), acc_token(lane, i));
  std::printf("selector %d\n", kMetaSelector);
  return 0;
}
