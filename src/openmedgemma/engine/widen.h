// Weights widened to fp32 in registers, shared by the kernels that read 16-bit or fp32 values (half_gemv.cpp,
// blocks.cpp, attention.cpp), and the run-time checks for the kernels' AVX-512 variants.

#pragma once

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

inline bool cpu_has_avx512() {
  __builtin_cpu_init();  // checks the OS saves the zmm state too
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

inline bool cpu_has_avx512_vnni() { return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni"); }

}  // namespace omg
