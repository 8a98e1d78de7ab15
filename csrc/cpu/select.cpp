// Selection masks: block_topk_mask (k best per B x B block) and nm_mask (n best of every m input
// columns). Semantics: reference.block_topk_mask / reference.nm_mask.
//
// Shared tie rule: best = higher score; among equal scores the lower index wins (row-major
// inside a block, column inside a group). NaN counts as -inf; -0.0 equals +0.0. Both kernels map
// each score to an int32 key whose signed order is the float order under those rules, so the
// comparisons below are plain integer compares.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "cpu/common.h"

namespace sparse_kernels_cpu {

namespace {

// Order-preserving int32 key of a score: NaN -> key(-inf), -0.0 -> key(+0.0), and for any two
// non-NaN floats a < b  <=>  key(a) < key(b), a == b  <=>  key(a) == key(b).
inline int32_t score_key(float v) {
  v = std::isnan(v) ? -std::numeric_limits<float>::infinity() : v + 0.0f;  // -0 + 0 = +0
  int32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b ^ ((b >> 31) & 0x7FFFFFFF);  // negative floats: flip the magnitude bits
}

// (key, index) packed so that a larger value is a better entry: the key in the high 32 bits
// (biased to unsigned), the index complemented in the low bits so that the lower index wins a
// tie. Distinct indices make every packed value unique, hence a strict total order.
inline uint64_t packed_rank(int32_t key, uint32_t index) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(key) ^ 0x80000000u) << 32) |
         static_cast<uint64_t>(0xFFFFFFFFu - index);
}

// The `keep`-th largest of the `count` packed values in `scratch` (1 <= keep < count): exactly
// the `keep` best values are >= it. Used for groups wider than kRankMaxWidth; permutes `scratch`.
inline uint64_t select_threshold(uint64_t* scratch, int64_t count, int64_t keep) {
  std::nth_element(scratch, scratch + (keep - 1), scratch + count, std::greater<uint64_t>());
  return scratch[keep - 1];
}

// Number of keys >= t (a loop the compiler vectorises). N > 0: count == N at compile time.
template <int N>
inline int32_t count_at_least(const int32_t* key, int32_t count, int32_t t) {
  if (N > 0) count = N;
  int32_t c = 0;
  for (int32_t i = 0; i < count; ++i) c += key[i] >= t;
  return c;
}

