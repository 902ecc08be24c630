// lowbit's CPU kernels: y = x W^T + b with W in one of lowbit's stored formats, prepared by
// lowbit/kernels/cpu.py (`prepare`). Registered as the torch operator `lowbit_kernels::linear`.
//
// Two paths, chosen by the number of rows of x:
//   few rows (decode, small batches): fused unpack + dequantize + dot, the weights decoded in
//     registers and used for up to 4 rows of x at a time; output rows split over the threads.
//   many rows (prefill): each thread dequantizes a tile of output rows into a float32 buffer that
//     stays in cache and multiplies it by torch's GEMM; the full float weight never exists.
// The whole file is compiled for AVX2 + FMA (the minimum, checked by the Python side before it
// loads the library); the AVX-512 variant is selected at run time when the CPU has it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#include <string>

namespace {

enum { MODE_LUT = 0, MODE_INT = 1, MODE_FMIN = 2 };
constexpr int MAX_MB = 4;  // rows of x per pass of the fused kernel (accumulators must stay in registers)
constexpr int64_t ROW_BLOCK = 32;  // output rows whose codes stay in L1 while every pass over x reuses them

// A prepared weight as the kernels read it: row n's codes start at codes + n * row_bytes; each
// of its `groups` groups holds units_per_group units of 16 codes (the last unit zero-padded).
struct Layout {
  const uint8_t* codes;
  int64_t row_bytes;
  const float* scale;  // [N, groups]
  const float* zsub;   // [N, groups], MODE_INT
  const float* fmin;   // [N, groups], MODE_FMIN
  const float* lut;    // 16 values of the codes before scale and zero (3 and 4 bits), per group when lut_stride
  int64_t lut_stride;  // 0: one table for every group (NF4, FP4, int); 16: group gi's table at lut + 16 gi (lut codebooks)
  int64_t groups;
  int64_t units_per_group;
};

// A prepared `vq` weight as vq_kernels.h reads it (see linear_vq).
struct VqLayout {
  const uint8_t* codes;
  int64_t row_bytes;
  const float* tables;
  int64_t table_floats;  // 2**bits * vector_dim
  int64_t groups;
  int64_t group;  // weights per group, a multiple of the vector dimension
  bool shared;  // one table per column group for every row
  const float* tables_t;  // shared tables transposed, [groups, vector_dim, entries] (vq_dot_products), or null
  int64_t entries;        // max(16, 2**bits)
  const uint8_t* codes_t;  // byte codes of 16 rows side by side, [ceil(N / 16), codes per row, 16], or null
};

using VqDotFn = void (*)(const VqLayout&, const float*, int64_t, int64_t, int64_t, float*, int64_t, const float*);
using VqDequantFn = void (*)(const VqLayout&, int64_t, int64_t, float*, int64_t);

struct VqKernels {
  VqDotFn dot[MAX_MB] = {nullptr, nullptr, nullptr, nullptr};
  VqDequantFn dequantize = nullptr;
};

using DotFn = void (*)(const Layout&, const float*, int64_t, int64_t, int64_t, float*, int64_t, const float*);
using DequantFn = void (*)(const Layout&, int64_t, int64_t, float*, int64_t);

struct Kernels {
  DotFn dot[MAX_MB] = {nullptr, nullptr, nullptr, nullptr};  // dot[mb - 1]: mb rows of x per pass
  DequantFn dequantize = nullptr;
};

namespace avx2 {
#define SIMD_WIDTH 8
#include "simd_ops.h"
#include "kernel_body.h"
#undef SIMD_WIDTH
}  // namespace avx2

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
namespace avx512 {
#define SIMD_WIDTH 16
#include "simd_ops.h"
#include "kernel_body.h"
#undef SIMD_WIDTH
}  // namespace avx512
#pragma GCC pop_options

namespace vqscalar {
#include "vq_kernels.h"
}  // namespace vqscalar

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
namespace vq512 {
#define VQ_AVX512
#include "vq_kernels.h"
#undef VQ_AVX512
}  // namespace vq512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
namespace vnni {
#include "int8_activations.h"
}  // namespace vnni
#pragma GCC pop_options

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}

