// Weight-only matrix-vector products for CPU decode from 16-bit (bf16, fp16) or fp32 weights held in blocks,
// built once by engine/native.py.
//
//   y[m, n] = sum_k x[m, k] * w[n, k]      x: fp32 [M, K], w: bf16, fp16 or fp32 blocks
//
// Decode streams every weight once per token, so its time is the weight bytes: 16-bit reads half of fp32.
// Each 16-bit weight is widened to fp32 in registers (bf16: the top half of an fp32, a 16-bit shift; fp16:
// F16C's vcvtph2ps) and multiplied with FMA in fp32, so the only rounding beyond fp32's is the weight's own.
// fp32 blocks run the same loop: one contiguous stream per block reads faster than BLAS's 1-row sgemm
// (768 x 6144, one thread, EPYC Zen 4: ~23 against ~17.5 GB/s, which is torch.sum's rate over the same bytes).
//
// Layout as int8_gemv.cpp: w is [ceil(N / 32), K, 32] (engine/native.py `pack_blocks`): per block of 32
// output channels the 32 weights of input k are adjacent, one contiguous stream per block, x[k] broadcast,
// no horizontal sum. Rows past N are zero. Each output is two fp32 partial sums (even and odd k) added at
// the end.
//
// Two variants of the inner loop: AVX2 (the library is compiled for AVX2 + FMA + F16C, so it loads on any
// such CPU) and AVX-512 (compiled for it by a function target attribute, run only when the caller asks and
// the CPU has it: `isa` is chosen in engine/half.py from engine/cpu.py's detection).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <string>
#include <type_traits>

#include "gemv_group.h"
#include "widen.h"

namespace {

constexpr int64_t kBlock = 32;

using omg::Elem;
using omg::Kind;
using omg::load8;

// ------------------------------------------------------------------ AVX2: 8 fp32 per register

template <Kind W>
void block_dot_avx2(const float* x, const void* weights, int64_t K, float* out) {
  const Elem<W>* w = static_cast<const Elem<W>*>(weights);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t k = 0;
  for (; k + 2 <= K; k += 2, w += 2 * kBlock) {  // two k per step: 8 independent FMA chains
    const __m256 x0 = _mm256_broadcast_ss(x + k), x1 = _mm256_broadcast_ss(x + k + 1);
    a0 = _mm256_fmadd_ps(x0, load8<W>(w), a0);
    a1 = _mm256_fmadd_ps(x0, load8<W>(w + 8), a1);
    a2 = _mm256_fmadd_ps(x0, load8<W>(w + 16), a2);
    a3 = _mm256_fmadd_ps(x0, load8<W>(w + 24), a3);
    b0 = _mm256_fmadd_ps(x1, load8<W>(w + 32), b0);
    b1 = _mm256_fmadd_ps(x1, load8<W>(w + 40), b1);
    b2 = _mm256_fmadd_ps(x1, load8<W>(w + 48), b2);
    b3 = _mm256_fmadd_ps(x1, load8<W>(w + 56), b3);
  }
  if (k < K) {
    const __m256 x0 = _mm256_broadcast_ss(x + k);
    a0 = _mm256_fmadd_ps(x0, load8<W>(w), a0);
    a1 = _mm256_fmadd_ps(x0, load8<W>(w + 8), a1);
    a2 = _mm256_fmadd_ps(x0, load8<W>(w + 16), a2);
    a3 = _mm256_fmadd_ps(x0, load8<W>(w + 24), a3);
  }
  _mm256_storeu_ps(out, _mm256_add_ps(a0, b0));
  _mm256_storeu_ps(out + 8, _mm256_add_ps(a1, b1));
  _mm256_storeu_ps(out + 16, _mm256_add_ps(a2, b2));
  _mm256_storeu_ps(out + 24, _mm256_add_ps(a3, b3));
}

// ------------------------------------------------------------------ AVX-512: 16 fp32 per register

#define OMG_AVX512 __attribute__((target("avx512f,avx512bw")))

template <Kind K>
OMG_AVX512 inline __m512 load16(const Elem<K>* p) {  // 16 weights -> 16 fp32
  if constexpr (K == Kind::fp32) {
    return _mm512_loadu_ps(p);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (K == Kind::bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return _mm512_cvtph_ps(h);
  }
}

template <Kind W>
OMG_AVX512 void block_dot_avx512(const float* x, const void* weights, int64_t K, float* out) {
  const Elem<W>* w = static_cast<const Elem<W>*>(weights);
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
  int64_t k = 0;
  for (; k + 4 <= K; k += 4, w += 4 * kBlock) {  // four k per step: 8 independent FMA chains
    const __m512 x0 = _mm512_set1_ps(x[k]), x1 = _mm512_set1_ps(x[k + 1]);
    const __m512 x2 = _mm512_set1_ps(x[k + 2]), x3 = _mm512_set1_ps(x[k + 3]);
    a0 = _mm512_fmadd_ps(x0, load16<W>(w), a0);
    a1 = _mm512_fmadd_ps(x0, load16<W>(w + 16), a1);
    b0 = _mm512_fmadd_ps(x1, load16<W>(w + 32), b0);
    b1 = _mm512_fmadd_ps(x1, load16<W>(w + 48), b1);
    c0 = _mm512_fmadd_ps(x2, load16<W>(w + 64), c0);
    c1 = _mm512_fmadd_ps(x2, load16<W>(w + 80), c1);
    d0 = _mm512_fmadd_ps(x3, load16<W>(w + 96), d0);
    d1 = _mm512_fmadd_ps(x3, load16<W>(w + 112), d1);
  }
  for (; k < K; ++k, w += kBlock) {
    const __m512 x0 = _mm512_set1_ps(x[k]);
    a0 = _mm512_fmadd_ps(x0, load16<W>(w), a0);
    a1 = _mm512_fmadd_ps(x0, load16<W>(w + 16), a1);
  }
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_add_ps(a0, b0), _mm512_add_ps(c0, d0)));
  _mm512_storeu_ps(out + 16, _mm512_add_ps(_mm512_add_ps(a1, b1), _mm512_add_ps(c1, d1)));
}

