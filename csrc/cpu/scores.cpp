// wanda_scores: Wanda importance S = |W| * sqrt(act_sq_norm) and its mean over each B x B block,
// in one pass over W. Semantics: reference.wanda_scores.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <algorithm>
#include <vector>

#include "cpu/common.h"

namespace sparse_kernels_cpu {

namespace {

template <typename T>
void wanda_kernel(const T* w, const float* col_scale, float* scores, float* block_scores,
                  int64_t out_f, int64_t in_f, int64_t bs) {
  const int64_t nbr = ceil_div(out_f, bs);
  const int64_t nbc = ceil_div(in_f, bs);
  at::parallel_for(0, nbr, 1, [&](int64_t begin, int64_t end) {
    // Column sums of the current block-row; folded into block sums once the block-row is done.
    std::vector<float> col_sum(static_cast<size_t>(in_f));
    for (int64_t br = begin; br < end; ++br) {
      const int64_t r0 = br * bs;
      const int64_t r1 = std::min(r0 + bs, out_f);
      float* acc = col_sum.data();
      std::fill(acc, acc + in_f, 0.0f);
      for (int64_t r = r0; r < r1; ++r) {
        const T* wrow = w + r * in_f;
        float* srow = scores + r * in_f;
        for (int64_t c = 0; c < in_f; ++c) {
          const float s = std::fabs(to_float(wrow[c])) * col_scale[c];
          srow[c] = s;
          acc[c] += s;
        }
      }
      const float rows = static_cast<float>(r1 - r0);
      float* out = block_scores + br * nbc;
      for (int64_t bc = 0; bc < nbc; ++bc) {
        const int64_t c0 = bc * bs;
        const int64_t c1 = std::min(c0 + bs, in_f);
        double sum = 0.0;
        for (int64_t c = c0; c < c1; ++c) sum += acc[c];
        const float count = rows * static_cast<float>(c1 - c0);
        out[bc] = static_cast<float>(sum) / count;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> wanda_scores(const at::Tensor& weight_in,
                                                const at::Tensor& act_sq_norm_in,
                                                int64_t block_size) {
  check_cpu(weight_in, "weight");
  check_cpu(act_sq_norm_in, "act_sq_norm");
  TORCH_CHECK(weight_in.dim() == 2, "weight must be 2-D [out_features, in_features], got shape ",
              weight_in.sizes());
  TORCH_CHECK(block_size == 4 || block_size == 8 || block_size == 12 || block_size == 16,
              "block_size must be 4, 8, 12 or 16, got ", block_size);
  const int64_t out_f = weight_in.size(0);
  const int64_t in_f = weight_in.size(1);
  TORCH_CHECK(act_sq_norm_in.dim() == 1 && act_sq_norm_in.size(0) == in_f,
              "act_sq_norm must have shape (", in_f, ",) (one entry per input column of weight), "
              "got ", act_sq_norm_in.sizes());

  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor act = act_sq_norm_in.contiguous();

  // sqrt of the activation norms, once per column, in fp32 and with torch's own sqrt: on the
  // CPU it is not always correctly rounded (1 ulp off for ~20% of inputs on AVX2 builds), and
  // using it keeps the scores bit-identical to the reference (and to other backends that
  // follow it), so masks computed from them agree exactly.
  dispatch_float(act, "act_sq_norm", [](auto) {});  // dtype check only
  const at::Tensor col_scale = act.to(at::kFloat).sqrt().contiguous();
  const auto opts = weight.options().dtype(at::kFloat);
  at::Tensor scores = at::empty({out_f, in_f}, opts);
  at::Tensor block_scores =
      at::empty({ceil_div(out_f, block_size), ceil_div(in_f, block_size)}, opts);
  dispatch_float(weight, "weight", [&](auto tag) {
    using T = decltype(tag);
    wanda_kernel<T>(weight.data_ptr<T>(), col_scale.data_ptr<float>(), scores.data_ptr<float>(),
                    block_scores.data_ptr<float>(), out_f, in_f, block_size);
  });
  return {scores, block_scores};
}

}  // namespace sparse_kernels_cpu

TORCH_LIBRARY_IMPL(sparse_kernels, CPU, m) {
  m.impl("wanda_scores", &sparse_kernels_cpu::wanda_scores);
}
