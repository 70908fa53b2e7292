// Weights widened to fp32 in registers, shared by the kernels that read 16-bit or fp32 values (half_gemv.cpp,
// blocks.cpp, attention.cpp), fp32 rounded back to bf16 (the kernels' bf16 outputs), and the run-time checks for
// the kernels' AVX-512 variants.

#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

namespace omg {

// The element type: 16-bit (widened in registers) or fp32 (the same loop, loads only).
enum class Kind { bf16, fp16, fp32 };
template <Kind K>
using Elem = std::conditional_t<K == Kind::fp32, float, uint16_t>;

template <Kind K>
inline __m256 load8(const Elem<K>* p) {  // 8 values -> 8 fp32 (AVX2 + F16C)
  if constexpr (K == Kind::fp32) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (K == Kind::bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);
  }
}

// 8 fp32 -> 8 bf16, rounded to nearest even as torch's conversion rounds (c10::BFloat16), NaN kept a NaN.
inline void store8_bf16(uint16_t* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));  // all <= 0xFFFF
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
}

// One value each way, with c10's own conversions (the same rounding as store8_bf16).
inline uint16_t to_bf16(float f) { return c10::detail::round_to_nearest_even(f); }
inline float from_bf16(uint16_t h) { return c10::detail::f32_from_bits(h); }

// n bf16 values as fp32, and back (rounded).
inline void widen_bf16(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8<Kind::bf16>(src + i));
  for (; i < n; ++i) dst[i] = from_bf16(src[i]);
}

inline void narrow_bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8_bf16(dst + i, _mm256_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = to_bf16(src[i]);
}

// A row of T (float, or uint16_t holding bf16) as fp32: the row itself, or widened into `buf`.
template <class T>
inline const float* as_float(const T* row, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    widen_bf16(row, buf, n);
    return buf;
  }
}

inline bool cpu_has_avx512() {
  __builtin_cpu_init();  // checks the OS saves the zmm state too
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

inline bool cpu_has_avx512_vnni() { return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni"); }

}  // namespace omg
