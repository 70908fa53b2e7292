// Weight-only int4 matrix-vector products for CPU decode, built once by engine/native.py with the
// other kernels. AVX2 everywhere; AVX-512 VNNI where the CPU has it, chosen at run time, so the one
// library still loads and runs on an AVX2-only CPU.
//
//   y[m, n] = sum_g d[n, g] * sum_{k in g} x[m, k] * q[n, k]      q in -8..7, one fp16 scale d per
//                                                                  group of 32 inputs (llama.cpp q4_0's bits)
//
// At 4 bits, converting every weight to float costs more than reading it, so (as llama.cpp does) each
// activation row is first quantized to int8 per group of 32 (xq = round(x / dx), dx = max|x| / 127),
// and each group's dot product is an exact integer one: u8 x s8 multiply-adds (maddubs on AVX2,
// vpdpbusd on AVX-512 VNNI), with the weights held unsigned (q + 8) and 8 * sum(xq) subtracted after.
// The only rounding besides fp32 sums is that of x: |x - dx * xq| <= dx / 2 (the tests bound it).
//
// Layout (engine/int4.py `pack_int4`): w is uint8 [ceil(N / 32), G, 512], G = ceil(K / 32): for each
// block of 32 output channels and group of 32 inputs, 512 bytes. With U[s][c][j] = q[c, 32 g + 4 s + j] + 8
// (step s = 0..7, channel c = 0..31, j = 0..3), byte t * 128 + c * 4 + j holds U[2t] in its low nibble
// and U[2t + 1] in its high one. So one register of bytes holds 4 consecutive inputs of 8 (ymm) or 16
// (zmm) channels, x[4s..4s+3] is broadcast as one int32, and the 32 sums of a block stay in lanes, with
// no horizontal reduction. Scales are fp16 [ceil(N / 32), G, 32]. Padded channels and inputs are
// q = 0 (byte 0x88) with scale 0; padded x is 0.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include "gemv_group.h"
#include "widen.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;                  // output channels per block
constexpr int64_t kGroup = 32;                  // inputs per scale group
constexpr int64_t kChunk = kBlock * kGroup / 2;  // bytes of one (block, group)

// One activation row quantized per group: xq [G * 32] (zero padded), dx [G], 8 * sum(xq) per group.
struct QuantRow {
  std::vector<int8_t> xq;
  std::vector<float> dx;
  std::vector<int32_t> sum8;
};

void quantize_row(const float* x, int64_t K, int64_t G, QuantRow& r) {
  r.xq.assign(G * kGroup, 0);
  r.dx.assign(G, 0.f);
  r.sum8.assign(G, 0);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k0 = g * kGroup, k1 = std::min(K, k0 + kGroup);
    float amax = 0.f;
    for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(x[k]));
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    int32_t sum = 0;
    for (int64_t k = k0; k < k1; ++k) {
      const int32_t q = static_cast<int32_t>(std::nearbyint(x[k] * inv));  // |q| <= 127
      r.xq[k] = static_cast<int8_t>(q);
      sum += q;
    }
    r.dx[g] = d;
    r.sum8[g] = 8 * sum;
  }
}

inline int32_t load4(const int8_t* p) {  // x[k..k+3] as one int32, to broadcast
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// One quantized row times one block [G, 512] -> the block's 32 unscaled-by-nothing sums in out.
// AVX2: u8 x s8 pairs (maddubs, each <= 2 * 15 * 127) summed in int16 over the group's 8 steps
// (<= 30480, no saturation), widened to int32 once per group.
__attribute__((target("avx2,fma,f16c"))) void block_avx2(const QuantRow& r, const uint8_t* w,
                                                         const uint16_t* sc, int64_t G, float* out) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
  for (int64_t g = 0; g < G; ++g, w += kChunk, sc += kBlock) {
    const int8_t* xg = r.xq.data() + g * kGroup;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (int t = 0; t < 4; ++t) {
      const __m256i xe = _mm256_set1_epi32(load4(xg + 8 * t)), xo = _mm256_set1_epi32(load4(xg + 8 * t + 4));
      const uint8_t* p = w + t * 128;
#define OMG_STEP(acc, off)                                                               \
  {                                                                                      \
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (off)));   \
    acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(_mm256_and_si256(v, low), xe));     \
    acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(                                    \
                                    _mm256_and_si256(_mm256_srli_epi16(v, 4), low), xo)); \
  }
      OMG_STEP(a0, 0) OMG_STEP(a1, 32) OMG_STEP(a2, 64) OMG_STEP(a3, 96)
#undef OMG_STEP
    }
    const __m256 dx = _mm256_set1_ps(r.dx[g]);
    const __m256i corr = _mm256_set1_epi32(r.sum8[g]);
#define OMG_SCALE(f, a, h)                                                                              \
  {                                                                                                     \
    const __m256i s = _mm256_sub_epi32(_mm256_madd_epi16(a, ones), corr);                               \
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 8 * (h)))); \
    f = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(s), f);                                \
  }
    OMG_SCALE(f0, a0, 0) OMG_SCALE(f1, a1, 1) OMG_SCALE(f2, a2, 2) OMG_SCALE(f3, a3, 3)
