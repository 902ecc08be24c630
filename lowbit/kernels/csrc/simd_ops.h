// SIMD primitives for one instruction set, included once per target by lowbit_cpu.cpp inside a
// namespace and a `#pragma GCC target` region, so the same kernel template compiles for AVX2 and
// AVX-512. A "unit" is 16 codes; `decode*` turn one unit of the prepared layout into NV vectors of
// W float lanes (NV * W == 16) of final weights:
//   4 bits: 8 bytes read as one little-endian uint64: nibble j of its low half is code 2j, nibble j
//           of its high half code 2j + 1, so one broadcast and one variable shift put code i in
//           lane i (only the low 4 bits of a lane matter: the lookup ignores the rest).
//   3 bits: 6 bytes, lowbit's own packing (codes 8k..8k+7 in a 24-bit little-endian word, code i
//           at bits 3i..3i+2); the 4-byte loads read one byte past a unit, hence the prepared tail
//           pad. The lookup table repeats its 8 values, so bit 3 of a lane need not be masked.
//   8 bits: 16 bytes, one code each.
// 3- and 4-bit units are decoded through a 16-entry table of the group's final weights (`Lut`,
// rebuilt per group); 8-bit units by conversion, then the group's scale and zero.

#if SIMD_WIDTH == 16
struct V {
  using F = __m512;
  static constexpr int W = 16, NV = 1;
  struct Lut { __m512 t; };
  static inline F zero() { return _mm512_setzero_ps(); }
  static inline F set1(float a) { return _mm512_set1_ps(a); }
  static inline F load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, F a) { _mm512_storeu_ps(p, a); }
  static inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static inline F add(F a, F b) { return _mm512_add_ps(a, b); }
  static inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static inline F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float hsum(F a) { return _mm512_reduce_add_ps(a); }
  template <class Op> static inline Lut map_lut(const float* base, Op op) { return Lut{op(_mm512_loadu_ps(base))}; }

  static inline void decode4(const uint8_t* p, const Lut& lut, F* v) {
    uint64_t b;
    std::memcpy(&b, p, 8);
    const __m512i shifts = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
    v[0] = _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(static_cast<long long>(b)), shifts), lut.t);
  }
  static inline void decode3(const uint8_t* p, const Lut& lut, F* v) {
    uint32_t w0, w1;
    std::memcpy(&w0, p, 4);
    std::memcpy(&w1, p + 3, 4);
    const __m512i shifts = _mm512_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21, 0, 3, 6, 9, 12, 15, 18, 21);
    const __m512i w = _mm512_mask_set1_epi32(_mm512_set1_epi32(static_cast<int>(w0)), 0xFF00, static_cast<int>(w1));
    v[0] = _mm512_permutexvar_ps(_mm512_srlv_epi32(w, shifts), lut.t);
  }
  static inline void decode8(const uint8_t* p, F* v) {
    v[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
};
#else
struct V {
  using F = __m256;
  static constexpr int W = 8, NV = 2;
  struct Lut { __m256 lo, hi; };
  static inline F zero() { return _mm256_setzero_ps(); }
  static inline F set1(float a) { return _mm256_set1_ps(a); }
  static inline F load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, F a) { _mm256_storeu_ps(p, a); }
  static inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static inline F add(F a, F b) { return _mm256_add_ps(a, b); }
  static inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static inline F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static inline float hsum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  template <class Op> static inline Lut map_lut(const float* base, Op op) {
    return Lut{op(_mm256_loadu_ps(base)), op(_mm256_loadu_ps(base + 8))};
  }

  // 16-entry lookup from two 8-entry permutes; bit 3 of the index (moved to the sign bit) picks the half.
  static inline F lookup(__m256i idx, const Lut& lut) {
    const __m256 lo = _mm256_permutevar8x32_ps(lut.lo, idx);
    const __m256 hi = _mm256_permutevar8x32_ps(lut.hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  }
  static inline void decode4(const uint8_t* p, const Lut& lut, F* v) {
    uint64_t b;
    std::memcpy(&b, p, 8);
    const __m256i w = _mm256_set1_epi64x(static_cast<long long>(b));
    v[0] = lookup(_mm256_srlv_epi32(w, _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12)), lut);
    v[1] = lookup(_mm256_srlv_epi32(w, _mm256_setr_epi32(16, 16, 20, 20, 24, 24, 28, 28)), lut);
  }
  static inline void decode3(const uint8_t* p, const Lut& lut, F* v) {
    uint32_t w0, w1;
    std::memcpy(&w0, p, 4);
    std::memcpy(&w1, p + 3, 4);
    const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    v[0] = _mm256_permutevar8x32_ps(lut.lo, _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w0)), shifts));
    v[1] = _mm256_permutevar8x32_ps(lut.lo, _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w1)), shifts));
  }
  static inline void decode8(const uint8_t* p, F* v) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
    v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
  }
};
#endif