bool use_avx512 = cpu_has_avx512();

// Whether the int8-activation kernels (`linear_int8x`) can run here.
bool has_vnni() {
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
  return has;
}

// The instruction set the kernels run: "avx512" where the CPU has it, else "avx2".
std::string isa() { return use_avx512 ? "avx512" : "avx2"; }

// Select the instruction set (tests run both variants on one machine); returns the one in use.
std::string set_isa(const std::string& name) {
  TORCH_CHECK(name == "avx2" || name == "avx512", "lowbit_kernels: isa must be avx2 or avx512, got ", name);
  TORCH_CHECK(name == "avx2" || cpu_has_avx512(), "lowbit_kernels: this CPU lacks AVX-512");
  use_avx512 = name == "avx512";
  return isa();
}

const at::Tensor& checked(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.device().is_cpu(),
              "lowbit_kernels: ", name, " must be a contiguous CPU tensor of ", dtype);
  return t;
}

// x [M, groups * group] -> [M, groups * group_padded] with zeros in each group's padding.
at::Tensor pad_groups(const at::Tensor& x, int64_t groups, int64_t group, int64_t group_padded) {
  if (group == group_padded) return x;
  const int64_t M = x.size(0);
  at::Tensor xp = at::zeros({M, groups, group_padded}, x.options());
  xp.narrow(2, 0, group).copy_(x.view({M, groups, group}));
  return xp.view({M, groups * group_padded});
}

const at::Tensor& required(const std::optional<at::Tensor>& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.has_value(), "lowbit_kernels: this layout needs ", name);
  TORCH_CHECK(t->numel() >= numel, "lowbit_kernels: ", name, " has ", t->numel(), " values, expected ", numel);
  return checked(*t, at::kFloat, name);
}

// The prepared weight's tensors as the kernels read them, after checking they fit together.
Layout layout_of(const at::Tensor& codes, const at::Tensor& scale, const std::optional<at::Tensor>& zsub,
                 const std::optional<at::Tensor>& fmin, const std::optional<at::Tensor>& lut, int64_t bits,
                 int64_t mode, int64_t group_padded) {
  checked(codes, at::kByte, "codes");
  checked(scale, at::kFloat, "scale");
  TORCH_CHECK(scale.dim() == 2 && group_padded % 16 == 0, "lowbit_kernels: bad layout");
  TORCH_CHECK(mode == MODE_LUT || mode == MODE_INT || mode == MODE_FMIN, "lowbit_kernels: unknown mode ", mode);
  const int64_t N = scale.size(0), G = scale.size(1);
  const int64_t row_bytes = G * group_padded * bits / 8;
  TORCH_CHECK(codes.numel() >= N * row_bytes + 8, "lowbit_kernels: codes too short for the layout");
  // a table per group (lut codebooks) when lut holds more than one table of 16 values
  const int64_t lut_stride = bits != 8 && lut.has_value() && lut->numel() > 16 ? 16 : 0;
  return Layout{codes.data_ptr<uint8_t>(), row_bytes, scale.data_ptr<float>(),
                mode == MODE_INT ? required(zsub, N * G, "zsub").data_ptr<float>() : nullptr,
                mode == MODE_FMIN ? required(fmin, N * G, "fmin").data_ptr<float>() : nullptr,
                bits != 8 ? required(lut, lut_stride ? N * G * 16 : 16, "lut").data_ptr<float>() : nullptr,
                lut_stride, G, group_padded / 16};
}

// Few rows: the fused kernel, output rows split over the threads; each thread walks its rows in
// blocks of ROW_BLOCK and makes every pass over x (MAX_MB rows of it) on a block before the next.
void fused_product(const Kernels& K, const Layout& L, const at::Tensor& xp, at::Tensor& y, const float* bias) {
  const int64_t M = xp.size(0), Kp = xp.size(1), N = y.size(1);
  const float* xd = xp.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t r0 = n0; r0 < n1; r0 += ROW_BLOCK) {
      const int64_t r1 = std::min(r0 + ROW_BLOCK, n1);
      for (int64_t m0 = 0; m0 < M; m0 += MAX_MB) {
        const int64_t mb = std::min<int64_t>(MAX_MB, M - m0);
        K.dot[mb - 1](L, xd + m0 * Kp, Kp, r0, r1, yd + m0 * N, N, bias);
      }
    }
  });
}

