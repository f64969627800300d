// brisk's matrix products for x86 CPUs, registered as torch operators (brisk::int4_linear,
// brisk::int8_linear, and brisk::float_linear for fp32 / bf16 / fp16 weights), so that one op
// runs eagerly, inside torch.compile and inside an AOTInductor package. cpu_kernels.py builds this file
// with torch.utils.cpp_extension and swaps the ops into the layers; where it cannot build or run, the
// plain layers of model.py and quantized_layers.py compute instead.
//
// Decoding multiplies one row of activations (a few, with a batch) by every weight of the model, so its
// speed is how fast the weights stream from memory. PyTorch's CPU int4 kernel widens each 4-bit weight to
// a float and multiplies in floating point, which costs more than reading it. This file does what
// llama.cpp does instead (its Q4_1 x Q8_1 and Q8_0 x Q8_0 dot products):
//
//   1. Round the activations to int8 once per call, in blocks of 32 values that share one fp32 scale:
//      x[i] ~ xq[i] * d, d = max |x| / 127 over the block (llama.cpp's Q8_0 / Q8_1 blocks).
//   2. Multiply weights by activations in integers, 8 weight rows at once, one row per int32 lane of a
//      register: each instruction adds 4 products of 8-bit numbers into every row's lane.
//   3. Scale: sum over a block = d * (integer sum), for the 8 rows at once; over a weight group, times the
//      8 rows' group scales, loaded as one vector.
//
// The weight formats (quantized_layers.py):
//   int4: w = q * scale + min, q in [0, 15] unsigned, a scale and a min per group of `groupsize` columns
//         (brisk stores zero = min + 8 scale; cpu_kernels.py passes scales and mins in fp16, which is
//         exact for GGUF's Q4_0 / Q4_1 files, whose blocks store them in fp16). A group's bytes hold its
//         columns j (low nibble) and j + groupsize / 2 (high nibble) in byte j (in the order of Step 3).
//         sum_j w_j x_j = scale * sum_j q_j x_j + min * sum_j x_j: the min multiplies the activations' sum
//         over the group, which step 1 keeps beside each block, as llama.cpp's Q8_1 does. It is the sum of
//         the ROUNDED x: then the product is exactly w times the rounded x, whose error sum_j w_j e_j is
//         small because w is centred near zero; the plain sum would leave scale * sum_j q_j e_j, whose
//         q_j in [0, 15] are all positive, and cost several times the perplexity (docs/cpu_kernels.md).
//   int8: w = q * scale, q in [-128, 127], a scale (fp16) per group of `groupsize` columns: 32 for GGUF's
//         Q8_0, the whole row for a scale per output channel.
//
// Weight rows go 8 at a time (a panel: one register lane each, Step 3), the panels split over torch's
// threads (at::parallel_for, so torch.set_num_threads holds). Each thread walks its panels once; for
// each, up to 4 activation rows at a time share every unpacked weight register, and further activation
// rows find the panel's weights still in the cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#define SLEEF_STATIC_LIBS  // declarations only: the functions are linked from PyTorch's own library
#include <sleef.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;  // activation values that share one int8 scale
constexpr int TILE = 4;        // activation rows multiplied together by one panel of weight rows

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
    const __m256 scaled = _mm256_mul_ps(v[i], inverse);
    q[i] = _mm256_cvtps_epi32(_mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
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

// ---- Step 2: 4 unsigned bytes times 4 signed bytes, in each of 8 lanes ------------------------------
// Both instructions multiply an UNSIGNED byte by a SIGNED byte, and sum 4 neighbouring products into
// each of 8 int32 lanes. Int4 weights are unsigned already (0..15). Int8 weights are signed, so an int8 x
// int8 product is written as |w| * (x with the sign of w): _mm256_sign_epi8 gives both (sign trick).

// AVX2: maddubs sums pairs of products into int16 (saturating: 15 * 127 * 2 and 128 * 127 * 2 both fit),
// madd with ones sums pairs of int16 into int32. An int4 pair sum is at most 2 * 15 * 127 = 3810, so 8 of
// them can be added in int16 before the madd (add16 / widen); int8's cannot.
struct Avx2 {
  static inline __m256i dot(__m256i sum, __m256i u, __m256i s) {
    return _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
  }
  static inline __m256i add16(__m256i sum, __m256i u, __m256i s) {
    return _mm256_add_epi16(sum, _mm256_maddubs_epi16(u, s));
  }
  static inline __m256i widen(__m256i sum) { return _mm256_madd_epi16(sum, _mm256_set1_epi16(1)); }
};

// AVX-512 VNNI: vpdpbusd does both steps in one instruction, in int32 all the way. Written as inline
// assembly because GCC emits its intrinsic only in a function compiled for AVX-512 as a whole, and this
// file is compiled for AVX2 (Vnni is used only where the CPU reports avx512_vnni and avx512vl).
struct Vnni {
  static inline __m256i dot(__m256i sum, __m256i u, __m256i s) {
    asm("vpdpbusd %2, %1, %0" : "+x"(sum) : "x"(u), "x"(s));  // sum += u . s (AT&T order)
    return sum;
  }
  static inline __m256i add16(__m256i sum, __m256i u, __m256i s) { return dot(sum, u, s); }
  static inline __m256i widen(__m256i sum) { return sum; }
};

// 4 activation bytes (one column quad) in every lane.
inline __m256i broadcast4(const int8_t* x) {
  int32_t quad;
  std::memcpy(&quad, x, 4);
  return _mm256_set1_epi32(quad);
}

// ---- Step 3: eight weight rows (a panel) times R activation rows --------------------------------------
// The 8 int32 lanes of one register hold 8 weight rows' sums, so a block's scaling is one vector multiply-
// add for 8 rows (their scales loaded as a vector), instead of a horizontal sum for each row. For that,
// each lane must hold 4 weights of its own row: cpu_kernels.py (kernel_weight) reorders the weight bytes
// once, at load, so that each 16 bytes of a row's stored bytes come as 4 registers, `quad[c]` holding
// bytes 4c .. 4c + 3 of the 8 rows, lane k row k. The activations' 4 matching bytes are broadcast to every
// lane. The scales come in the same shape (kernel_scales): per panel and group, the 8 rows' scales side
// by side (int4: then their mins).

// Piece `piece` (the rows' bytes 16 * piece .. + 15) of a panel: 4 registers of 32 bytes.
inline void load_piece(const uint8_t* __restrict panel, int64_t piece, __m256i quad[4]) {
  for (int c = 0; c < 4; c++) quad[c] = _mm256_loadu_si256((const __m256i*)(panel + 128 * piece + 32 * c));
}

inline __m256 halves_to_floats(const at::Half* h) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)h)); }

