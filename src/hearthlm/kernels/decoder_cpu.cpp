// One decode step of a pre-norm decoder layer in a single call: the dense layers of Llama, Mistral, Qwen2/2.5/3,
// Gemma 3 and Gemma 4 (decoder_cpu.h spells out what it computes).
//
// At decode a small model's arithmetic is cheap and its per-op overhead is not: run from Python, a layer makes
// about twenty calls (modules, views, kernels), and on Qwen2.5-0.5B those cost 4-5 ms of a 22 ms token at
// 2 threads. This chains the same kernels, in the same order and on the same intermediate values, as the
// layer-by-layer path, so the two agree bit for bit (tests/test_decode_step.py); only the Python between
// them is gone.
#include "decoder_cpu.h"

#include <torch/types.h>

#include <string>
#include <utility>
#include <vector>

#include "cpu_kernels.h"

torch::Tensor DecodeLinear::operator()(const torch::Tensor& x) const {
  if (!parts.empty()) {  // as layers.linear runs a RowConcat: each part, concatenated, then the bias
    std::vector<torch::Tensor> outs;
    for (const auto& part : parts) outs.push_back(part(x));
    auto y = torch::cat(outs, -1);
    return bias.has_value() ? y + *bias : y;
  }
  if (!bits) return gemv(x, weight, bias);
  // On AVX2 more rows than kQuantGemvRowsAvx2 take the integer GEMM, as quant_linear gives them.
  if (x.numel() > kQuantGemvRowsAvx2 * x.size(-1) && !avx512_path())
    return quant_gemm_avx2(x, weight, *scales, mins, bits, group, bias);
  return quant_gemv(x, weight, *scales, mins, bits, group, bias);
}

DecodeLinear::DecodeLinear(std::vector<DecodeLinear> parts, c10::optional<torch::Tensor> bias)
    : bias(std::move(bias)), parts(std::move(parts)) {
  TORCH_CHECK(!this->parts.empty(), "DecodeLinear: no parts");
}

DecodeLinear::DecodeLinear(torch::Tensor weight, c10::optional<torch::Tensor> scales, c10::optional<torch::Tensor> mins,
                           int64_t bits, int64_t group, c10::optional<torch::Tensor> bias)
    : weight(std::move(weight)), scales(std::move(scales)), mins(std::move(mins)), bias(std::move(bias)), bits(bits),
      group(group) {
  TORCH_CHECK(bits == 0 || this->scales.has_value(), "DecodeLinear: a quantized weight needs its scales");
  TORCH_CHECK(!this->bias.has_value() || this->bias->scalar_type() == torch::kFloat32,
              "DecodeLinear: bias must be float32");
}

DecoderLayer::DecoderLayer(torch::Tensor attn_norm, torch::Tensor mlp_norm, DecodeLinear qkv, DecodeLinear o,
                           DecodeLinear gate_up, DecodeLinear down, int64_t heads, int64_t kv_heads, int64_t head_dim,
                           double eps, double scale, std::string act, c10::optional<torch::Tensor> attn_out_norm,
                           c10::optional<torch::Tensor> mlp_out_norm, c10::optional<torch::Tensor> q_norm,
                           c10::optional<torch::Tensor> k_norm, bool v_norm, bool k_eq_v, bool shared,
                           std::optional<DecodeLinear> ple_gate, std::optional<DecodeLinear> ple_out,
                           c10::optional<torch::Tensor> ple_norm, c10::optional<torch::Tensor> scalar)
    : attn_norm(std::move(attn_norm)), mlp_norm(std::move(mlp_norm)), attn_out_norm(std::move(attn_out_norm)),
      mlp_out_norm(std::move(mlp_out_norm)), q_norm(std::move(q_norm)), k_norm(std::move(k_norm)),
      ple_norm(std::move(ple_norm)), scalar(std::move(scalar)), v_norm(v_norm), k_eq_v(k_eq_v), shared(shared),
      qkv(std::move(qkv)), o(std::move(o)), gate_up(std::move(gate_up)), down(std::move(down)),
      ple_gate(std::move(ple_gate)), ple_out(std::move(ple_out)), heads(heads), kv_heads(kv_heads),
      head_dim(head_dim), eps(eps), scale(scale), act(std::move(act)) {
  TORCH_CHECK(this->act == "silu" || this->act == "gelu_tanh", "DecoderLayer: unknown activation ", this->act);
  TORCH_CHECK(this->ple_gate.has_value() == this->ple_out.has_value() &&
                  this->ple_gate.has_value() == this->ple_norm.has_value(),
              "DecoderLayer: a per-layer input needs ple_gate, ple_out and ple_norm");
}