// Many rows, in one parallel region: each thread dequantizes its own tiles of output rows and
// multiplies them by a serial GEMM (BLAS and oneDNN run single-threaded inside a region), so a
// call pays one fork-join, not two per tile. Tiles shrink until every thread has one.
// `dequantize(n0, n1, out, stride)` writes rows n0..n1 of the float32 weight.
template <class Dequantize>
void tiled_product(const Dequantize& dequantize, const at::Tensor& xp, at::Tensor& y, int64_t tile_rows,
                   bool bf16_gemm) {
  const int64_t Kp = xp.size(1), N = y.size(1);
  const int64_t threads = at::get_num_threads();
  // as many tiles as tile_rows allows, rounded up to a multiple of the threads so they share the work evenly
  const auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t wanted = ceil_div(ceil_div(N, tile_rows), threads) * threads;
  const int64_t T = std::max<int64_t>(16, ceil_div(ceil_div(N, wanted), 16) * 16);
  const int64_t tiles = (N + T - 1) / T;
  // The bfloat16 option rounds x, each weight tile and the products' sums to bfloat16 (oneDNN's
  // bf16 GEMM, 2-4x float32's speed with AVX512-BF16 or AMX); see `linear_bf16_prefill`.
  const at::Tensor x_gemm = bf16_gemm ? xp.to(at::kBFloat16) : xp;
  const at::ThreadLocalState caller;  // inference and grad modes: the workers run ATen ops on y
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    const at::ThreadLocalStateGuard same_modes(caller);
    at::Tensor w = at::empty({T, Kp}, xp.options());
    at::Tensor w_bf16 = bf16_gemm ? at::empty({T, Kp}, xp.options().dtype(at::kBFloat16)) : at::Tensor();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * T, nt = std::min(T, N - n0);
      dequantize(n0, n0 + nt, w.data_ptr<float>(), Kp);
      at::Tensor y_tile = y.narrow(1, n0, nt);  // rows of stride N: BLAS writes it in place (ldc = N)
      if (bf16_gemm) {
        at::Tensor wt = w_bf16.narrow(0, 0, nt);
        wt.copy_(w.narrow(0, 0, nt));
        y_tile.copy_(at::mm(x_gemm, wt.t()));
      } else {
        at::mm_out(y_tile, xp, w.narrow(0, 0, nt).t());
      }
    }
  });
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                  const std::optional<at::Tensor>& zsub, const std::optional<at::Tensor>& fmin,
                  const std::optional<at::Tensor>& lut, int64_t bits, int64_t mode, int64_t group, int64_t group_padded,
                  const std::optional<at::Tensor>& bias, int64_t gemm_min_rows, int64_t tile_rows, bool bf16_gemm) {
  checked(x, at::kFloat, "x");
  const Layout L = layout_of(codes, scale, zsub, fmin, lut, bits, mode, group_padded);
  const int64_t M = x.size(0), N = scale.size(0);
  TORCH_CHECK(x.dim() == 2 && group <= group_padded && x.size(1) == L.groups * group,
              "lowbit_kernels: x has ", x.size(1), " features, the weight ", L.groups * group);
  const Kernels K = use_avx512 ? avx512::kernels_for(static_cast<int>(bits), static_cast<int>(mode))
                               : avx2::kernels_for(static_cast<int>(bits), static_cast<int>(mode));
  TORCH_CHECK(K.dequantize != nullptr, "lowbit_kernels: no kernel for ", bits, "-bit codes in mode ", mode);
  const float* b = bias ? required(bias, N, "bias").data_ptr<float>() : nullptr;

  const at::Tensor xp = pad_groups(x, L.groups, group, group_padded);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M < gemm_min_rows) {
    fused_product(K, L, xp, y, b);
  } else {
    tiled_product([&](int64_t n0, int64_t n1, float* out, int64_t stride) { K.dequantize(L, n0, n1, out, stride); },
                  xp, y, tile_rows, bf16_gemm);
    if (bias) y.add_(*bias);
  }
  return y;
}

