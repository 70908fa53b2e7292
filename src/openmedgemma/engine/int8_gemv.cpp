// Weight-only int8 matrix-vector products for CPU decode, built once by engine/native.py. AVX2 everywhere;
// AVX-512 VNNI where the CPU has it, chosen at run time, so the one library still runs on an AVX2-only CPU.
//
//   y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]      x: fp32 [M, K], w: int8, scale: fp32 [N]
//
// Decode multiplies one activation row by every weight, so it is bound by the bytes of weight it streams:
// int8 reads 4x fewer than fp32. torch's own weight-only kernel (_weight_int8pack_mm) is vectorised for
// AVX-512 only and on AVX2 runs 3-4x slower than fp32 BLAS.
//
// Widening every weight to fp32 costs more than reading it (the first version of this kernel did, and ran
// at 11-16 GB/s where int4 reads at 17-24), so x is rounded to int16 per group of kGroup inputs
// (xq = round(x / dx), dx = max|x| / 32767: |x - dx * xq| <= dx / 2, 2^-16 of the group's largest value, 256x
// finer than bf16) and each group's dot product is exact in int32: two rows k, k + 1 widened to int16 and
// interleaved (unpack), so each int32 lane holds the pair (w[k, c], w[k + 1, c]), and one multiply-add of
// pairs (vpmaddwd + vpaddd on AVX2, vpdpwssd on AVX-512 VNNI) adds xq[k] w[k, c] + xq[k + 1] w[k + 1, c].
// |sum| <= kGroup * 32767 * 127 < 2^31. Then one fp32 multiply-add per group. Integer sums are exact and
// the fp32 ones run over the groups in order, so both variants (and any thread count) give the same bits.
//
// Layout: w is held as [ceil(N / 32), K, 32] (engine/native.py `pack_blocks`): for each block of 32
// output channels the 32 weights of input k are adjacent, so a block is one contiguous stream and the
// 32 sums stay in lanes, with no horizontal reduction. Rows past N are zero.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include "gemv_group.h"
#include "widen.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;   // output channels per block
constexpr int64_t kGroup = 256;  // inputs per int16 rounding group (and int32 sum)

// One row (rounded: xq, dx) times one block [K, 32] -> its 32 unscaled sums in out. AVX2: 16 channels per register.
__attribute__((target("avx2,fma"))) void block_avx2(const int16_t* xq, const float* dx, const int8_t* w, int64_t K,
                                                    float* out) {
  __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
  for (int64_t k0 = 0; k0 < K; k0 += kGroup) {
    const int64_t k1 = std::min(K, k0 + kGroup);
    __m256i l0 = _mm256_setzero_si256(), h0 = l0, l1 = l0, h1 = l0;  // channels 0-15 (lo/hi), 16-31
    int64_t k = k0;
    for (; k + 2 <= k1; k += 2, w += 2 * kBlock) {
      int32_t p0;  // (xq[k], xq[k + 1]) as one int32
      std::memcpy(&p0, xq + k, 4);
      const __m256i x0 = _mm256_set1_epi32(p0);
      const __m256i a0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
      const __m256i a1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));
      const __m256i b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kBlock)));
      const __m256i b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kBlock + 16)));
      l0 = _mm256_add_epi32(l0, _mm256_madd_epi16(_mm256_unpacklo_epi16(a0, b0), x0));
      h0 = _mm256_add_epi32(h0, _mm256_madd_epi16(_mm256_unpackhi_epi16(a0, b0), x0));
      l1 = _mm256_add_epi32(l1, _mm256_madd_epi16(_mm256_unpacklo_epi16(a1, b1), x0));
      h1 = _mm256_add_epi32(h1, _mm256_madd_epi16(_mm256_unpackhi_epi16(a1, b1), x0));
    }
    for (; k < k1; ++k, w += kBlock) {  // an odd group's last input: pairs (w[k, c], 0)
      const __m256i x0 = _mm256_set1_epi32(static_cast<uint16_t>(xq[k]));
      const __m256i a0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
      const __m256i a1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));
      const __m256i z = _mm256_setzero_si256();
      l0 = _mm256_add_epi32(l0, _mm256_madd_epi16(_mm256_unpacklo_epi16(a0, z), x0));
      h0 = _mm256_add_epi32(h0, _mm256_madd_epi16(_mm256_unpackhi_epi16(a0, z), x0));
      l1 = _mm256_add_epi32(l1, _mm256_madd_epi16(_mm256_unpacklo_epi16(a1, z), x0));
      h1 = _mm256_add_epi32(h1, _mm256_madd_epi16(_mm256_unpackhi_epi16(a1, z), x0));
    }
    const __m256 d = _mm256_set1_ps(dx[k0 / kGroup]);
    f0 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(l0), f0);
    f1 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(h0), f1);
    f2 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(l1), f2);
    f3 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(h1), f3);
  }
  // lo: channels 0-3 (lane 0), 8-11 (lane 1); hi: 4-7, 12-15
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(f0, f1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(f0, f1, 0x31));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(f2, f3, 0x20));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(f2, f3, 0x31));
}