#undef OMG_SCALE
  }
  _mm256_storeu_ps(out, f0);
  _mm256_storeu_ps(out + 8, f1);
  _mm256_storeu_ps(out + 16, f2);
  _mm256_storeu_ps(out + 24, f3);
}

// The same with 512-bit registers and vpdpbusd (u8 x s8, 4 products summed into each int32 lane).
__attribute__((target("avx512f,avx512bw,avx512vnni,fma,f16c"))) void block_vnni(const QuantRow& r,
                                                                                const uint8_t* w,
                                                                                const uint16_t* sc,
                                                                                int64_t G, float* out) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 f0 = _mm512_setzero_ps(), f1 = f0;
  for (int64_t g = 0; g < G; ++g, w += kChunk, sc += kBlock) {
    const int8_t* xg = r.xq.data() + g * kGroup;
    __m512i e0 = _mm512_setzero_si512(), e1 = e0, o0 = e0, o1 = e0;  // 4 independent chains
    for (int t = 0; t < 4; ++t) {
      const __m512i xe = _mm512_set1_epi32(load4(xg + 8 * t)), xo = _mm512_set1_epi32(load4(xg + 8 * t + 4));
      const __m512i v0 = _mm512_loadu_si512(w + t * 128), v1 = _mm512_loadu_si512(w + t * 128 + 64);
      e0 = _mm512_dpbusd_epi32(e0, _mm512_and_si512(v0, low), xe);
      o0 = _mm512_dpbusd_epi32(o0, _mm512_and_si512(_mm512_srli_epi16(v0, 4), low), xo);
      e1 = _mm512_dpbusd_epi32(e1, _mm512_and_si512(v1, low), xe);
      o1 = _mm512_dpbusd_epi32(o1, _mm512_and_si512(_mm512_srli_epi16(v1, 4), low), xo);
    }
    const __m512 dx = _mm512_set1_ps(r.dx[g]);
    const __m512i corr = _mm512_set1_epi32(r.sum8[g]);
    const __m512i s0 = _mm512_sub_epi32(_mm512_add_epi32(e0, o0), corr);
    const __m512i s1 = _mm512_sub_epi32(_mm512_add_epi32(e1, o1), corr);
    const __m512 d0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc)));
    const __m512 d1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + 16)));
    f0 = _mm512_fmadd_ps(_mm512_mul_ps(d0, dx), _mm512_cvtepi32_ps(s0), f0);
    f1 = _mm512_fmadd_ps(_mm512_mul_ps(d1, dx), _mm512_cvtepi32_ps(s1), f1);
  }
  _mm512_storeu_ps(out, f0);
  _mm512_storeu_ps(out + 16, f1);
}

using BlockFn = void (*)(const QuantRow&, const uint8_t*, const uint16_t*, int64_t, float*);

std::string int4_best_isa() { return omg::cpu_has_avx512_vnni() ? "avx512vnni" : "avx2"; }

BlockFn pick(const std::string& isa) {
  const std::string chosen = isa == "auto" ? int4_best_isa() : isa;
  if (chosen == "avx2") return block_avx2;
  TORCH_CHECK(chosen == "avx512vnni", "int4_gemv: isa must be auto, avx2 or avx512vnni, not ", isa);
  TORCH_CHECK(omg::cpu_has_avx512_vnni(), "int4_gemv: this CPU lacks AVX-512 VNNI (asked for isa=avx512vnni)");
  return block_vnni;
}

