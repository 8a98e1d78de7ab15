// Torch binding of the hybrid matmul: y = x @ W^T (+ bias) from the packed three-tier format.
//
// Paths, all accumulating in fp32 (kernels in hybrid_kernels.h):
//  * B = 16, M <= 3 rows of x: "row-dot" decode kernel, bandwidth-bound on the packed bytes.
//  * B = 16, M >= 4: "outer-product" kernel over chunks of 16 rows of x^T. A block-row of the
//    weight (about 160 KB in fp32 for 4096 columns) stays in cache while every chunk of x passes
//    over it, so the weight is read from memory once and a sparse block costs only its kept values.
//  * other block sizes: decompress panels of block-rows to fp32 and multiply with at::mm.
// x is copied once to fp32, zero-padded to whole blocks (transposed for the outer-product path).
// The B = 16 kernels run the variant of the CPU's instruction set (isa.h, hybrid_isa_*.cpp).

#include "cpu/common.h"
#include "cpu/hybrid_entries.h"
#include "cpu/isa.h"
#define SK_ISA_NS generic  // the decompress path and the pair table: plain portable code
#include "cpu/hybrid_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>

namespace sparse_kernels_cpu {
namespace {

// Rows of fp32 weight decompressed per at::mm call: about 4 MiB, whole block-rows.
int64_t panel_block_rows(int64_t in_pad, int64_t nbr, int B) {
  const int64_t rows = (int64_t{1} << 20) / std::max<int64_t>(in_pad, 1);
  return std::clamp<int64_t>(rows / B, 1, nbr);
}

template <typename T, int B>
void run_decompress_mm(const PackedView<T>& p, const at::Tensor& x, at::Tensor& y, int64_t nbr) {
  const int64_t M = x.size(0), in = x.size(1), out_features = y.size(1);
  const int64_t in_pad = ceil_div(in, B) * B;
  at::Tensor xf = at::zeros({M, in_pad}, y.options());
  xf.narrow(1, 0, in).copy_(x);
  at::Tensor yt = at::empty({out_features, M}, y.options());  // y^T: a panel's rows are contiguous
  const int64_t step = panel_block_rows(in_pad, nbr, B);
  at::Tensor panel = at::empty({step * B, in_pad}, y.options());
  for (int64_t br0 = 0; br0 < nbr; br0 += step) {
    const int64_t n_br = std::min(step, nbr - br0);
    panel.zero_();
    float* pp = panel.data_ptr<float>();
    at::parallel_for(br0, br0 + n_br, 1, [&](int64_t begin, int64_t end) {
      for (int64_t br = begin; br < end; ++br)
        generic::decompress_block_row<T, B>(p, br, in_pad, pp + (br - br0) * B * in_pad);
    });
    const int64_t r0 = br0 * B, rows = std::min(n_br * B, out_features - r0);
    at::Tensor yt_rows = yt.narrow(0, r0, rows);
    at::mm_out(yt_rows, panel.narrow(0, 0, rows), xf.t());
  }
  y.copy_(yt.t());
}

template <typename T, int M>
void run_row_dot16(const PackedView<T>& p, const at::Tensor& x, at::Tensor& y, int64_t nbr) {
  constexpr int B = 16;
  const int64_t in = x.size(1), out_features = y.size(1);
  const int64_t in_pad = ceil_div(in, B) * B, pair_stride = in_pad / 4 * 16;
  at::Tensor xf = at::zeros({M, in_pad}, y.options());
  xf.narrow(1, 0, in).copy_(x);
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto kernel = for_active_isa(&generic::row_dot_task16<T, M>,
                                     &avx2::row_dot_task16<T, M>, &avx512::row_dot_task16<T, M>);
  // Only the generic kernel reads pair tables; the AVX2 / AVX-512 ones permute in registers.
  at::Tensor pairs;
  uint64_t* pp = nullptr;
  if (kernel == &generic::row_dot_task16<T, M>) {
    pairs = at::empty({M * pair_stride}, y.options().dtype(at::kLong));
    pp = reinterpret_cast<uint64_t*>(pairs.data_ptr<int64_t>());
    for (int m = 0; m < M; ++m)
      generic::build_pair_table(xp + m * in_pad, in_pad, pp + m * pair_stride);
  }
  at::parallel_for(0, nbr, 1, [&](int64_t begin, int64_t end) {
    kernel(p, begin, end, xp, in_pad, pp, pair_stride, yp, out_features);
  });
}

template <typename T>
void run_outer16(const PackedView<T>& p, const at::Tensor& x, at::Tensor& y, int64_t nbr) {
  constexpr int B = 16, CHUNK = 16;
  const int64_t M = x.size(0), in = x.size(1), out_features = y.size(1);
  const int64_t in_pad = ceil_div(in, B) * B, chunks = ceil_div(M, CHUNK);
  // x^T in chunks of 16 rows of x: xt[chunk][column][row in chunk], zero-padded.
  at::Tensor xt = at::zeros({chunks * CHUNK, in_pad}, y.options());
  xt.narrow(0, 0, M).narrow(1, 0, in).copy_(x);
  xt = xt.view({chunks, CHUNK, in_pad}).transpose(1, 2).contiguous();
  const float* xp = xt.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto kernel = for_active_isa(&generic::outer_task16<T>, &avx2::outer_task16<T>,
                                     &avx512::outer_task16<T>);
  at::parallel_for(0, nbr, 1, [&](int64_t begin, int64_t end) {
    kernel(p, begin, end, xp, in_pad, M, yp, out_features);
  });
}

// The op's packed arguments by name (the order of PackedTensors in sparse_kernels/format.py),
// each contiguous; the copies, where one was needed, live until the end of the call. B is the
// block size, codes_per_element 2 for int4 values (two codes a byte) and 1 otherwise.
struct PackedArgs {
  at::Tensor dense_rowptr, dense_cols, dense_vals;
  at::Tensor s24_rowptr, s24_cols, s24_vals, s24_meta;
  at::Tensor topk_rowptr, topk_cols, topk_vals, topk_pos;
  int64_t B = 16, codes_per_element = 1;
};

template <typename T>
PackedView<T> view_of(const PackedArgs& a) {
  PackedView<T> p{a.dense_rowptr.data_ptr<int32_t>(),
                  a.dense_cols.data_ptr<int32_t>(),
                  reinterpret_cast<const T*>(a.dense_vals.data_ptr()),
                  a.s24_rowptr.data_ptr<int32_t>(),
                  a.s24_cols.data_ptr<int32_t>(),
                  reinterpret_cast<const T*>(a.s24_vals.data_ptr()),
                  a.s24_meta.data_ptr<int16_t>(),
                  a.topk_rowptr.data_ptr<int32_t>(),
                  a.topk_cols.data_ptr<int32_t>(),
                  reinterpret_cast<const T*>(a.topk_vals.data_ptr()),
                  a.topk_pos.data_ptr<uint8_t>(),
                  a.topk_pos.size(1)};
  p.topk_stride = a.topk_vals.size(1) * a.codes_per_element;
  return p;
}

// Checks the packed tensors' structure (dtypes of the indices, shapes of every tier with the
// values' last dimension divided by codes_per_element, rounded up) and returns them contiguous.
PackedArgs packed_args(const char* op, int64_t codes_per_element, const at::Tensor& dense_rowptr,
                       const at::Tensor& dense_cols, const at::Tensor& dense_vals,
                       const at::Tensor& s24_rowptr, const at::Tensor& s24_cols,
                       const at::Tensor& s24_vals, const at::Tensor& s24_meta,
                       const at::Tensor& topk_rowptr, const at::Tensor& topk_cols,
                       const at::Tensor& topk_vals, const at::Tensor& topk_pos,
                       int64_t out_features) {
  const int64_t c = codes_per_element;
  TORCH_CHECK(dense_vals.dim() == 3 && dense_vals.size(2) * c == dense_vals.size(1),
              op, ": dense_vals must be [n, B, B", c == 2 ? " / 2" : "", "], got ",
              dense_vals.sizes());
  const int64_t B = dense_vals.size(1);
  TORCH_CHECK(B == 4 || B == 8 || B == 12 || B == 16, op,
              ": block size must be 4, 8, 12 or 16, got ", B);
  const int64_t nbr = ceil_div(out_features, B);
  for (const at::Tensor* v : {&dense_vals, &s24_vals, &topk_vals}) check_cpu(*v, op);
  for (const at::Tensor* r : {&dense_rowptr, &s24_rowptr, &topk_rowptr}) {
    TORCH_CHECK(r->scalar_type() == at::kInt && r->dim() == 1 && r->numel() == nbr + 1, op,
                ": each rowptr must be int32 [ceil(out/B) + 1] = [", nbr + 1, "], got ",
                r->scalar_type(), " ", r->sizes());
  }
  TORCH_CHECK(dense_cols.scalar_type() == at::kInt && s24_cols.scalar_type() == at::kInt &&
                  topk_cols.scalar_type() == at::kInt,
              op, ": block column indices must be int32");
  TORCH_CHECK(s24_vals.dim() == 3 && s24_vals.size(1) == B && s24_vals.size(2) == B / 2 / c, op,
              ": s24_vals must be [n, ", B, ", ", B / 2 / c, "], got ", s24_vals.sizes());
  TORCH_CHECK(s24_meta.scalar_type() == at::kShort && s24_meta.dim() == 2 &&
                  s24_meta.size(0) == s24_vals.size(0) && s24_meta.size(1) == B,
              op, ": s24_meta must be int16 [", s24_vals.size(0), ", ", B, "], got ",
              s24_meta.scalar_type(), " ", s24_meta.sizes());
  TORCH_CHECK(topk_pos.scalar_type() == at::kByte && topk_pos.dim() == 2, op,
              ": topk_pos must be uint8 [n, K], got ", topk_pos.scalar_type(), " ",
              topk_pos.sizes());
  const int64_t K = topk_pos.size(1);
  TORCH_CHECK(topk_vals.dim() == 2 && topk_vals.size(0) == topk_pos.size(0) &&
                  topk_vals.size(1) == ceil_div(K, c),
              op, ": topk_vals must be [", topk_pos.size(0), ", ", ceil_div(K, c),
              "] for K = ", K, ", got ", topk_vals.sizes());
  TORCH_CHECK(dense_cols.numel() == dense_vals.size(0) && s24_cols.numel() == s24_vals.size(0) &&
                  topk_cols.numel() == topk_vals.size(0),
              op, ": each tier needs one block column per block of values");
  return {dense_rowptr.contiguous(), dense_cols.contiguous(), dense_vals.contiguous(),
          s24_rowptr.contiguous(),   s24_cols.contiguous(),   s24_vals.contiguous(),
          s24_meta.contiguous(),     topk_rowptr.contiguous(), topk_cols.contiguous(),
          topk_vals.contiguous(),    topk_pos.contiguous(),   B, c};
}

// y [M, out] fp32 = x @ W^T through the path for the block size and M (see the top of the file).
template <typename T>
void run_hybrid(const PackedView<T>& p, int64_t B, const at::Tensor& x, at::Tensor& y) {
  const int64_t M = x.size(0), nbr = ceil_div(y.size(1), B);
  if (M == 0) return;
  switch (B) {
    case 4: run_decompress_mm<T, 4>(p, x, y, nbr); break;
    case 8: run_decompress_mm<T, 8>(p, x, y, nbr); break;
    case 12: run_decompress_mm<T, 12>(p, x, y, nbr); break;
    default:
      if (M == 1) run_row_dot16<T, 1>(p, x, y, nbr);
      else if (M == 2) run_row_dot16<T, 2>(p, x, y, nbr);
      else if (M == 3) run_row_dot16<T, 3>(p, x, y, nbr);
      else run_outer16<T>(p, x, y, nbr);
  }
}

// y in x's dtype, plus the bias.
at::Tensor finish(at::Tensor y, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  if (bias) y.add_(*bias);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

void check_x_and_bias(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                      int64_t out_features) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, in_features], got ", x.sizes());
  check_cpu(x, op);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, op, ": bias must be [",
                out_features, "], got ", bias->sizes());
  }
}