// The same with 512-bit registers and vpdpwssd: 32 channels per register pair.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void block_vnni(const int16_t* xq, const float* dx,
                                                                      const int8_t* w, int64_t K, float* out) {
  __m512 flo = _mm512_setzero_ps(), fhi = flo;
  for (int64_t k0 = 0; k0 < K; k0 += kGroup) {
    const int64_t k1 = std::min(K, k0 + kGroup);
    __m512i lo0 = _mm512_setzero_si512(), hi0 = lo0, lo1 = lo0, hi1 = lo0;  // 4 independent chains
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4, w += 4 * kBlock) {
      int32_t p0, p1;  // (xq[k], xq[k + 1]) and (xq[k + 2], xq[k + 3]) as one int32 each
      std::memcpy(&p0, xq + k, 4);
      std::memcpy(&p1, xq + k + 2, 4);
      const __m512i x0 = _mm512_set1_epi32(p0), x1 = _mm512_set1_epi32(p1);
      const __m512i r0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
      const __m512i r1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kBlock)));
      const __m512i r2 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2 * kBlock)));
      const __m512i r3 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 3 * kBlock)));
      lo0 = _mm512_dpwssd_epi32(lo0, _mm512_unpacklo_epi16(r0, r1), x0);
      hi0 = _mm512_dpwssd_epi32(hi0, _mm512_unpackhi_epi16(r0, r1), x0);
      lo1 = _mm512_dpwssd_epi32(lo1, _mm512_unpacklo_epi16(r2, r3), x1);
      hi1 = _mm512_dpwssd_epi32(hi1, _mm512_unpackhi_epi16(r2, r3), x1);
    }
    for (; k < k1; ++k, w += kBlock) {  // the group's last 1-3 inputs: pairs (w[k, c], 0)
      const __m512i x0 = _mm512_set1_epi32(static_cast<uint16_t>(xq[k]));
      const __m512i r0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
      lo0 = _mm512_dpwssd_epi32(lo0, _mm512_unpacklo_epi16(r0, _mm512_setzero_si512()), x0);
      hi0 = _mm512_dpwssd_epi32(hi0, _mm512_unpackhi_epi16(r0, _mm512_setzero_si512()), x0);
    }
    const __m512 d = _mm512_set1_ps(dx[k0 / kGroup]);
    flo = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_add_epi32(lo0, lo1)), flo);
    fhi = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_add_epi32(hi0, hi1)), fhi);
  }
  // out[c] for c = 8 L + j: lo[4 L + j] (j < 4), hi[4 L + j - 4] (j >= 4); index 16 + i picks hi[i]
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  _mm512_storeu_ps(out, _mm512_permutex2var_ps(flo, first, fhi));
  _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(flo, second, fhi));
}

