// brisk's quantized matrix products for x86 CPUs, registered as torch operators (brisk::int4_linear,
// brisk::int8_linear), so that one op runs eagerly, inside torch.compile and inside an AOTInductor package.
// cpu_kernels.py builds this file with torch.utils.cpp_extension and swaps the ops into the int4 and
// int8 layers; where it cannot build or run, the plain layers of quantized_layers.py compute instead.
//
// Decoding multiplies one row of activations (a few, with a batch) by every weight of the model, so its
// speed is how fast the weights stream from memory. PyTorch's CPU int4 kernel widens each 4-bit weight to
// a float and multiplies in floating point, which costs more than reading it. This file does what
// llama.cpp does instead (its Q4_1 x Q8_1 and Q8_0 x Q8_0 dot products):
//
//   1. Round the activations to int8 once per call, in blocks of 32 values that share one fp32 scale:
//      x[i] ~ xq[i] * d, d = max |x| / 127 over the block (llama.cpp's Q8_0 / Q8_1 blocks).
//   2. Multiply 32 weights by one activation block in integers: 32 products of 8-bit numbers summed into
//      8 int32 lanes by one or two instructions, which then become one float per lane.
//   3. Scale: sum over a block = d * (integer sum); over a weight group, times the group's scale.
//
// The weight formats (quantized_layers.py):
//   int4: w = q * scale + min, q in [0, 15] unsigned, a scale and a min per group of `groupsize` columns
//         (brisk stores zero = min + 8 scale; cpu_kernels.py passes scale and min as fp16 pairs, which is
//         exact for GGUF's Q4_0 / Q4_1 files, whose blocks store them in fp16). A group's bytes hold its
//         columns j (low nibble) and j + groupsize / 2 (high nibble) in byte j.
//         sum_j w_j x_j = scale * sum_j q_j x_j + min * sum_j x_j: the min multiplies the activations' sum
//         over the group, which step 1 keeps beside each block, as llama.cpp's Q8_1 does. It is the sum of
//         the ROUNDED x: then the product is exactly w times the rounded x, whose error sum_j w_j e_j is
//         small because w is centred near zero; the plain sum would leave scale * sum_j q_j e_j, whose
//         q_j in [0, 15] are all positive, and cost several times the perplexity (docs/cpu_kernels.md).
//   int8: w = q * scale, q in [-128, 127], a scale (fp16) per group of `groupsize` columns: 32 for GGUF's
//         Q8_0, the whole row for a scale per output channel.
//
// Rows of the output are split over torch's threads (at::parallel_for, so torch.set_num_threads holds).
// Each thread walks its weight rows once; for each, up to 4 activation rows at a time share every
// unpacked weight register, and further activation rows find the weight row still in the L1 cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;  // activation values that share one int8 scale
constexpr int TILE = 4;        // activation rows multiplied together by one weight row
constexpr int64_t ROWS_PER_PASS = 16;  // weight rows multiplied by every activation row before the next ones

// ---- Step 1: the activations as int8 blocks ---------------------------------------------------------

struct Q8Rows {
  int64_t rows, blocks_per_row;
  std::vector<int8_t> values;  // (rows, in): x rounded to int8 within its block's scale
  std::vector<float> scales;   // (rows, in / 32): x ~ value * scale
  std::vector<float> sums;     // (rows, in / 32): each block's sum of its rounded x (for int4's mins)
};

// One block of 32 values, rounded: values[i] = round(block[i] * 127 / amax) (to nearest, ties to even,
// as std::nearbyint does), scale = amax / 127, sum = scale * the sum of the rounded values.
inline void quantize_block(const float* block, int8_t* values, float* scale, float* sum) {
  __m256 v[4], amax = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int i = 0; i < 4; i++) {
    v[i] = _mm256_loadu_ps(block + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));  // |v| clears the sign bit
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  const float largest = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  const __m256 inverse = _mm256_set1_ps(largest > 0 ? 127.0f / largest : 0.0f);
  __m256i q[4], total = _mm256_setzero_si256();
  for (int i = 0; i < 4; i++) {
    q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    total = _mm256_add_epi32(total, q[i]);
  }
  // int32 -> int8: the packs work within 128-bit lanes, so the result's 4-byte groups come out in the
  // order 0 2 4 6 1 3 5 7, which one permute puts back
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256((__m256i*)values, _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
  *scale = largest / 127.0f;
  *sum = *scale * _mm_cvtsi128_si32(t);
}

