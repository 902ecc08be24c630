// Vector-codebook products (the `vq` format: one code stands for `D` consecutive weights along the
// input dimension, D in {1, 2, 4, 8, 16}; a codebook of 2**bits vectors per table), for lowbit_cpu.cpp's
// `linear_vq`. Each output row n, column group g reads table `shared ? g : n * groups + g`, float32
// [2**bits, D] laid flat, so a weight is table[code * D + lane % D]: the exact value the reference
// `QuantizedWeight.dequantize` gives (float16 tables widened once by the Python side).
//
// Codes: bits <= 4: two per byte, code j of a row in nibble j (low nibble first); else one per byte.
// A unit is 16 weights (16 / D codes), decoded by one gather; the codes end in 16 bytes of padding so a
// unit's loads may read past them.
//
// Included twice by lowbit_cpu.cpp: in namespace vq512 with VQ_AVX512 defined (16 weights per gather),
// and in namespace vqscalar without (a plain loop: the AVX2 variant and the reference for tests).
// VqLayout and VqKernels are lowbit_cpu.cpp's.

template <int D, bool NIBBLES>
static inline int code_at(const uint8_t* row, int64_t j) {
  if constexpr (NIBBLES) return (row[j >> 1] >> ((j & 1) * 4)) & 15;
  else return row[j];
}

#ifdef VQ_AVX512
// The 16 weights of unit u of a row (codes starting at code index j0) from table t.
template <int D, bool NIBBLES>
static inline __m512 vq_unit(const uint8_t* row, int64_t j0, const float* t) {
  static_assert(16 % D == 0, "D must divide 16");
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i which = _mm512_srli_epi32(lane, __builtin_ctz(D));  // code of lane l: l / D
  __m512i code;
  if constexpr (NIBBLES) {  // lane l reads code j0 + l / D: nibble (j0 & 1) + l / D from byte j0 / 2
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (j0 >> 1))));
    const __m512i nibble = _mm512_add_epi32(which, _mm512_set1_epi32(static_cast<int>(j0 & 1)));
    const __m512i byte = _mm512_permutexvar_epi32(_mm512_srli_epi32(nibble, 1), bytes);
    const __m512i shift = _mm512_slli_epi32(_mm512_and_si512(nibble, _mm512_set1_epi32(1)), 2);
    code = _mm512_and_si512(_mm512_srlv_epi32(byte, shift), _mm512_set1_epi32(15));
  } else {
    code = _mm512_permutexvar_epi32(which, _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j0))));
  }
  const __m512i index = _mm512_add_epi32(_mm512_slli_epi32(code, __builtin_ctz(D)),
                                         _mm512_and_si512(lane, _mm512_set1_epi32(D - 1)));
  return _mm512_i32gather_ps(index, t, 4);
}
#endif

// y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for MB rows of x and output rows n0..n1. A group's whole
// units of 16 weights take the vector path; its last group % 16 weights (whole codes) a plain loop.
template <int D, bool NIBBLES, int MB>
static void vq_dot_rows(const VqLayout& L, const float* x, int64_t x_stride, int64_t n0, int64_t n1, float* y,
                        int64_t y_stride, const float* bias) {
  constexpr int64_t CODES_PER_UNIT = 16 / D;
  const int64_t units = L.group / 16, tail_codes = L.group % 16 / D;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = L.codes + n * L.row_bytes;
    float acc[MB] = {};
#ifdef VQ_AVX512
    __m512 vacc[MB];
    for (int m = 0; m < MB; ++m) vacc[m] = _mm512_setzero_ps();
#endif
    int64_t j = 0;  // code index within the row
    for (int64_t g = 0; g < L.groups; ++g) {
      const float* t = L.tables + (L.shared ? g : n * L.groups + g) * L.table_floats;
      const float* xg = x + g * L.group;
      int64_t k = 0;  // weight index within the group
#ifdef VQ_AVX512
      for (int64_t u = 0; u < units; ++u, j += CODES_PER_UNIT, k += 16) {
        const __m512 w = vq_unit<D, NIBBLES>(row, j, t);
        for (int m = 0; m < MB; ++m) vacc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xg + m * x_stride + k), vacc[m]);
      }
      const int64_t scalar_codes = tail_codes;
#else
      const int64_t scalar_codes = units * CODES_PER_UNIT + tail_codes;
#endif
      for (int64_t c = 0; c < scalar_codes; ++c, ++j, k += D) {
        const float* v = t + code_at<D, NIBBLES>(row, j) * D;
        for (int e = 0; e < D; ++e)
          for (int m = 0; m < MB; ++m) acc[m] += v[e] * xg[m * x_stride + k + e];
      }
    }
    for (int m = 0; m < MB; ++m) {
#ifdef VQ_AVX512
      acc[m] += _mm512_reduce_add_ps(vacc[m]);
#endif
      y[m * y_stride + n] = acc[m] + (bias ? bias[n] : 0.0f);
    }
  }
}

