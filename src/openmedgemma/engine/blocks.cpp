// Prefill over blocked weights [B, K, 32] (engine/native.py `pack_blocks`: per block of 32 output channels the 32
// weights of input k adjacent), two ops for engine/native.py `blocks_matmul`:
//   - blocks_matmul: fp32 activations times int8 / fp16 / bf16 / fp32 blocks, a GEMM that reads the blocks as they
//     lie (below);
//   - blocks_to_bf16_columns: the bf16 matrix [K, B * 32] that oneDNN's bf16 GEMM reads for a prefill with bf16
//     activations (a model loaded in bf16, e.g. the 4b), converted and re-laid out in one parallel pass, each
//     thread whole rows. As a torch copy of a permuted view this pass took ~65% of an int8 4b gate/up prefill
//     (2560 x 20480, 64 rows, 2 threads: 41-48 ms beside a 24 ms GEMM). Weights: int8 or bf16; exact (|int8| <=
//     128 is a bf16 value).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "widen.h"

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


// ------------------------------------------------------------------ prefill GEMM over the blocks (fp32 x)
// y [M, B * 32] = x [M, K] times blocks [B, K, 32] (int8 / fp16 / bf16 / fp32), times scale [N] if given. A block's
// weights for kKc inputs are widened once into an L1-sized fp32 panel and reused by every tile of rows (one
// widening per panel, not one per tile; fp32 blocks are read as they lie). Register tiles: AVX-512
// 12 rows x 32 outputs (24 accumulators), AVX2 6 rows x 16 outputs (12). Each thread takes a range of blocks, in
// groups whose outputs [M, group * 32] stay in L2 while the passes over K (kKc inputs each) add to them.
// 130M shapes, 128 rows, EPYC Zen 4: 0.8-1.4x the speed of MKL's sgemm on the same weight in fp32 at 1 thread,
// 1.1-2.1x at 2 (benchmarks/RESULTS.md).

constexpr int64_t kKc = 256;  // inputs per pass: a block's panel [256, 32] widened to fp32 is 32 KB (128: within noise)
constexpr int64_t kGroupBytes = 256 << 10;  // outputs per group of blocks

template <typename T>
void widen_panel(const T* src, int64_t n, float* dst) {  // n values (a multiple of 8) -> fp32
  for (int64_t i = 0; i < n; i += 8) {
    __m256 f;
    if constexpr (std::is_same_v<T, int8_t>) {
      f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i))));
    } else if constexpr (std::is_same_v<T, at::Half>) {
      f = omg::load8<omg::Kind::fp16>(reinterpret_cast<const uint16_t*>(src + i));
    } else {
      f = omg::load8<omg::Kind::bf16>(reinterpret_cast<const uint16_t*>(src + i));
    }
    _mm256_storeu_ps(dst + i, f);
  }
}

#define OMG_AVX512 __attribute__((target("avx512f,avx512bw")))

// rows R of x (stride ldx) times the panel w [kc, 32] into y (stride ldy): y = (first ? 0 : y) + x w, then
// times scale (32 values) when given
template <int R>
OMG_AVX512 void tile_avx512(const float* x, int64_t ldx, const float* w, int64_t kc, float* y, int64_t ldy,
                            bool first, const float* scale) {
  __m512 a0[R], a1[R];  // two arrays, not one [R][2]: GCC then keeps them in registers across the k loop
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k, w += kBlock) {
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_set1_ps(x[r * ldx + k]);
      a0[r] = _mm512_fmadd_ps(v, w0, a0[r]);
      a1[r] = _mm512_fmadd_ps(v, w1, a1[r]);
    }
  }
  const __m512 s0 = scale ? _mm512_loadu_ps(scale) : _mm512_set1_ps(1.f);
  const __m512 s1 = scale ? _mm512_loadu_ps(scale + 16) : _mm512_set1_ps(1.f);
  for (int r = 0; r < R; ++r) {
    float* out = y + r * ldy;
    if (!first) a0[r] = _mm512_add_ps(a0[r], _mm512_loadu_ps(out)), a1[r] = _mm512_add_ps(a1[r], _mm512_loadu_ps(out + 16));
    _mm512_storeu_ps(out, scale ? _mm512_mul_ps(a0[r], s0) : a0[r]);
    _mm512_storeu_ps(out + 16, scale ? _mm512_mul_ps(a1[r], s1) : a1[r]);
  }
}

template <int R>  // as tile_avx512, 16 outputs (half a block: w's stride stays 32)
void tile_avx2(const float* x, int64_t ldx, const float* w, int64_t kc, float* y, int64_t ldy, bool first,
               const float* scale) {
  __m256 a0[R], a1[R];  // two arrays, not one [R][2]: GCC then keeps them in registers across the k loop
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k, w += kBlock) {
    const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 v = _mm256_set1_ps(x[r * ldx + k]);
      a0[r] = _mm256_fmadd_ps(v, w0, a0[r]);
      a1[r] = _mm256_fmadd_ps(v, w1, a1[r]);
    }
  }
  const __m256 s0 = scale ? _mm256_loadu_ps(scale) : _mm256_set1_ps(1.f);
  const __m256 s1 = scale ? _mm256_loadu_ps(scale + 8) : _mm256_set1_ps(1.f);
  for (int r = 0; r < R; ++r) {
    float* out = y + r * ldy;
    if (!first) a0[r] = _mm256_add_ps(a0[r], _mm256_loadu_ps(out)), a1[r] = _mm256_add_ps(a1[r], _mm256_loadu_ps(out + 8));
    _mm256_storeu_ps(out, scale ? _mm256_mul_ps(a0[r], s0) : a0[r]);
    _mm256_storeu_ps(out + 8, scale ? _mm256_mul_ps(a1[r], s1) : a1[r]);
  }
}