// y = x W^T + b with x rounded per block of 64 to int8 or (act_bits 16) two int8 halves for few rows
// (see int8_activations.h), the exact weights through the float32 GEMM for many.
at::Tensor linear_int8x(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& corr,
                        const std::optional<at::Tensor>& zsub, const std::optional<at::Tensor>& fmin, int64_t bits,
                        int64_t group, int64_t out_features, int64_t act_bits, const std::optional<at::Tensor>& bias,
                        int64_t gemm_min_rows, int64_t tile_rows) {
  TORCH_CHECK(has_vnni(), "lowbit_kernels: int8 activations need AVX-512 VNNI");
  checked(x, at::kFloat, "x");
  checked(codes, at::kByte, "codes");
  checked(scale, at::kFloat, "scale");
  checked(corr, at::kFloat, "corr");
  TORCH_CHECK(bits == 3 || bits == 4 || bits == 8, "lowbit_kernels: int8 activations cover 3, 4 and 8 bits");
  TORCH_CHECK(act_bits == 8 || act_bits == 16, "lowbit_kernels: act_bits must be 8 or 16");
  const bool fine = act_bits == 16;
  TORCH_CHECK(scale.dim() == 2 && group % vnni::BLOCK == 0, "lowbit_kernels: bad layout");
  const int64_t N = out_features, Np = scale.size(0), G = scale.size(1), K = G * group, M = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "lowbit_kernels: x has ", x.size(1), " features, the weight ", K);
  TORCH_CHECK(Np % vnni::PANEL == 0 && N <= Np && N > Np - vnni::PANEL && corr.numel() == Np * G &&
                  codes.numel() >= Np * K * bits / 8,
              "lowbit_kernels: layout tensors disagree");
  TORCH_CHECK(zsub.has_value() != fmin.has_value(), "lowbit_kernels: exactly one of zsub and fmin");
  const vnni::Int8Layout L{codes.data_ptr<uint8_t>(), K * bits / 8, scale.data_ptr<float>(), corr.data_ptr<float>(),
                           zsub ? required(zsub, Np * G, "zsub").data_ptr<float>() : nullptr,
                           fmin ? required(fmin, Np * G, "fmin").data_ptr<float>() : nullptr, G, group / vnni::BLOCK};
  const vnni::Int8Kernels Kn = vnni::int8_kernels_for(static_cast<int>(bits), fine);
  const float* b = bias ? required(bias, N, "bias").data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M >= gemm_min_rows) {
    tiled_product([&](int64_t n0, int64_t n1, float* out, int64_t stride) { Kn.dequantize(L, n0, n1, out, stride); },
                  x, y, tile_rows, false);
    if (bias) y.add_(*bias);
    return y;
  }
  at::Tensor xq = at::empty({fine ? 2 * M : M, K}, x.options().dtype(at::kChar));
  at::Tensor sx = at::empty({M, K / vnni::BLOCK}, x.options());
  at::Tensor xsum = at::empty({M, G}, x.options());
  (fine ? vnni::quantize_rows<true> : vnni::quantize_rows<false>)(x.data_ptr<float>(), M, K, L.blocks_per_group,
                                                                   xq.data_ptr<int8_t>(), sx.data_ptr<float>(),
                                                                   xsum.data_ptr<float>());
  const int8_t* xqd = xq.data_ptr<int8_t>();
  const float *sxd = sx.data_ptr<float>(), *xsd = xsum.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  const int64_t blocks = K / vnni::BLOCK;
  at::parallel_for(0, Np / vnni::PANEL, 4, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t m0 = 0; m0 < M; m0 += MAX_MB) {
        const int64_t mb = std::min<int64_t>(MAX_MB, M - m0);
        Kn.dot[mb - 1](L, xqd + m0 * K, sxd + m0 * blocks, xsd + m0 * G, K, M, p * vnni::PANEL, N, yd + m0 * N, N, b);
      }
    }
  });
  return y;
}

bool int8_activations_supported() { return has_vnni(); }

