// The kernels proper, written once over the primitives of simd_ops.h (struct V) and compiled once
// per instruction set. Every kernel decodes a unit to the exact float32 weights the reference
// `QuantizedWeight.dequantize` produces (same operations in the same order, no FMA contraction):
//   MODE_LUT:  w = lut[q] * s          (NF4, FP4; lut codebooks: a table per group, s = 1)
//   MODE_INT:  w = (q - z) * s         (int: z = the grid offset when symmetric, the zero-point when not)
//   MODE_FMIN: w = q * s + m           (int with a float minimum)
// so a kernel differs from the reference only in the order of the float32 sums.

// A group's decoding state: its 16 final weights for 3- and 4-bit codes, its scale, zero and
// minimum (broadcast) for 8-bit codes.
struct Group {
  V::Lut lut;
  V::F s, z, m;
};

template <int BITS, int MODE>
static inline Group group_state(const Layout& L, int64_t gi) {
  Group G{};
  const float s = L.scale[gi];
  const float z = MODE == MODE_INT ? L.zsub[gi] : 0.0f;
  const float m = MODE == MODE_FMIN ? L.fmin[gi] : 0.0f;
  G.s = V::set1(s);
  G.z = V::set1(z);
  G.m = V::set1(m);
  if constexpr (BITS != 8) {
    const V::F sv = G.s, zv = G.z, mv = G.m;
    G.lut = V::map_lut(L.lut + gi * L.lut_stride, [&](V::F t) {
      if constexpr (MODE == MODE_LUT) return V::mul(t, sv);
      else if constexpr (MODE == MODE_INT) return V::mul(V::sub(t, zv), sv);
      else return V::add(V::mul(t, sv), mv);
    });
  }
  return G;
}

template <int BITS, int MODE>
static inline void decode_unit(const uint8_t* p, const Group& G, V::F* w) {
  if constexpr (BITS == 4) V::decode4(p, G.lut, w);
  else if constexpr (BITS == 3) V::decode3(p, G.lut, w);
  else {
    V::decode8(p, w);
    for (int i = 0; i < V::NV; ++i) {
      if constexpr (MODE == MODE_INT) w[i] = V::mul(V::sub(w[i], G.z), G.s);
      else w[i] = V::add(V::mul(w[i], G.s), G.m);
    }
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
  const int64_t upg = L.units_per_group;
  for (int64_t n = n0; n < n1; ++n) {
    V::F acc[MB][A];
    for (int m = 0; m < MB; ++m)
      for (int k = 0; k < A; ++k) acc[m][k] = V::zero();
    const uint8_t* p = L.codes + n * L.row_bytes;
    const float* xg = x;
    for (int64_t g = 0; g < L.groups; ++g) {
      const Group G = group_state<BITS, MODE>(L, n * L.groups + g);
      int64_t u = 0;
      for (; u + U <= upg; u += U, p += U * UB) {
        V::F w[A];
        for (int j = 0; j < U; ++j) decode_unit<BITS, MODE>(p + j * UB, G, w + j * V::NV);
        for (int m = 0; m < MB; ++m)
          for (int k = 0; k < A; ++k)
            acc[m][k] = V::fmadd(w[k], V::load(xg + m * x_stride + u * 16 + k * V::W), acc[m][k]);
      }
      for (; u < upg; ++u, p += UB) {
        V::F w[V::NV];
        decode_unit<BITS, MODE>(p, G, w);
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
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = L.codes + n * L.row_bytes;
    float* o = out + (n - n0) * out_stride;
    for (int64_t g = 0; g < L.groups; ++g) {
      const Group G = group_state<BITS, MODE>(L, n * L.groups + g);
      for (int64_t u = 0; u < L.units_per_group; ++u, p += UB, o += 16) {
        V::F w[V::NV];
        decode_unit<BITS, MODE>(p, G, w);
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
  LOWBIT_CASE(3, MODE_LUT)
  LOWBIT_CASE(4, MODE_INT)
  LOWBIT_CASE(4, MODE_FMIN)
  LOWBIT_CASE(8, MODE_INT)
  LOWBIT_CASE(8, MODE_FMIN)
  LOWBIT_CASE(3, MODE_INT)
  LOWBIT_CASE(3, MODE_FMIN)
#undef LOWBIT_CASE
  return Kernels{};
}
