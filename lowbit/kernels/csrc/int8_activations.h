// The int8-activation kernels (AVX-512 VNNI), included by lowbit_cpu.cpp in a target region.
//
// For few rows of x (decode), x is rounded to int8 per block of 64 (t = x * 127 / absmax of the
// block, xq = round-half-even(t), x^ = sx * xq with sx = absmax / 127) or, with FINE, to 16-bit fixed
// point per row as two int8 halves (t = x * 127 / absmax of the row, hi = round(t), lo = round((t -
// hi) * 256) clamped to +-127, x^ = sx (256 hi + lo) with sx = absmax / (127 * 256)); each block of 64
// integer codes meets them in one `vpdpbusd` per half (unsigned codes times signed int8, summed
// exactly in int32: 256 * 64 * 255 * 127 < 2^31). FINE's one scale per row saves a multiply per
// block, and its 16 bits keep the rounding far below what matters. With w = (q - z) s or q s + m:
//   y[m, n] = sum_g s[n, g] sum_{b in g} sx[m, b] isum[m, n, b] + sum_g corr[n, g] xsum[m, g]
// where corr = -s z (integer zero or the symmetric grid's offset) or m (float minimum) and
// xsum[m, g] = sum_{k in g} x^[m, k]: the product with x^ in place of x, up to float32 rounding.
// Many rows (prefill) dequantize tiles of the same layout exactly and use the float32 GEMM.
//
// Layout: rows in panels of PANEL (the weight zero-padded to whole panels); a panel holds block 0 of
// its rows in order, then block 1, ..., so a pass over a panel reads memory in order. A block of 64
// codes is:
//   8 bits: 64 bytes, code k at byte k.
//   4 bits: 32 bytes, byte j = code j | code (j + 32) << 4.
//   3 bits: 24 bytes: 16 bytes, byte j holding code j + 16 i at bits 2i..2i+1 (i = 0..3), then a
//           little-endian uint64 whose bit k is bit 2 of code k.

constexpr int64_t BLOCK = 64;
constexpr int64_t PANEL = 4;  // output rows computed together, sharing each block of x

struct Int8Layout {
  const uint8_t* codes;
  int64_t row_bytes;   // bytes of one row's codes
  const float* scale;  // [N padded to PANEL, groups], as every array below
  const float* corr;
  const float* zsub;   // or null: dequantizing (q - z) s
  const float* fmin;   // or null: dequantizing q s + m
  int64_t groups;
  int64_t blocks_per_group;
};

template <int BITS>
static inline __m512i codes64(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512(p);
  } else if constexpr (BITS == 4) {
    // the 32 bytes in both halves, the upper half shifted right by 4: low nibbles, then high nibbles
    const __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512i shifts = _mm512_set_epi64(0x0004000400040004LL, 0x0004000400040004LL, 0x0004000400040004LL,
                                            0x0004000400040004LL, 0, 0, 0, 0);
    return _mm512_and_si512(_mm512_srlv_epi16(both, shifts), _mm512_set1_epi8(0x0F));
  } else {
    const __m512i low = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512i shifts = _mm512_set_epi64(0x0006000600060006LL, 0x0006000600060006LL, 0x0004000400040004LL,
                                            0x0004000400040004LL, 0x0002000200020002LL, 0x0002000200020002LL, 0, 0);
    const __m512i two = _mm512_and_si512(_mm512_srlv_epi16(low, shifts), _mm512_set1_epi8(0x03));
    uint64_t high;
    std::memcpy(&high, p + 16, 8);
    return _mm512_mask_add_epi8(two, static_cast<__mmask64>(high), two, _mm512_set1_epi8(4));
  }
}