// y = x times each weight i of a group that reads the same input (q, k, v; gate, up), the outputs side by side
// [M, sum n]: x is quantized once and one parallel loop runs over every block of every weight (one call
// per group instead of one per layer: a small model's decode step is mostly per-call costs).
at::Tensor int4_gemv_group(const at::Tensor& x, at::TensorList w, at::TensorList scale, at::IntArrayRef n,
                           c10::string_view isa) {
  omg::check_input(x, "int4_gemv");
  TORCH_CHECK(!w.empty() && w.size() == scale.size() && w.size() == n.size(),
              "int4_gemv_group: w, scale and n must be lists of the same, non-zero length");
  const int64_t M = x.size(0), K = x.size(1), G = (K + kGroup - 1) / kGroup;
  for (size_t i = 0; i < w.size(); ++i) {
    TORCH_CHECK(w[i].dim() == 3 && w[i].scalar_type() == at::kByte && w[i].is_contiguous() && w[i].size(2) == kChunk,
                "int4_gemv: w must be contiguous uint8 blocks [ceil(N / 32), ceil(K / 32), 512]");
    TORCH_CHECK(w[i].size(1) == G, "int4_gemv: x has ", K, " columns but w has ", w[i].size(1), " groups of 32");
    TORCH_CHECK(w[i].size(0) == (n[i] + kBlock - 1) / kBlock, "int4_gemv: ", w[i].size(0),
                " blocks cannot hold N = ", n[i]);
    TORCH_CHECK(scale[i].dim() == 3 && scale[i].scalar_type() == at::kHalf && scale[i].is_contiguous() &&
                    scale[i].size(0) == w[i].size(0) && scale[i].size(1) == G && scale[i].size(2) == kBlock,
                "int4_gemv: scale must be contiguous fp16 [ceil(N / 32), ceil(K / 32), 32]");
  }
  const BlockFn block = pick(std::string(isa));
  std::vector<QuantRow> rows(M);
  std::vector<float> widened;
  const float* xp = omg::float_rows(x, widened);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {  // prefill: many rows
    for (int64_t m = begin; m < end; ++m) quantize_row(xp + m * K, K, G, rows[m]);
  });
  const omg::GroupLayout group(w, n);
  const int64_t cols = group.cols();
  const omg::Output y(x, M, cols);
  // Tasks of at least ~32 KB of weights, so a thread's share outweighs waking it.
  const int64_t grain = std::max<int64_t>(1, (32 * 1024) / (G * kChunk));
  group.for_each_block(n, kBlock, grain, [&](size_t i, int64_t local, int64_t n0, int64_t width) {
    alignas(64) float sums[kBlock];
    const uint8_t* wp = w[i].data_ptr<uint8_t>() + local * G * kChunk;
    const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale[i].data_ptr<at::Half>()) + local * G * kBlock;
    for (int64_t m = 0; m < M; ++m) {  // the block stays in L1/L2 across the rows
      block(rows[m], wp, sp, G, sums);
      y.store(m * cols + group.first_col[i] + n0, sums, width);
    }
  });
  return y.y;
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t n,
                     c10::string_view isa) {
  return int4_gemv_group(x, {w}, {scale}, {n}, isa);
}

// The weight as fp32 [n, k], for Int4Linear.dequantize (savers, tests). Per (block, group, t, channel), 4 bytes
// hold inputs 8t..8t+3 (low nibbles) and 8t+4..8t+7 (high): 8 consecutive floats of one row.
at::Tensor int4_dequant(const at::Tensor& w, const at::Tensor& scale, int64_t n, int64_t k) {
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(2) == kChunk && w.is_cpu(),
              "int4_dequant: w must be contiguous uint8 blocks [ceil(N / 32), ceil(K / 32), 512]");
  const int64_t blocks = w.size(0), G = w.size(1);
  TORCH_CHECK(G == (k + kGroup - 1) / kGroup && blocks == (n + kBlock - 1) / kBlock,
              "int4_dequant: w [", blocks, ", ", G, ", 512] cannot hold [", n, ", ", k, "]");
  TORCH_CHECK(scale.dim() == 3 && scale.scalar_type() == at::kHalf && scale.is_contiguous() &&
                  scale.size(0) == blocks && scale.size(1) == G && scale.size(2) == kBlock,
              "int4_dequant: scale must be contiguous fp16 [ceil(N / 32), ceil(K / 32), 32]");
  at::Tensor out = at::empty({n, k}, w.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  float* op = out.data_ptr<float>();
  const __m128i low = _mm_set1_epi8(0x0F);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(32) float tmp[8];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t width = std::min(kBlock, n - b * kBlock);
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* chunk = wp + (b * G + g) * kChunk;
        const uint16_t* sc = sp + (b * G + g) * kBlock;
        for (int64_t c = 0; c < width; ++c) {
          const __m256 d = _mm256_set1_ps(_cvtsh_ss(sc[c]));
          const __m256 bias = _mm256_mul_ps(d, _mm256_set1_ps(-8.f));
          float* row = op + (b * kBlock + c) * k;
          for (int t = 0; t < 4; ++t) {
            int32_t v;
            std::memcpy(&v, chunk + t * 128 + c * 4, 4);
            const __m128i bytes = _mm_cvtsi32_si128(v);
            const __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
            const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi32(lo, hi)));
            const __m256 y = _mm256_fmadd_ps(f, d, bias);  // (u - 8) * d
            const int64_t k0 = g * kGroup + 8 * t;
            if (k0 + 8 <= k) {
              _mm256_storeu_ps(row + k0, y);
            } else if (k0 < k) {  // the last, partial group
              _mm256_store_ps(tmp, y);
              std::memcpy(row + k0, tmp, (k - k0) * sizeof(float));
            }
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openmedgemma, m) {
  m.def("int4_gemv(Tensor x, Tensor w, Tensor scale, int n, str isa='auto') -> Tensor");
  m.def("int4_gemv_group(Tensor x, Tensor[] w, Tensor[] scale, int[] n, str isa='auto') -> Tensor");
  m.def("int4_dequant(Tensor w, Tensor scale, int n, int k) -> Tensor");
  m.def("int4_best_isa() -> str", &int4_best_isa);  // what isa='auto' picks on this CPU
}

TORCH_LIBRARY_IMPL(openmedgemma, CPU, m) {
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int4_gemv_group", &int4_gemv_group);
  m.impl("int4_dequant", &int4_dequant);
}