torch::Tensor DecoderLayer::decode(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor K,
                                   torch::Tensor V, c10::optional<torch::Tensor> write,
                                   c10::optional<torch::Tensor> read_slots, int64_t read_start, int64_t S,
                                   c10::optional<torch::Tensor> mask, c10::optional<torch::Tensor> ple) const {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 3 && x.size(1) == 1,
              "DecoderLayer.decode: x must be float32 [B, 1, hidden]");
  TORCH_CHECK(shared != write.has_value(), "DecoderLayer.decode: a layer writes its new K/V unless it is shared");
  TORCH_CHECK(ple.has_value() == ple_gate.has_value(), "DecoderLayer.decode: ple must be given iff the layer has one");
  const int64_t B = x.size(0), D = head_dim, q_width = heads * D, kv_width = kv_heads * D;
  const int64_t width = q_width + (shared ? 0 : k_eq_v ? kv_width : 2 * kv_width);

  // Attention: one GEMV for q, k and v; per-head norms, RoPE, the step's K/V into its cache slots.
  auto h = qkv(rms_norm(x, attn_norm, eps));
  TORCH_CHECK(h.size(-1) == width, "DecoderLayer.decode: qkv gives ", h.size(-1), " outputs, not ", width);
  auto q = h.narrow(-1, 0, q_width).view({B, 1, heads, D});
  if (q_norm.has_value()) q = rms_norm(q, q_norm, eps);
  q = rope(q, cos, sin);
  if (!shared) {
    auto k = h.narrow(-1, q_width, kv_width).view({B, 1, kv_heads, D});
    auto v = k_eq_v ? k : h.narrow(-1, q_width + kv_width, kv_width).view({B, 1, kv_heads, D});
    if (k_norm.has_value()) k = rms_norm(k, k_norm, eps);
    if (v_norm) v = rms_norm(v, c10::nullopt, eps);
    k = rope(k, cos, sin);
    kv_store(K, V, *write, k.reshape({-1, kv_heads, D}), v.reshape({-1, kv_heads, D}));
  }

  // Every row's readable slots: one run [read_start, read_start + S) of a single row, or a slot per key.
  auto q1 = q.select(1, 0);
  auto attn = read_slots.has_value()
                  ? paged_decode_attention(q1, K, V, read_slots->view({B, S}), mask, scale)
                  : decode_attention(q1, K.narrow(1, read_start, S).unsqueeze(0), V.narrow(1, read_start, S).unsqueeze(0),
                                     mask, scale);
  auto a = o(attn.reshape({B, 1, q_width}));
  x = x + (attn_out_norm.has_value() ? rms_norm(a, attn_out_norm, eps) : a);

  // The gated MLP.
  auto m = down(act_mul(gate_up(rms_norm(x, mlp_norm, eps)), act));
  x = x + (mlp_out_norm.has_value() ? rms_norm(m, mlp_out_norm, eps) : m);

  if (ple_gate.has_value()) {  // Gemma 4's per-layer input, with the elementwise activation PyTorch's own
    auto g = (*ple_gate)(x);
    g = act == "silu" ? at::silu(g) : at::gelu(g, "tanh");
    x = x + rms_norm((*ple_out)(g * *ple), ple_norm, eps);
  }
  return scalar.has_value() ? x * *scalar : x;
}