at::Tensor hybrid_linear(const at::Tensor& x, const at::Tensor& dense_rowptr,
                         const at::Tensor& dense_cols, const at::Tensor& dense_vals,
                         const at::Tensor& s24_rowptr, const at::Tensor& s24_cols,
                         const at::Tensor& s24_vals, const at::Tensor& s24_meta,
                         const at::Tensor& topk_rowptr, const at::Tensor& topk_cols,
                         const at::Tensor& topk_vals, const at::Tensor& topk_pos,
                         int64_t out_features, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "hybrid_linear";
  check_x_and_bias(op, x, bias, out_features);
  for (const at::Tensor* v : {&dense_vals, &s24_vals, &topk_vals}) {
    TORCH_CHECK(v->scalar_type() == x.scalar_type(), op, ": x is ", x.scalar_type(),
                " but packed values are ", v->scalar_type());
  }
  const PackedArgs packed =
      packed_args(op, 1, dense_rowptr, dense_cols, dense_vals, s24_rowptr, s24_cols, s24_vals,
                  s24_meta, topk_rowptr, topk_cols, topk_vals, topk_pos, out_features);
  at::Tensor y = at::empty({x.size(0), out_features}, x.options().dtype(at::kFloat));
  dispatch_float(x, "hybrid_linear: x", [&](auto tag) {
    using C10 = decltype(tag);  // float, c10::BFloat16 or c10::Half
    using T = std::conditional_t<std::is_same_v<C10, float>, float,
                                 std::conditional_t<std::is_same_v<C10, c10::Half>, fp16_t,
                                                    bf16_t>>;
    run_hybrid<T>(view_of<T>(packed), packed.B, x, y);
  });
  return finish(y, x, bias);
}