// x: (rows, x_in) fp32, rounded into rows of `in` values (in >= x_in, a multiple of 32): the columns past
// x_in are zero (an int4 weight padded to whole groups multiplies them). Rows are split over the threads.
Q8Rows quantize_rows(const float* x, int64_t rows, int64_t x_in, int64_t in) {
  Q8Rows q{rows, in / BLOCK, std::vector<int8_t>(rows * in), std::vector<float>(rows * in / BLOCK),
           std::vector<float>(rows * in / BLOCK)};
  const int64_t grain = std::max<int64_t>(1, 16384 / in);  // a few microseconds of work a thread at least
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      for (int64_t column = 0; column < in; column += BLOCK) {
        float block[BLOCK] = {};
        std::memcpy(block, x + r * x_in + column, sizeof(float) * std::clamp<int64_t>(x_in - column, 0, BLOCK));
        const int64_t b = (r * in + column) / BLOCK;
        quantize_block(block, &q.values[b * BLOCK], &q.scales[b], &q.sums[b]);
      }
    }
  });
  return q;
}

// ---- Step 2: 32 unsigned bytes times 32 signed bytes ------------------------------------------------
// Both instructions multiply an UNSIGNED byte by a SIGNED byte, and sum 4 neighbouring products into
// each of 8 int32 lanes. Int4 weights are unsigned already (0..15). Int8 weights are signed, so an int8 x
// int8 product is written as |w| * (x with the sign of w): _mm256_sign_epi8 gives both (sign trick).

// AVX2: maddubs sums pairs of products into int16 (saturating: 15 * 127 * 2 and 128 * 127 * 2 both fit),
// madd with ones sums pairs of int16 into int32.
struct Avx2 {
  static inline __m256i dot(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
  }
};

// AVX-512 VNNI: vpdpbusd does both steps in one instruction, in int32 all the way. Written as inline
// assembly because GCC emits its intrinsic only in a function compiled for AVX-512 as a whole, and this
// file is compiled for AVX2 (Vnni is used only where the CPU reports avx512_vnni and avx512vl).
struct Vnni {
  static inline __m256i dot(__m256i u, __m256i s) {
    __m256i sum = _mm256_setzero_si256();
    asm("vpdpbusd %2, %1, %0" : "+x"(sum) : "x"(u), "x"(s));  // sum += u . s (AT&T order)
    return sum;
  }
};

// acc + (the integer dot of 32 weights with one activation block) * the block's scale: 8 float lanes.
template <typename Isa>
inline __m256 add_block(__m256 acc, __m256i weights, const int8_t* x, float x_scale) {
  const __m256i products = Isa::dot(weights, _mm256_loadu_si256((const __m256i*)x));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), _mm256_set1_ps(x_scale), acc);
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float half_to_float(const at::Half& h) { return _cvtsh_ss(h.x); }

// R activation rows, side by side in a Q8Rows: row r's values start at values + r * in, its block scales
// and sums at scales + r * blocks, sums + r * blocks.
struct Tile {
  const int8_t* __restrict values;
  const float* __restrict scales;
  const float* __restrict sums;
  int64_t in, blocks;
};

// ---- Step 3: one weight row times R activation rows -------------------------------------------------

// int4 in groups of 32 (GGUF's Q4_0 / Q4_1 blocks): 16 bytes hold columns 0-15 (low nibbles) and 16-31
// (high nibbles), one activation block. Scale and min fold into the block's float multiply-add.
template <typename Isa, int R>
inline void add_group_g32(const uint8_t* __restrict weight, const at::Half* __restrict scale_min, int64_t g,
                          const Tile& x, __m256* acc, float* min_terms) {
  const __m128i bytes = _mm_loadu_si128((const __m128i*)(weight + 16 * g));
  const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), _mm256_set1_epi8(0x0F));
  const float scale = half_to_float(scale_min[2 * g]), min = half_to_float(scale_min[2 * g + 1]);
  for (int r = 0; r < R; r++) {
    const __m256i products = Isa::dot(q, _mm256_loadu_si256((const __m256i*)(x.values + r * x.in + 32 * g)));
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), _mm256_set1_ps(scale * x.scales[r * x.blocks + g]), acc[r]);
    min_terms[r] += min * x.sums[r * x.blocks + g];
  }
}