#ifdef VQ_AVX512
// Shared codebooks (every row reads column group g's table) turn the product into lookups of dot
// products: P[j, k] = table_g(j)[k] . x[j D : (j + 1) D] for every code position j and entry k (a
// table of K/D x 2**bits floats per row of x, computed once per call), then y[n] = sum_j P[j, code[n, j]],
// one gather per 16 codes (16 D weights) instead of one per 16 weights. Needs L.tables_t, the tables
// transposed to [groups, D, entries] with entries = max(16, 2**bits) (zero-padded).
template <int D>
static void vq_dot_products(const VqLayout& L, const float* x, int64_t j0, int64_t j1, float* P) {
  const int64_t entries = L.entries, codes_per_group = L.group / D;
  for (int64_t j = j0; j < j1; ++j) {
    const float* t = L.tables_t + (j / codes_per_group) * D * entries;
    __m512 xs[D];
    for (int e = 0; e < D; ++e) xs[e] = _mm512_set1_ps(x[j * D + e]);
    for (int64_t k = 0; k < entries; k += 16) {
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(t + k), xs[0]);
      for (int e = 1; e < D; ++e) acc = _mm512_fmadd_ps(_mm512_loadu_ps(t + e * entries + k), xs[e], acc);
      _mm512_storeu_ps(P + j * entries + k, acc);
    }
  }
}

// y[n] (+ bias[n]) = sum_j P[j, code[n, j]] for output rows n0..n1 of one row of x.
template <bool NIBBLES>
static void vq_lookup_rows(const VqLayout& L, const float* P, int64_t codes_per_row, int64_t n0, int64_t n1, float* y,
                           const float* bias) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i stride = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(L.entries)));
  const __m512i byte_of = _mm512_srli_epi32(lane, 1), shift = _mm512_slli_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(1)), 2);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = L.codes + n * L.row_bytes;
    __m512 acc = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= codes_per_row; j += 16) {
      __m512i code;
      if constexpr (NIBBLES) {  // j is even: codes j..j+15 are the 8 bytes from j / 2
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j / 2)));
        code = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(byte_of, bytes), shift), _mm512_set1_epi32(15));
      } else {
        code = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
      }
      acc = _mm512_add_ps(acc, _mm512_i32gather_ps(_mm512_add_epi32(stride, code), P + j * L.entries, 4));
    }
    float s = _mm512_reduce_add_ps(acc);
    for (; j < codes_per_row; ++j) s += P[j * L.entries + code_at<1, NIBBLES>(row, j)];
    y[n] = s + (bias ? bias[n] : 0.0f);
  }
}

#else
// The products-then-lookups path of the AVX-512 variant above as plain loops (the compiler vectorises
// the products over the entries): on an AVX2 CPU a lookup of one float from an L1/L2-resident table
// replaces D multiply-adds and a weight decode, so shared codebooks decode faster than the unit loop.
template <int D>
static void vq_dot_products(const VqLayout& L, const float* x, int64_t j0, int64_t j1, float* P) {
  const int64_t entries = L.entries, codes_per_group = L.group / D;
  for (int64_t j = j0; j < j1; ++j) {
    const float* t = L.tables_t + (j / codes_per_group) * D * entries;
    float* p = P + j * entries;
    const float x0 = x[j * D];
    for (int64_t k = 0; k < entries; ++k) p[k] = t[k] * x0;
    for (int e = 1; e < D; ++e) {
      const float xe = x[j * D + e];
      const float* te = t + e * entries;
      for (int64_t k = 0; k < entries; ++k) p[k] += te[k] * xe;
    }
  }
}

// y[n] (+ bias[n]) = sum_j P[j, code[n, j]] for output rows n0..n1 of one row of x; four running sums
// so the loads of consecutive codes overlap.
template <bool NIBBLES>
static void vq_lookup_rows(const VqLayout& L, const float* P, int64_t codes_per_row, int64_t n0, int64_t n1, float* y,
                           const float* bias) {
  const int64_t E = L.entries;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = L.codes + n * L.row_bytes;
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t j = 0;
    for (; j + 4 <= codes_per_row; j += 4)
      for (int i = 0; i < 4; ++i) s[i] += P[(j + i) * E + code_at<1, NIBBLES>(row, j + i)];
    for (; j < codes_per_row; ++j) s[0] += P[j * E + code_at<1, NIBBLES>(row, j)];
    y[n] = (s[0] + s[1]) + (s[2] + s[3]) + (bias ? bias[n] : 0.0f);
  }
}

#endif

