// The DoRA layer's passes over the activations on the CPU, where eager PyTorch needs several
// (kernels/cpu_dora.py builds this file on first use and holds the plain-PyTorch references):
//
//   dora_apply_   y = g * y + bias + ax Bs^T            y (tokens x out) bf16, in place, one pass,
//                                                       float32 arithmetic rounded once to bf16
//   column_dots   sum_t a[t] * (b[t] - shift)           per column of two bf16 (tokens x out), float32
//   dora_norm     c sqrt(max(||W0/c||^2 + (s/c) (B/c).(2 W0 A^T + s B A A^T), eps))   per row, float32
//
// The first two use AVX512-BF16 (compiled per function with a target attribute, so the library
// loads on any x86 CPU; `supported` says whether this one has it). dora_norm is portable C++.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define QDORA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace {

bool supported() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

void check_bf16_2d(const at::Tensor& t, const char* name, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.is_contiguous(),
              name, " must be a contiguous bfloat16 CPU tensor, got ", t.scalar_type(), " on ", t.device(),
              " with strides ", t.strides(), " for shape ", t.sizes());
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == cols, name, " must have ", cols, " columns, got shape ", t.sizes());
}

void check_f32_vec(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 1 && t.size(0) == n,
              name, " must be a contiguous float32 CPU vector of ", n, " values, got ", t.scalar_type(), " on ",
              t.device(), " of shape ", t.sizes(), " and strides ", t.strides());
}

// The optional float32 vector's data (checked), or n zeros held by `zeros`.
const float* vec_or_zeros(const std::optional<at::Tensor>& t, const char* name, int64_t n, std::vector<float>& zeros) {
  if (t.has_value()) {
    check_f32_vec(*t, name, n);
    return t->data_ptr<float>();
  }
  zeros.assign(n, 0.f);
  return zeros.data();
}

#if defined(__x86_64__)

QDORA_AVX512 inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

QDORA_AVX512 inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// float32 -> bfloat16, round to nearest even: PyTorch's rounding (c10's round_to_nearest_even), bit
// for bit but for NaN's payload (0x7FC0 here and there; PyTorch's vectorized casts give 0xFFFF).
// The hardware's VCVTNEPS2BF16 would flush subnormals to zero.
QDORA_AVX512 inline __m256i round_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

// ax's row as bf16 pairs (k, k + 1) packed in 32 bits, the operand layout of VDPBF16PS; an odd
// rank's last pair is (k, 0).
inline void pack_pairs(const uint16_t* a, int64_t r, uint32_t* out) {
  for (int64_t p = 0; 2 * p < r; ++p)
    out[p] = uint32_t(a[2 * p]) | (2 * p + 1 < r ? uint32_t(a[2 * p + 1]) << 16 : 0u);
}

constexpr int64_t TILE = 64;       // output columns per tile: four 16-lane registers
constexpr int64_t ROW_BLOCK = 16;  // rows swept per tile, so that the tile's Bs pairs stay in L1