// R activation rows, side by side in a Q8Rows: row r's values start at values + r * in, its block scales
// and sums at scales + r * blocks, sums + r * blocks.
struct Tile {
  const int8_t* __restrict values;
  const float* __restrict scales;
  const float* __restrict sums;
  int64_t in, blocks;
};

// int4 in groups of 32 (GGUF's Q4_0 / Q4_1 blocks): a row's 16 bytes hold columns 0-15 (low nibbles) and
// 16-31 (high nibbles) of one activation block. Scale and min fold into the block's float multiply-adds.
template <typename Isa, int R>
void int4_panel_g32(const uint8_t* __restrict panel, const at::Half* __restrict scale_min, int64_t groups,
                    const Tile& x, __m256* acc) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int64_t g = 0; g < groups; g++) {
    __m256i quad[4], low_sum[R], high_sum[R];  // two sums a row: two dependency chains run at once
    load_piece(panel, g, quad);
    for (int r = 0; r < R; r++) low_sum[r] = high_sum[r] = _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
      const __m256i low = _mm256_and_si256(quad[c], nibble);
      const __m256i high = _mm256_and_si256(_mm256_srli_epi16(quad[c], 4), nibble);
      for (int r = 0; r < R; r++) {
        const int8_t* block = x.values + r * x.in + 32 * g;
        low_sum[r] = Isa::add16(low_sum[r], low, broadcast4(block + 4 * c));
        high_sum[r] = Isa::add16(high_sum[r], high, broadcast4(block + 16 + 4 * c));
      }
    }
    const __m256 scale = halves_to_floats(scale_min + 16 * g), min = halves_to_floats(scale_min + 16 * g + 8);
    for (int r = 0; r < R; r++) {
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(Isa::widen(low_sum[r]), Isa::widen(high_sum[r])));
      acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(scale, _mm256_set1_ps(x.scales[r * x.blocks + g])), acc[r]);
      acc[r] = _mm256_fmadd_ps(min, _mm256_set1_ps(x.sums[r * x.blocks + g]), acc[r]);
    }
  }
}

// int4 in groups of 64, 128, ...: byte j of a group holds its columns j (low nibble) and j + groupsize / 2
// (high nibble), so 32 bytes hold two activation blocks, one in the low nibbles and one in the high.
// Each block's integer sums times its activation scale add up over the group, then times the group's
// scale; the min multiplies the activations' sum over the whole group.
template <typename Isa, int R>
void int4_panel(const uint8_t* __restrict panel, const at::Half* __restrict scale_min, int64_t groups,
                int64_t groupsize, const Tile& x, __m256* acc) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const int64_t half = groupsize / 2, blocks_per_group = groupsize / BLOCK;
  for (int64_t g = 0; g < groups; g++) {
    const int64_t first = g * blocks_per_group;  // the group's first activation block
    __m256 group_acc[R];
    for (int r = 0; r < R; r++) group_acc[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < half; j += BLOCK) {
      const int64_t low_block = first + j / BLOCK, high_block = low_block + half / BLOCK;
      __m256i low_sum[R], high_sum[R];
      for (int r = 0; r < R; r++) low_sum[r] = high_sum[r] = _mm256_setzero_si256();
      for (int part = 0; part < 2; part++) {  // the block's columns 0-15, then 16-31
        __m256i quad[4];
        load_piece(panel, (g * half + j) / 16 + part, quad);
        for (int c = 0; c < 4; c++) {
          const __m256i low = _mm256_and_si256(quad[c], nibble);
          const __m256i high = _mm256_and_si256(_mm256_srli_epi16(quad[c], 4), nibble);
          for (int r = 0; r < R; r++) {
            const int8_t* row = x.values + r * x.in + 16 * part + 4 * c;
            low_sum[r] = Isa::add16(low_sum[r], low, broadcast4(row + low_block * BLOCK));
            high_sum[r] = Isa::add16(high_sum[r], high, broadcast4(row + high_block * BLOCK));
          }
        }
      }
      for (int r = 0; r < R; r++) {
        const float* scales = x.scales + r * x.blocks;
        group_acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(Isa::widen(low_sum[r])), _mm256_set1_ps(scales[low_block]),
                                       group_acc[r]);
        group_acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(Isa::widen(high_sum[r])),
                                       _mm256_set1_ps(scales[high_block]), group_acc[r]);
      }
    }
    const __m256 scale = halves_to_floats(scale_min + 16 * g), min = halves_to_floats(scale_min + 16 * g + 8);
    for (int r = 0; r < R; r++) {
      float group_sum = 0;
      for (int64_t b = first; b < first + blocks_per_group; b++) group_sum += x.sums[r * x.blocks + b];
      acc[r] = _mm256_fmadd_ps(scale, group_acc[r], acc[r]);
      acc[r] = _mm256_fmadd_ps(min, _mm256_set1_ps(group_sum), acc[r]);
    }
  }
}

