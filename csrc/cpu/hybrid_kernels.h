// Hybrid matmul kernels for one block-row of the packed three-tier format, in plain C++ (no torch
// headers, so they compile in a second and a standalone harness can call them).
//
// Layout of the packed tensors: sparse_kernels/format.py. The x buffers the kernels read are
// zero-padded to whole 16-column blocks, so padded 2:4 slots and padded top-K positions (value
// 0, possibly pointing into the padding) need no bounds checks.
//
// Explicit GCC/Clang vector types (f32x8) fix the vectorisation: left to itself the compiler
// vectorised the wrong loop of the outer-product kernel and ran 30x slower. The header is built
// without -march flags: the instruction set comes from the includer's target pragma; the generic
// build converts fp16 through _Float16, the AVX2 / AVX-512 builds with F16C instructions.
//
// Included once per instruction set: the includer defines SK_ISA_NS (generic, avx2, avx512) and
// sets the target (hybrid_isa_*.cpp), so every function here exists once per ISA in its own
// namespace and nothing compiled for AVX-512 can be linked into a caller built for another ISA.
// SK_ISA_HAS_AVX2 (0 or 1) says whether AVX2 code may be used: GCC's C++ front end does not
// define __AVX2__ after `#pragma GCC target`, so the includer says it.
#ifndef SK_ISA_NS
#error "define SK_ISA_NS (the instruction set's namespace) before including hybrid_kernels.h"
#endif
#ifndef SK_ISA_HAS_AVX2
#define SK_ISA_HAS_AVX2 0
#endif

#include <cstdint>
#include <cstring>

#include "cpu/packed_view.h"

#if SK_ISA_HAS_AVX2
#include <immintrin.h>
#endif

namespace sparse_kernels_cpu {
namespace SK_ISA_NS {

typedef float f32x8 __attribute__((vector_size(32)));
typedef _Float16 f16x8 __attribute__((vector_size(16)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint64_t u64x4 __attribute__((vector_size(32)));

inline float load_f32(const float* p) { return *p; }
inline float load_f32(const bf16_t* p) {
  const uint32_t bits = static_cast<uint32_t>(p->bits) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline float load_f32(const fp16_t* p) {
#if SK_ISA_HAS_AVX2
  return _cvtsh_ss(p->bits);  // F16C
#else
  _Float16 h;
  std::memcpy(&h, p, sizeof(h));
  return static_cast<float>(h);
#endif
}

inline f32x8 splat8(float v) { return f32x8{v, v, v, v, v, v, v, v}; }
inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }
inline f32x8 load8(const bf16_t* p) {
  u16x8 h;
  std::memcpy(&h, p, sizeof(h));
  const u32x8 bits = __builtin_convertvector(h, u32x8) << 16;
  f32x8 out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline f32x8 load8(const fp16_t* p) {
#if SK_ISA_HAS_AVX2
  // One vcvtph2ps: GCC lowers the generic _Float16 vector conversion below to per-lane ones.
  __m128i h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<f32x8>(_mm256_cvtph_ps(h));
#else
  f16x8 h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, f32x8);
#endif
}
inline float hsum8(f32x8 v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// ------------------------------------------------------------------------------------------
// Values by element index e of a tier's value tensor: the float formats convert, low-bit codes
// widen to fp32 (their group scale is applied per block row, block_scales below).
template <typename T>
inline f32x8 values8(const T* base, int64_t e) { return load8(base + e); }
template <typename T>
inline float value1(const T* base, int64_t e) { return load_f32(base + e); }

inline f32x8 values8(const q8_t* base, int64_t e) {
#if SK_ISA_HAS_AVX2
  return reinterpret_cast<f32x8>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(base + e)))));
#else
  typedef int8_t i8x8 __attribute__((vector_size(8)));
  i8x8 v;
  std::memcpy(&v, base + e, sizeof(v));
  return __builtin_convertvector(v, f32x8);
#endif
}
inline float value1(const q8_t* base, int64_t e) { return static_cast<float>(base[e].code); }

// 8 int4 codes from element e (even: a whole byte boundary), the low nibble first.
inline f32x8 values8(const q4_t* base, int64_t e) {
  uint32_t word;
  std::memcpy(&word, base + e / 2, sizeof(word));
#if SK_ISA_HAS_AVX2
  const __m256i nibbles = _mm256_and_si256(
      _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)),
                        _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
      _mm256_set1_epi32(15));
  const __m256i eight = _mm256_set1_epi32(8);  // (n ^ 8) - 8: the nibble as a signed code
  return reinterpret_cast<f32x8>(_mm256_cvtepi32_ps(
      _mm256_sub_epi32(_mm256_xor_si256(nibbles, eight), eight)));