// The k-th largest of `count` keys (1 <= k < count): the largest t with at least k keys >= t,
// found by bisection on the int32 key range, <= 32 rounds of a vectorised count. (Faster than
// std::nth_element on packed (key, index) pairs: ~0.6 vs ~2.5 us for a 16x16 block.)
template <int N>
inline int32_t kth_largest(const int32_t* key, int32_t count, int32_t k) {
  if (N > 0) count = N;
  int32_t lo = key[0], hi = key[0];
  for (int32_t i = 1; i < count; ++i) {
    lo = std::min(lo, key[i]);
    hi = std::max(hi, key[i]);
  }
  // Invariant: count_at_least(lo) >= k, count_at_least(hi + 1) < k.
  while (lo < hi) {
    const int32_t mid = static_cast<int32_t>(lo + (static_cast<int64_t>(hi) - lo + 1) / 2);
    if (count_at_least<N>(key, count, mid) >= k) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Keeps the k best real entries of one block whose top-left element is s / mask (row stride
// in_f), rows x cols real entries, k < rows * cols. BS > 0: a full BS x BS block, sizes known
// at compile time; BS == 0: an edge block of runtime size. The keys go to a small local array
// in row-major order; with t = the k-th largest key, every key > t is kept and the remaining
// places go to the keys == t in row-major order, i.e. to the lowest indices: exactly the
// reference's "higher score, then lower index" rule. Padding is never looked at.
template <typename T, int BS>
inline void topk_block(const T* s, bool* mask, int64_t in_f, int64_t rows, int64_t cols,
                       int32_t k, int32_t* key) {
  if (BS > 0) rows = cols = BS;
  for (int64_t i = 0; i < rows; ++i) {
    const T* srow = s + i * in_f;
    int32_t* krow = key + i * cols;
    for (int64_t j = 0; j < cols; ++j) krow[j] = score_key(to_float(srow[j]));
  }
  const int32_t t = kth_largest<BS * BS>(key, static_cast<int32_t>(rows * cols), k);
  int32_t ties_left = k;  // places left for keys == t (>= 1 since t is the k-th largest)
  for (int64_t i = 0; i < rows; ++i) {
    bool* mrow = mask + i * in_f;
    const int32_t* krow = key + i * cols;
    for (int64_t j = 0; j < cols; ++j) {
      mrow[j] = krow[j] > t;
      ties_left -= krow[j] > t;
    }
  }
  for (int64_t i = 0; i < rows && ties_left > 0; ++i) {  // ties at t, lowest index first
    bool* mrow = mask + i * in_f;
    const int32_t* krow = key + i * cols;
    for (int64_t j = 0; j < cols; ++j) {
      const bool take = (krow[j] == t) & (ties_left > 0);
      mrow[j] |= take;
      ties_left -= take;
    }
  }
}

template <typename T, int BS>
void topk_kernel(const T* s, bool* mask, int64_t out_f, int64_t in_f, int64_t k) {
  const int64_t nbr = ceil_div(out_f, BS);
  const int64_t nbc = ceil_div(in_f, BS);
  at::parallel_for(0, nbr * nbc, 16, [&](int64_t begin, int64_t end) {
    int32_t key[BS * BS];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = (b / nbc) * BS, c0 = (b % nbc) * BS;
      const int64_t rows = std::min<int64_t>(BS, out_f - r0);
      const int64_t cols = std::min<int64_t>(BS, in_f - c0);
      const T* sb = s + r0 * in_f + c0;
      bool* mb = mask + r0 * in_f + c0;
      if (k >= rows * cols) {  // every real entry survives
        for (int64_t i = 0; i < rows; ++i) std::fill_n(mb + i * in_f, cols, true);
      } else if (rows == BS && cols == BS) {
        topk_block<T, BS>(sb, mb, in_f, rows, cols, static_cast<int32_t>(k), key);
      } else {
        topk_block<T, 0>(sb, mb, in_f, rows, cols, static_cast<int32_t>(k), key);
      }
    }
  });
}

// n best of each full group of M columns, M known at compile time; keys already computed.
// rank(i) = how many entries of the group beat i; i is kept iff rank(i) < n.
template <int M>
inline void nm_full_groups(const int32_t* key, bool* mrow, int64_t groups, int64_t n) {
  for (int64_t g = 0; g < groups; ++g) {
    const int32_t* k = key + g * M;
    bool* o = mrow + g * M;
    for (int i = 0; i < M; ++i) {
      int rank = 0;
      for (int j = 0; j < i; ++j) rank += k[j] >= k[i];
      for (int j = i + 1; j < M; ++j) rank += k[j] > k[i];
      o[i] = rank < n;
    }
  }
}

// m = 4: the 6 pairwise comparisons once each (c_ji = "j beats i" for j < i; then i beats j
// iff !c_ji, the keys being totally ordered once the index breaks ties).
inline void nm_full_groups4(const int32_t* key, bool* mrow, int64_t groups, int64_t n) {
  const int32_t nn = static_cast<int32_t>(n);
  for (int64_t g = 0; g < groups; ++g) {
    const int32_t* k = key + 4 * g;
    const int32_t c01 = k[0] >= k[1], c02 = k[0] >= k[2], c03 = k[0] >= k[3];
    const int32_t c12 = k[1] >= k[2], c13 = k[1] >= k[3], c23 = k[2] >= k[3];
    const int32_t r0 = 3 - c01 - c02 - c03;
    const int32_t r1 = c01 + 2 - c12 - c13;
    const int32_t r2 = c02 + c12 + 1 - c23;
    const int32_t r3 = c03 + c13 + c23;
    bool* o = mrow + 4 * g;
    o[0] = r0 < nn;
    o[1] = r1 < nn;
    o[2] = r2 < nn;
    o[3] = r3 < nn;
  }
}

// Same as above for one group of runtime width w (small groups and the ragged last group).
inline void nm_group_rank(const int32_t* k, bool* o, int64_t w, int64_t n) {
  for (int64_t i = 0; i < w; ++i) {
    int64_t rank = 0;
    for (int64_t j = 0; j < i; ++j) rank += k[j] >= k[i];
    for (int64_t j = i + 1; j < w; ++j) rank += k[j] > k[i];
    o[i] = rank < n;
  }
}

// One group of w > kRankMaxWidth columns: the n best by a threshold on packed (key, index)
// values. vals and scratch hold at least w entries.
inline void nm_group_wide(const int32_t* k, bool* o, int64_t w, int64_t n, uint64_t* vals,
                          uint64_t* scratch) {
  for (int64_t j = 0; j < w; ++j) vals[j] = packed_rank(k[j], static_cast<uint32_t>(j));
  std::copy_n(vals, w, scratch);
  const uint64_t t = select_threshold(scratch, w, n);
  for (int64_t j = 0; j < w; ++j) o[j] = vals[j] >= t;
}

constexpr int64_t kRankMaxWidth = 32;  // wider groups use nth_element instead of O(w^2) ranks

template <typename T>
void nm_kernel(const T* s, bool* mask, int64_t out_f, int64_t in_f, int64_t n, int64_t m) {
  const int64_t full = in_f / m;             // full groups per row
  const int64_t tail = in_f - full * m;      // width of the ragged last group (0 if none)
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(in_f, 1));
  at::parallel_for(0, out_f, grain, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> key(static_cast<size_t>(in_f));
    std::vector<uint64_t> scratch, vals;
    if (m > kRankMaxWidth) {
      scratch.resize(static_cast<size_t>(std::min(m, in_f)));
      vals.resize(scratch.size());
    }
    for (int64_t r = begin; r < end; ++r) {
      const T* srow = s + r * in_f;
      bool* mrow = mask + r * in_f;
      if (n >= m) {  // every column is kept (also covers the ragged group: min(n, w) = w)
        std::fill_n(mrow, in_f, true);
        continue;
      }
      for (int64_t c = 0; c < in_f; ++c) key[c] = score_key(to_float(srow[c]));
      if (m == 4) {
        nm_full_groups4(key.data(), mrow, full, n);
      } else if (m == 8) {
        nm_full_groups<8>(key.data(), mrow, full, n);
      } else if (m <= kRankMaxWidth) {
        for (int64_t g = 0; g < full; ++g) nm_group_rank(key.data() + g * m, mrow + g * m, m, n);
      } else {
        for (int64_t g = 0; g < full; ++g)
          nm_group_wide(key.data() + g * m, mrow + g * m, m, n, vals.data(), scratch.data());
      }
      if (tail > 0) {
        const int32_t* k = key.data() + full * m;
        bool* o = mrow + full * m;
        if (n >= tail) {
          std::fill_n(o, tail, true);
        } else if (tail <= kRankMaxWidth) {
          nm_group_rank(k, o, tail, n);
        } else {
          nm_group_wide(k, o, tail, n, vals.data(), scratch.data());
        }
      }
    }
  });
}

