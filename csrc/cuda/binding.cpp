// Torch binding of the CUDA kernels: checks the arguments (naming the offending values), allocates
// outputs and workspace with torch, and calls the launch functions of cuda/launch.h on the
// current stream of the inputs' device. The only CUDA-side file that includes torch headers, and
// only the few it needs (they dominate the build time).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <array>
#include <optional>
#include <tuple>
#include <utility>

#include "cuda/launch.h"

namespace sparse_kernels_cuda {
namespace {

DType float_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda(), what, " must be a CUDA tensor, got one on ", t.device());
}

void check_same_device(const at::Tensor& t, const char* what, const at::Tensor& anchor,
                       const char* anchor_name) {
  TORCH_CHECK(t.device() == anchor.device(), what, " is on ", t.device(), " but ", anchor_name,
              " is on ", anchor.device(), "; all tensors must be on one CUDA device");
}

void check_block_size(int64_t block_size, const char* what) {
  TORCH_CHECK(block_size == 4 || block_size == 8 || block_size == 12 || block_size == 16, what,
              " must be 4, 8, 12 or 16, got ", block_size);
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

uint8_t* mask_bytes(at::Tensor& mask) { return static_cast<uint8_t*>(mask.data_ptr()); }

// A kernel's scratch of `bytes` on `like`'s device (undefined when none is needed).
at::Tensor workspace_of(size_t bytes, const at::Tensor& like) {
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// ------------------------------------------------------------------------ pruning ops

std::tuple<at::Tensor, at::Tensor> wanda_scores(const at::Tensor& weight_in,
                                                const at::Tensor& act_sq_norm_in,
                                                int64_t block_size) {
  check_cuda(weight_in, "weight");
  check_same_device(act_sq_norm_in, "act_sq_norm", weight_in, "weight");
  TORCH_CHECK(weight_in.dim() == 2, "weight must be 2-D [out_features, in_features], got shape ",
              weight_in.sizes());
  check_block_size(block_size, "block_size");
  const int64_t out_f = weight_in.size(0), in_f = weight_in.size(1);
  TORCH_CHECK(act_sq_norm_in.dim() == 1 && act_sq_norm_in.size(0) == in_f,
              "act_sq_norm must have shape (", in_f, ",) (one entry per input column of weight), "
              "got ", act_sq_norm_in.sizes());
  const DType weight_dtype = float_dtype(weight_in, "weight");
  const DType norm_dtype = float_dtype(act_sq_norm_in, "act_sq_norm");

  const c10::cuda::CUDAGuard guard(weight_in.device());
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor act = act_sq_norm_in.contiguous();
  const auto fp32 = weight.options().dtype(at::kFloat);
  at::Tensor scores = at::empty({out_f, in_f}, fp32);
  at::Tensor block_scores =
      at::empty({ceil_div(out_f, block_size), ceil_div(in_f, block_size)}, fp32);
  check_launch(launch_wanda_scores(weight.data_ptr(), weight_dtype, act.data_ptr(), norm_dtype,
                                   out_f, in_f, static_cast<int>(block_size),
                                   scores.data_ptr<float>(), block_scores.data_ptr<float>(),
                                   current_stream()),
               "wanda_scores");
  return {scores, block_scores};
}

void check_scores(const at::Tensor& scores) {
  check_cuda(scores, "scores");
  TORCH_CHECK(scores.dim() == 2, "scores must be 2-D [out_features, in_features], got shape ",
              scores.sizes());
}

at::Tensor block_topk_mask(const at::Tensor& scores_in, int64_t k, int64_t block_size) {
  check_scores(scores_in);
  check_block_size(block_size, "block_size");
  TORCH_CHECK(k >= 1 && k <= block_size * block_size, "k must be in 1..",
              block_size * block_size, " (block_size^2), got k=", k);
  const DType dtype = float_dtype(scores_in, "scores");

  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  at::Tensor mask = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  check_launch(launch_block_topk_mask(scores.data_ptr(), dtype, scores.size(0), scores.size(1),
                                      static_cast<int>(k), static_cast<int>(block_size),
                                      mask_bytes(mask), current_stream()),
               "block_topk_mask");
  return mask;
}

at::Tensor nm_mask(const at::Tensor& scores_in, int64_t n, int64_t m) {
  check_scores(scores_in);
  TORCH_CHECK(n >= 1 && n <= m, "N:M needs 1 <= n <= m, got n=", n, ", m=", m);
  TORCH_CHECK(m <= INT_MAX, "m too large: ", m);
  TORCH_CHECK(scores_in.size(1) <= INT_MAX, "nm_mask: at most ", INT_MAX,
              " input features, got ", scores_in.size(1));
  const DType dtype = float_dtype(scores_in, "scores");

  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  at::Tensor mask = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  check_launch(launch_nm_mask(scores.data_ptr(), dtype, scores.size(0), scores.size(1),
                              static_cast<int>(n), static_cast<int>(m), mask_bytes(mask),
                              current_stream()),
               "nm_mask");
  return mask;
}

std::tuple<at::Tensor, at::Tensor> compress_24(const at::Tensor& blocks_in) {
  check_cuda(blocks_in, "blocks");
  TORCH_CHECK(blocks_in.dim() == 3 && blocks_in.size(1) == blocks_in.size(2),
              "blocks must be [n, B, B], got shape ", blocks_in.sizes());
  const int64_t b = blocks_in.size(1);
  TORCH_CHECK(b == 4 || b == 8 || b == 12 || b == 16,
              "blocks must be [n, B, B] with B = 4, 8, 12 or 16, got B=", b);
  const DType dtype = float_dtype(blocks_in, "blocks");

  const c10::cuda::CUDAGuard guard(blocks_in.device());
  const at::Tensor blocks = blocks_in.contiguous();
  const int64_t n_blocks = blocks.size(0);
  at::Tensor values = at::empty({n_blocks, b, b / 2}, blocks.options());
  at::Tensor meta = at::empty({n_blocks, b}, blocks.options().dtype(at::kShort));
  check_launch(launch_compress_24(blocks.data_ptr(), dtype, n_blocks, static_cast<int>(b),
                                  values.data_ptr(), meta.data_ptr<int16_t>(), current_stream()),
               "compress_24");
  return {values, meta};
}

// ------------------------------------------------------------------------ hybrid_linear

// The packed tensors of the op (argument order), made contiguous: no-ops for a HybridWeight's own.
// The tensor-core kernel reads block values with 8-byte (dense) and 4-byte (2:4) loads: a view
// that starts inside its storage at an odd element is copied (a HybridWeight's own tensors are
// whole allocations, so this costs nothing for them).
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

struct PackedArgs {
  at::Tensor dense_rowptr, dense_cols, dense_vals;
  at::Tensor s24_rowptr, s24_cols, s24_vals, s24_meta;
  at::Tensor topk_rowptr, topk_cols, topk_vals, topk_pos;

  // Each tensor with its argument name, for messages.
  std::array<std::pair<const char*, const at::Tensor*>, 11> named() const {
    return {{{"dense_rowptr", &dense_rowptr}, {"dense_cols", &dense_cols},
             {"dense_vals", &dense_vals}, {"s24_rowptr", &s24_rowptr}, {"s24_cols", &s24_cols},
             {"s24_vals", &s24_vals}, {"s24_meta", &s24_meta}, {"topk_rowptr", &topk_rowptr},
             {"topk_cols", &topk_cols}, {"topk_vals", &topk_vals}, {"topk_pos", &topk_pos}}};
  }
};

// The packed tensors of an unpack op (argument order), made contiguous.
PackedArgs contiguous_packed(const at::Tensor& dense_rowptr, const at::Tensor& dense_cols,
                             const at::Tensor& dense_vals, const at::Tensor& s24_rowptr,
                             const at::Tensor& s24_cols, const at::Tensor& s24_vals,
                             const at::Tensor& s24_meta, const at::Tensor& topk_rowptr,
                             const at::Tensor& topk_cols, const at::Tensor& topk_vals,
                             const at::Tensor& topk_pos) {
  return {dense_rowptr.contiguous(), dense_cols.contiguous(), dense_vals.contiguous(),
          s24_rowptr.contiguous(),   s24_cols.contiguous(),   s24_vals.contiguous(),
          s24_meta.contiguous(),     topk_rowptr.contiguous(), topk_cols.contiguous(),
          topk_vals.contiguous(),    topk_pos.contiguous()};
}

// Shapes of the packed format (sparse_kernels/format.py) for a weight of out_features rows, with
// the values' last dimension divided by codes_per_element (rounded up: 2 for int4 codes two per
// byte) and the block size of dense_vals; every tensor on the anchor's device.
void check_packed(const PackedArgs& p, const at::Tensor& anchor, int64_t out_features,
                  const char* anchor_name, int64_t codes_per_element = 1) {
  const int64_t c = codes_per_element;
  for (const auto& [name, t] : p.named()) check_same_device(*t, name, anchor, anchor_name);
  const at::Tensor& dense_vals = p.dense_vals;
  TORCH_CHECK(dense_vals.dim() == 3 && dense_vals.size(2) * c == dense_vals.size(1),
              "hybrid_linear: dense_vals must be [n, B, B", c == 2 ? " / 2" : "", "], got ",
              dense_vals.sizes());
  const int64_t b = dense_vals.size(1);
  check_block_size(b, "hybrid_linear: block size (dense_vals.size(1))");
  const int64_t nbr = ceil_div(out_features, b);
  for (const at::Tensor* r : {&p.dense_rowptr, &p.s24_rowptr, &p.topk_rowptr}) {
    TORCH_CHECK(r->scalar_type() == at::kInt && r->dim() == 1 && r->numel() == nbr + 1,
                "hybrid_linear: each rowptr must be int32 [ceil(out/B) + 1] = [", nbr + 1,
                "], got ", r->scalar_type(), " ", r->sizes());
  }
  for (const at::Tensor* cols : {&p.dense_cols, &p.s24_cols, &p.topk_cols}) {
    TORCH_CHECK(cols->scalar_type() == at::kInt && cols->dim() == 1,
                "hybrid_linear: block column indices must be int32 [n], got ",
                cols->scalar_type(), " ", cols->sizes());
  }
  const at::Tensor& s24_vals = p.s24_vals;
  TORCH_CHECK(s24_vals.dim() == 3 && s24_vals.size(1) == b && s24_vals.size(2) == b / 2 / c,
              "hybrid_linear: s24_vals must be [n, ", b, ", ", b / 2 / c, "], got ",
              s24_vals.sizes());
  const at::Tensor& s24_meta = p.s24_meta;
  TORCH_CHECK(s24_meta.scalar_type() == at::kShort && s24_meta.dim() == 2 &&
                  s24_meta.size(0) == s24_vals.size(0) && s24_meta.size(1) == b,
              "hybrid_linear: s24_meta must be int16 [", s24_vals.size(0), ", ", b, "], got ",
              s24_meta.scalar_type(), " ", s24_meta.sizes());
  const at::Tensor& topk_pos = p.topk_pos;
  TORCH_CHECK(topk_pos.scalar_type() == at::kByte && topk_pos.dim() == 2 &&
                  topk_pos.size(1) <= b * b,
              "hybrid_linear: topk_pos must be uint8 [n, K] with K <= B*B = ", b * b, ", got ",
              topk_pos.scalar_type(), " ", topk_pos.sizes());
  const int64_t k = topk_pos.size(1);
  TORCH_CHECK(p.topk_vals.dim() == 2 && p.topk_vals.size(0) == topk_pos.size(0) &&
                  p.topk_vals.size(1) == ceil_div(k, c),
              "hybrid_linear: topk_vals must be [", topk_pos.size(0), ", ", ceil_div(k, c),
              "] for K = ", k, ", got ", p.topk_vals.sizes());
  TORCH_CHECK(p.dense_cols.numel() == dense_vals.size(0) &&
                  p.s24_cols.numel() == s24_vals.size(0) &&
                  p.topk_cols.numel() == p.topk_vals.size(0),
              "hybrid_linear: each tier needs one block column per block of values, got ",
              p.dense_cols.numel(), "/", dense_vals.size(0), " (dense), ", p.s24_cols.numel(),
              "/", s24_vals.size(0), " (2:4), ", p.topk_cols.numel(), "/", p.topk_vals.size(0),
              " (top-K)");
}

// Float values share the dtype of `anchor` (x, or the values themselves for unpack).
void check_values_dtype(const PackedArgs& p, const at::Tensor& anchor, const char* anchor_name) {
  for (const at::Tensor* v : {&p.dense_vals, &p.s24_vals, &p.topk_vals}) {
    TORCH_CHECK(v->scalar_type() == anchor.scalar_type(), "hybrid_linear: ", anchor_name, " is ",
                anchor.scalar_type(), " but packed values are ", v->scalar_type());
  }
}

// The tiers hold one block per block of a [out, in] weight.
void check_block_count(const PackedArgs& p, int64_t out_features, int64_t in_features,
                       const char* op) {
  const int64_t b = p.dense_vals.size(1);
  const int64_t n = p.dense_cols.numel() + p.s24_cols.numel() + p.topk_cols.numel();
  TORCH_CHECK(n == ceil_div(out_features, b) * ceil_div(in_features, b), op, ": the tiers hold ",
              p.dense_cols.numel(), " + ", p.s24_cols.numel(), " + ", p.topk_cols.numel(),
              " blocks but a [", out_features, ", ", in_features, "] weight has ",
              ceil_div(out_features, b) * ceil_div(in_features, b));
}

PackedWeight packed_weight(const PackedArgs& p, int64_t out_features, int64_t in_features) {
  PackedWeight w;
  w.out_features = out_features;
  w.in_features = in_features;
  w.block_size = static_cast<int>(p.dense_vals.size(1));
  w.topk = static_cast<int>(p.topk_pos.size(1));  // values per block (int4: 2 per byte)
  w.n_dense = p.dense_vals.size(0);
  w.n_s24 = p.s24_vals.size(0);
  w.n_topk = p.topk_vals.size(0);
  w.dense_rowptr = p.dense_rowptr.data_ptr<int32_t>();
  w.dense_cols = p.dense_cols.data_ptr<int32_t>();
  w.dense_vals = p.dense_vals.data_ptr();
  w.s24_rowptr = p.s24_rowptr.data_ptr<int32_t>();
  w.s24_cols = p.s24_cols.data_ptr<int32_t>();
  w.s24_vals = p.s24_vals.data_ptr();
  w.s24_meta = p.s24_meta.data_ptr<int16_t>();
  w.topk_rowptr = p.topk_rowptr.data_ptr<int32_t>();
  w.topk_cols = p.topk_cols.data_ptr<int32_t>();
  w.topk_vals = p.topk_vals.data_ptr();
  w.topk_pos = p.topk_pos.data_ptr<uint8_t>();
  return w;
}

at::Tensor hybrid_linear(const at::Tensor& x_in, const at::Tensor& dense_rowptr,
                         const at::Tensor& dense_cols, const at::Tensor& dense_vals,
                         const at::Tensor& s24_rowptr, const at::Tensor& s24_cols,
                         const at::Tensor& s24_vals, const at::Tensor& s24_meta,
                         const at::Tensor& topk_rowptr, const at::Tensor& topk_cols,
                         const at::Tensor& topk_vals, const at::Tensor& topk_pos,
                         int64_t out_features, const std::optional<at::Tensor>& bias_in) {
  check_cuda(x_in, "hybrid_linear: x");
  TORCH_CHECK(x_in.dim() == 2, "hybrid_linear: x must be 2-D [M, in_features], got ",
              x_in.sizes());
  const DType dtype = float_dtype(x_in, "hybrid_linear: x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const PackedArgs packed{dense_rowptr.contiguous(), dense_cols.contiguous(),
                           aligned_contiguous(dense_vals), s24_rowptr.contiguous(),
                           s24_cols.contiguous(), aligned_contiguous(s24_vals),
                           s24_meta.contiguous(), topk_rowptr.contiguous(),
                           topk_cols.contiguous(), topk_vals.contiguous(), topk_pos.contiguous()};
  check_packed(packed, x_in, out_features, "x");
  check_values_dtype(packed, x_in, "x");
  at::Tensor bias;
  if (bias_in) {
    check_same_device(*bias_in, "hybrid_linear: bias", x_in, "x");
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == out_features &&
                    bias_in->scalar_type() == x_in.scalar_type(),
                "hybrid_linear: bias must be [", out_features, "] ", x_in.scalar_type(), ", got ",
                bias_in->sizes(), " ", bias_in->scalar_type());
    bias = bias_in->contiguous();
  }

  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0);
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (rows == 0 || out_features == 0) return y;
  const PackedWeight w = packed_weight(packed, out_features, x.size(1));
  const at::Tensor workspace = workspace_of(hybrid_linear_workspace_bytes(w, rows, dtype), x);
  check_launch(launch_hybrid_linear(x.data_ptr(), rows, w, data_or_null(bias), y.data_ptr(),
                                    dtype, data_or_null(workspace), current_stream()),
               "hybrid_linear");
  return y;
}

