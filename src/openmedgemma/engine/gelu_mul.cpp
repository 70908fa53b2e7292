// The MLP's activation in one op: gelu_tanh(gate) * up from the fused gate|up projection [..., 2I] -> [..., I]
// (engine/fast.py installs it in quantized CPU decoders; model/gemma3.py GemmaMLP.act).
//
// As torch ops it is chunk, gelu and mul, and torch's gelu takes ~20-30 us for the 10240 values of a 4b row
// (2 ns a value, bf16 or fp32). Here gelu_tanh(g) = 0.5 g (1 + tanh(u)) is computed as g / (1 + exp(-2u)),
// u = sqrt(2 / pi) (g + 0.044715 g^3): the same function, exp by the Cephes polynomial (1-2 ulp in fp32;
// for g << 0 it is more accurate than 1 + tanh(u), which cancels). bf16 rows (a model loaded in bf16) are
// rounded as torch rounds them: gelu to bf16, then the product to bf16. So a value can differ from torch's by
// one unit in the last place where torch's fp32 gelu and this one fall on either side of a rounding boundary.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "widen.h"

namespace {

constexpr float kMinus2Sqrt2OverPi = -1.5957691216057308f;  // -2 sqrt(2 / pi)
constexpr float kCubic = 0.044715f;

inline __m256 exp8(__m256 x) {  // Cephes expf; x clamped to the finite range (NaN -> the lower bound)
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

inline __m256 gelu8(__m256 g) {
  const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(g, g), g), _mm256_set1_ps(kCubic), g);
  const __m256 e = exp8(_mm256_mul_ps(inner, _mm256_set1_ps(kMinus2Sqrt2OverPi)));
  return _mm256_div_ps(g, _mm256_add_ps(e, _mm256_set1_ps(1.0f)));
}

inline float gelu1(float g) {
  const float e = std::exp(std::clamp((g * g * g * kCubic + g) * kMinus2Sqrt2OverPi, -87.3f, 88.3f));
  return g / (1.0f + e);
}

template <class T>  // float or uint16_t (bf16)
void gelu_mul_rows(const T* xp, T* yp, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / I), [&](int64_t begin, int64_t end) {
    constexpr bool bf16 = !std::is_same_v<T, float>;
    std::vector<float> gb(bf16 ? I : 0), ub(bf16 ? I : 0), ob(bf16 ? I : 0);  // bf16 rows: widened, then rounded
    for (int64_t r = begin; r < end; ++r) {
      const float* g = omg::as_float(xp + r * 2 * I, gb.data(), I);
      const float* u = omg::as_float(xp + r * 2 * I + I, ub.data(), I);
      float* out;
      if constexpr (bf16) out = ob.data(); else out = yp + r * I;
      int64_t j = 0;
      for (; j + 8 <= I; j += 8) {
        __m256 a = gelu8(_mm256_loadu_ps(g + j));
        if constexpr (bf16) {  // gelu's output is a bf16 tensor in torch: round it first
          alignas(32) uint16_t h[8];
          omg::store8_bf16(h, a);
          a = omg::load8<omg::Kind::bf16>(h);
        }
        _mm256_storeu_ps(out + j, _mm256_mul_ps(a, _mm256_loadu_ps(u + j)));
      }
      for (; j < I; ++j) {
        float a = gelu1(g[j]);
        if constexpr (bf16) a = omg::from_bf16(omg::to_bf16(a));
        out[j] = a * u[j];
      }
      if constexpr (bf16) omg::narrow_bf16(out, yp + r * I, I);
    }
  });
}

at::Tensor gelu_tanh_mul(const at::Tensor& gate_up) {
  TORCH_CHECK((gate_up.scalar_type() == at::kFloat || gate_up.scalar_type() == at::kBFloat16) &&
                  gate_up.is_contiguous() && gate_up.is_cpu() && gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0 &&
                  gate_up.size(-1) > 0,
              "gelu_tanh_mul: gate_up must be a contiguous fp32 or bf16 CPU tensor [..., 2 I]");
  const int64_t I = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * I);
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() = I;
  at::Tensor y = at::empty(shape, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) {
    gelu_mul_rows(gate_up.data_ptr<float>(), y.data_ptr<float>(), rows, I);
  } else {
    gelu_mul_rows(reinterpret_cast<const uint16_t*>(gate_up.data_ptr<c10::BFloat16>()),
                  reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>()), rows, I);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openmedgemma, m) {
  m.def("gelu_tanh_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(openmedgemma, CPU, m) {
  m.impl("gelu_tanh_mul", &gelu_tanh_mul);
}
