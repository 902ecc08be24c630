// The kernels proper, written once over the primitives of simd_ops.h (struct V) and compiled once
// per instruction set. Every kernel decodes a unit to the exact float32 weights the reference
// `QuantizedWeight.dequantize` produces (same operations in the same order, no FMA contraction):
//   MODE_LUT:  w = lut[q] * s          (NF4, FP4)
//   MODE_INT:  w = (q - z) * s         (int: z = the grid offset when symmetric, the zero-point when not)
//   MODE_FMIN: w = q * s + m           (int with a float minimum)
// so a kernel differs from the reference only in the order of the float32 sums.

template <int BITS, int MODE>
static inline void decode_unit(const uint8_t* p, const V::Lut* lut, V::F s, V::F z, V::F m, V::F* w) {
  if constexpr (BITS == 4) V::decode4(p, MODE == MODE_LUT ? lut : nullptr, w);
  else if constexpr (BITS == 8) V::decode8(p, w);
  else V::decode3(p, w);
  for (int i = 0; i < V::NV; ++i) {
    if constexpr (MODE == MODE_LUT) w[i] = V::mul(w[i], s);
    else if constexpr (MODE == MODE_INT) w[i] = V::mul(V::sub(w[i], z), s);
    else w[i] = V::add(V::mul(w[i], s), m);
  }
}

// y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for MB rows of x and output rows n0..n1: the weights
// are decoded once and used MB times. Two accumulators per row of x keep two FMA chains in flight.
template <int BITS, int MODE, int MB>
static void dot_rows(const Layout& L, const float* x, int64_t x_stride, int64_t n0, int64_t n1,
                     float* y, int64_t y_stride, const float* bias) {
  constexpr int UB = 2 * BITS;             // bytes per unit of 16 codes
  constexpr int U = V::NV == 1 ? 2 : 1;    // units per step
  constexpr int A = U * V::NV;             // accumulators per row of x
  V::Lut lut_v{};
  const V::Lut* lut = nullptr;
  if constexpr (MODE == MODE_LUT) { lut_v = V::make_lut(L.lut); lut = &lut_v; }
  const int64_t upg = L.units_per_group;
  for (int64_t n = n0; n < n1; ++n) {
    V::F acc[MB][A];
    for (int m = 0; m < MB; ++m)
      for (int k = 0; k < A; ++k) acc[m][k] = V::zero();
    const uint8_t* p = L.codes + n * L.row_bytes;
    const float* xg = x;
    for (int64_t g = 0; g < L.groups; ++g) {
      const int64_t gi = n * L.groups + g;
      const V::F s = V::set1(L.scale[gi]);
      const V::F z = MODE == MODE_INT ? V::set1(L.zsub[gi]) : s;
      const V::F mn = MODE == MODE_FMIN ? V::set1(L.fmin[gi]) : s;
      int64_t u = 0;
      for (; u + U <= upg; u += U, p += U * UB) {
        V::F w[A];
        for (int j = 0; j < U; ++j) decode_unit<BITS, MODE>(p + j * UB, lut, s, z, mn, w + j * V::NV);
        for (int m = 0; m < MB; ++m)
          for (int k = 0; k < A; ++k)
            acc[m][k] = V::fmadd(w[k], V::load(xg + m * x_stride + u * 16 + k * V::W), acc[m][k]);
      }
      for (; u < upg; ++u, p += UB) {
        V::F w[V::NV];
        decode_unit<BITS, MODE>(p, lut, s, z, mn, w);
        for (int m = 0; m < MB; ++m)
          for (int k = 0; k < V::NV; ++k)
            acc[m][k] = V::fmadd(w[k], V::load(xg + m * x_stride + u * 16 + k * V::W), acc[m][k]);
      }
      xg += upg * 16;
    }
    for (int m = 0; m < MB; ++m) {
      V::F t = acc[m][0];
      for (int k = 1; k < A; ++k) t = V::add(t, acc[m][k]);
      y[m * y_stride + n] = V::hsum(t) + (bias ? bias[n] : 0.0f);
    }
  }
}

// Rows n0..n1 of the float32 weight (groups padded as prepared) into out[(n - n0) * out_stride + k].
template <int BITS, int MODE>
static void dequantize_rows(const Layout& L, int64_t n0, int64_t n1, float* out, int64_t out_stride) {
  constexpr int UB = 2 * BITS;
  V::Lut lut_v{};
  const V::Lut* lut = nullptr;
  if constexpr (MODE == MODE_LUT) { lut_v = V::make_lut(L.lut); lut = &lut_v; }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = L.codes + n * L.row_bytes;
    float* o = out + (n - n0) * out_stride;
    for (int64_t g = 0; g < L.groups; ++g) {
      const int64_t gi = n * L.groups + g;
      const V::F s = V::set1(L.scale[gi]);
      const V::F z = MODE == MODE_INT ? V::set1(L.zsub[gi]) : s;
      const V::F mn = MODE == MODE_FMIN ? V::set1(L.fmin[gi]) : s;
      for (int64_t u = 0; u < L.units_per_group; ++u, p += UB, o += 16) {
        V::F w[V::NV];
        decode_unit<BITS, MODE>(p, lut, s, z, mn, w);
        for (int k = 0; k < V::NV; ++k) V::store(o + k * V::W, w[k]);
      }
    }
  }
}

template <int BITS, int MODE>
static DotFn dot_for_rows(int mb) {
  switch (mb) {
    case 1: return &dot_rows<BITS, MODE, 1>;
    case 2: return &dot_rows<BITS, MODE, 2>;
    case 3: return &dot_rows<BITS, MODE, 3>;
    default: return &dot_rows<BITS, MODE, 4>;
  }
}

// The kernels for one stored format: (bits, mode) -> dot for 1..MAX_MB rows of x, and dequantize.
static Kernels kernels_for(int bits, int mode) {
#define LOWBIT_CASE(B, M)                                                                            \
  if (bits == B && mode == M)                                                                       \
    return Kernels{{dot_for_rows<B, M>(1), dot_for_rows<B, M>(2), dot_for_rows<B, M>(3), dot_for_rows<B, M>(4)}, \
                   &dequantize_rows<B, M>};
  LOWBIT_CASE(4, MODE_LUT)
  LOWBIT_CASE(4, MODE_INT)
  LOWBIT_CASE(4, MODE_FMIN)
  LOWBIT_CASE(8, MODE_INT)
  LOWBIT_CASE(8, MODE_FMIN)
  LOWBIT_CASE(3, MODE_INT)
  LOWBIT_CASE(3, MODE_FMIN)
#undef LOWBIT_CASE
  return Kernels{};
}