// Even and odd groups add into separate sums: each multiply-add waits for the previous one into the same
// register (4 cycles), so one chain would hold a core to a group per 4 cycles.
template <typename Isa, int R>
void int4_row_g32(const uint8_t* __restrict weight, const at::Half* __restrict scale_min, int64_t groups,
                  const Tile& x, float* __restrict result) {
  __m256 even[R], odd[R];
  float even_mins[R], odd_mins[R];
  for (int r = 0; r < R; r++) even[r] = odd[r] = _mm256_setzero_ps(), even_mins[r] = odd_mins[r] = 0;
  int64_t g = 0;
  for (; g + 1 < groups; g += 2) {
    add_group_g32<Isa, R>(weight, scale_min, g, x, even, even_mins);
    add_group_g32<Isa, R>(weight, scale_min, g + 1, x, odd, odd_mins);
  }
  if (g < groups) add_group_g32<Isa, R>(weight, scale_min, g, x, even, even_mins);
  for (int r = 0; r < R; r++) result[r] = horizontal_sum(_mm256_add_ps(even[r], odd[r])) + even_mins[r] + odd_mins[r];
}

// int4 in groups of 64, 128, ...: 32 bytes at a time, whose low nibbles are the 32 columns j.. and high
// nibbles the 32 columns j + groupsize / 2..; each block's integer dot times its activation scale is
// summed over the group, then times the group's scale.
template <typename Isa, int R>
void int4_row(const uint8_t* __restrict weight, const at::Half* __restrict scale_min, int64_t groups,
              int64_t groupsize, const Tile& x, float* __restrict result) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const int64_t half = groupsize / 2, blocks_per_group = groupsize / BLOCK;
  __m256 acc[R];
  float min_terms[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), min_terms[r] = 0;
  for (int64_t g = 0; g < groups; g++) {
    const int64_t first = g * blocks_per_group;  // the group's first activation block
    __m256 group_acc[R];
    for (int r = 0; r < R; r++) group_acc[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < half; j += BLOCK) {
      const __m256i bytes = _mm256_loadu_si256((const __m256i*)(weight + g * half + j));
      const __m256i low = _mm256_and_si256(bytes, nibble);
      const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
      const int64_t low_block = first + j / BLOCK, high_block = low_block + half / BLOCK;
      for (int r = 0; r < R; r++) {
        const int8_t* row = x.values + r * x.in;
        const float* scales = x.scales + r * x.blocks;
        group_acc[r] = add_block<Isa>(group_acc[r], low, row + low_block * BLOCK, scales[low_block]);
        group_acc[r] = add_block<Isa>(group_acc[r], high, row + high_block * BLOCK, scales[high_block]);
      }
    }
    const float scale = half_to_float(scale_min[2 * g]), min = half_to_float(scale_min[2 * g + 1]);
    for (int r = 0; r < R; r++) {
      float group_sum = 0;
      for (int64_t b = first; b < first + blocks_per_group; b++) group_sum += x.sums[r * x.blocks + b];
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale), group_acc[r], acc[r]);
      min_terms[r] += min * group_sum;
    }
  }
  for (int r = 0; r < R; r++) result[r] = horizontal_sum(acc[r]) + min_terms[r];
}