void check_scores(const at::Tensor& scores) {
  check_cpu(scores, "scores");
  TORCH_CHECK(scores.dim() == 2, "scores must be 2-D [out_features, in_features], got shape ",
              scores.sizes());
}

}  // namespace

at::Tensor block_topk_mask(const at::Tensor& scores_in, int64_t k, int64_t block_size) {
  check_scores(scores_in);
  TORCH_CHECK(block_size == 4 || block_size == 8 || block_size == 12 || block_size == 16,
              "block_size must be 4, 8, 12 or 16, got ", block_size);
  TORCH_CHECK(k >= 1 && k <= block_size * block_size, "k must be in 1..",
              block_size * block_size, " (block_size^2), got k=", k);
  const at::Tensor scores = scores_in.contiguous();
  const int64_t out_f = scores.size(0), in_f = scores.size(1);
  at::Tensor mask = at::empty({out_f, in_f}, scores.options().dtype(at::kBool));
  dispatch_float(scores, "scores", [&](auto tag) {
    using T = decltype(tag);
    const T* sp = scores.data_ptr<T>();
    bool* mp = mask.data_ptr<bool>();
    switch (block_size) {
      case 4: topk_kernel<T, 4>(sp, mp, out_f, in_f, k); break;
      case 8: topk_kernel<T, 8>(sp, mp, out_f, in_f, k); break;
      case 12: topk_kernel<T, 12>(sp, mp, out_f, in_f, k); break;
      default: topk_kernel<T, 16>(sp, mp, out_f, in_f, k); break;
    }
  });
  return mask;
}

at::Tensor nm_mask(const at::Tensor& scores_in, int64_t n, int64_t m) {
  check_scores(scores_in);
  TORCH_CHECK(n >= 1 && n <= m, "N:M needs 1 <= n <= m, got n=", n, ", m=", m);
  TORCH_CHECK(m <= std::numeric_limits<uint32_t>::max(), "m too large: ", m);
  const at::Tensor scores = scores_in.contiguous();
  const int64_t out_f = scores.size(0), in_f = scores.size(1);
  at::Tensor mask = at::empty({out_f, in_f}, scores.options().dtype(at::kBool));
  dispatch_float(scores, "scores", [&](auto tag) {
    using T = decltype(tag);
    nm_kernel<T>(scores.data_ptr<T>(), mask.data_ptr<bool>(), out_f, in_f, n, m);
  });
  return mask;
}

}  // namespace sparse_kernels_cpu

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("block_topk_mask", &sparse_kernels_cpu::block_topk_mask);
  m.impl("nm_mask", &sparse_kernels_cpu::nm_mask);
}