// int8: a row's 32 bytes are one activation block; |w| * (x with w's sign), as above.
template <typename Isa, int R>
void int8_panel(const uint8_t* __restrict panel, const at::Half* __restrict scales, int64_t groups,
                int64_t groupsize, const Tile& x, __m256* acc) {
  const int64_t blocks_per_group = groupsize / BLOCK;
  for (int64_t g = 0; g < groups; g++) {
    __m256 group_acc[R];
    for (int r = 0; r < R; r++) group_acc[r] = _mm256_setzero_ps();
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; b++) {
      __m256i sum[R];
      for (int r = 0; r < R; r++) sum[r] = _mm256_setzero_si256();
      for (int part = 0; part < 2; part++) {  // the block's columns 0-15, then 16-31
        __m256i quad[4];
        load_piece(panel, 2 * b + part, quad);
        for (int c = 0; c < 4; c++) {
          const __m256i magnitude = _mm256_sign_epi8(quad[c], quad[c]);  // |w| as unsigned bytes (-128: 128)
          for (int r = 0; r < R; r++) {
            const __m256i xq = broadcast4(x.values + r * x.in + b * BLOCK + 16 * part + 4 * c);
            sum[r] = Isa::dot(sum[r], magnitude, _mm256_sign_epi8(xq, quad[c]));
          }
        }
      }
      for (int r = 0; r < R; r++)
        group_acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_set1_ps(x.scales[r * x.blocks + b]),
                                       group_acc[r]);
    }
    const __m256 scale = halves_to_floats(scales + 8 * g);
    for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(scale, group_acc[r], acc[r]);
  }
}

// ---- The whole product: panels over threads, activation rows in tiles -------------------------------

struct Weight {
  const uint8_t* data;     // int4 or int8 bytes in panels (cpu_kernels.py, kernel_weight): (panels, 8 * row_bytes)
  const at::Half* scales;  // int4: (panels, groups, 2, 8) scales and mins; int8: (panels, groups, 8)
  int64_t out, in, groupsize, row_bytes, scales_per_panel;
};

// Panel p's weight rows times activation rows [r0, r0 + R): out (rows, out) at those places. The last
// panel's rows past `out` are zeros, computed and not written.
template <typename Isa, int R>
void panel_times_tile(const Weight& w, int64_t p, bool int4, const Q8Rows& q, int64_t r0, float* out) {
  const int64_t blocks = q.blocks_per_row, groups = w.in / w.groupsize;
  const Tile x{q.values.data() + r0 * w.in, q.scales.data() + r0 * blocks, q.sums.data() + r0 * blocks, w.in,
               blocks};
  const uint8_t* panel = w.data + p * 8 * w.row_bytes;
  const at::Half* scales = w.scales + p * w.scales_per_panel;
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  if (!int4) int8_panel<Isa, R>(panel, scales, groups, w.groupsize, x, acc);
  else if (w.groupsize == BLOCK) int4_panel_g32<Isa, R>(panel, scales, groups, x, acc);
  else int4_panel<Isa, R>(panel, scales, groups, w.groupsize, x, acc);
  const int64_t count = std::min<int64_t>(8, w.out - 8 * p);
  for (int r = 0; r < R; r++) {
    float lanes[8];
    _mm256_storeu_ps(lanes, acc[r]);
    std::memcpy(out + (r0 + r) * w.out + 8 * p, lanes, sizeof(float) * count);
  }
}

// A thread's share should be worth more than waking a second thread (a few microseconds): panels of at
// least this many weight bytes in all run on one thread.
constexpr int64_t MIN_BYTES_PER_THREAD = 64 * 1024;