#else
  typedef int32_t i32x8 __attribute__((vector_size(32)));
  const i32x8 shifts = {0, 4, 8, 12, 16, 20, 24, 28};
  const i32x8 nibbles = (static_cast<int32_t>(word) >> shifts) & 15;
  return __builtin_convertvector((nibbles ^ 8) - 8, f32x8);
#endif
}
inline float value1(const q4_t* base, int64_t e) {
  const int nibble = (base[e / 2].pair >> (4 * (e & 1))) & 15;
  return static_cast<float>((nibble ^ 8) - 8);
}

// The scales of block-row br's 16 rows in the group of block column bc (low-bit values only),
// reloaded only when the group changes (`group` is the one s holds); rows past the weight's
// last one get 0.
template <typename T>
inline void block_scales(const PackedView<T>& p, int64_t br, int64_t bc, float (&s)[16],
                         int64_t& group) {
  const int64_t g = bc / p.group_blocks;
  if (g == group) return;
  group = g;
  const fp16_t* scales = reinterpret_cast<const fp16_t*>(p.scales);
  for (int i = 0; i < 16; ++i) {
    const int64_t row = br * 16 + i;
    s[i] = row < p.out_features ? load_f32(scales + row * p.n_groups + g) : 0.f;
  }
}

// Column (inside its block) of each kept slot j of one 2:4 row: 4 * (j / 2) + (2-bit position).
template <int B>
inline void slot_columns(int16_t meta, int (&col)[B / 2]) {
  const uint32_t bits = static_cast<uint16_t>(meta);
  for (int j = 0; j < B / 2; ++j) col[j] = 4 * (j / 2) + static_cast<int>((bits >> (2 * j)) & 3u);
}

// ------------------------------------------------------------------------------------------
// 2:4 pair table of one row of x for the decode kernel: for every group g of 4 columns and every
// 4-bit code (p0 | p1 << 2) of a 2:4 group's meta, the two x values that group's kept slots meet,
// as one 8-byte pair: table[g * 16 + code] = (x[4g + p0], x[4g + p1]). A 2:4 row then gathers its
// 8 x values with 4 loads instead of 8. x: in_pad floats; table: in_pad / 4 * 16 entries.
inline void build_pair_table(const float* x, int64_t in_pad, uint64_t* table) {
  for (int64_t g = 0; g < in_pad / 4; ++g) {
    for (int code = 0; code < 16; ++code) {
      const float pair[2] = {x[4 * g + (code & 3)], x[4 * g + (code >> 2)]};
      std::memcpy(table + g * 16 + code, pair, sizeof(pair));
    }
  }
}

#if SK_ISA_HAS_AVX2
// The 8 x values one 2:4 row's kept slots meet, gathered in registers (no table): slot j sits in
// column 4 * (j / 2) + (2-bit field j of meta) of the block, so slots 0-3 lie in x_lo (columns
// 0-7) and slots 4-7 in x_hi (8-15). slot_lanes: the lane each slot reads in its half.
inline __m256i slot_lanes(uint32_t meta) {
  const __m256i fields = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(meta)),
                                           _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
  return _mm256_add_epi32(_mm256_and_si256(fields, _mm256_set1_epi32(3)),
                          _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4));
}
inline f32x8 gather_slots(__m256i lanes, f32x8 x_lo, f32x8 x_hi) {
  const __m256 lo = _mm256_permutevar8x32_ps(reinterpret_cast<__m256>(x_lo), lanes);
  const __m256 hi = _mm256_permutevar8x32_ps(reinterpret_cast<__m256>(x_hi), lanes);
  return reinterpret_cast<f32x8>(_mm256_blend_ps(lo, hi, 0xF0));
}
#endif

