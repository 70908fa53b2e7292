// RMSNorm of fp32 or bf16 rows in one op, for the decoder's norms at decode time (engine/fast.py installs it).
//
//   y[r, :] = (x[r, :] * (1 / sqrt(sum(x[r, :]^2) / D + eps))) * gain[r mod G, :]
//
// A decode step of a small model runs ~60 norms on vectors of a few hundred floats; as torch ops each costs
// 6-7 dispatches (~20 us from Python), as one op a single dispatch. gain is [G, D] (G = 1, or the heads of
// q and k normed together with their stacked gains), repeating over the rows. Same operations and order of
// scaling as the model's no-grad path (model/layers.py): bf16 x (a model loaded in bf16) is widened, normed in
// fp32 and rounded to bf16 once, as there. The sum of squares is accumulated in 8 lanes, so it may differ from
// torch's reduction in the last bit (and a bf16 output, rarely, by one unit in its last place).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "widen.h"

namespace {

template <class T>  // float or uint16_t (bf16)
void norm_rows(const T* xp, const float* gp, T* yp, int64_t rows, int64_t D, int64_t G, float e) {
  const float inv_d = 1.0f / static_cast<float>(D);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    constexpr bool bf16 = !std::is_same_v<T, float>;
    std::vector<float> h(bf16 ? D : 0), o(bf16 ? D : 0);  // bf16 rows: widened, normed, then rounded
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = omg::as_float(xp + r * D, h.data(), D);
      const float* g = gp + (r % G) * D;
      float* out;
      if constexpr (bf16) out = o.data(); else out = yp + r * D;
      __m256 acc = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= D; k += 8) {
        const __m256 v = _mm256_loadu_ps(xr + k);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc);
      float ss = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
      for (; k < D; ++k) ss += xr[k] * xr[k];
      const float scale = 1.0f / std::sqrt(ss * inv_d + e);
      for (int64_t j = 0; j < D; ++j) out[j] = (xr[j] * scale) * g[j];
      if constexpr (bf16) omg::narrow_bf16(out, yp + r * D, D);
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& gain, double eps) {
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && x.is_contiguous() &&
                  x.is_cpu() && x.dim() >= 1,
              "rms_norm: x must be a contiguous fp32 or bf16 CPU tensor [..., D]");
  const int64_t D = x.size(-1);
  TORCH_CHECK(gain.scalar_type() == at::kFloat && gain.is_contiguous() && gain.dim() >= 1 && gain.size(-1) == D &&
                  D > 0 && gain.numel() % D == 0,
              "rms_norm: gain must be contiguous fp32 [G, D] with x's last dimension D = ", D);
  const int64_t rows = x.numel() / D, G = gain.numel() / D;
  TORCH_CHECK(G == 1 || (x.dim() >= 2 && x.size(-2) == G), "rms_norm: a gain of ", G,
              " rows needs x [..., ", G, ", D]");
  at::Tensor y = at::empty_like(x);
  const float* gp = gain.data_ptr<float>();
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == at::kFloat) {
    norm_rows(x.data_ptr<float>(), gp, y.data_ptr<float>(), rows, D, G, e);
  } else {
    norm_rows(reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()), gp,
              reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>()), rows, D, G, e);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openmedgemma, m) {
  m.def("rms_norm(Tensor x, Tensor gain, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(openmedgemma, CPU, m) {
  m.impl("rms_norm", &rms_norm);
}