// y = x W^T + b for a `vq` weight (vq_kernels.h): codes [N, row_bytes] (16 bytes of padding at the end),
// tables float32 [T, 2**bits * vector_dim], T = groups when `shared` (one table per column group), else
// N * groups. Few rows: shared tables take lookups of precomputed dot products (gathers or permutes on
// AVX-512, plain loads on AVX2), per-row tables the unit loop (gathers on AVX-512, a plain loop on AVX2);
// many rows: exact weight tiles into the float32 GEMM.
at::Tensor linear_vq(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tables,
                     const std::optional<at::Tensor>& tables_t, const std::optional<at::Tensor>& codes_t,
                     int64_t bits, int64_t vector_dim, int64_t groups,
                     bool shared, int64_t out_features, const std::optional<at::Tensor>& bias, int64_t gemm_min_rows,
                     int64_t tile_rows) {
  checked(x, at::kFloat, "x");
  checked(codes, at::kByte, "codes");
  checked(tables, at::kFloat, "tables");
  const int64_t N = out_features, K = x.size(1), M = x.size(0);
  TORCH_CHECK(x.dim() == 2 && bits >= 1 && bits <= 8 && groups > 0 && K % groups == 0 && 16 % vector_dim == 0 &&
                  K / groups % vector_dim == 0,
              "lowbit_kernels: bad vq layout");
  const bool nibbles = bits <= 4;
  const int64_t codes_per_row = K / vector_dim, row_bytes = nibbles ? (codes_per_row + 1) / 2 : codes_per_row;
  const int64_t table_floats = (int64_t{1} << bits) * vector_dim;
  TORCH_CHECK(codes.numel() >= N * row_bytes + 16 && tables.numel() == (shared ? groups : N * groups) * table_floats,
              "lowbit_kernels: vq layout tensors disagree");
  const int64_t entries = std::max<int64_t>(16, int64_t{1} << bits);
  TORCH_CHECK(!tables_t || (shared && tables_t->numel() == groups * vector_dim * entries),
              "lowbit_kernels: transposed vq tables disagree with the layout");
  const int64_t row_blocks = (N + 15) / 16;
  TORCH_CHECK(!codes_t || (tables_t && !nibbles && codes_t->numel() == row_blocks * codes_per_row * 16),
              "lowbit_kernels: side-by-side vq codes disagree with the layout");
  const VqLayout L{codes.data_ptr<uint8_t>(), row_bytes, tables.data_ptr<float>(), table_floats, groups,
                   K / groups, shared, tables_t ? checked(*tables_t, at::kFloat, "tables_t").data_ptr<float>() : nullptr,
                   entries, codes_t ? checked(*codes_t, at::kByte, "codes_t").data_ptr<uint8_t>() : nullptr};
  const VqKernels Ks = vqscalar::vq_kernels_for(static_cast<int>(vector_dim), nibbles);
  const VqKernels Kd = use_avx512 ? vq512::vq_kernels_for(static_cast<int>(vector_dim), nibbles) : Ks;
  TORCH_CHECK(Ks.dequantize != nullptr, "lowbit_kernels: no vq kernel for vector_dim ", vector_dim);
  const float* b = bias ? required(bias, N, "bias").data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M >= gemm_min_rows) {
    tiled_product([&](int64_t n0, int64_t n1, float* out, int64_t stride) { Ks.dequantize(L, n0, n1, out, stride); },
                  x, y, tile_rows, false);
    if (bias) y.add_(*bias);
    return y;
  }
  const float* xd = x.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  if (L.tables_t != nullptr) {  // shared codebooks: lookups of precomputed dot products
    const auto products = use_avx512 ? vq512::vq_dot_products_for(static_cast<int>(vector_dim))
                                     : vqscalar::vq_dot_products_for(static_cast<int>(vector_dim));
    const auto lookup = use_avx512 ? (nibbles ? &vq512::vq_lookup_rows<true> : &vq512::vq_lookup_rows<false>)
                                   : (nibbles ? &vqscalar::vq_lookup_rows<true> : &vqscalar::vq_lookup_rows<false>);
    at::Tensor P = at::empty({codes_per_row * entries}, x.options());
    for (int64_t m = 0; m < M; ++m) {
      at::parallel_for(0, codes_per_row, 16, [&](int64_t j0, int64_t j1) { products(L, xd + m * K, j0, j1, P.data_ptr<float>()); });
      if (use_avx512 && L.codes_t != nullptr) {
        at::parallel_for(0, row_blocks, 4, [&](int64_t b0, int64_t b1) {
          vq512::vq_lookup_blocks_for(entries)(L, P.data_ptr<float>(), codes_per_row, b0, b1, N, yd + m * N, b);
        });
      } else {
        at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
          lookup(L, P.data_ptr<float>(), codes_per_row, n0, n1, yd + m * N, b);
        });
      }
    }
    return y;
  }
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += MAX_MB) {
      const int64_t mb = std::min<int64_t>(MAX_MB, M - m0);
      Kd.dot[mb - 1](L, xd + m0 * K, K, n0, n1, yd + m0 * N, N, b);
    }
  });
  return y;
}

