// The small operations of one decode step, fused so that a token costs a few dispatches per layer,
// not dozens (lowbit/evaluate/lean_decode.py). Float32, CPU, AVX2 + FMA; each states the float
// operations it performs, so its result can be compared with the transformers modules it replaces.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(),
              "lowbit_kernels: ", name, " must be a contiguous float32 CPU tensor");
}

// hidden += delta (when given), then returns w * (hidden / sqrt(mean(hidden^2) + eps)), row by row:
// the residual add and Llama's RMSNorm (computed in float32, as transformers does for float32).
at::Tensor add_rms_norm(at::Tensor& hidden, const std::optional<at::Tensor>& delta, const at::Tensor& weight,
                        double eps) {
  check_float(hidden, "hidden");
  check_float(weight, "weight");
  const int64_t d = weight.numel();
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(1) == d, "lowbit_kernels: hidden must be [n, ", d, "]");
  float* h = hidden.data_ptr<float>();
  if (delta) {
    check_float(*delta, "delta");
    TORCH_CHECK(delta->sizes() == hidden.sizes(), "lowbit_kernels: delta and hidden differ in shape");
    const float* dd = delta->data_ptr<float>();
    for (int64_t i = 0; i < hidden.numel(); ++i) h[i] += dd[i];
  }
  at::Tensor out = at::empty_like(hidden);
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t r = 0; r < hidden.size(0); ++r, h += d, o += d) {
    float squares = 0.0f;
    for (int64_t k = 0; k < d; ++k) squares += h[k] * h[k];
    const float inv = 1.0f / std::sqrt(squares / static_cast<float>(d) + static_cast<float>(eps));
    for (int64_t k = 0; k < d; ++k) o[k] = w[k] * (h[k] * inv);
  }
  return out;
}

// v = v * c + rotate_half(v) * s for one head of 2 * half values, rotate_half(v) = cat(-v2, v1).
inline void rotate(float* v, const float* c, const float* s, int64_t half) {
  for (int64_t k = 0; k < half; ++k) {
    const float x1 = v[k], x2 = v[k + half];
    v[k] = x1 * c[k] + (-x2) * s[k];
    v[k + half] = x2 * c[k + half] + x1 * s[k + half];
  }
}

// In place, for every row and head of x [n, heads, d]: x = x * cos + rotate_half(x) * sin, with
// rotate_half(x) = cat(-x2, x1) and cos, sin [n, d]: the rotary embedding as transformers applies it.
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_float(x, "x");
  check_float(cos, "cos");
  check_float(sin, "sin");
  const int64_t n = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  TORCH_CHECK(x.dim() == 3 && d % 2 == 0 && cos.numel() == n * d && sin.numel() == n * d,
              "lowbit_kernels: rotary_ needs x [n, heads, d] and cos, sin [n, d]");
  float* p = x.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < heads; ++h) rotate(p + (i * heads + h) * d, cos.data_ptr<float>() + i * d,
                                               sin.data_ptr<float>() + i * d, half);
}

// decode_attention for G query heads per kv head (a compile-time G keeps its accumulators in
// registers; `group` > G: each query head on its own, G = 1).
template <int G>
void attend(const at::Tensor& q, const at::Tensor& keys_t, const at::Tensor& values, int64_t start, int64_t length,
            float scale, at::Tensor& out, int64_t group = G) {
  const int64_t heads = q.size(0), d = q.size(1), kv_heads = keys_t.size(0), max_length = keys_t.size(2);
  const int64_t padded = (length + 7) / 8 * 8, seen = length - start;
  at::Tensor scores = at::empty({heads, padded}, q.options());
  float* sc = scores.data_ptr<float>();
  const float* qd = q.data_ptr<float>();
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t h0 = 0; h0 < heads; h0 += G) {  // G query heads reading one kv head
    const float* kt = keys_t.data_ptr<float>() + (h0 / group) * d * max_length;
    for (int64_t t0 = start / 8 * 8; t0 < padded; t0 += 8) {
      __m256 acc[G];
      for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
      for (int64_t k = 0; k < d; ++k) {
        const __m256 keys8 = _mm256_loadu_ps(kt + k * max_length + t0);
        for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_set1_ps(qd[(h0 + g) * d + k]), keys8, acc[g]);
      }
      for (int g = 0; g < G; ++g) _mm256_storeu_ps(sc + (h0 + g) * padded + t0, _mm256_mul_ps(acc[g], s));
    }
  }
  const at::Tensor probs = at::softmax(scores.narrow(1, start, seen), -1).contiguous();
  const float* pd = probs.data_ptr<float>();
  float* od = out.data_ptr<float>();
  for (int64_t h0 = 0; h0 < heads; h0 += G) {
    const float* vbase = values.data_ptr<float>() + (h0 / group) * max_length * d;
    for (int64_t c0 = 0; c0 < d; c0 += 8) {
      __m256 acc[G];
      for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
      for (int64_t t = start; t < length; ++t) {
        const __m256 v = _mm256_loadu_ps(vbase + t * d + c0);
        for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_set1_ps(pd[(h0 + g) * seen + t - start]), v, acc[g]);
      }
      for (int g = 0; g < G; ++g) _mm256_storeu_ps(od + (h0 + g) * d + c0, acc[g]);
    }
  }
}

