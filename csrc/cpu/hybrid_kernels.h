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
// define __AVX2__ after `#pragma GCC target`, so the includer says it; SK_ISA_HAS_AVX512 likewise
// for the 512-bit int4 decode paths.
#ifndef SK_ISA_NS
#error "define SK_ISA_NS (the instruction set's namespace) before including hybrid_kernels.h"
#endif
#ifndef SK_ISA_HAS_AVX2
#define SK_ISA_HAS_AVX2 0
#endif
#ifndef SK_ISA_HAS_AVX512
#define SK_ISA_HAS_AVX512 0
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

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

// Bytes of `count` values of type T (int4: two per byte).
template <typename T>
constexpr int64_t value_bytes(int64_t count) {
  return std::is_same_v<T, q4_t> ? (count + 1) / 2 : count * static_cast<int64_t>(sizeof(T));
}

// Decode reads each tier's blocks in storage order, doing about as much arithmetic per block as
// fetching it from memory takes; without software prefetch the two add up instead of overlapping
// (benchmarks/NOTES-lowbit.md). So each block asks for the `bytes` of the block
// kPrefetchBlocks ahead (one request per 64-byte line; past the end a prefetch does nothing).
constexpr int64_t kPrefetchBlocks = 16;

inline void prefetch_ahead(const void* block, int64_t bytes) {
  const char* ahead = static_cast<const char*>(block) + kPrefetchBlocks * bytes;
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(ahead + off, 0, 3);
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

#if SK_ISA_HAS_AVX512
// ------------------------------------------------------------------------------------------
// int4 decode with AVX-512 (B = 16). Widening 8 codes at a time costs more instructions than the
// products they feed, which leaves the 256-bit path compute-bound at a third of the bytes
// (benchmarks/NOTES-lowbit.md). Here 16 bytes of codes widen at once, one byte per 32-bit lane:
// the low nibbles are the even elements of a row, the high nibbles the odd ones, and each meets
// x permuted to match (one 16-float x block is one register).

// The codes of 16 lanes holding one byte each, as fp32: the low and the high nibbles. The bits
// 0x4B000000 | (n ^ 8) are the float 2^23 + 8 + code exactly, so one subtraction converts.
inline void nibble_codes(__m512i bytes, __m512& lo, __m512& hi) {
  const __m512i nibble = _mm512_set1_epi32(0xF), magic = _mm512_set1_epi32(0x4B000008);
  const __m512 bias = _mm512_set1_ps(8388616.0f);  // 2^23 + 8
  constexpr int kAndXor = 0x6A;                     // ternary logic (a & b) ^ c
  lo = _mm512_sub_ps(
      _mm512_castsi512_ps(_mm512_ternarylogic_epi32(bytes, nibble, magic, kAndXor)), bias);
  hi = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_ternarylogic_epi32(
                         _mm512_srli_epi32(bytes, 4), nibble, magic, kAndXor)),
                     bias);
}

inline __m512i widen16(const q4_t* bytes) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
}