template <typename Isa>
void matmul(const Weight& w, bool int4, const Q8Rows& q, float* out) {
  const int64_t panels = (w.out + 7) / 8, grain = std::max<int64_t>(1, MIN_BYTES_PER_THREAD / (8 * w.row_bytes));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    // each panel times every tile of activation rows while its weights are in the L1 / L2 cache
    for (int64_t p = begin; p < end; p++) {
      for (int64_t r0 = 0; r0 < q.rows; r0 += TILE) {
        switch (std::min<int64_t>(TILE, q.rows - r0)) {
          case 4: panel_times_tile<Isa, 4>(w, p, int4, q, r0, out); break;
          case 3: panel_times_tile<Isa, 3>(w, p, int4, q, r0, out); break;
          case 2: panel_times_tile<Isa, 2>(w, p, int4, q, r0, out); break;
          default: panel_times_tile<Isa, 1>(w, p, int4, q, r0, out);
        }
      }
    }
  });
}

// ---- Float weights: fp32, bf16 or fp16 rows, widened to fp32 in registers ----------------------------
// No rounding here: a weight row's dot product with an activation row in fp32. Decoding streams each
// weight once, so what counts is reading the stored bytes (2 a value for bf16 and fp16) at memory speed:
// each thread walks its weight rows front to back, one row at a time (one stream from memory, which the
// CPU's prefetcher follows, where four rows side by side read more slowly), 32 columns a step, and each 32
// weights, once widened, serve up to 4 activation rows.
//
// Widening bf16 takes no shuffle: bf16 is the top half of an fp32, so in 32 bytes of bf16 the odd columns
// already sit where fp32 keeps its top half (clear the low half: and), and the even ones get there by
// a shift left of 16 bits. The two vectors then hold columns 0, 2, .. 14 and 1, 3, .. 15: the activations
// are put in that order once per call (in_bf16_order), so the products pair up.

template <typename T> struct Float;

template <> struct Float<float> {
  static inline void widen16(const float* w, __m256& first, __m256& second) {
    first = _mm256_loadu_ps(w);
    second = _mm256_loadu_ps(w + 8);
  }
  static constexpr bool evens_then_odds = false;
};

template <> struct Float<at::BFloat16> {
  static inline void widen16(const at::BFloat16* w, __m256& evens, __m256& odds) {
    const __m256i pairs = _mm256_loadu_si256((const __m256i*)w);
    evens = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    odds = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(0xFFFF0000)));
  }
  static constexpr bool evens_then_odds = true;
};

template <> struct Float<at::Half> {
  static inline void widen16(const at::Half* w, __m256& first, __m256& second) {
    first = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)w));
    second = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + 8)));
  }
  static constexpr bool evens_then_odds = false;
};

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Activation rows x (rows, in) with each 16 columns as evens, then odds: the order in which widen16 gives
// bf16 weights. The columns past the last whole 16 stay where they are.
std::vector<float> in_bf16_order(const float* x, int64_t rows, int64_t in) {
  std::vector<float> ordered(x, x + rows * in);
  for (int64_t r = 0; r < rows; r++)
    for (int64_t j = 0; j + 16 <= in; j += 16)
      for (int i = 0; i < 8; i++) {
        ordered[r * in + j + i] = x[r * in + j + 2 * i];
        ordered[r * in + j + 8 + i] = x[r * in + j + 2 * i + 1];
      }
  return ordered;
}

// Weight row o times activation rows [r0, r0 + R): out (rows, out) at those places. x: the activations in
// the column order of widen16; plain: as given, for the columns past the last whole 32. Each row's sums are
// added to in the same order whatever R is: a row's outputs do not depend on the rows beside it (a batch
// of one equals that row in a batch of many). Not inlined: compiled on its own, its sums stay in
// registers (inlined into the threads' loop, GCC kept them in memory, a store and a load on every
// multiply-add's chain).
template <typename T, int R>
__attribute__((noinline)) void float_row_times_tile(const T* __restrict w, const float* __restrict x,
                                                    const float* __restrict plain, int64_t in,
                                                    int64_t out_features, int64_t o, int64_t r0,
                                                    float* __restrict out) {
  const T* row = w + o * in;
  __m256 first_acc[R], second_acc[R];  // two sums a row: two chains of multiply-adds run at once
  for (int r = 0; r < R; r++) first_acc[r] = second_acc[r] = _mm256_setzero_ps();
  const int64_t whole = in - in % 32;
  for (int64_t j = 0; j < whole; j += 32) {
    __m256 w0, w1, w2, w3;
    Float<T>::widen16(row + j, w0, w1);
    Float<T>::widen16(row + j + 16, w2, w3);
    for (int r = 0; r < R; r++) {
      const float* xr = x + (r0 + r) * in + j;
      first_acc[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), first_acc[r]);
      second_acc[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), second_acc[r]);
      first_acc[r] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), first_acc[r]);
      second_acc[r] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), second_acc[r]);
    }
  }
  for (int r = 0; r < R; r++) {
    float sum = horizontal_sum(_mm256_add_ps(first_acc[r], second_acc[r]));
    for (int64_t j = whole; j < in; j++) sum += float(row[j]) * plain[(r0 + r) * in + j];
    out[(r0 + r) * out_features + o] = sum;
  }
}