// int8: 32 weights a block; |w| * (x with w's sign), as above.
template <typename Isa, int R>
void int8_row(const int8_t* __restrict weight, const at::Half* __restrict scales, int64_t groups,
              int64_t groupsize, const Tile& x, float* __restrict result) {
  const int64_t blocks_per_group = groupsize / BLOCK;
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; g++) {
    __m256 group_acc[R];
    for (int r = 0; r < R; r++) group_acc[r] = _mm256_setzero_ps();
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; b++) {
      const __m256i w = _mm256_loadu_si256((const __m256i*)(weight + b * BLOCK));
      const __m256i magnitude = _mm256_sign_epi8(w, w);  // |w| as unsigned bytes (-128 gives 128)
      for (int r = 0; r < R; r++) {
        const __m256i xq = _mm256_loadu_si256((const __m256i*)(x.values + r * x.in + b * BLOCK));
        const __m256i products = Isa::dot(magnitude, _mm256_sign_epi8(xq, w));
        group_acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), _mm256_set1_ps(x.scales[r * x.blocks + b]),
                                       group_acc[r]);
      }
    }
    const __m256 scale = _mm256_set1_ps(half_to_float(scales[g]));
    for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(scale, group_acc[r], acc[r]);
  }
  for (int r = 0; r < R; r++) result[r] = horizontal_sum(acc[r]);
}

// ---- The whole product: weight rows over threads, activation rows in tiles --------------------------

struct Weight {
  const uint8_t* data;     // packed int4 (out, in / 2) or int8 (out, in)
  const at::Half* scales;  // int4: (out, groups, 2) scale and min; int8: (out, groups)
  int64_t out, in, groupsize, row_bytes, scales_per_row;
};

// Weight rows [begin, end) times activation rows [r0, r0 + R): out (rows, out) at those places.
template <typename Isa, int R>
void rows_times_tile(const Weight& w, int64_t begin, int64_t end, bool int4, const Q8Rows& q, int64_t r0,
                     float* out) {
  const int64_t blocks = q.blocks_per_row, groups = w.in / w.groupsize;
  const Tile x{q.values.data() + r0 * w.in, q.scales.data() + r0 * blocks, q.sums.data() + r0 * blocks, w.in,
               blocks};
  for (int64_t o = begin; o < end; o++) {
    float result[R];
    const uint8_t* row = w.data + o * w.row_bytes;
    const at::Half* scales = w.scales + o * w.scales_per_row;
    if (!int4) int8_row<Isa, R>((const int8_t*)row, scales, groups, w.groupsize, x, result);
    else if (w.groupsize == BLOCK) int4_row_g32<Isa, R>(row, scales, groups, x, result);
    else int4_row<Isa, R>(row, scales, groups, w.groupsize, x, result);
    for (int r = 0; r < R; r++) out[(r0 + r) * w.out + o] = result[r];
  }
}

// A thread's share should be worth more than waking a second thread (a few microseconds): rows of at
// least this many weight bytes in all run on one thread.
constexpr int64_t MIN_BYTES_PER_THREAD = 64 * 1024;

template <typename Isa>
void matmul(const Weight& w, bool int4, const Q8Rows& q, float* out) {
  const int64_t grain = std::max<int64_t>(1, MIN_BYTES_PER_THREAD / w.row_bytes);
  at::parallel_for(0, w.out, grain, [&](int64_t begin, int64_t end) {
    // a few weight rows at a time, each times every tile of activation rows while it is in the L1 cache
    for (int64_t o = begin; o < end; o += ROWS_PER_PASS) {
      const int64_t stop = std::min(end, o + ROWS_PER_PASS);
      for (int64_t r0 = 0; r0 < q.rows; r0 += TILE) {
        switch (std::min<int64_t>(TILE, q.rows - r0)) {
          case 4: rows_times_tile<Isa, 4>(w, o, stop, int4, q, r0, out); break;
          case 3: rows_times_tile<Isa, 3>(w, o, stop, int4, q, r0, out); break;
          case 2: rows_times_tile<Isa, 2>(w, o, stop, int4, q, r0, out); break;
          default: rows_times_tile<Isa, 1>(w, o, stop, int4, q, r0, out);
        }
      }
    }
  });
}

// ---- Which instructions: the best the CPU has, unless a caller (a test) asks for AVX2 ---------------

bool cpu_has_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
}

bool use_vnni = cpu_has_vnni();

std::string cpu_isa(const std::string& choice) {
  TORCH_CHECK(choice == "" || choice == "best" || choice == "avx2", "cpu_isa: '", choice,
              "' is not one of '' (ask), 'best', 'avx2'");
  if (!choice.empty()) use_vnni = choice == "best" && cpu_has_vnni();
  return use_vnni ? "avx512_vnni" : "avx2";
}