using omg::cpu_has_avx512;

// ------------------------------------------------------------------ the op

using BlockDot = void (*)(const float*, const void*, int64_t, float*);

// y = x times each weight i of a group that reads the same input (q, k, v; gate, up), the outputs side by side
// [M, sum n], in one parallel loop over every block of every weight (one call per group, not per layer).
at::Tensor half_gemv_group(const at::Tensor& x, at::TensorList w, at::IntArrayRef n, c10::string_view isa) {
  omg::check_input(x, "half_gemv");
  TORCH_CHECK(!w.empty() && w.size() == n.size(), "half_gemv_group: w and n must be lists of the same, non-zero length");
  const at::ScalarType type = w[0].scalar_type();
  const int64_t M = x.size(0), K = x.size(1);
  for (size_t i = 0; i < w.size(); ++i) {
    TORCH_CHECK(w[i].dim() == 3 && (type == at::kBFloat16 || type == at::kHalf || type == at::kFloat) &&
                    w[i].is_contiguous() && w[i].size(2) == kBlock,
                "half_gemv: w must be contiguous bfloat16, float16 or float32 blocks [ceil(N / 32), K, 32]");
    TORCH_CHECK(w[i].scalar_type() == w[0].scalar_type(), "half_gemv_group: the weights must share one dtype");
    TORCH_CHECK(w[i].size(1) == K, "half_gemv: x has ", K, " columns but w has K = ", w[i].size(1));
    TORCH_CHECK(w[i].size(0) == (n[i] + kBlock - 1) / kBlock, "half_gemv: ", w[i].size(0), " blocks cannot hold N = ",
                n[i]);
  }
  const bool wide = isa == "avx512";
  TORCH_CHECK(wide || isa == "avx2", "half_gemv: isa must be 'avx2' or 'avx512', got '", std::string(isa), "'");
  TORCH_CHECK(!wide || cpu_has_avx512(), "half_gemv: isa 'avx512' asked for on a CPU without AVX-512F/BW");
  BlockDot dot = type == at::kBFloat16 ? (wide ? &block_dot_avx512<Kind::bf16> : &block_dot_avx2<Kind::bf16>)
                 : type == at::kHalf    ? (wide ? &block_dot_avx512<Kind::fp16> : &block_dot_avx2<Kind::fp16>)
                                        : (wide ? &block_dot_avx512<Kind::fp32> : &block_dot_avx2<Kind::fp32>);
  const omg::GroupLayout group(w, n);
  const int64_t cols = group.cols();
  const omg::Output y(x, M, cols);
  std::vector<float> widened;
  const float* xp = omg::float_rows(x, widened);
  // Tasks of at least ~32 KB of weights, so a thread's share outweighs waking it.
  const int64_t grain = std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(1, K * kBlock));
  group.for_each_block(n, kBlock, grain, [&](size_t i, int64_t local, int64_t n0, int64_t width) {
    alignas(64) float sums[kBlock];
    const char* wp = static_cast<const char*>(w[i].data_ptr()) + local * K * kBlock * w[i].element_size();
    for (int64_t m = 0; m < M; ++m) {  // the block stays in L1/L2 across the rows
      dot(xp + m * K, wp, K, sums);
      y.store(m * cols + group.first_col[i] + n0, sums, width);
    }
  });
  return y.y;
}

at::Tensor half_gemv(const at::Tensor& x, const at::Tensor& w, int64_t n, c10::string_view isa) {
  return half_gemv_group(x, {w}, {n}, isa);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openmedgemma, m) {
  m.def("half_gemv(Tensor x, Tensor w, int n, str isa) -> Tensor");
  m.def("half_gemv_group(Tensor x, Tensor[] w, int[] n, str isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(openmedgemma, CPU, m) {
  m.impl("half_gemv", &half_gemv);
  m.impl("half_gemv_group", &half_gemv_group);
}
