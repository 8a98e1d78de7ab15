// compress_24: 2:4 blocks [n, B, B] -> kept half [n, B, B/2] and 2-bit positions int16 [n, B].
// Semantics: reference.compress_24. Values are copied as raw elements (bit-exact: -0.0 and NaN
// payloads survive).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "cpu/common.h"

namespace sparse_kernels_cpu {

namespace {

// For each 4-bit non-zero pattern of a group (bit p = column p is non-zero): the two kept
// positions (lo, hi), lo < hi, packed as lo | hi << 2 (the group's 4 meta bits). The kept
// positions are the first two of [non-zero columns ascending] ++ [zero columns ascending],
// then put in ascending order.
struct GroupTable {
  uint8_t pos[16][2];
  uint8_t meta[16];
  constexpr GroupTable() : pos(), meta() {
    for (int pattern = 0; pattern < 16; ++pattern) {
      int order[4] = {0, 0, 0, 0};
      int len = 0;
      for (int p = 0; p < 4; ++p)
        if (pattern & (1 << p)) order[len++] = p;
      for (int p = 0; p < 4; ++p)
        if (!(pattern & (1 << p))) order[len++] = p;
      const int lo = order[0] < order[1] ? order[0] : order[1];
      const int hi = order[0] < order[1] ? order[1] : order[0];
      pos[pattern][0] = static_cast<uint8_t>(lo);
      pos[pattern][1] = static_cast<uint8_t>(hi);
      meta[pattern] = static_cast<uint8_t>(lo | (hi << 2));
    }
  }
};

constexpr GroupTable kGroups{};

template <typename T>
void compress_kernel(const T* in, T* values, int16_t* meta, int64_t rows, int64_t bs) {
  const int64_t groups = bs / 4;
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* src = in + r * bs;
      T* dst = values + r * (bs / 2);
      uint32_t bits = 0;
      for (int64_t g = 0; g < groups; ++g) {
        const T* grp = src + 4 * g;
        // "Non-zero" as a float comparison: -0.0 is zero, NaN is non-zero.
        const int pattern = (to_float(grp[0]) != 0.0f ? 1 : 0) |
                            (to_float(grp[1]) != 0.0f ? 2 : 0) |
                            (to_float(grp[2]) != 0.0f ? 4 : 0) |
                            (to_float(grp[3]) != 0.0f ? 8 : 0);
        dst[2 * g] = grp[kGroups.pos[pattern][0]];
        dst[2 * g + 1] = grp[kGroups.pos[pattern][1]];
        bits |= static_cast<uint32_t>(kGroups.meta[pattern]) << (4 * g);
      }
      // The 16-bit pattern reinterpreted as int16 (bit 15 set -> negative).
      meta[r] = static_cast<int16_t>(static_cast<uint16_t>(bits));
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> compress_24(const at::Tensor& blocks_in) {
  check_cpu(blocks_in, "blocks");
  TORCH_CHECK(blocks_in.dim() == 3 && blocks_in.size(1) == blocks_in.size(2),
              "blocks must be [n, B, B], got shape ", blocks_in.sizes());
  const int64_t bs = blocks_in.size(1);
  TORCH_CHECK(bs == 4 || bs == 8 || bs == 12 || bs == 16,
              "blocks must be [n, B, B] with B = 4, 8, 12 or 16, got B=", bs);
  const at::Tensor blocks = blocks_in.contiguous();
  const int64_t nb = blocks.size(0);
  at::Tensor values = at::empty({nb, bs, bs / 2}, blocks.options());
  at::Tensor meta = at::empty({nb, bs}, blocks.options().dtype(at::kShort));
  dispatch_float(blocks, "blocks", [&](auto tag) {
    using T = decltype(tag);
    compress_kernel<T>(blocks.data_ptr<T>(), values.data_ptr<T>(), meta.data_ptr<int16_t>(),
                       nb * bs, bs);
  });
  return {values, meta};
}

}  // namespace sparse_kernels_cpu

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("compress_24", &sparse_kernels_cpu::compress_24);
}