// x (..., x_in) times the weight, transposed: (..., out).
at::Tensor quantized_linear(const at::Tensor& x, const Weight& w, bool int4) {
  const int64_t x_in = x.size(-1), rows = x.numel() / x_in;
  const Q8Rows q = quantize_rows(x.data_ptr<float>(), rows, x_in, w.in);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.out;
  at::Tensor out = at::empty(shape, x.options());
  if (use_vnni) matmul<Vnni>(w, int4, q, out.data_ptr<float>());
  else matmul<Avx2>(w, int4, q, out.data_ptr<float>());
  return out;
}

// x: (..., in) fp32, contiguous; for int4, in may be less than the weight's columns (zero padding follows).
void check_common(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t groupsize,
                  int64_t in) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous float32 CPU tensor (..., in)");
  TORCH_CHECK(x.size(-1) <= in && x.size(-1) > in - groupsize, "x has ", x.size(-1), " columns, the weight ", in);
  TORCH_CHECK(weight.is_contiguous() && scales.is_contiguous() && scales.scalar_type() == at::kHalf,
              "weight and scales must be contiguous, scales float16");
  TORCH_CHECK(groupsize > 0 && groupsize % BLOCK == 0 && in % groupsize == 0, "groupsize ", groupsize,
              " must be a multiple of 32 dividing the ", in, " columns");
}

// x (..., in) fp32 times an int4 weight (out, padded_in / 2) uint8, transposed: (..., out) fp32.
// scale_min: (out, in / groupsize, 2) fp16. groupsize: 32, or a multiple of 64.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale_min,
                       int64_t groupsize) {
  const int64_t out = weight.size(0), in = 2 * weight.size(1);
  check_common(x, weight, scale_min, groupsize, in);
  TORCH_CHECK(weight.scalar_type() == at::kByte, "int4 weight must be uint8 (two values a byte)");
  TORCH_CHECK(groupsize == BLOCK || groupsize % (2 * BLOCK) == 0, "int4 groupsize must be 32 or a multiple of 64");
  TORCH_CHECK(scale_min.numel() == out * (in / groupsize) * 2, "scale_min must be (out, in / groupsize, 2)");
  return quantized_linear(x, {weight.data_ptr<uint8_t>(), scale_min.data_ptr<at::Half>(), out, in, groupsize, in / 2,
                              2 * (in / groupsize)}, true);
}

// x (..., in) fp32 times an int8 weight (out, in), transposed: (..., out) fp32.
// scales: (out, in / groupsize) fp16; groupsize = in for one scale per output channel.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t groupsize) {
  const int64_t out = weight.size(0), in = weight.size(1);
  check_common(x, weight, scales, groupsize, in);
  TORCH_CHECK(x.size(-1) == in, "x has ", x.size(-1), " columns, the weight ", in);
  TORCH_CHECK(weight.scalar_type() == at::kChar, "int8 weight must be int8");
  TORCH_CHECK(scales.numel() == out * (in / groupsize), "scales must be (out, in / groupsize)");
  return quantized_linear(x, {(const uint8_t*)weight.data_ptr(), scales.data_ptr<at::Half>(), out, in, groupsize, in,
                              in / groupsize}, false);
}

// The op's output shape without computing (torch.compile and export trace with it): (..., out).
at::Tensor quantized_linear_meta(const at::Tensor& x, const at::Tensor& weight, const at::Tensor&, int64_t) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = weight.size(0);
  return at::empty(shape, x.options());
}

}  // namespace

TORCH_LIBRARY(brisk, m) {
  m.def("int4_linear(Tensor x, Tensor weight, Tensor scale_min, int groupsize) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales, int groupsize) -> Tensor");
  m.def("cpu_isa(str choice) -> str", &cpu_isa);
}

TORCH_LIBRARY_IMPL(brisk, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
}

TORCH_LIBRARY_IMPL(brisk, Meta, m) {
  m.impl("int4_linear", &quantized_linear_meta);
  m.impl("int8_linear", &quantized_linear_meta);
}