// ------------------------------------------------------------------------ unpack_hybrid

at::Tensor unpack_hybrid(const at::Tensor& dense_rowptr, const at::Tensor& dense_cols,
                         const at::Tensor& dense_vals, const at::Tensor& s24_rowptr,
                         const at::Tensor& s24_cols, const at::Tensor& s24_vals,
                         const at::Tensor& s24_meta, const at::Tensor& topk_rowptr,
                         const at::Tensor& topk_cols, const at::Tensor& topk_vals,
                         const at::Tensor& topk_pos, int64_t out_features, int64_t in_features) {
  check_cuda(dense_vals, "unpack_hybrid: dense_vals");
  const DType dtype = float_dtype(dense_vals, "unpack_hybrid: dense_vals");
  TORCH_CHECK(out_features >= 0 && in_features >= 0, "unpack_hybrid: negative shape [",
              out_features, ", ", in_features, "]");
  const c10::cuda::CUDAGuard guard(dense_vals.device());
  const PackedArgs packed = contiguous_packed(dense_rowptr, dense_cols, dense_vals, s24_rowptr,
                                              s24_cols, s24_vals, s24_meta, topk_rowptr,
                                              topk_cols, topk_vals, topk_pos);
  check_packed(packed, packed.dense_vals, out_features, "dense_vals");
  check_values_dtype(packed, packed.dense_vals, "dense_vals");
  check_block_count(packed, out_features, in_features, "unpack_hybrid");
  at::Tensor dense = at::empty({out_features, in_features}, dense_vals.options());
  if (dense.numel() == 0) return dense;
  check_launch(launch_unpack_hybrid(packed_weight(packed, out_features, in_features), dtype,
                                    dense.data_ptr(), current_stream()),
               "unpack_hybrid");
  return dense;
}