using Tile = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, bool, const float*);

template <int... R>
constexpr std::array<Tile, sizeof...(R)> avx512_tiles(std::integer_sequence<int, R...>) {
  return {&tile_avx512<R + 1>...};
}
template <int... R>
constexpr std::array<Tile, sizeof...(R)> avx2_tiles(std::integer_sequence<int, R...>) {
  return {&tile_avx2<R + 1>...};
}
constexpr int kRows512 = 12, kRows2 = 6;  // rows per register tile
constexpr auto kTiles512 = avx512_tiles(std::make_integer_sequence<int, kRows512>{});
constexpr auto kTiles2 = avx2_tiles(std::make_integer_sequence<int, kRows2>{});

using omg::cpu_has_avx512;

template <typename T>
void gemm_blocks(const float* x, int64_t M, int64_t K, const T* blocks, int64_t B, const float* scale, float* y,
                 bool wide) {
  const int64_t N = B * kBlock;
  // blocks per group: the group's outputs [M, group * 32] stay in L2 while every pass over K adds to them
  const int64_t group = std::max<int64_t>(1, kGroupBytes / (M * kBlock * int64_t(sizeof(float))));
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> panel(std::is_same_v<T, float> ? 0 : kKc * kBlock);
    for (int64_t g0 = b0; g0 < b1; g0 += group) {
      for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        const int64_t kc = std::min(kKc, K - k0);
        const bool first = k0 == 0, last = k0 + kc == K;
        for (int64_t b = g0; b < std::min(b1, g0 + group); ++b) {
          const T* src = blocks + (b * K + k0) * kBlock;
          const float* w;
          if constexpr (std::is_same_v<T, float>) {
            w = src;
          } else {
            widen_panel(src, kc * kBlock, panel.data());
            w = panel.data();
          }
          const float* s = last && scale ? scale + b * kBlock : nullptr;
          float* yb = y + b * kBlock;
          const int rows = wide ? kRows512 : kRows2;
          for (int64_t m = 0; m < M; m += rows) {
            const int r = static_cast<int>(std::min<int64_t>(rows, M - m));
            const float* xm = x + m * K + k0;
            if (wide) {
              kTiles512[r - 1](xm, K, w, kc, yb + m * N, N, first, s);
            } else {
              kTiles2[r - 1](xm, K, w, kc, yb + m * N, N, first, s);
              kTiles2[r - 1](xm, K, w + 16, kc, yb + m * N + 16, N, first, s ? s + 16 : nullptr);
            }
          }
        }
      }
    }
  });
}

at::Tensor blocks_matmul(const at::Tensor& x, const at::Tensor& blocks, const std::optional<at::Tensor>& scale,
                         int64_t n, c10::string_view isa) {
  const auto dtype = blocks.scalar_type();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "blocks_matmul: x must be a contiguous fp32 CPU matrix [M, K]");
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(2) == kBlock && blocks.size(1) == x.size(1) && blocks.is_contiguous() &&
                  blocks.is_cpu() && (dtype == at::kChar || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat),
              "blocks_matmul: blocks must be contiguous int8 / fp16 / bf16 / fp32 CPU blocks [B, K, 32], K = x's");
  const int64_t M = x.size(0), K = x.size(1), B = blocks.size(0), N = B * kBlock;
  TORCH_CHECK(n > N - kBlock && n <= N, "blocks_matmul: n must be within the last block");
  const bool wide = isa == "avx512";
  TORCH_CHECK(wide || isa == "avx2", "blocks_matmul: isa must be 'avx2' or 'avx512', got '", std::string(isa), "'");
  TORCH_CHECK(!wide || cpu_has_avx512(), "blocks_matmul: isa 'avx512' asked for on a CPU without AVX-512F/BW");
  std::vector<float> padded;  // the scale up to the blocks' padding (N values)
  if (scale) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->numel() == n,
                "blocks_matmul: scale must be a contiguous fp32 vector of n values");
    padded.assign(N, 0.f);
    std::memcpy(padded.data(), scale->data_ptr<float>(), n * sizeof(float));
  }
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* sp = scale ? padded.data() : nullptr;
  float* yp = y.data_ptr<float>();
  if (M > 0) {
    switch (dtype) {
      case at::kChar: gemm_blocks(xp, M, K, blocks.data_ptr<int8_t>(), B, sp, yp, wide); break;
      case at::kHalf: gemm_blocks(xp, M, K, blocks.data_ptr<at::Half>(), B, sp, yp, wide); break;
      case at::kBFloat16: gemm_blocks(xp, M, K, blocks.data_ptr<at::BFloat16>(), B, sp, yp, wide); break;
      default: gemm_blocks(xp, M, K, blocks.data_ptr<float>(), B, sp, yp, wide);
    }
  }
  return n == N ? y : y.narrow(1, 0, n).contiguous();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openmedgemma, m) {
  m.def("blocks_to_bf16_columns(Tensor blocks) -> Tensor");
  m.def("blocks_matmul(Tensor x, Tensor blocks, Tensor? scale, int n, str isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(openmedgemma, CPU, m) {
  m.impl("blocks_to_bf16_columns", &blocks_to_bf16_columns);
  m.impl("blocks_matmul", &blocks_matmul);
}