// Rows [i0, i1) of dora_apply_. bt holds Bs as bf16 pairs: bt[p * N + j] = (Bs[j, 2p], Bs[j, 2p+1]).
// The low-rank sum is accumulated from zero and added to g * y + bias last: VDPBF16PS flushes
// subnormal accumulators, and g = 1, bias = 0, B = 0 must leave every y as it was.
QDORA_AVX512 void apply_rows(uint16_t* y, const float* g, const float* bias, const uint16_t* ax, int64_t r,
                             const uint32_t* bt, int64_t N, int64_t i0, int64_t i1) {
  const int64_t r2 = (r + 1) / 2, full = N / TILE * TILE;
  std::vector<uint32_t> pairs(2 * r2);
  for (int64_t b0 = i0; b0 < i1; b0 += ROW_BLOCK) {
    const int64_t b1 = std::min(i1, b0 + ROW_BLOCK);
    for (int64_t j0 = 0; j0 < full; j0 += TILE) {
      __m512 gv[4], bv[4];
      for (int q = 0; q < 4; ++q) {
        gv[q] = _mm512_loadu_ps(g + j0 + 16 * q);
        bv[q] = _mm512_loadu_ps(bias + j0 + 16 * q);
      }
      int64_t i = b0;
      for (; i + 1 < b1; i += 2) {  // two rows share each load of Bs
        uint16_t* y0 = y + i * N + j0;
        uint16_t* y1 = y0 + N;
        pack_pairs(ax + i * r, r, pairs.data());
        pack_pairs(ax + (i + 1) * r, r, pairs.data() + r2);
        __m512 c0[4], c1[4];
        for (int q = 0; q < 4; ++q) c0[q] = c1[q] = _mm512_setzero_ps();
        for (int64_t p = 0; p < r2; ++p) {
          const __m512bh a0 = (__m512bh)_mm512_set1_epi32(int32_t(pairs[p]));
          const __m512bh a1 = (__m512bh)_mm512_set1_epi32(int32_t(pairs[r2 + p]));
          const uint32_t* b = bt + p * N + j0;
          for (int q = 0; q < 4; ++q) {
            const __m512bh bq = (__m512bh)_mm512_loadu_si512(b + 16 * q);
            c0[q] = _mm512_dpbf16_ps(c0[q], a0, bq);
            c1[q] = _mm512_dpbf16_ps(c1[q], a1, bq);
          }
        }
        for (int q = 0; q < 4; ++q) {
          const __m512 v0 = _mm512_add_ps(_mm512_fmadd_ps(gv[q], load_bf16(y0 + 16 * q), bv[q]), c0[q]);
          const __m512 v1 = _mm512_add_ps(_mm512_fmadd_ps(gv[q], load_bf16(y1 + 16 * q), bv[q]), c1[q]);
          _mm256_storeu_si256((__m256i*)(y0 + 16 * q), round_bf16(v0));
          _mm256_storeu_si256((__m256i*)(y1 + 16 * q), round_bf16(v1));
        }
      }
      for (; i < b1; ++i) {
        uint16_t* y0 = y + i * N + j0;
        pack_pairs(ax + i * r, r, pairs.data());
        __m512 c0[4];
        for (int q = 0; q < 4; ++q) c0[q] = _mm512_setzero_ps();
        for (int64_t p = 0; p < r2; ++p) {
          const __m512bh a0 = (__m512bh)_mm512_set1_epi32(int32_t(pairs[p]));
          const uint32_t* b = bt + p * N + j0;
          for (int q = 0; q < 4; ++q) c0[q] = _mm512_dpbf16_ps(c0[q], a0, (__m512bh)_mm512_loadu_si512(b + 16 * q));
        }
        for (int q = 0; q < 4; ++q) {
          const __m512 v0 = _mm512_add_ps(_mm512_fmadd_ps(gv[q], load_bf16(y0 + 16 * q), bv[q]), c0[q]);
          _mm256_storeu_si256((__m256i*)(y0 + 16 * q), round_bf16(v0));
        }
      }
    }
    for (int64_t j0 = full; j0 < N; j0 += 16) {  // the last columns, 16 at a time under a mask
      const __mmask16 m = (__mmask16)((1u << std::min<int64_t>(16, N - j0)) - 1u);
      const __m512 gv = _mm512_maskz_loadu_ps(m, g + j0), bv = _mm512_maskz_loadu_ps(m, bias + j0);
      for (int64_t i = b0; i < b1; ++i) {
        uint16_t* y0 = y + i * N + j0;
        pack_pairs(ax + i * r, r, pairs.data());
        __m512 c0 = _mm512_setzero_ps();
        for (int64_t p = 0; p < r2; ++p)
          c0 = _mm512_dpbf16_ps(c0, (__m512bh)_mm512_set1_epi32(int32_t(pairs[p])),
                                (__m512bh)_mm512_maskz_loadu_epi32(m, bt + p * N + j0));
        const __m512 v0 = _mm512_add_ps(_mm512_fmadd_ps(gv, load_bf16(y0, m), bv), c0);
        _mm256_mask_storeu_epi16(y0, m, round_bf16(v0));
      }
    }
  }
}