// Per-row sums of block-row br's int4 dense blocks for M rows of x, added to sums[m][row].
// Two block rows per register: lanes 0-7 row 2r's bytes, 8-15 row 2r + 1's.
template <int M>
void q4_dense_rows16(const PackedView<q4_t>& p, int64_t br, const float* xf, int64_t in_pad,
                     float (&sums)[M][16]) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  __m512 acc[M][8], scale[8];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < 8; ++r) acc[m][r] = _mm512_setzero_ps();
  float s[16] = {};
  int64_t group = -1, built = -1;
  for (int32_t e = p.dense_rowptr[br]; e < p.dense_rowptr[br + 1]; ++e) {
    const int64_t bc = p.dense_cols[e];
    block_scales(p, br, bc, s, group);
    if (group != built) {
      built = group;
      for (int r = 0; r < 8; ++r)
        scale[r] = _mm512_insertf32x8(_mm512_set1_ps(s[2 * r]), _mm256_set1_ps(s[2 * r + 1]), 1);
    }
    __m512 x_even[M], x_odd[M];
    for (int m = 0; m < M; ++m) {
      const __m512 x = _mm512_loadu_ps(xf + m * in_pad + bc * 16);
      x_even[m] = _mm512_permutexvar_ps(even, x);
      x_odd[m] = _mm512_permutexvar_ps(odd, x);
    }
    const q4_t* codes = p.dense_vals + static_cast<int64_t>(e) * 128;
    prefetch_ahead(codes, 128);
    for (int r = 0; r < 8; ++r) {
      __m512 lo, hi;
      nibble_codes(widen16(codes + r * 16), lo, hi);
      for (int m = 0; m < M; ++m)
        acc[m][r] = _mm512_fmadd_ps(
            scale[r], _mm512_fmadd_ps(hi, x_odd[m], _mm512_mul_ps(lo, x_even[m])), acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < 8; ++r) {
      sums[m][2 * r] += _mm512_mask_reduce_add_ps(0x00FF, acc[m][r]);
      sums[m][2 * r + 1] += _mm512_mask_reduce_add_ps(0xFF00, acc[m][r]);
    }
}

// The same for int4 2:4 blocks: four block rows per register (a row's 8 codes are 4 bytes),
// lane 4r + j holding slots 2j (low nibble) and 2j + 1 (high) of row r, which sit in columns
// 4j + the 2-bit fields j of the row's meta; x is permuted to those columns.
template <int M>
void q4_s24_rows16(const PackedView<q4_t>& p, int64_t br, const float* xf, int64_t in_pad,
                   float (&sums)[M][16]) {
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12);
  const __m512i group_col = shifts;  // 4j: the shift of group j's fields is its first column
  const __m512i three = _mm512_set1_epi32(3);
  constexpr int kAndOr = 0xEA;  // ternary logic (a & b) | c
  __m512 acc[M][4], scale[4];
  for (int m = 0; m < M; ++m)
    for (int q = 0; q < 4; ++q) acc[m][q] = _mm512_setzero_ps();
  float s[16] = {};
  int64_t group = -1, built = -1;
  for (int32_t e = p.s24_rowptr[br]; e < p.s24_rowptr[br + 1]; ++e) {
    const int64_t bc = p.s24_cols[e];
    block_scales(p, br, bc, s, group);
    if (group != built) {
      built = group;
      for (int q = 0; q < 4; ++q)
        scale[q] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(s + 4 * q)));
    }
    __m512 x[M];
    for (int m = 0; m < M; ++m) x[m] = _mm512_loadu_ps(xf + m * in_pad + bc * 16);
    const q4_t* codes = p.s24_vals + static_cast<int64_t>(e) * 64;
    const int16_t* meta = p.s24_meta + static_cast<int64_t>(e) * 16;
    prefetch_ahead(codes, 64);
    prefetch_ahead(meta, 32);
    for (int q = 0; q < 4; ++q) {
      const __m512i metas = _mm512_permutexvar_epi32(
          spread, _mm512_cvtepu16_epi32(_mm256_zextsi128_si256(
                      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(meta + 4 * q)))));
      const __m512i fields = _mm512_srlv_epi32(metas, shifts);
      const __m512i col_even = _mm512_ternarylogic_epi32(fields, three, group_col, kAndOr);
      const __m512i col_odd =
          _mm512_ternarylogic_epi32(_mm512_srli_epi32(fields, 2), three, group_col, kAndOr);
      __m512 lo, hi;
      nibble_codes(widen16(codes + q * 16), lo, hi);
      for (int m = 0; m < M; ++m) {
        const __m512 dot = _mm512_fmadd_ps(hi, _mm512_permutexvar_ps(col_odd, x[m]),
                                           _mm512_mul_ps(lo, _mm512_permutexvar_ps(col_even, x[m])));
        acc[m][q] = _mm512_fmadd_ps(scale[q], dot, acc[m][q]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int q = 0; q < 4; ++q) {
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, acc[m][q]);
      for (int r = 0; r < 4; ++r)
        sums[m][4 * q + r] += lanes[4 * r] + lanes[4 * r + 1] + lanes[4 * r + 2] + lanes[4 * r + 3];
    }
}

// One int4 block's values as fp32 in their stored order, each times its row's scale: a dense
// block's 16 rows of 16 (kRowLen 16) or a 2:4 block's 16 rows of 8 slots (kRowLen 8). Each
// 16 bytes widen to lanes of two (or four) rows' bytes; interleaving their low and high nibbles
// gives 32 consecutive values.
template <int kRowLen>
inline void q4_block_to_f32(const q4_t* codes, const float (&scale)[16], float* out) {
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  // Row of each lane of 16 consecutive values, from the first one's row.
  const __m512i lane_row = kRowLen == 16 ? _mm512_setzero_si512()
      : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512 s = _mm512_loadu_ps(scale);
  for (int k = 0; k < kRowLen / 2; ++k) {
    __m512 lo, hi;
    nibble_codes(widen16(codes + 16 * k), lo, hi);
    for (int half = 0; half < 2; ++half) {
      const int o = 2 * k + half;  // values 16 * o .. 16 * o + 15
      const __m512 row_scale = _mm512_permutexvar_ps(
          _mm512_add_epi32(_mm512_set1_epi32(16 * o / kRowLen), lane_row), s);
      const __m512 v = _mm512_permutex2var_ps(lo, half ? second : first, hi);
      _mm512_store_ps(out + 16 * o, _mm512_mul_ps(v, row_scale));
    }
  }
}
#endif

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
  float acc_topk[M][B] = {};  // scalar per-row sums (top-K entries, the 512-bit int4 paths)
  float scale[B] = {};  // low-bit values: the rows' scales of the current group
  int64_t group = -1;