// ------------------------------------------------------------------------ unpack_hybrid_q

// Low-bit values (int8 codes, or int4 two per byte as uint8) -> the fp32 [out, in] weight, the
// codes times fp16 scales [out, ceil(in / group_size)].
at::Tensor unpack_hybrid_q(const at::Tensor& dense_rowptr, const at::Tensor& dense_cols,
                           const at::Tensor& dense_vals, const at::Tensor& s24_rowptr,
                           const at::Tensor& s24_cols, const at::Tensor& s24_vals,
                           const at::Tensor& s24_meta, const at::Tensor& topk_rowptr,
                           const at::Tensor& topk_cols, const at::Tensor& topk_vals,
                           const at::Tensor& topk_pos, const at::Tensor& scales_in,
                           int64_t group_size, int64_t out_features, int64_t in_features) {
  constexpr const char* op = "unpack_hybrid_q";
  check_cuda(dense_vals, "unpack_hybrid_q: dense_vals");
  const at::ScalarType codes = dense_vals.scalar_type();
  TORCH_CHECK(codes == at::kChar || codes == at::kByte, op, ": low-bit values must be int8 codes "
              "or uint8 (int4 two per byte), got ", codes);
  for (const at::Tensor* v : {&s24_vals, &topk_vals}) {
    TORCH_CHECK(v->scalar_type() == codes, op, ": every tier's values must be ", codes,
                ", got ", v->scalar_type());
  }
  TORCH_CHECK(out_features >= 0 && in_features >= 0, op, ": negative shape [", out_features,
              ", ", in_features, "]");
  const c10::cuda::CUDAGuard guard(dense_vals.device());
  const PackedArgs packed = contiguous_packed(dense_rowptr, dense_cols, dense_vals, s24_rowptr,
                                              s24_cols, s24_vals, s24_meta, topk_rowptr,
                                              topk_cols, topk_vals, topk_pos);
  const int64_t codes_per_element = codes == at::kByte ? 2 : 1;
  check_packed(packed, packed.dense_vals, out_features, "dense_vals", codes_per_element);
  check_block_count(packed, out_features, in_features, op);
  const int64_t b = dense_vals.size(1);
  TORCH_CHECK(group_size > 0 && group_size % b == 0, op, ": group_size must be a positive "
              "multiple of the block size ", b, ", got ", group_size);
  const int64_t n_groups = ceil_div(in_features, group_size);
  check_same_device(scales_in, "scales", dense_vals, "dense_vals");
  TORCH_CHECK(scales_in.scalar_type() == at::kHalf && scales_in.dim() == 2 &&
                  scales_in.size(0) == out_features && scales_in.size(1) == n_groups,
              op, ": scales must be float16 [out_features, ceil(in_features / group_size)] = [",
              out_features, ", ", n_groups, "], got ", scales_in.scalar_type(), " ",
              scales_in.sizes());
  const at::Tensor scales = scales_in.contiguous();
  at::Tensor dense = at::empty({out_features, in_features}, scales.options().dtype(at::kFloat));
  if (dense.numel() == 0) return dense;
  check_launch(launch_unpack_hybrid_q(packed_weight(packed, out_features, in_features), codes == at::kByte ? 4 : 8, scales.data_ptr(),
                                      group_size, dense.data_ptr<float>(), current_stream()),
               op);
  return dense;
}

