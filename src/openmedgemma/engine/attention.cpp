// Attention of one query token per row over a KV cache, for the decoder's decode steps (engine/fast.py
// installs it on the attention layers of quantized CPU decoders, fp32 or bf16: a bf16 cache is widened as it is
// read, a bf16 query widened once and the result rounded to bf16 once; the sums are fp32).
//
//   out[b, h, 0, :] = sum_s p[s] v[b, h / G, s, :],  p = softmax_s(scale * q[b, h, 0, :] . k[b, h / G, s, :])
//
// over the keys the boolean mask allows (mask[b or 0, 0, 0, s]; no mask: all). torch's CPU SDPA costs ~150 us
// per call at the 130M shape (3 KV heads, 257 keys of 128), ~5 GB/s of cache read; a decode step runs one per
// layer. Here each task is one (row, KV head): its G = Hq / Hkv queries read every key and value once (GQA
// without repeating the cache), scores in fp32, softmax with the max subtracted, the weighted sum of values
// accumulated in fp32. Same arithmetic as SDPA's math up to summation order. A row whose mask allows no key
// gets zeros (a decode row always allows its own key).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "widen.h"

namespace {

// The cache is fp32 or bf16 (a model loaded in bf16): 8 of its values as fp32, and one as fp32.
inline __m256 load8(const float* p) { return omg::load8<omg::Kind::fp32>(p); }
inline __m256 load8(const c10::BFloat16* p) { return omg::load8<omg::Kind::bf16>(reinterpret_cast<const uint16_t*>(p)); }
inline float load1(float v) { return v; }
inline float load1(c10::BFloat16 v) { return static_cast<float>(v); }

template <typename T>
inline float dot(const float* a, const T* b, int64_t D) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(b + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), load8(b + d + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 16), load8(b + d + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 24), load8(b + d + 24), a3);
  }
  for (; d + 8 <= D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(b + d), a0);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; d < D; ++d) s += a[d] * load1(b[d]);
  return s;
}

template <typename T>
inline void axpy(float p, const T* x, float* y, int64_t D) {  // y += p x
  const __m256 pv = _mm256_set1_ps(p);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(y + d, _mm256_fmadd_ps(pv, load8(x + d), _mm256_loadu_ps(y + d)));
  for (; d < D; ++d) y[d] += p * load1(x[d]);
}

template <typename T>
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                  double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(q.size(2) == 1, "decode_attention: one query per row (T = 1), got T = ", q.size(2));
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(3) == D && v.size(3) == D && v.size(1) == Hkv &&
                  v.size(2) == S,
              "decode_attention: k and v must be [B, Hkv, S, D] matching q [B, Hq, 1, D]");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "decode_attention: ", Hq, " query heads do not share ", Hkv, " KV heads");
  const bool* mp = nullptr;
  int64_t mask_b = 0, mask_s = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.is_cpu() && m.dim() == 4 && (m.size(0) == 1 || m.size(0) == B) &&
                    m.size(1) == 1 && m.size(2) == 1 && m.size(3) == S,
                "decode_attention: mask must be boolean [1 or B, 1, 1, S] with S = ", S);
    mp = m.data_ptr<bool>();
    mask_b = m.size(0) == 1 ? 0 : m.stride(0);
    mask_s = m.stride(3);
  }
  const int64_t G = Hq / Hkv;
  at::Tensor out = at::empty({B, Hq, 1, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale), neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(G * S);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const T* kb = kp + b * k.stride(0) + h * k.stride(1);
      const T* vb = vp + b * v.stride(0) + h * v.stride(1);
      const bool* mb = mp ? mp + b * mask_b : nullptr;
      std::vector<float> maxes(G, neg_inf);
      for (int64_t s = 0; s < S; ++s) {  // every key read once for the G queries that share it
        const bool allowed = !mb || mb[s * mask_s];
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qp + b * q.stride(0) + (h * G + g) * q.stride(1);
          const float score = allowed ? sc * dot(qg, kb + s * k.stride(2), D) : neg_inf;
          p[g * S + s] = score;
          maxes[g] = std::max(maxes[g], score);
        }
      }
      float* ob = op + (b * Hq + h * G) * D;  // the G outputs of this task, adjacent
      std::fill(ob, ob + G * D, 0.0f);
      for (int64_t g = 0; g < G; ++g) {  // p = softmax; a query whose mask allows no key keeps zeros
        float* pg = p.data() + g * S;
        if (maxes[g] == neg_inf) {
          std::fill(pg, pg + S, 0.0f);
          continue;
        }
        float sum = 0.0f;
        for (int64_t s = 0; s < S; ++s) sum += (pg[s] = std::exp(pg[s] - maxes[g]));
        const float inv = 1.0f / sum;
        for (int64_t s = 0; s < S; ++s) pg[s] *= inv;
      }
      for (int64_t s = 0; s < S; ++s) {  // every value read once
        const T* vs = vb + s * v.stride(2);
        for (int64_t g = 0; g < G; ++g)
          if (p[g * S + s] != 0.0f) axpy(p[g * S + s], vs, ob + g * D, D);
      }
    }
  });
  return out;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->dim() == 4 && t->is_cpu() && t->stride(3) == 1,
                "decode_attention: q, k, v must be CPU [B, heads, T, D] with D contiguous");
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == k.scalar_type()) &&
                  k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "decode_attention: k and v must be both fp32 or both bf16, q fp32 or their dtype");
  const at::Tensor q32 = q.to(at::kFloat);  // a bf16 q (bf16 activations): widened here, the result rounded once
  const at::Tensor out = k.scalar_type() == at::kFloat ? attend<float>(q32, k, v, mask, scale)
                                                        : attend<c10::BFloat16>(q32, k, v, mask, scale);
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openmedgemma, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(openmedgemma, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