// Top-K blocks with at least this many entries (of 256) are decoded as a dense tile (see below):
// measured per block-row, the tile costs about the same for any K and the entry-by-entry loop
// grows with K; they cross near K = 32 (benchmarks/NOTES-linear.md).
constexpr int64_t kTopkAsTile = 32;

// The 16 x values of one block column for each of M rows of x: lo = columns 0-7, hi = 8-15.
template <int M>
inline void load_block_x(const float* xc, int64_t in_pad, f32x8 (&lo)[M], f32x8 (&hi)[M]) {
  for (int m = 0; m < M; ++m) {
    lo[m] = load8(xc + m * in_pad);
    hi[m] = load8(xc + m * in_pad + 8);
  }
}

// acc[m][i] += row i of a 16x16 block of values U (T, or fp32 for a spread top-K tile; element
// off of base) times the block's x, as one 8-wide product per row (the two halves folded into
// one); low-bit values times their row's scale.
template <typename U, int M>
inline void dense_block_rows16(const U* base, int64_t off, const float* xc, int64_t in_pad,
                               f32x8 (&acc)[M][16], const float* scale = nullptr) {
  f32x8 x_lo[M], x_hi[M];
  load_block_x<M>(xc, in_pad, x_lo, x_hi);
  for (int i = 0; i < 16; ++i) {
    const f32x8 w_lo = values8(base, off + i * 16), w_hi = values8(base, off + i * 16 + 8);
    if constexpr (is_low_bit<U>) {
      const f32x8 s = splat8(scale[i]);
      for (int m = 0; m < M; ++m) acc[m][i] += s * (w_lo * x_lo[m] + w_hi * x_hi[m]);
    } else {
      for (int m = 0; m < M; ++m) acc[m][i] += w_lo * x_lo[m] + w_hi * x_hi[m];
    }
  }
}

// Decode, M (1..3, a template parameter so loops over rows of x unroll) rows of x, B = 16.
// xf: [M][in_pad] fp32; pairs: M pair tables (build_pair_table), pair_stride entries apart; with
// AVX2 the 2:4 rows permute x in registers instead and pairs is not read (may be null).
// out: [M][16]. Each weight row meets the block's x as one 8-wide vector (dense: two products
// folded into one; 2:4: the 8 kept values against their 8 paired x values) added to a per-row
// accumulator; the horizontal sums happen once per block-row.
template <typename T, int M>
void row_dot_block_row16(const PackedView<T>& p, int64_t br, const float* xf, int64_t in_pad,
                         const uint64_t* pairs, int64_t pair_stride, float* out) {
  constexpr int B = 16;
  f32x8 acc[M][B] = {};
  float acc_topk[M][B] = {};
  float scale[B] = {};  // low-bit values: the rows' scales of the current group
  int64_t group = -1;

  for (int32_t e = p.dense_rowptr[br]; e < p.dense_rowptr[br + 1]; ++e) {
    const int64_t bc = p.dense_cols[e];
    if constexpr (is_low_bit<T>) block_scales(p, br, bc, scale, group);
    dense_block_rows16<T, M>(p.dense_vals, static_cast<int64_t>(e) * B * B, xf + bc * B, in_pad,
                             acc, scale);
  }

  for (int32_t e = p.s24_rowptr[br]; e < p.s24_rowptr[br + 1]; ++e) {
    const int64_t off = static_cast<int64_t>(e) * B * (B / 2), bc = p.s24_cols[e];
    const int16_t* meta = p.s24_meta + static_cast<int64_t>(e) * B;
    if constexpr (is_low_bit<T>) block_scales(p, br, bc, scale, group);
#if SK_ISA_HAS_AVX2
    f32x8 x_lo[M], x_hi[M];
    load_block_x<M>(xf + bc * B, in_pad, x_lo, x_hi);
    for (int i = 0; i < B; ++i) {
      const __m256i lanes = slot_lanes(static_cast<uint16_t>(meta[i]));
      f32x8 w = values8(p.s24_vals, off + i * (B / 2));
      if constexpr (is_low_bit<T>) w *= splat8(scale[i]);
      for (int m = 0; m < M; ++m) acc[m][i] += w * gather_slots(lanes, x_lo[m], x_hi[m]);
    }
#else
    const int64_t group0 = bc * (B / 4);
    for (int i = 0; i < B; ++i) {
      const uint32_t code = static_cast<uint16_t>(meta[i]);
      f32x8 w = values8(p.s24_vals, off + i * (B / 2));
      if constexpr (is_low_bit<T>) w *= splat8(scale[i]);
      for (int m = 0; m < M; ++m) {
        const uint64_t* t = pairs + m * pair_stride + group0 * 16;
        const u64x4 q = {t[code & 15], t[16 + ((code >> 4) & 15)], t[32 + ((code >> 8) & 15)],
                         t[48 + (code >> 12)]};
        f32x8 xg;
        std::memcpy(&xg, &q, sizeof(xg));
        acc[m][i] += w * xg;
      }
    }
#endif
  }

  // Top-K: with few entries each is one scalar FMA into its row's sum; with many, those sums
  // become a chain of dependent adds through memory (entries of one row follow each other), so
  // the block is spread into a zeroed 16x16 tile and multiplied like a dense block instead.
  alignas(32) float tile[B * B];
  for (int32_t e = p.topk_rowptr[br]; e < p.topk_rowptr[br + 1]; ++e) {
    const int64_t bc = p.topk_cols[e];
    const float* xc = xf + bc * B;
    const int64_t vals = e * p.topk_stride;
    const uint8_t* pos = p.topk_pos + e * p.topk;
    if constexpr (is_low_bit<T>) block_scales(p, br, bc, scale, group);
    if (p.topk >= kTopkAsTile) {
      std::memset(tile, 0, sizeof(tile));
      for (int64_t s = 0; s < p.topk; ++s) {
        float w = value1(p.topk_vals, vals + s);
        if constexpr (is_low_bit<T>) w *= scale[pos[s] / B];
        tile[pos[s]] = w;
      }
      dense_block_rows16<float, M>(tile, 0, xc, in_pad, acc);
      continue;
    }
    for (int64_t s = 0; s < p.topk; ++s) {
      const int row = pos[s] / B, col = pos[s] % B;
      float w = value1(p.topk_vals, vals + s);
      if constexpr (is_low_bit<T>) w *= scale[row];
      for (int m = 0; m < M; ++m) acc_topk[m][row] += w * xc[m * in_pad + col];
    }
  }

  for (int m = 0; m < M; ++m)
    for (int i = 0; i < B; ++i) out[m * B + i] = hsum8(acc[m][i]) + acc_topk[m][i];
}