// ------------------------------------------------------------------------ hybrid_linear_decode

// The decode kernel on a layout from sparse_kernels/decode_layout.py (its contract: the binding
// checks shapes, dtypes, devices and alignment; the contents come from prepare_decode_layout).
at::Tensor hybrid_linear_decode(const at::Tensor& x_in, const at::Tensor& stream,
                                const at::Tensor& tasks, const at::Tensor& codes,
                                const at::Tensor& counters, int64_t out_features, int64_t topk,
                                const std::optional<at::Tensor>& bias_in) {
  check_cuda(x_in, "hybrid_linear_decode: x");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) <= 16,
              "hybrid_linear_decode: x must be 2-D [M, in_features] with M <= 16, got ",
              x_in.sizes());
  const DType dtype = float_dtype(x_in, "hybrid_linear_decode: x");
  TORCH_CHECK(dtype != DType::kFloat32,
              "hybrid_linear_decode: x must be float16 or bfloat16 (tensor cores), got float32");
  TORCH_CHECK(x_in.size(1) % 4 == 0, "hybrid_linear_decode: in_features must be a multiple of "
              "4, got ", x_in.size(1));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"stream", &stream},
                                {"tasks", &tasks}, {"codes", &codes}, {"counters", &counters}}) {
    check_same_device(*t, name, x_in, "x");
    TORCH_CHECK(t->is_contiguous(), "hybrid_linear_decode: ", name, " must be contiguous");
  }
  TORCH_CHECK(stream.scalar_type() == at::kByte && stream.dim() == 1 &&
                  reinterpret_cast<uintptr_t>(stream.data_ptr()) % 16 == 0,
              "hybrid_linear_decode: stream must be a 16-byte aligned uint8 [bytes] tensor, got ",
              stream.scalar_type(), " ", stream.sizes());
  TORCH_CHECK(tasks.scalar_type() == at::kInt && tasks.dim() == 2 && tasks.size(1) == 8 &&
                  tasks.size(0) >= 1 && tasks.size(0) <= INT_MAX &&
                  reinterpret_cast<uintptr_t>(tasks.data_ptr()) % 16 == 0,
              "hybrid_linear_decode: tasks must be int32 [n_tasks >= 1, 8], got ",
              tasks.scalar_type(), " ", tasks.sizes());
  TORCH_CHECK(codes.scalar_type() == at::kInt && codes.dim() == 1,
              "hybrid_linear_decode: codes must be int32 [words], got ", codes.scalar_type(),
              " ", codes.sizes());
  const int64_t nbr = ceil_div(out_features, 16);
  TORCH_CHECK(counters.scalar_type() == at::kLong && counters.dim() == 1 &&
                  counters.size(0) == nbr,
              "hybrid_linear_decode: counters must be int64 [ceil(out/16)] = [", nbr, "], got ",
              counters.scalar_type(), " ", counters.sizes());
  TORCH_CHECK(topk >= 1 && topk <= 170, "hybrid_linear_decode: topk must be in 1..170 (a "
              "top-K image fits in one 512-byte chunk), got ", topk);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor bias;
  if (bias_in) {
    check_same_device(*bias_in, "hybrid_linear_decode: bias", x_in, "x");
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == out_features &&
                    bias_in->scalar_type() == x_in.scalar_type(),
                "hybrid_linear_decode: bias must be [", out_features, "] ", x_in.scalar_type(),
                ", got ", bias_in->sizes(), " ", bias_in->scalar_type());
    bias = bias_in->contiguous();
  }
  at::Tensor x = x_in.contiguous();
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 8 != 0) x = x.clone();  // 8-byte x loads
  const int64_t rows = x.size(0);
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (rows == 0 || out_features == 0) return y;
  DecodeLayout layout;
  layout.out_features = out_features;
  layout.in_features = x.size(1);
  layout.topk = static_cast<int>(topk);
  layout.n_tasks = static_cast<int>(tasks.size(0));
  layout.n_block_rows = static_cast<int>(nbr);
  layout.stream = static_cast<const uint8_t*>(stream.data_ptr());
  layout.tasks = tasks.data_ptr<int32_t>();
  layout.codes = reinterpret_cast<const uint32_t*>(codes.data_ptr<int32_t>());
  layout.counters = reinterpret_cast<unsigned long long*>(counters.data_ptr<int64_t>());
  const at::Tensor workspace = workspace_of(hybrid_decode_workspace_bytes(layout, rows), x);
  check_launch(launch_hybrid_decode(x.data_ptr(), rows, layout, data_or_null(bias), y.data_ptr(),
                                    dtype, data_or_null(workspace), current_stream()),
               "hybrid_linear_decode");
  return y;
}

}  // namespace
}  // namespace sparse_kernels_cuda

TORCH_LIBRARY_IMPL(sparse_kernels, CUDA, m) {
  m.impl("wanda_scores", &sparse_kernels_cuda::wanda_scores);
  m.impl("block_topk_mask", &sparse_kernels_cuda::block_topk_mask);
  m.impl("nm_mask", &sparse_kernels_cuda::nm_mask);
  m.impl("compress_24", &sparse_kernels_cuda::compress_24);
  m.impl("hybrid_linear", &sparse_kernels_cuda::hybrid_linear);
  m.impl("hybrid_linear_decode", &sparse_kernels_cuda::hybrid_linear_decode);
  m.impl("unpack_hybrid", &sparse_kernels_cuda::unpack_hybrid);
  m.impl("unpack_hybrid_q", &sparse_kernels_cuda::unpack_hybrid_q);
}