// Rows [i0, i1) of column_dots into acc (N floats, this chunk's): sums over blocks of rows first,
// so that a long run of tokens is not one long float32 chain.
QDORA_AVX512 void dot_rows(const uint16_t* a, const uint16_t* b, const float* shift, float* acc, float* block,
                           int64_t N, int64_t i0, int64_t i1) {
  constexpr int64_t SUM_BLOCK = 64;
  for (int64_t b0 = i0; b0 < i1; b0 += SUM_BLOCK) {
    const int64_t b1 = std::min(i1, b0 + SUM_BLOCK);
    std::fill(block, block + N, 0.f);
    for (int64_t i = b0; i < b1; ++i) {
      const uint16_t* ar = a + i * N;
      const uint16_t* br = b + i * N;
      for (int64_t j = 0; j < N; j += 16) {
        const __mmask16 m = (__mmask16)((1u << std::min<int64_t>(16, N - j)) - 1u);
        const __m512 d = _mm512_sub_ps(load_bf16(br + j, m), _mm512_maskz_loadu_ps(m, shift + j));
        _mm512_mask_storeu_ps(block + j, m, _mm512_fmadd_ps(load_bf16(ar + j, m), d, _mm512_maskz_loadu_ps(m, block + j)));
      }
    }
    for (int64_t j = 0; j < N; ++j) acc[j] += block[j];
  }
}

#endif  // __x86_64__

at::Tensor dora_apply_(at::Tensor y, const at::Tensor& g, const std::optional<at::Tensor>& bias,
                       const at::Tensor& ax, const at::Tensor& Bs) {
  TORCH_CHECK(supported(), "dora_apply_ needs a CPU with AVX512-BF16");
  const int64_t N = y.size(-1), M = y.numel() / std::max<int64_t>(N, 1), r = Bs.size(-1);
  check_bf16_2d(y, "y", N);
  check_bf16_2d(ax, "ax", r);
  check_bf16_2d(Bs, "Bs", r);
  TORCH_CHECK(ax.numel() == M * r && Bs.numel() == N * r, "ax must be (tokens x r) and Bs (out x r), got ",
              ax.sizes(), " and ", Bs.sizes(), " for y ", y.sizes());
  check_f32_vec(g, "g", N);
  std::vector<float> zeros;
  const float* bp = vec_or_zeros(bias, "bias", N, zeros);
  if (M == 0 || N == 0) return y;
#if defined(__x86_64__)
  const int64_t r2 = (r + 1) / 2;
  std::vector<uint32_t> bt(r2 * N);  // Bs as bf16 pairs, transposed: row p holds columns 2p and 2p + 1
  const uint16_t* bs = reinterpret_cast<const uint16_t*>(Bs.data_ptr());
  std::vector<uint32_t> row(r2);
  for (int64_t j = 0; j < N; ++j) {
    pack_pairs(bs + j * r, r, row.data());
    for (int64_t p = 0; p < r2; ++p) bt[p * N + j] = row[p];
  }
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const uint16_t* ap = reinterpret_cast<const uint16_t*>(ax.data_ptr());
  const float* gp = g.data_ptr<float>();
  at::parallel_for(0, M, 2, [&](int64_t i0, int64_t i1) { apply_rows(yp, gp, bp, ap, r, bt.data(), N, i0, i1); });
#endif
  return y;
}