// x (rows, in) times w (out_features, in), transposed: weight rows split over the threads, activation
// rows in tiles of up to TILE.
template <typename T>
void float_matmul(const T* w, const float* x, int64_t rows, int64_t in, int64_t out_features, float* out) {
  const std::vector<float> ordered = Float<T>::evens_then_odds ? in_bf16_order(x, rows, in) : std::vector<float>();
  const float* xs = Float<T>::evens_then_odds ? ordered.data() : x;
  const int64_t grain = std::max<int64_t>(1, MIN_BYTES_PER_THREAD / (in * (int64_t)sizeof(T)));
  at::parallel_for(0, out_features, grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; o++) {
      for (int64_t r0 = 0; r0 < rows; r0 += TILE) {
        switch (std::min<int64_t>(TILE, rows - r0)) {
          case 4: float_row_times_tile<T, 4>(w, xs, x, in, out_features, o, r0, out); break;
          case 3: float_row_times_tile<T, 3>(w, xs, x, in, out_features, o, r0, out); break;
          case 2: float_row_times_tile<T, 2>(w, xs, x, in, out_features, o, r0, out); break;
          default: float_row_times_tile<T, 1>(w, xs, x, in, out_features, o, r0, out);
        }
      }
    }
  });
}

// ---- The small ops around the products: a norm, the rotary embedding, attention over the cache -------
// Eagerly, PyTorch runs a norm as five ops (pow, mean, add, rsqrt, mul), the rotary embedding as ten and
// attention over one query through a kernel built for long blocks of queries; each op pays a dispatch, and
// many wake the other threads, which for a decode step's few rows costs more than the arithmetic. Each
// here is one op over fp32 tensors, run on the calling thread unless its work is worth waking another.

constexpr int64_t MIN_VALUES_PER_THREAD = 32 * 1024;  // floats read by a thread's share, at the least

// How many of `items` (each reading `values_per_item` floats) a thread takes at the least.
int64_t grain_for(int64_t values_per_item) { return std::max<int64_t>(1, MIN_VALUES_PER_THREAD / values_per_item); }

void check_fp32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous float32 CPU tensor");
}

// RMSNorm (Zhang & Sennrich 2019) over each row of x (..., dim): x / sqrt(mean(x^2) + eps) * weight.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_fp32(x, "x");
  check_fp32(weight, "weight");
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  TORCH_CHECK(weight.numel() == dim, "weight has ", weight.numel(), " values, x's rows ", dim);
  at::Tensor out = at::empty_like(x);
  const float *xs = x.data_ptr<float>(), *w = weight.data_ptr<float>();
  float* ys = out.data_ptr<float>();
  at::parallel_for(0, rows, grain_for(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const float* xr = xs + r * dim;
      float* yr = ys + r * dim;
      __m256 squares = _mm256_setzero_ps();  // eight partial sums, added at the end
      int64_t j = 0;
      for (; j + 8 <= dim; j += 8) squares = _mm256_fmadd_ps(_mm256_loadu_ps(xr + j), _mm256_loadu_ps(xr + j), squares);
      float sum = horizontal_sum(squares);
      for (; j < dim; j++) sum += xr[j] * xr[j];
      const float inverse = 1.0f / std::sqrt(sum / dim + (float)eps);
      for (j = 0; j < dim; j++) yr[j] = xr[j] * inverse * w[j];
    }
  });
  return out;
}

// The rotary embedding (Su et al. 2021) in the rotate-half form: dimension i of a head pairs with
// i + head_dim / 2, (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). x: (batch, seq, heads, head_dim);
// table: (batch or 1, seq, 1, head_dim / 2, 2), each token's cos and sin per frequency.
at::Tensor rope(const at::Tensor& x, const at::Tensor& table) {
  check_fp32(x, "x");
  check_fp32(table, "table");
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "x must be (batch, seq, heads, head_dim), head_dim even");
  const int64_t batch = x.size(0), seq = x.size(1), heads = x.size(2), half = x.size(3) / 2;
  TORCH_CHECK(table.dim() == 5 && (table.size(0) == 1 || table.size(0) == batch) && table.size(1) == seq &&
              table.size(3) == half && table.size(4) == 2, "table must be (batch or 1, seq, 1, head_dim / 2, 2)");
  const int64_t table_batch_stride = table.size(0) == 1 ? 0 : seq * half * 2;
  at::Tensor out = at::empty_like(x);
  const float *xs = x.data_ptr<float>(), *angles = table.data_ptr<float>();
  float* ys = out.data_ptr<float>();
  at::parallel_for(0, batch * seq, grain_for(heads * 2 * half), [&](int64_t begin, int64_t end) {
    for (int64_t token = begin; token < end; token++) {
      const float* cos_sin = angles + (token / seq) * table_batch_stride + (token % seq) * half * 2;
      for (int64_t h = 0; h < heads; h++) {
        const float* x1 = xs + (token * heads + h) * 2 * half;
        float* y1 = ys + (token * heads + h) * 2 * half;
        for (int64_t i = 0; i < half; i++) {
          const float cos = cos_sin[2 * i], sin = cos_sin[2 * i + 1];
          y1[i] = x1[i] * cos - x1[half + i] * sin;
          y1[half + i] = x1[half + i] * cos + x1[i] * sin;
        }
      }
    }
  });
  return out;
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float sum = horizontal_sum(acc);
  for (; i < n; i++) sum += a[i] * b[i];
  return sum;
}