#ifdef VQ_AVX512
// The same sums with byte codes of 16 rows side by side (L.codes_t), the code positions outermost:
// position j's products (P[j], 2**bits floats) are held in registers while every block of 16 rows
// picks from them by permutes (each pair of 16-float vectors answers the codes whose high bits name
// it, then rounds of blends choose): a block's 16 lookups cost about twenty vector instructions,
// where one gather of 16 floats costs about thirty cycles on this project's benchmark machine.
// Output rows in blocks b0..b1 of 16 (rows from N on are padding and not written). Byte codes:
// 32 <= 2**bits <= 256.
template <int PAIRS>  // 2**bits / 32
static void vq_lookup_blocks_t(const VqLayout& L, const float* P, int64_t codes_per_row, int64_t b0, int64_t b1,
                               int64_t N, float* y, const float* bias) {
  std::vector<float> sums((b1 - b0) * 16, 0.0f);  // floats: a vector of __m512 would be built outside this ISA
  for (int64_t j = 0; j < codes_per_row; ++j) {
    const float* t = P + j * L.entries;
    __m512 lo[PAIRS], hi[PAIRS];
    for (int k = 0; k < PAIRS; ++k) lo[k] = _mm512_loadu_ps(t + 32 * k), hi[k] = _mm512_loadu_ps(t + 32 * k + 16);
    const uint8_t* c = L.codes_t + (b0 * codes_per_row + j) * 16;
    for (int64_t b = b0; b < b1; ++b, c += codes_per_row * 16) {
      const __m512i code = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
      __m512 r[PAIRS];
      for (int k = 0; k < PAIRS; ++k) r[k] = _mm512_permutex2var_ps(lo[k], code, hi[k]);
      for (int width = PAIRS, bit = 32; width > 1; width /= 2, bit *= 2) {
        const __mmask16 high = _mm512_test_epi32_mask(code, _mm512_set1_epi32(bit));
        for (int k = 0; k < width / 2; ++k) r[k] = _mm512_mask_blend_ps(high, r[2 * k], r[2 * k + 1]);
      }
      float* s = sums.data() + (b - b0) * 16;
      _mm512_storeu_ps(s, _mm512_add_ps(_mm512_loadu_ps(s), r[0]));
    }
  }
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t r = 0; r < 16 && b * 16 + r < N; ++r)
      y[b * 16 + r] = sums[(b - b0) * 16 + r] + (bias ? bias[b * 16 + r] : 0.0f);
}

using VqBlocksFn = void (*)(const VqLayout&, const float*, int64_t, int64_t, int64_t, int64_t, float*, const float*);

static VqBlocksFn vq_lookup_blocks_for(int64_t entries) {
  switch (entries) {
    case 32: return &vq_lookup_blocks_t<1>;
    case 64: return &vq_lookup_blocks_t<2>;
    case 128: return &vq_lookup_blocks_t<4>;
    default: return &vq_lookup_blocks_t<8>;
  }
}
#endif

// Rows n0..n1 of the float32 weight into out[(n - n0) * out_stride + k].
template <int D, bool NIBBLES>
static void vq_dequantize_rows(const VqLayout& L, int64_t n0, int64_t n1, float* out, int64_t out_stride) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = L.codes + n * L.row_bytes;
    float* o = out + (n - n0) * out_stride;
    int64_t j = 0;
    for (int64_t g = 0; g < L.groups; ++g) {
      const float* t = L.tables + (L.shared ? g : n * L.groups + g) * L.table_floats;
      for (int64_t c = 0; c < L.group / D; ++c, ++j, o += D) {
        const float* v = t + code_at<D, NIBBLES>(row, j) * D;
        for (int e = 0; e < D; ++e) o[e] = v[e];
      }
    }
  }
}

template <int D, bool NIBBLES>
static VqKernels vq_kernels_of() {
  return VqKernels{{&vq_dot_rows<D, NIBBLES, 1>, &vq_dot_rows<D, NIBBLES, 2>, &vq_dot_rows<D, NIBBLES, 3>,
                    &vq_dot_rows<D, NIBBLES, 4>},
                   &vq_dequantize_rows<D, NIBBLES>};
}

using VqProductsFn = void (*)(const VqLayout&, const float*, int64_t, int64_t, float*);

static VqProductsFn vq_dot_products_for(int vector_dim) {
  switch (vector_dim) {
    case 1: return &vq_dot_products<1>;
    case 2: return &vq_dot_products<2>;
    case 4: return &vq_dot_products<4>;
    case 8: return &vq_dot_products<8>;
    default: return &vq_dot_products<16>;
  }
}

static VqKernels vq_kernels_for(int vector_dim, bool nibbles) {
#define LOWBIT_VQ_CASE(D)                                                      \
  if (vector_dim == D) return nibbles ? vq_kernels_of<D, true>() : vq_kernels_of<D, false>();
  LOWBIT_VQ_CASE(1)
  LOWBIT_VQ_CASE(2)
  LOWBIT_VQ_CASE(4)
  LOWBIT_VQ_CASE(8)
  LOWBIT_VQ_CASE(16)
#undef LOWBIT_VQ_CASE
  return VqKernels{};
}