// Low-bit values (sparse_kernels/quant.py): int8 codes, or int4 two per byte (uint8), times the
// fp16 scales [out, ceil(in / group_size)]; x of any float dtype, accumulated in fp32.
at::Tensor hybrid_linear_q(const at::Tensor& x, const at::Tensor& dense_rowptr,
                           const at::Tensor& dense_cols, const at::Tensor& dense_vals,
                           const at::Tensor& s24_rowptr, const at::Tensor& s24_cols,
                           const at::Tensor& s24_vals, const at::Tensor& s24_meta,
                           const at::Tensor& topk_rowptr, const at::Tensor& topk_cols,
                           const at::Tensor& topk_vals, const at::Tensor& topk_pos,
                           const at::Tensor& scales, int64_t group_size, int64_t out_features,
                           const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "hybrid_linear_q";
  check_x_and_bias(op, x, bias, out_features);
  const at::ScalarType codes = dense_vals.scalar_type();
  TORCH_CHECK(codes == at::kChar || codes == at::kByte, op,
              ": packed values must be int8 (8-bit codes) or uint8 (4-bit codes two per byte), "
              "got ", codes);
  TORCH_CHECK(s24_vals.scalar_type() == codes && topk_vals.scalar_type() == codes, op,
              ": the three tiers' values must share one dtype, got ", dense_vals.scalar_type(),
              ", ", s24_vals.scalar_type(), ", ", topk_vals.scalar_type());
  const PackedArgs packed = packed_args(op, codes == at::kByte ? 2 : 1, dense_rowptr, dense_cols,
                                        dense_vals, s24_rowptr, s24_cols, s24_vals, s24_meta,
                                        topk_rowptr, topk_cols, topk_vals, topk_pos, out_features);
  TORCH_CHECK(group_size > 0 && group_size % packed.B == 0, op,
              ": group_size must be a positive multiple of the block size ", packed.B, ", got ",
              group_size);
  const int64_t n_groups = ceil_div(x.size(1), group_size);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 2 &&
                  scales.size(0) == out_features && scales.size(1) == n_groups,
              op, ": scales must be float16 [out_features, ceil(in_features / group_size)] = [",
              out_features, ", ", n_groups, "], got ", scales.scalar_type(), " ", scales.sizes());
  check_cpu(scales, op);
  const at::Tensor scales_c = scales.contiguous();
  at::Tensor y = at::empty({x.size(0), out_features}, x.options().dtype(at::kFloat));
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    PackedView<T> p = view_of<T>(packed);
    p.scales = reinterpret_cast<const uint16_t*>(scales_c.data_ptr());
    p.n_groups = n_groups;
    p.group_blocks = group_size / packed.B;
    p.out_features = out_features;
    run_hybrid<T>(p, packed.B, x, y);
  };
  if (codes == at::kChar) run(q8_t{});
  else run(q4_t{});
  return finish(y, x, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("hybrid_linear", &hybrid_linear);
  m.impl("hybrid_linear_q", &hybrid_linear_q);
}

}  // namespace sparse_kernels_cpu