at::Tensor column_dots(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(supported(), "column_dots needs a CPU with AVX512-BF16");
  const int64_t N = a.size(-1), M = a.numel() / std::max<int64_t>(N, 1);
  check_bf16_2d(a, "a", N);
  check_bf16_2d(b, "b", N);
  TORCH_CHECK(b.numel() == a.numel(), "a and b must have the same shape, got ", a.sizes(), " and ", b.sizes());
  std::vector<float> zeros;
  const float* sp = vec_or_zeros(shift, "shift", N, zeros);
  at::Tensor out = at::empty({N}, a.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  std::fill(op, op + N, 0.f);
#if defined(__x86_64__)
  // Fixed chunks of rows, each with its own sums, added in chunk order: the result does not depend
  // on the number of threads (at most 64 chunks, so the buffers stay small for long batches).
  const int64_t rows = std::max<int64_t>(256, (M + 63) / 64), chunks = (M + rows - 1) / rows;
  std::vector<float> partial(chunks * N * 2, 0.f);  // per chunk: its sums, then a block buffer
  const uint16_t* ap = reinterpret_cast<const uint16_t*>(a.data_ptr());
  const uint16_t* bp = reinterpret_cast<const uint16_t*>(b.data_ptr());
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* acc = partial.data() + c * N * 2;
      dot_rows(ap, bp, sp, acc, acc + N, N, c * rows, std::min(M, (c + 1) * rows));
    }
  });
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t j = 0; j < N; ++j) op[j] += partial[c * N * 2 + j];
#endif
  return out;
}

at::Tensor dora_norm(const at::Tensor& wa, const at::Tensor& A, const at::Tensor& B, const at::Tensor& w0_sq,
                     const at::Tensor& c, double scale, double eps) {
  TORCH_CHECK(B.dim() == 2, "dora_norm: B must be (out x r), got shape ", B.sizes());
  const int64_t N = B.size(0), r = B.size(1);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == r && wa.dim() == 2 && wa.size(0) == N && wa.size(1) == r,
              "dora_norm: A must be (r x in) and W0 A^T (out x r) for B ", B.sizes(), ", got ", A.sizes(), " and ", wa.sizes());
  check_f32_vec(w0_sq, "w0_sq", N);
  check_f32_vec(c, "c (row_scale)", N);
  const at::Tensor Af = A.to(at::kFloat);
  const at::Tensor Bf = B.to(at::kFloat).contiguous();
  // t = 2 W0 A^T + s B (A A^T), as the PyTorch path's addmm computes it
  const at::Tensor t = at::addmm(wa.to(at::kFloat), Bf, at::mm(Af, Af.t()), 2.0, scale).contiguous();
  at::Tensor norm = at::empty({N}, B.options().dtype(at::kFloat));
  const float *bp = Bf.data_ptr<float>(), *tp = t.data_ptr<float>(), *w0 = w0_sq.data_ptr<float>(), *cp = c.data_ptr<float>();
  float* out = norm.data_ptr<float>();
  const float s = float(scale), e = float(eps);
  at::parallel_for(0, N, 1024, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float cj = cp[j];
      float d = 0.f;
      for (int64_t k = 0; k < r; ++k) d += (bp[j * r + k] / cj) * tp[j * r + k];
      const float n2 = w0[j] + s * d / cj;
      out[j] = std::sqrt(n2 < e ? e : n2) * cj;  // a NaN stays NaN (fails n2 < e)
    }
  });
  return norm;
}

}  // namespace

TORCH_LIBRARY(qdora_cpu, m) {
  m.def("supported() -> bool", &supported);
  m.def("dora_apply_(Tensor(a!) y, Tensor g, Tensor? bias, Tensor ax, Tensor Bs) -> Tensor(a!)");
  m.def("column_dots(Tensor a, Tensor b, Tensor? shift) -> Tensor");
  m.def("dora_norm(Tensor wa, Tensor A, Tensor B, Tensor w0_sq, Tensor c, float scale, float eps) -> Tensor");
  m.impl("dora_apply_", c10::DispatchKey::CPU, TORCH_FN(dora_apply_));
  m.impl("column_dots", c10::DispatchKey::CPU, TORCH_FN(column_dots));
  m.impl("dora_norm", c10::DispatchKey::CPU, TORCH_FN(dora_norm));
}