#if SK_ISA_HAS_AVX512
  // int4 dense and 2:4 blocks take the 512-bit paths above (their sums land in acc_topk).
  constexpr bool kWideQ4 = std::is_same_v<T, q4_t>;
  if constexpr (kWideQ4) {
    q4_dense_rows16<M>(p, br, xf, in_pad, acc_topk);
    q4_s24_rows16<M>(p, br, xf, in_pad, acc_topk);
  }
#else
  constexpr bool kWideQ4 = false;
#endif

  for (int32_t e = p.dense_rowptr[br]; !kWideQ4 && e < p.dense_rowptr[br + 1]; ++e) {
    const int64_t bc = p.dense_cols[e];
    prefetch_ahead(reinterpret_cast<const char*>(p.dense_vals) + value_bytes<T>(e * B * B),
                   value_bytes<T>(B * B));
    if constexpr (is_low_bit<T>) block_scales(p, br, bc, scale, group);
    dense_block_rows16<T, M>(p.dense_vals, static_cast<int64_t>(e) * B * B, xf + bc * B, in_pad,
                             acc, scale);
  }

  for (int32_t e = p.s24_rowptr[br]; !kWideQ4 && e < p.s24_rowptr[br + 1]; ++e) {
    const int64_t off = static_cast<int64_t>(e) * B * (B / 2), bc = p.s24_cols[e];
    const int16_t* meta = p.s24_meta + static_cast<int64_t>(e) * B;
    prefetch_ahead(reinterpret_cast<const char*>(p.s24_vals) + value_bytes<T>(off),
                   value_bytes<T>(B * (B / 2)));
    prefetch_ahead(meta, B * sizeof(int16_t));
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
    prefetch_ahead(reinterpret_cast<const char*>(p.topk_vals) + value_bytes<T>(vals),
                   value_bytes<T>(p.topk_stride));
    prefetch_ahead(pos, p.topk);
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
#if SK_ISA_HAS_AVX512
  // int4 blocks are decoded whole, 32 codes per step, into `tile` (scaled): one code at a time
  // costs more than the V products each feeds.
  constexpr bool kTileQ4 = std::is_same_v<T, q4_t>;
#else
  constexpr bool kTileQ4 = false;
#endif
  alignas(64) float tile[B * B];
  // Value k of the block whose values start at element blk of a tier, as it multiplies.
  const auto value = [&](const T* base, int64_t blk, int64_t k, int row) {
    if constexpr (kTileQ4) return tile[k];
    else return weight(value1(base, blk + k), row);
  };

  for (int32_t e = p.dense_rowptr[br]; e < p.dense_rowptr[br + 1]; ++e) {
    const int64_t blk = static_cast<int64_t>(e) * B * B, bc = p.dense_cols[e];
    const float* xc = xt + bc * B * W;
    if constexpr (is_low_bit<T>) block_scales(p, br, bc, scale, group);
#if SK_ISA_HAS_AVX512
    if constexpr (kTileQ4) q4_block_to_f32<16>(p.dense_vals + blk / 2, scale, tile);
#endif
    for (int i = 0; i < B; ++i) {
      f32x8 a[V];
      for (int v = 0; v < V; ++v) a[v] = acc[i][v];
      for (int c = 0; c < B; ++c) {
        const f32x8 w = splat8(value(p.dense_vals, blk, i * B + c, i));
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
#if SK_ISA_HAS_AVX512
    if constexpr (kTileQ4) q4_block_to_f32<8>(p.s24_vals + blk / 2, scale, tile);
#endif
    for (int i = 0; i < B; ++i) {
      int c[B / 2];
      slot_columns<B>(meta[i], c);
      f32x8 a[V];
      for (int v = 0; v < V; ++v) a[v] = acc[i][v];
      for (int j = 0; j < B / 2; ++j) {
        const f32x8 w = splat8(value(p.s24_vals, blk, i * (B / 2) + j, i));
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
