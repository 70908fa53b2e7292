// Weight-only int8 matrix-vector products for CPU decode (AVX2 + FMA), built once by engine/native.py.
//
//   y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]      x: fp32 [M, K], w: int8, scale: fp32 [N]
//
// Decode multiplies one activation row by every weight, so it is bound by the bytes of weight it
// streams: int8 reads 4x fewer than fp32. torch's own weight-only kernel (_weight_int8pack_mm) is
// vectorised for AVX-512 only and on AVX2 runs 3-4x slower than fp32 BLAS; this one streams int8 at
// close to the memory bandwidth.
//
// Layout: w is held as [ceil(N / 32), K, 32] (engine/native.py `pack_blocks`): for each block of 32
// output channels the 32 weights of input k are adjacent, so a block is one contiguous stream and the
// 32 sums live in 4 registers (x[k] broadcast), with no horizontal reduction. Rows past N are zero.
// Each output is two fp32 partial sums (even and odd k, each in k order) added at the end.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include "gemv_group.h"

namespace {

constexpr int64_t kBlock = 32;

inline __m256 load8(const int8_t* p) {  // 8 int8 -> 8 fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// One activation row x [K] times one block [K, 32] -> 32 unscaled sums in out.
inline void block_dot(const float* x, const int8_t* w, int64_t K, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t k = 0;
  for (; k + 2 <= K; k += 2, w += 2 * kBlock) {  // two k per step: 8 independent FMA chains
    const __m256 x0 = _mm256_broadcast_ss(x + k), x1 = _mm256_broadcast_ss(x + k + 1);
    a0 = _mm256_fmadd_ps(x0, load8(w), a0);
    a1 = _mm256_fmadd_ps(x0, load8(w + 8), a1);
    a2 = _mm256_fmadd_ps(x0, load8(w + 16), a2);
    a3 = _mm256_fmadd_ps(x0, load8(w + 24), a3);
    b0 = _mm256_fmadd_ps(x1, load8(w + 32), b0);
    b1 = _mm256_fmadd_ps(x1, load8(w + 40), b1);
    b2 = _mm256_fmadd_ps(x1, load8(w + 48), b2);
    b3 = _mm256_fmadd_ps(x1, load8(w + 56), b3);
  }
  if (k < K) {
    const __m256 x0 = _mm256_broadcast_ss(x + k);
    a0 = _mm256_fmadd_ps(x0, load8(w), a0);
    a1 = _mm256_fmadd_ps(x0, load8(w + 8), a1);
    a2 = _mm256_fmadd_ps(x0, load8(w + 16), a2);
    a3 = _mm256_fmadd_ps(x0, load8(w + 24), a3);
  }
  _mm256_storeu_ps(out, _mm256_add_ps(a0, b0));
  _mm256_storeu_ps(out + 8, _mm256_add_ps(a1, b1));
  _mm256_storeu_ps(out + 16, _mm256_add_ps(a2, b2));
  _mm256_storeu_ps(out + 24, _mm256_add_ps(a3, b3));
}

// y = x times each weight i of a group that reads the same input (q, k, v; gate, up), the outputs side by side
// [M, sum n], in one parallel loop over every block of every weight (one call per group, not per layer).
at::Tensor int8_gemv_group(const at::Tensor& x, at::TensorList w, at::TensorList scale, at::IntArrayRef n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "int8_gemv: x must be a contiguous fp32 CPU matrix [M, K]");
  TORCH_CHECK(!w.empty() && w.size() == scale.size() && w.size() == n.size(),
              "int8_gemv_group: w, scale and n must be lists of the same, non-zero length");
  const int64_t M = x.size(0), K = x.size(1);
  for (size_t i = 0; i < w.size(); ++i) {
    TORCH_CHECK(w[i].dim() == 3 && w[i].scalar_type() == at::kChar && w[i].is_contiguous() && w[i].size(2) == kBlock,
                "int8_gemv: w must be contiguous int8 blocks [ceil(N / 32), K, 32]");
    TORCH_CHECK(w[i].size(1) == K, "int8_gemv: x has ", K, " columns but w has K = ", w[i].size(1));
    TORCH_CHECK(w[i].size(0) == (n[i] + kBlock - 1) / kBlock, "int8_gemv: ", w[i].size(0), " blocks cannot hold N = ",
                n[i]);
    TORCH_CHECK(scale[i].dim() == 1 && scale[i].size(0) == n[i] && scale[i].scalar_type() == at::kFloat &&
                    scale[i].is_contiguous(),
                "int8_gemv: scale must be contiguous fp32 [N]");
  }
  const omg::GroupLayout group(w, n);
  const int64_t cols = group.cols();
  at::Tensor y = at::empty({M, cols}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Tasks of at least ~64 KB of weights, so a thread's share outweighs waking it.
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, K * kBlock));
  group.for_each_block(n, kBlock, grain, [&](size_t i, int64_t local, int64_t n0, int64_t width) {
    alignas(32) float sums[kBlock];
    const int8_t* wp = w[i].data_ptr<int8_t>() + local * K * kBlock;
    const float* sp = scale[i].data_ptr<float>() + n0;
    for (int64_t m = 0; m < M; ++m) {  // the block stays in L1/L2 across the rows
      block_dot(xp + m * K, wp, K, sums);
      float* out = yp + m * cols + group.first_col[i] + n0;
      for (int64_t j = 0; j < width; ++j) out[j] = sums[j] * sp[j];
    }
  });
  return y;
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t n) {
  return int8_gemv_group(x, {w}, {scale}, {n});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openmedgemma, m) {
  m.def("int8_gemv(Tensor x, Tensor w, Tensor scale, int n) -> Tensor");
  m.def("int8_gemv_group(Tensor x, Tensor[] w, Tensor[] scale, int[] n) -> Tensor");
}

TORCH_LIBRARY_IMPL(openmedgemma, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int8_gemv_group", &int8_gemv_group);
}