// q's dot products with 8 rows of k (k_stride apart), n a multiple of 8: 8 vectors of partial sums, whose
// lanes are added across all 8 at once (hadd pairs neighbours), one lane a row.
inline __m256 dot8(const float* q, const float* k, int64_t k_stride, int64_t n) {
  __m256 acc[8];
  for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 qi = _mm256_loadu_ps(q + i);
    for (int r = 0; r < 8; r++) acc[r] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + r * k_stride + i), acc[r]);
  }
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
  // each 128-bit half holds rows 0-3 (then 4-7) summed over its half of the lanes: add the halves
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// The largest of n values, 8 lanes at a time.
inline float maximum(const float* values, int64_t n) {
  __m256 lanes = _mm256_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) lanes = _mm256_max_ps(lanes, _mm256_loadu_ps(values + t));
  float lane[8], largest = -INFINITY;
  _mm256_storeu_ps(lane, lanes);
  for (float value : lane) largest = std::max(largest, value);
  for (; t < n; t++) largest = std::max(largest, values[t]);
  return largest;
}

// scores[t] = exp(scores[t] - largest), 8 at a time by SLEEF's vectorized exp (which PyTorch ships and its own
// kernels call; within 1 ulp); returns their sum.
inline float exponentials(float* scores, int64_t n, float largest) {
  __m256 sums = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = Sleef_expf8_u10(_mm256_sub_ps(_mm256_loadu_ps(scores + t), _mm256_set1_ps(largest)));
    _mm256_storeu_ps(scores + t, e);
    sums = _mm256_add_ps(sums, e);
  }
  float sum = horizontal_sum(sums);
  for (; t < n; t++) sum += scores[t] = std::exp(scores[t] - largest);
  return sum;
}

// The attention output's shape (batch, heads, seq, head_dim), laid out as (batch, seq, heads, head_dim): the
// order in which the output projection reads it, so the caller's transpose back costs no copy.
at::Tensor attention_output(const at::Tensor& q) {
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
}

// y = sum over slots t of weights[t] * v_t, 32 columns at a time in 4 registers (4 chains of multiply-adds
// run at once), then 8, then one. Slots of weight 0 (masked) are not read.
inline void weighted_sum(const float* weights, const float* v, int64_t v_stride, int64_t slots, int64_t dim,
                         float* y) {
  int64_t i = 0;
  for (; i + 32 <= dim; i += 32) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t t = 0; t < slots; t++) {
      if (weights[t] == 0.0f) continue;
      const __m256 w = _mm256_set1_ps(weights[t]);
      for (int c = 0; c < 4; c++) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + t * v_stride + i + 8 * c), acc[c]);
    }
    for (int c = 0; c < 4; c++) _mm256_storeu_ps(y + i + 8 * c, acc[c]);
  }
  for (; i + 8 <= dim; i += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t t = 0; t < slots; t++) acc = _mm256_fmadd_ps(_mm256_set1_ps(weights[t]), _mm256_loadu_ps(v + t * v_stride + i), acc);
    _mm256_storeu_ps(y + i, acc);
  }
  for (; i < dim; i++) {
    y[i] = 0;
    for (int64_t t = 0; t < slots; t++) y[i] += weights[t] * v[t * v_stride + i];
  }
}

// Where one query's K/V head lies: row t of k at k + t * k_stride (and of v), whether the query may look at
// it at look[t * look_stride].
struct Slots {
  int64_t k_stride, v_stride, look_stride, count, dim;
  float scale;  // 1 / sqrt(head_dim)
};

// One query row q (dim) over one K/V head's slots: y (dim) = softmax(q k^T * scale, masked) v. weights:
// room for the slots' scores, then their softmax weights. Slots past the last one the query may look at
// are not read: decoding attends a power of two of slots past its position (generation.slots_to_attend),
// and a server's rows are each at their own.
void attend(const Slots& c, const float* q, const float* k, const float* v, const bool* look, float* weights,
            float* y) {
  int64_t count = c.count;
  while (count > 0 && !look[(count - 1) * c.look_stride]) count--;
  if (count == 0) {  // nowhere to look
    std::fill(y, y + c.dim, 0.0f);
    return;
  }
  int64_t t = 0;  // the scores, 8 slots at a time where head_dim allows
  for (; c.dim % 8 == 0 && t + 8 <= count; t += 8)
    _mm256_storeu_ps(weights + t, _mm256_mul_ps(dot8(q, k + t * c.k_stride, c.k_stride, c.dim), _mm256_set1_ps(c.scale)));
  for (; t < count; t++) weights[t] = dot(q, k + t * c.k_stride, c.dim) * c.scale;
  for (t = 0; t < count; t++)
    if (!look[t * c.look_stride]) weights[t] = -INFINITY;
  const float largest = maximum(weights, count);  // which softmax subtracts, for exp to stay within fp32
  const float total = exponentials(weights, count, largest);  // masked slots: exp(-inf) = 0
  for (t = 0; t < count; t++) weights[t] /= total;
  weighted_sum(weights, v, c.v_stride, count, c.dim, y);
}