// x [M, K] float32 -> xq [M, K] int8 (then, with FINE, the low halves [M, K]), sx [M, K / 64] (the
// scale of the block's integer sum), xsum [M, groups] (see the file's comment).
template <bool FINE>
static void quantize_rows(const float* x, int64_t M, int64_t K, int64_t blocks_per_group, int8_t* xq, float* sx,
                          float* xsum) {
  const int64_t blocks = K / BLOCK, groups = blocks / blocks_per_group;
  int8_t* xlo = xq + M * K;
  for (int64_t m = 0; m < M; ++m) {
    float row_absmax = 0.0f;
    if constexpr (FINE) {
      __m512 amax = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + m * K + k)));
      row_absmax = _mm512_reduce_max_ps(amax);
    }
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t at = m * K + b * BLOCK;
      __m512 v[4];
      __m512 amax = _mm512_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm512_loadu_ps(x + at + 16 * i);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
      }
      const float absmax = FINE ? row_absmax : _mm512_reduce_max_ps(amax);
      const float scale = FINE ? absmax / 127.0f / 256.0f : absmax / 127.0f;
      const __m512 inv = _mm512_set1_ps(absmax > 0.0f ? 127.0f / absmax : 0.0f);
      __m512i total = _mm512_setzero_si512();
      for (int i = 0; i < 4; ++i) {
        const __m512 t = _mm512_mul_ps(v[i], inv);
        const __m512i hi = _mm512_cvtps_epi32(t);  // round half to even
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + at + 16 * i), _mm512_cvtsepi32_epi8(hi));
        if constexpr (FINE) {
          const __m512 rest = _mm512_mul_ps(_mm512_sub_ps(t, _mm512_cvtepi32_ps(hi)), _mm512_set1_ps(256.0f));
          const __m512i lo = _mm512_cvtps_epi32(rest);
          const __m512i lo8 = _mm512_max_epi32(_mm512_min_epi32(lo, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(xlo + at + 16 * i), _mm512_cvtsepi32_epi8(lo8));
          total = _mm512_add_epi32(total, _mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo8));
        } else {
          total = _mm512_add_epi32(total, hi);
        }
      }
      sx[m * blocks + b] = scale;
      const float part = scale * static_cast<float>(_mm512_reduce_add_epi32(total));
      float& sum = xsum[m * groups + b / blocks_per_group];
      sum = (b % blocks_per_group ? sum : 0.0f) + part;
    }
  }
}

// [sum(a), sum(b), sum(c), sum(d)] of four vectors.
static inline __m128 sum_each4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const auto half = [](__m512 v) {  // 16 -> 4 lanes
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  };
  return _mm_hadd_ps(_mm_hadd_ps(half(a), half(b)), _mm_hadd_ps(half(c), half(d)));
}

// Output rows n..n+PANEL-1 (n a multiple of PANEL; only rows below n_end are written) for MB rows
// of x: the panel's rows share each block of x, and give the out-of-order core PANEL * MB
// independent accumulation chains.
template <int BITS, int MB, bool FINE>
static void int8_dot_panel(const Int8Layout& L, const int8_t* xq, const float* sx, const float* xsum, int64_t K,
                           int64_t M, int64_t n, int64_t n_end, float* y, int64_t y_stride, const float* bias) {
  constexpr int64_t BYTES = BLOCK * BITS / 8;
  constexpr int R = PANEL;
  const int64_t blocks = L.groups * L.blocks_per_group;
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  const uint8_t* p = L.codes + n * L.row_bytes;
  int64_t b = 0;
  for (int64_t g = 0; g < L.groups; ++g) {
    for (int64_t i = 0; i < L.blocks_per_group; ++i, ++b) {
      __m512i xb[MB], xl[MB];
      __m512 sxb[MB];
      for (int m = 0; m < MB; ++m) {
        xb[m] = _mm512_loadu_si512(xq + m * K + b * BLOCK);
        if constexpr (FINE) xl[m] = _mm512_loadu_si512(xq + (M + m) * K + b * BLOCK);
        else sxb[m] = _mm512_set1_ps(sx[m * blocks + b]);
      }
      for (int r = 0; r < R; ++r, p += BYTES) {
        const __m512i q = codes64<BITS>(p);
        const __m512 s = _mm512_set1_ps(L.scale[(n + r) * L.groups + g]);
        for (int m = 0; m < MB; ++m) {
          __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xb[m]);
          if constexpr (FINE) isum = _mm512_dpbusd_epi32(_mm512_slli_epi32(isum, 8), q, xl[m]);
          const __m512 dot = _mm512_cvtepi32_ps(isum);
          acc[r][m] = _mm512_fmadd_ps(FINE ? dot : _mm512_mul_ps(dot, sxb[m]), s, acc[r][m]);  // FINE: sx at the end
        }
      }
    }
  }
  // The panel's rows side by side: their sums, then the corrections sum_g corr[n + r, g] xsum[m, g]
  // (the panel's rows of corr are contiguous), 16 groups to a vector: the panel's four results leave
  // in one store, where a scalar tail per row cost a third of the time at small widths.
  static_assert(R == 4, "the epilogue sums four rows side by side");
  const __mmask8 rows = static_cast<__mmask8>((1u << std::min<int64_t>(R, n_end - n)) - 1);
  const float* corr = L.corr + n * L.groups;
  for (int m = 0; m < MB; ++m) {
    const float* xs = xsum + m * L.groups;
    __m512 c[R];
    for (int r = 0; r < R; ++r) c[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < L.groups; g += 16) {
      const __mmask16 k = L.groups - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (L.groups - g)) - 1);
      const __m512 xv = _mm512_maskz_loadu_ps(k, xs + g);
      for (int r = 0; r < R; ++r) c[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, corr + r * L.groups + g), xv, c[r]);
    }
    __m128 t = sum_each4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]);
    if constexpr (FINE) t = _mm_mul_ps(t, _mm_set1_ps(sx[m * blocks]));  // the row's one scale
    t = _mm_add_ps(t, sum_each4(c[0], c[1], c[2], c[3]));
    if (bias) t = _mm_add_ps(t, _mm_maskz_loadu_ps(rows, bias + n));
    _mm_mask_storeu_ps(y + m * y_stride + n, rows, t);
  }
}