// ------------------------------------------------------------------------------------------
// Many rows of x (B = 16): one chunk of x^T, xt [in_pad][16] fp32 (16 rows of x, zero-padded);
// out: [16 outputs][16 rows]. V vectors of 8 rows are computed (V = 1 when the chunk holds at most
// 8 real rows). Each weight value is broadcast against a contiguous vector of x rows, so a 2:4
// slot or a top-K position costs one FMA per vector, the same as a dense value.
template <typename T, int V>
void outer_block_row16(const PackedView<T>& p, int64_t br, const float* xt, float* out) {
  constexpr int B = 16, W = 16;
  f32x8 acc[B][V] = {};
  float scale[B] = {};  // low-bit values: the rows' scales of the current group
  int64_t group = -1;
  // A value as it multiplies: low-bit codes times their row's scale.
  const auto weight = [&](float v, int row) {
    if constexpr (is_low_bit<T>) return v * scale[row];
    return v;
  };

  for (int32_t e = p.dense_rowptr[br]; e < p.dense_rowptr[br + 1]; ++e) {
    const int64_t blk = static_cast<int64_t>(e) * B * B, bc = p.dense_cols[e];
    const float* xc = xt + bc * B * W;
    if constexpr (is_low_bit<T>) block_scales(p, br, bc, scale, group);
    for (int i = 0; i < B; ++i) {
      f32x8 a[V];
      for (int v = 0; v < V; ++v) a[v] = acc[i][v];
      for (int c = 0; c < B; ++c) {
        const f32x8 w = splat8(weight(value1(p.dense_vals, blk + i * B + c), i));
        for (int v = 0; v < V; ++v) a[v] += w * load8(xc + c * W + v * 8);
      }
      for (int v = 0; v < V; ++v) acc[i][v] = a[v];
    }
  }

  for (int32_t e = p.s24_rowptr[br]; e < p.s24_rowptr[br + 1]; ++e) {
    const int64_t blk = static_cast<int64_t>(e) * B * (B / 2), bc = p.s24_cols[e];
    const int16_t* meta = p.s24_meta + static_cast<int64_t>(e) * B;
    const float* xc = xt + bc * B * W;
    if constexpr (is_low_bit<T>) block_scales(p, br, bc, scale, group);
    for (int i = 0; i < B; ++i) {
      int c[B / 2];
      slot_columns<B>(meta[i], c);
      f32x8 a[V];
      for (int v = 0; v < V; ++v) a[v] = acc[i][v];
      for (int j = 0; j < B / 2; ++j) {
        const f32x8 w = splat8(weight(value1(p.s24_vals, blk + i * (B / 2) + j), i));
        for (int v = 0; v < V; ++v) a[v] += w * load8(xc + c[j] * W + v * 8);
      }
      for (int v = 0; v < V; ++v) acc[i][v] = a[v];
    }
  }

  for (int32_t e = p.topk_rowptr[br]; e < p.topk_rowptr[br + 1]; ++e) {
    const int64_t bc = p.topk_cols[e];
    const float* xc = xt + bc * B * W;
    const int64_t vals = e * p.topk_stride;
    const uint8_t* pos = p.topk_pos + e * p.topk;
    if constexpr (is_low_bit<T>) block_scales(p, br, bc, scale, group);
    for (int64_t s = 0; s < p.topk; ++s) {
      const int row = pos[s] / B, col = pos[s] % B;
      const f32x8 w = splat8(weight(value1(p.topk_vals, vals + s), row));
      for (int v = 0; v < V; ++v) acc[row][v] += w * load8(xc + col * W + v * 8);
    }
  }

  for (int i = 0; i < B; ++i)
    for (int v = 0; v < V; ++v) store8(out + i * W + v * 8, acc[i][v]);
}

