// Blocked weights [B, K, 32] (engine/native.py `pack_blocks`: per block of 32 output channels the 32 weights of
// input k adjacent) to the bf16 matrix [K, B * 32] that oneDNN's bf16 GEMM reads for a prefill with bf16
// activations (a model loaded in bf16, e.g. the 4b: engine/native.py `blocks_to_columns`), converted and
// re-laid out in one parallel pass, each thread whole rows. As a torch copy of a permuted view this pass took
// ~65% of an int8 4b gate/up prefill (2560 x 20480, 64 rows, 2 threads: 41-48 ms beside a 24 ms GEMM).
//
// Weights: int8 or bf16; the result is exact (|int8| <= 128 is a bf16 value).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstring>

namespace {

constexpr int64_t kBlock = 32;

inline void widen32(const int8_t* src, uint16_t* dst) {  // int8 -> fp32 -> its top 16 bits (exact here)
  for (int i = 0; i < kBlock; i += 8) {
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i))));
    const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(f), 16);  // 8 x 32-bit holding 16-bit values
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), packed);
  }
}

at::Tensor blocks_to_bf16_columns(const at::Tensor& blocks) {
  const auto dtype = blocks.scalar_type();
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(2) == kBlock && blocks.is_contiguous() && blocks.is_cpu() &&
                  (dtype == at::kChar || dtype == at::kBFloat16),
              "blocks_to_bf16_columns: blocks must be contiguous int8 or bfloat16 CPU blocks [B, K, 32]");
  const int64_t B = blocks.size(0), K = blocks.size(1), N = B * kBlock;
  at::Tensor out = at::empty({K, N}, blocks.options().dtype(at::kBFloat16));
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const void* bp = blocks.data_ptr();
  // rows of the result per task: each row is B pieces of 32, one from every block
  at::parallel_for(0, K, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N)), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      uint16_t* row = op + k * N;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t at = (b * K + k) * kBlock;
        if (dtype == at::kChar) widen32(static_cast<const int8_t*>(bp) + at, row + b * kBlock);
        else std::memcpy(row + b * kBlock, static_cast<const uint16_t*>(bp) + at, kBlock * sizeof(uint16_t));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openmedgemma, m) {
  m.def("blocks_to_bf16_columns(Tensor blocks) -> Tensor");
}

TORCH_LIBRARY_IMPL(openmedgemma, CPU, m) {
  m.impl("blocks_to_bf16_columns", &blocks_to_bf16_columns);
}