// One query per head against positions start..length-1 of a KV cache: q [heads, d], keys_t
// [kv_heads, d, max_length] (keys stored transposed, so scores of 8 positions are one vector) and
// values [kv_heads, max_length, d], max_length a multiple of 8; query head h reads kv head
// h / (heads / kv_heads). Returns softmax(q k^T * scale) v, [heads, d]. No mask: a single new
// position sees every earlier one (start 0), or the last length - start of them (a sliding window).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys_t, const at::Tensor& values, int64_t length,
                            double scale, int64_t start) {
  check_float(q, "q");
  check_float(keys_t, "keys_t");
  check_float(values, "values");
  const int64_t heads = q.size(0), d = q.size(1), kv_heads = keys_t.size(0), max_length = keys_t.size(2);
  TORCH_CHECK(q.dim() == 2 && keys_t.dim() == 3 && values.dim() == 3 && keys_t.size(1) == d &&
                  values.size(0) == kv_heads && values.size(1) == max_length && values.size(2) == d && d % 8 == 0 &&
                  max_length % 8 == 0 && heads % kv_heads == 0 && start >= 0 && start < length && length <= max_length,
              "lowbit_kernels: decode_attention needs q [heads, d], keys_t [kv_heads, d, max_length], values "
              "[kv_heads, max_length, d], d and max_length multiples of 8, 0 <= start < length <= max_length");
  const int64_t group = heads / kv_heads;
  at::Tensor out = at::empty({heads, d}, q.options());
  switch (group) {  // the query heads of one kv head share each load of its keys and values
    case 1: attend<1>(q, keys_t, values, start, length, static_cast<float>(scale), out); break;
    case 2: attend<2>(q, keys_t, values, start, length, static_cast<float>(scale), out); break;
    case 3: attend<3>(q, keys_t, values, start, length, static_cast<float>(scale), out); break;
    case 4: attend<4>(q, keys_t, values, start, length, static_cast<float>(scale), out); break;
    case 6: attend<6>(q, keys_t, values, start, length, static_cast<float>(scale), out); break;
    case 8: attend<8>(q, keys_t, values, start, length, static_cast<float>(scale), out); break;
    default: attend<1>(q, keys_t, values, start, length, static_cast<float>(scale), out, group);
  }
  return out;
}