// ------------------------------------------------------------------------------------------
// Any block size: writes block-row br as fp32 rows [B][in_pad] into an already zeroed panel.
template <typename T, int B>
void decompress_block_row(const PackedView<T>& p, int64_t br, int64_t in_pad, float* panel) {
  constexpr int H = B / 2;
  // The fp32 value of element e of a tier for row i of the block at block column bc.
  const auto weight = [&](const T* base, int64_t e, int64_t bc, int i) {
    const float v = value1(base, e);
    if constexpr (is_low_bit<T>) {
      const int64_t row = br * B + i;
      return row < p.out_features
          ? v * load_f32(reinterpret_cast<const fp16_t*>(p.scales) + row * p.n_groups +
                         bc / p.group_blocks)
          : 0.f;
    }
    return v;
  };
  for (int32_t e = p.dense_rowptr[br]; e < p.dense_rowptr[br + 1]; ++e) {
    const int64_t blk = static_cast<int64_t>(e) * B * B, bc = p.dense_cols[e];
    float* dst = panel + bc * B;
    for (int i = 0; i < B; ++i)
      for (int c = 0; c < B; ++c) dst[i * in_pad + c] = weight(p.dense_vals, blk + i * B + c, bc, i);
  }
  for (int32_t e = p.s24_rowptr[br]; e < p.s24_rowptr[br + 1]; ++e) {
    const int64_t blk = static_cast<int64_t>(e) * B * H, bc = p.s24_cols[e];
    const int16_t* meta = p.s24_meta + static_cast<int64_t>(e) * B;
    float* dst = panel + bc * B;
    for (int i = 0; i < B; ++i) {
      int c[H];
      slot_columns<B>(meta[i], c);
      for (int j = 0; j < H; ++j) dst[i * in_pad + c[j]] = weight(p.s24_vals, blk + i * H + j, bc, i);
    }
  }
  for (int32_t e = p.topk_rowptr[br]; e < p.topk_rowptr[br + 1]; ++e) {
    const int64_t bc = p.topk_cols[e];
    float* dst = panel + bc * B;
    for (int64_t s = 0; s < p.topk; ++s) {
      const int pos = p.topk_pos[e * p.topk + s];
      dst[(pos / B) * in_pad + pos % B] = weight(p.topk_vals, e * p.topk_stride + s, bc, pos / B);
    }
  }
}

}  // namespace SK_ISA_NS
}  // namespace sparse_kernels_cpu