// y[m, r] += sum_k vals[k] x[m, cols[k]] over row_ptr[r] <= k < row_ptr[r + 1]: a weight's sparse part
// (exact outliers added to its dense codes) in compressed-row form, output rows split over the threads.
void sparse_accumulate_(at::Tensor& y, const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& cols,
                        const at::Tensor& vals) {
  checked(y, at::kFloat, "y");
  checked(x, at::kFloat, "x");
  checked(row_ptr, at::kLong, "row_ptr");
  checked(cols, at::kLong, "cols");
  checked(vals, at::kFloat, "vals");
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == M && row_ptr.numel() == N + 1 && cols.numel() == vals.numel(),
              "lowbit_kernels: sparse part does not fit y [", M, ", ", N, "]");
  const int64_t *rp = row_ptr.data_ptr<int64_t>(), *cd = cols.data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[N] == cols.numel(), "lowbit_kernels: row_ptr does not span the sparse part");
  const float *xd = x.data_ptr<float>(), *vd = vals.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = xd + m * K;
      for (int64_t r = n0; r < n1; ++r) {
        float s = 0.0f;
        for (int64_t k = rp[r]; k < rp[r + 1]; ++k) s += vd[k] * xm[cd[k]];
        yd[m * N + r] += s;
      }
    }
  });
}

}  // namespace

// `linear` is declared here and implemented for the CPU key only, so torch.compile can trace it
// through the shape function lowbit/kernels/cpu.py registers (a composite op could not have one).
TORCH_LIBRARY(lowbit_kernels, m) {
  m.def("linear(Tensor x, Tensor codes, Tensor scale, Tensor? zsub, Tensor? fmin, Tensor? lut, int bits, "
        "int mode, int group, int group_padded, Tensor? bias, int gemm_min_rows, int tile_rows, bool bf16_gemm) -> Tensor");
  m.def("linear_int8x(Tensor x, Tensor codes, Tensor scale, Tensor corr, Tensor? zsub, Tensor? fmin, int bits, "
        "int group, int out_features, int act_bits, Tensor? bias, int gemm_min_rows, int tile_rows) -> Tensor");
  m.def("linear_vq(Tensor x, Tensor codes, Tensor tables, Tensor? tables_t, Tensor? codes_t, int bits, int vector_dim, "
        "int groups, bool shared, "
        "int out_features, Tensor? bias, int gemm_min_rows, int tile_rows) -> Tensor");
  m.def("sparse_accumulate_(Tensor(a!) y, Tensor x, Tensor row_ptr, Tensor cols, Tensor vals) -> ()");
  m.def("int8_activations_supported() -> bool", &int8_activations_supported);
  m.def("isa() -> str", &isa);
  m.def("set_isa(str name) -> str", &set_isa);
}

TORCH_LIBRARY_IMPL(lowbit_kernels, CPU, m) {
  m.impl("linear", &linear);
  m.impl("linear_int8x", &linear_int8x);
  m.impl("sparse_accumulate_", &sparse_accumulate_);
  m.impl("linear_vq", &linear_vq);
}