// x rounded to int16 per group of kGroup inputs: xq [K], dx [ceil(K / kGroup)]. A group holding inf or NaN gets
// dx = NaN (and xq = 0), so its outputs are NaN, as an fp32 product's would be, not garbage.
void quantize_row16(const float* x, int64_t K, int16_t* xq, float* dx) {
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += kGroup, ++g) {
    const int64_t k1 = std::min(K, k0 + kGroup);
    float amax = 0.f;
    bool finite = true;
    for (int64_t k = k0; k < k1; ++k) {
      finite = finite && std::isfinite(x[k]);
      amax = std::max(amax, std::fabs(x[k]));
    }
    const float d = finite ? amax / 32767.f : std::numeric_limits<float>::quiet_NaN();
    const float inv = finite && d > 0.f ? 1.f / d : 0.f;
    for (int64_t k = k0; k < k1; ++k) xq[k] = static_cast<int16_t>(std::nearbyint(x[k] * inv));  // |xq| <= 32767
    dx[g] = d;
  }
}

using BlockFn = void (*)(const int16_t*, const float*, const int8_t*, int64_t, float*);

std::string int8_best_isa() { return omg::cpu_has_avx512_vnni() ? "avx512vnni" : "avx2"; }

BlockFn pick(const std::string& isa) {
  const std::string chosen = isa == "auto" ? int8_best_isa() : isa;
  if (chosen == "avx2") return block_avx2;
  TORCH_CHECK(chosen == "avx512vnni", "int8_gemv: isa must be auto, avx2 or avx512vnni, not ", isa);
  TORCH_CHECK(omg::cpu_has_avx512_vnni(), "int8_gemv: this CPU lacks AVX-512 VNNI (asked for isa=avx512vnni)");
  return block_vnni;
}

// y = x times each weight i of a group that reads the same input (q, k, v; gate, up), the outputs side by side
// [M, sum n], in one parallel loop over every block of every weight (one call per group, not per layer).
at::Tensor int8_gemv_group(const at::Tensor& x, at::TensorList w, at::TensorList scale, at::IntArrayRef n,
                           c10::string_view isa) {
  omg::check_input(x, "int8_gemv");
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
  const BlockFn block = pick(std::string(isa));
  std::vector<float> widened;
  const float* xp = omg::float_rows(x, widened);
  const int64_t G = (K + kGroup - 1) / kGroup;
  std::vector<int16_t> xq(M * K);  // the rows rounded once per call
  std::vector<float> dx(M * G);
  for (int64_t m = 0; m < M; ++m) quantize_row16(xp + m * K, K, xq.data() + m * K, dx.data() + m * G);
  const omg::GroupLayout group(w, n);
  const int64_t cols = group.cols();
  const omg::Output y(x, M, cols);
  // Tasks of at least ~64 KB of weights, so a thread's share outweighs waking it.
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, K * kBlock));
  group.for_each_block(n, kBlock, grain, [&](size_t i, int64_t local, int64_t n0, int64_t width) {
    alignas(32) float sums[kBlock];
    const int8_t* wp = w[i].data_ptr<int8_t>() + local * K * kBlock;
    const float* sp = scale[i].data_ptr<float>() + n0;
    for (int64_t m = 0; m < M; ++m) {  // the block stays in L1/L2 across the rows
      block(xq.data() + m * K, dx.data() + m * G, wp, K, sums);
      for (int64_t j = 0; j < width; ++j) sums[j] *= sp[j];
      y.store(m * cols + group.first_col[i] + n0, sums, width);
    }
  });
  return y.y;
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t n,
                     c10::string_view isa) {
  return int8_gemv_group(x, {w}, {scale}, {n}, isa);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openmedgemma, m) {
  m.def("int8_gemv(Tensor x, Tensor w, Tensor scale, int n, str isa='auto') -> Tensor");
  m.def("int8_gemv_group(Tensor x, Tensor[] w, Tensor[] scale, int[] n, str isa='auto') -> Tensor");
  m.def("int8_best_isa() -> str", &int8_best_isa);  // what isa='auto' picks on this CPU
}

TORCH_LIBRARY_IMPL(openmedgemma, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int8_gemv_group", &int8_gemv_group);
}