// Attention of a few query rows over the KV cache: softmax(q k^T / sqrt(head_dim), masked) v for each query
// head, which reads the K/V head of its group (grouped-query attention: heads / kv_heads query heads a
// K/V head). q: (batch, heads, seq, head_dim); k, v: (batch, kv_heads, slots, head_dim), any strides but
// the last (the cache's rows as they lie); mask: (batch or 1, 1, seq, slots) bool, true where a query may
// look. A query that may look nowhere gets zeros.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
              q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
              q.size(3) == k.size(3) && q.size(1) % k.size(1) == 0, "attention: q must be float32 (batch, heads, "
              "seq, head_dim), k and v (batch, kv_heads, slots, head_dim) with heads a multiple of kv_heads");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attention: head_dim must be contiguous");
  const int64_t batch = q.size(0), heads = q.size(1), seq = q.size(2), dim = q.size(3);
  const int64_t group = heads / k.size(1), slots = k.size(2);
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4 && (mask.size(0) == 1 || mask.size(0) == batch) &&
              mask.size(2) == seq && mask.size(3) == slots, "attention: mask must be bool (batch or 1, 1, seq, slots)");
  const int64_t mask_batch_stride = mask.size(0) == 1 ? 0 : mask.stride(0);
  at::Tensor out = attention_output(q);
  const float *qs = q.data_ptr<float>(), *ks = k.data_ptr<float>(), *vs = v.data_ptr<float>();
  const bool* allowed = mask.data_ptr<bool>();
  float* ys = out.data_ptr<float>();
  const Slots cache{k.stride(2), v.stride(2), mask.stride(3), slots, dim, 1.0f / std::sqrt((float)dim)};
  // A task: one query row's heads that share a K/V head, one after another, so that the K/V head's slots are
  // read from memory once and then from the cache; where there are too few such groups to share out over
  // the threads (one row), a single query head. Tasks differ in work (a server's rows are each at their own
  // position), so rather than fixed shares, each thread takes the next task from a shared counter.
  const int64_t kv_heads = k.size(1), threads = at::get_num_threads();
  const int64_t heads_per_task = batch * kv_heads * seq >= 4 * threads ? group : 1;
  const int64_t tasks_per_row = heads / heads_per_task, tasks = batch * seq * tasks_per_row;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(threads, 1 + tasks * 2 * slots * dim / MIN_VALUES_PER_THREAD), 1,
                   [&](int64_t, int64_t) {
    std::vector<float> weights(slots);
    for (int64_t task = next++; task < tasks; task = next++) {
      const int64_t b = task / (seq * tasks_per_row), s = task / tasks_per_row % seq;
      for (int64_t h = task % tasks_per_row * heads_per_task; h < (task % tasks_per_row + 1) * heads_per_task; h++)
        attend(cache, qs + b * q.stride(0) + h * q.stride(1) + s * q.stride(2),
               ks + b * k.stride(0) + (h / group) * k.stride(1), vs + b * v.stride(0) + (h / group) * v.stride(1),
               allowed + b * mask_batch_stride + s * mask.stride(2), weights.data(),
               ys + b * out.stride(0) + h * out.stride(1) + s * out.stride(2));
    }
  });
  return out;
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

// An uninitialised output for x (..., in): (..., out_features), x's dtype and device.
at::Tensor output_like(const at::Tensor& x, int64_t out_features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return at::empty(shape, x.options());
}

// x (..., x_in) times the weight, transposed: (..., out).
at::Tensor quantized_linear(const at::Tensor& x, const Weight& w, bool int4) {
  const int64_t x_in = x.size(-1), rows = x.numel() / x_in;
  const Q8Rows q = quantize_rows(x.data_ptr<float>(), rows, x_in, w.in);
  at::Tensor out = output_like(x, w.out);
  if (use_vnni) matmul<Vnni>(w, int4, q, out.data_ptr<float>());
  else matmul<Avx2>(w, int4, q, out.data_ptr<float>());
  return out;
}

// x: (..., in) fp32, contiguous; for int4, in may be less than the weight's columns (zero padding follows).
void check_common(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t groupsize,
                  int64_t in) {
  check_fp32(x, "x (..., in)");
  TORCH_CHECK(x.size(-1) <= in && x.size(-1) > in - groupsize, "x has ", x.size(-1), " columns, the weight ", in);
  TORCH_CHECK(weight.is_contiguous() && scales.is_contiguous() && scales.scalar_type() == at::kHalf,
              "weight and scales must be contiguous, scales float16");
  TORCH_CHECK(groupsize > 0 && groupsize % BLOCK == 0 && in % groupsize == 0, "groupsize ", groupsize,
              " must be a multiple of 32 dividing the ", in, " columns");
}