// Rows n0..n1 of the exact float32 weight, as the reference dequantizes it.
template <int BITS>
static void int8_dequantize_rows(const Int8Layout& L, int64_t n0, int64_t n1, float* out, int64_t out_stride) {
  constexpr int64_t BYTES = BLOCK * BITS / 8;
  alignas(64) uint8_t q[BLOCK];
  const __m512 codes16 = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = L.codes + (n - n % PANEL) * L.row_bytes + (n % PANEL) * BYTES;
    float* o = out + (n - n0) * out_stride;
    for (int64_t g = 0; g < L.groups; ++g) {
      const __m512 s = _mm512_set1_ps(L.scale[n * L.groups + g]);
      const __m512 z = _mm512_set1_ps(L.zsub ? L.zsub[n * L.groups + g] : 0.0f);
      const __m512 mn = _mm512_set1_ps(L.fmin ? L.fmin[n * L.groups + g] : 0.0f);
      const auto weight = [&](__m512 w) {
        return L.zsub ? _mm512_mul_ps(_mm512_sub_ps(w, z), s) : _mm512_add_ps(_mm512_mul_ps(w, s), mn);
      };
      // 3- and 4-bit codes: the group's 16 possible weights once, then one vpermps per 16 codes
      const __m512 table = weight(codes16);
      for (int64_t i = 0; i < L.blocks_per_group; ++i, p += PANEL * BYTES, o += BLOCK) {
        _mm512_store_si512(q, codes64<BITS>(p));
        for (int j = 0; j < 4; ++j) {
          const __m512i code = _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(q + 16 * j)));
          _mm512_storeu_ps(o + 16 * j, BITS == 8 ? weight(_mm512_cvtepi32_ps(code)) : _mm512_permutexvar_ps(code, table));
        }
      }
    }
  }
}

using Int8DotFn = void (*)(const Int8Layout&, const int8_t*, const float*, const float*, int64_t, int64_t, int64_t,
                           int64_t, float*, int64_t, const float*);  // one panel
using Int8DequantFn = void (*)(const Int8Layout&, int64_t, int64_t, float*, int64_t);

struct Int8Kernels {
  Int8DotFn dot[MAX_MB] = {nullptr, nullptr, nullptr, nullptr};
  Int8DequantFn dequantize = nullptr;
};

template <int B, bool FINE>
static Int8Kernels int8_kernels() {
  return Int8Kernels{{&int8_dot_panel<B, 1, FINE>, &int8_dot_panel<B, 2, FINE>, &int8_dot_panel<B, 3, FINE>,
                      &int8_dot_panel<B, 4, FINE>},
                     &int8_dequantize_rows<B>};
}

static Int8Kernels int8_kernels_for(int bits, bool fine) {
#define LOWBIT_INT8_CASE(B) \
  if (bits == B) return fine ? int8_kernels<B, true>() : int8_kernels<B, false>();
  LOWBIT_INT8_CASE(3)
  LOWBIT_INT8_CASE(4)
  LOWBIT_INT8_CASE(8)
#undef LOWBIT_INT8_CASE
  return Int8Kernels{};
}