// One decode position of attention from the q/k/v products' output: qkv [1, (heads + 2 kv_heads) d]
// (q, then k, then v heads); rotates q and k (as rotary_), writes k and v at `position` of the
// caches (layouts of decode_attention) and returns decode_attention over positions 0..position,
// [1, heads d]. Part of decode_layer.
at::Tensor attention_step(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& keys_t,
                          at::Tensor& values, int64_t position, int64_t heads, double scale) {
  check_float(qkv, "qkv");
  check_float(keys_t, "keys_t");
  check_float(values, "values");
  const int64_t kv_heads = keys_t.size(0), d = keys_t.size(1), capacity = keys_t.size(2);
  TORCH_CHECK(qkv.numel() == (heads + 2 * kv_heads) * d && cos.numel() == d && sin.numel() == d &&
                  position >= 0 && position < capacity,
              "lowbit_kernels: attention_step got qkv of ", qkv.numel(), " values for ", heads, " + 2 x ", kv_heads,
              " heads of ", d, ", or a position outside the cache");
  at::Tensor q = qkv.narrow(1, 0, heads * d).reshape({heads, d}).clone();
  float* qd = q.data_ptr<float>();
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.device().is_cpu(),
              "lowbit_kernels: attention_step needs float32 CPU cos and sin");
  const at::Tensor cos_c = cos.contiguous(), sin_c = sin.contiguous();  // kept alive while read
  const float* c = cos_c.data_ptr<float>();
  const float* sn = sin_c.data_ptr<float>();
  for (int64_t h = 0; h < heads; ++h) rotate(qd + h * d, c, sn, d / 2);
  const float* kv = qkv.data_ptr<float>() + heads * d;
  float k[1024];
  TORCH_CHECK(d <= 1024, "lowbit_kernels: head size above 1024");
  for (int64_t h = 0; h < kv_heads; ++h) {
    std::copy(kv + h * d, kv + (h + 1) * d, k);
    rotate(k, c, sn, d / 2);
    float* kt = keys_t.data_ptr<float>() + h * d * capacity + position;
    for (int64_t j = 0; j < d; ++j) kt[j * capacity] = k[j];
    std::copy(kv + (kv_heads + h) * d, kv + (kv_heads + h + 1) * d, values.data_ptr<float>() + (h * capacity + position) * d);
  }
  return decode_attention(q, keys_t, values, position + 1, scale, 0).reshape({1, heads * d});
}

// One part of a product of decode_layer, from its slice of `weights` (6 tensors) and `meta` (5 ints):
//   kind 0: lowbit's float-activation layout (`linear`): codes, scale, lut, zsub, fmin, bias; bits, group,
//           group_padded, mode;
//   kind 1: the integer-activation layout (`linear_int8x`): codes, scale, corr, zsub, fmin, bias; bits,
//           group, out_features, act_bits;
//   kind 2: a float weight [out, in] (`at::linear`): weight, -, -, -, -, bias;
//   kind 3 (every row reads its column group's codebook) and 4 (codebooks per row): a `vq` layout
//           (`linear_vq`): codes, tables, tables_t, codes_t, -, bias; bits, vector_dim, groups, out_features.
at::Tensor part_product(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& w, const int64_t* m,
                        int64_t part) {
  auto t = [&](int i) { return w.get(part * 6 + i); };
  const int64_t kind = m[0];
  if (kind == 2) return at::linear(x, *t(0), t(5));
  if (kind == 3 || kind == 4) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lowbit_kernels::linear_vq", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
                                           int64_t, int64_t, bool, int64_t, const std::optional<at::Tensor>&, int64_t,
                                           int64_t)>();
    return op.call(x, *t(0), *t(1), t(2), t(3), m[1], m[2], m[3], kind == 3, m[4], t(5), 1 << 30, 16);
  }
  if (kind == 1) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lowbit_kernels::linear_int8x", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
                                           int64_t, int64_t, int64_t, const std::optional<at::Tensor>&, int64_t,
                                           int64_t)>();
    return op.call(x, *t(0), *t(1), *t(2), t(3), t(4), m[1], m[2], m[3], m[4], t(5), 1 << 30, 16);
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lowbit_kernels::linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, int64_t,
                                         const std::optional<at::Tensor>&, int64_t, int64_t, bool)>();
  return op.call(x, *t(0), *t(1), t(3), t(4), t(2), m[1], m[4], m[2], m[3], t(5), 1 << 30, 16, false);
}