// x (..., in) fp32 times an int4 weight of out_features rows, transposed: (..., out_features) fp32.
// weight: uint8 in panels (panels, padded_in / 32, 4, 8, 4), panels = out_features / 8 rounded up;
// scale_min: (panels, in / groupsize, 2, 8) fp16. groupsize: 32, or a multiple of 64.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale_min,
                       int64_t groupsize, int64_t out_features) {
  TORCH_CHECK(out_features > 0 && weight.dim() == 5 && weight.size(0) == (out_features + 7) / 8,
              "weight must be in panels of 8 rows");
  const int64_t row_bytes = weight.numel() / (8 * weight.size(0)), in = 2 * row_bytes;
  check_common(x, weight, scale_min, groupsize, in);
  const int64_t groups = in / groupsize;
  TORCH_CHECK(weight.scalar_type() == at::kByte, "int4 weight must be uint8 (two values a byte)");
  TORCH_CHECK(groupsize == BLOCK || groupsize % (2 * BLOCK) == 0, "int4 groupsize must be 32 or a multiple of 64");
  TORCH_CHECK(scale_min.numel() == weight.size(0) * groups * 2 * 8,
              "scale_min must be (out / 8, in / groupsize, 2, 8)");
  return quantized_linear(x, {weight.data_ptr<uint8_t>(), scale_min.data_ptr<at::Half>(), out_features, in,
                              groupsize, row_bytes, groups * 2 * 8}, true);
}

// x (..., in) fp32 times an int8 weight of out_features rows, transposed: (..., out_features) fp32.
// weight: int8 in panels (panels, in / 16, 4, 8, 4); scales: (panels, in / groupsize, 8) fp16;
// groupsize = in for one scale per output channel.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t groupsize,
                       int64_t out_features) {
  TORCH_CHECK(out_features > 0 && weight.dim() == 5 && weight.size(0) == (out_features + 7) / 8,
              "weight must be in panels of 8 rows");
  const int64_t in = weight.numel() / (8 * weight.size(0));
  check_common(x, weight, scales, groupsize, in);
  const int64_t groups = in / groupsize;
  TORCH_CHECK(x.size(-1) == in, "x has ", x.size(-1), " columns, the weight ", in);
  TORCH_CHECK(weight.scalar_type() == at::kChar, "int8 weight must be int8");
  TORCH_CHECK(scales.numel() == weight.size(0) * groups * 8, "scales must be (out / 8, in / groupsize, 8)");
  return quantized_linear(x, {(const uint8_t*)weight.data_ptr(), scales.data_ptr<at::Half>(), out_features, in,
                              groupsize, in, groups * 8}, false);
}

// x (..., in) fp32 times a float weight (out, in) in fp32, bf16 or fp16, transposed: (..., out) fp32.
at::Tensor float_linear(const at::Tensor& x, const at::Tensor& weight) {
  check_fp32(x, "x (..., in)");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x.size(-1), "weight must be a "
              "contiguous (out, in) matrix with in = ", x.size(-1));
  const int64_t in = x.size(-1), rows = x.numel() / in, out_features = weight.size(0);
  at::Tensor out = output_like(x, out_features);
  const float* xs = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  switch (weight.scalar_type()) {
    case at::kFloat: float_matmul(weight.data_ptr<float>(), xs, rows, in, out_features, o); break;
    case at::kBFloat16: float_matmul(weight.data_ptr<at::BFloat16>(), xs, rows, in, out_features, o); break;
    case at::kHalf: float_matmul(weight.data_ptr<at::Half>(), xs, rows, in, out_features, o); break;
    default: TORCH_CHECK(false, "float_linear: weight must be float32, bfloat16 or float16, not ",
                         weight.scalar_type());
  }
  return out;
}

at::Tensor float_linear_meta(const at::Tensor& x, const at::Tensor& weight) { return output_like(x, weight.size(0)); }

at::Tensor same_shape_meta(const at::Tensor& x, const at::Tensor&) { return at::empty_like(x); }

at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor&, double) { return at::empty_like(x); }

at::Tensor attention_meta(const at::Tensor& q, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  return attention_output(q);
}

// The op's output shape without computing (torch.compile and export trace with it): (..., out_features).
at::Tensor quantized_linear_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, int64_t,
                                 int64_t out_features) {
  return output_like(x, out_features);
}

}  // namespace

TORCH_LIBRARY(brisk, m) {
  m.def("int4_linear(Tensor x, Tensor weight, Tensor scale_min, int groupsize, int out_features) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales, int groupsize, int out_features) -> Tensor");
  m.def("float_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor table) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
  m.def("cpu_isa(str choice) -> str", &cpu_isa);
}

TORCH_LIBRARY_IMPL(brisk, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("float_linear", &float_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
  m.impl("attention", &attention);
}

TORCH_LIBRARY_IMPL(brisk, Meta, m) {
  m.impl("int4_linear", &quantized_linear_meta);
  m.impl("int8_linear", &quantized_linear_meta);
  m.impl("float_linear", &float_linear_meta);
  m.impl("rms_norm", &rms_norm_meta);
  m.impl("rope", &same_shape_meta);
  m.impl("attention", &attention_meta);
}