// One token through one Llama decoder layer with a SiLU MLP (decode_step runs it per layer): x = norm1(hidden +=
// delta); attention_step on qkv(x); x = norm2(hidden += o(attention)); returns down(silu(gate(x)) *
// up(x)), the next delta. The four products (qkv, o, gate_up, down) are `parts` parts each (their
// outputs side by side; a stacked layout is one part), described as part_product reads them.
at::Tensor decode_layer(at::Tensor& hidden, const std::optional<at::Tensor>& delta, const at::Tensor& norm1,
                        double eps1, const at::Tensor& norm2, double eps2,
                        const c10::List<std::optional<at::Tensor>>& weights, at::IntArrayRef meta,
                        at::IntArrayRef parts, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& keys_t,
                        at::Tensor& values, int64_t position, int64_t heads, double scale) {
  TORCH_CHECK(parts.size() == 4 && hidden.size(0) == 1, "lowbit_kernels: decode_layer takes one token, 4 products");
  int64_t first[5] = {0, 0, 0, 0, 0};
  for (int i = 0; i < 4; ++i) first[i + 1] = first[i] + parts[i];
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == first[4] * 6 && static_cast<int64_t>(meta.size()) == first[4] * 5,
              "lowbit_kernels: decode_layer got ", weights.size(), " tensors and ", meta.size(), " ints for ",
              first[4], " parts");
  auto product = [&](int i, const at::Tensor& x) {
    if (parts[i] == 1) return part_product(x, weights, meta.data() + first[i] * 5, first[i]);
    std::vector<at::Tensor> outs;
    for (int64_t p = first[i]; p < first[i + 1]; ++p) outs.push_back(part_product(x, weights, meta.data() + p * 5, p));
    return at::cat(outs, 1);
  };
  at::Tensor x = add_rms_norm(hidden, delta, norm1, eps1);
  at::Tensor attention = attention_step(product(0, x), cos, sin, keys_t, values, position, heads, scale);
  x = add_rms_norm(hidden, product(1, attention), norm2, eps2);
  const at::Tensor gate_up = product(2, x);
  const int64_t inner = gate_up.size(1) / 2;
  const at::Tensor act = at::silu(gate_up.narrow(1, 0, inner)).mul_(gate_up.narrow(1, inner, inner));
  return product(3, act);
}

// Every layer's decode_layer arguments but the token's, gathered once, so a token crosses from Python
// to C++ once for the whole stack (decode_step) instead of once per layer with two dozen arguments.
struct DecoderPlan : torch::CustomClassHolder {
  struct Layer {
    at::Tensor norm1, norm2;
    double eps1, eps2;
    c10::List<std::optional<at::Tensor>> weights;
    std::vector<int64_t> meta, parts;
    at::Tensor keys_t, values;
  };
  std::vector<Layer> layers;

  void add_layer(at::Tensor norm1, double eps1, at::Tensor norm2, double eps2,
                 c10::List<std::optional<at::Tensor>> weights, std::vector<int64_t> meta, std::vector<int64_t> parts,
                 at::Tensor keys_t, at::Tensor values) {
    layers.push_back(Layer{std::move(norm1), std::move(norm2), eps1, eps2, std::move(weights), std::move(meta),
                           std::move(parts), std::move(keys_t), std::move(values)});
  }
};

// One token through every layer of `plan`: hidden [1, hidden] is updated as decode_layer does; returns
// the last layer's MLP output (add it to hidden for the final norm).
at::Tensor decode_step(const c10::intrusive_ptr<DecoderPlan>& plan, at::Tensor& hidden, const at::Tensor& cos,
                       const at::Tensor& sin, int64_t position, int64_t heads, double scale) {
  std::optional<at::Tensor> delta;
  for (DecoderPlan::Layer& L : plan->layers)
    delta = decode_layer(hidden, delta, L.norm1, L.eps1, L.norm2, L.eps2, L.weights, L.meta, L.parts, cos, sin,
                         L.keys_t, L.values, position, heads, scale);
  TORCH_CHECK(delta.has_value(), "lowbit_kernels: decode_step got a plan without layers");
  return *delta;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit_kernels, m) {
  m.def("add_rms_norm(Tensor(a!) hidden, Tensor? delta, Tensor weight, float eps) -> Tensor");
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("decode_attention(Tensor q, Tensor keys_t, Tensor values, int length, float scale, int start=0) -> Tensor");
  m.class_<DecoderPlan>("DecoderPlan").def(torch::init<>()).def("add_layer", &DecoderPlan::add_layer);
  m.def("decode_step(__torch__.torch.classes.lowbit_kernels.DecoderPlan plan, Tensor(a!) hidden, Tensor cos, "
        "Tensor sin, int position, int heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_kernels, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_", &rotary_);
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_step", &decode_step);
}
