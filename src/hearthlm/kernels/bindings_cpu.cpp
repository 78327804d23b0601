// The Python module of hearthlm's CPU kernels (kernels/cpu.py loads it).
#include <torch/extension.h>

#include "cpu_kernels.h"
#include "decoder_cpu.h"

#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "threadpool.h"

namespace {

// Test hook for the thread pool (tests/test_threadpool.py): `jobs` jobs of n chunks in a row, each chunk busy for
// `work_us`. Returns how often each chunk ran ([jobs, n] int32), how many threads ran chunks, and whether every
// nested job (one per chunk, if `nested`) ran on its chunk's thread. Chunk `throw_at` of the last job throws.
std::tuple<torch::Tensor, int64_t, bool> pool_check(int64_t n, int64_t jobs, double work_us, bool nested,
                                                    int64_t throw_at) {
  std::vector<std::atomic<int>> runs(n * jobs);
  std::set<std::thread::id> ids;
  std::mutex ids_lock;
  std::atomic<bool> inline_nested{true};
  for (int64_t j = 0; j < jobs; ++j)
    hearth::parallel_for(0, n, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        TORCH_CHECK(!(j == jobs - 1 && c == throw_at), "pool_check: chunk ", c, " throws");
        const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double, std::micro>(work_us);
        while (std::chrono::steady_clock::now() < until) {
        }
        const auto me = std::this_thread::get_id();
        if (nested)
          hearth::parallel_for(0, 64, 1, [&](int64_t, int64_t) {
            if (std::this_thread::get_id() != me) inline_nested = false;
          });
        runs[j * n + c]++;
        std::lock_guard<std::mutex> hold(ids_lock);
        ids.insert(me);
      }
    });
  auto out = torch::empty({jobs, n}, torch::kInt32);
  for (int64_t i = 0; i < n * jobs; ++i) out.data_ptr<int32_t>()[i] = runs[i].load();
  return {out, static_cast<int64_t>(ids.size()), inline_nested.load()};
}

// A kernel that keeps the GIL on decode-sized inputs and lets the other threads run on a prefill's.
template <typename... A>
auto big_without_gil(torch::Tensor (*kernel)(torch::Tensor, A...)) {
  return [kernel](torch::Tensor x, A... a) {
    if (x.numel() < (1 << 16)) return kernel(x, a...);
    py::gil_scoped_release release;
    return kernel(x, a...);
  };
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The long kernels let other Python threads run meanwhile (the server's event loop streams tokens while the
  // engine thread computes); the short ones keep the GIL, whose hand-back would cost more than they do.
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("gemv", &gemv, "x [..., K] @ W[N, K]^T (+ bias) -> [..., N] float32", release);
  m.def("rms_norm", big_without_gil(&rms_norm), "RMSNorm over the last dim (float32)");
  m.def("rope", &rope, "rotate-half RoPE (float32)");
  m.def("decode_attention", &decode_attention, "one-query attention over a KV cache", release);
  m.def("paged_decode_attention", &paged_decode_attention, "one-query attention over a paged KV cache", release);
  m.def("kv_store", &kv_store, "write K/V rows into cache slots");
  m.def("act_mul", &act_mul, "act(gate) * up");
  m.def("softcap_", big_without_gil(&softcap_), "x = cap * tanh(x / cap) in place (float32)");
  m.def("argmax_rows", big_without_gil(&argmax_rows), "the first argmax of each row (float32) -> int64");
  m.def("quant_gemv", &quant_gemv, "x [..., K] @ W^T (+ bias) for a quantized W [N, K] -> [..., N] float32", release);
  m.def("quant_gemm", &quant_gemm_avx2, "x [..., K] @ W^T (+ bias) for a quantized W [N, K], an AVX2 integer GEMM",
        release);
  m.def("half_gemm", &half_gemm_avx2, "x [..., K] @ W^T (+ bias) for a 16-bit W [N, K], float32 sums, AVX2", release);
  m.def("pool_check", &pool_check, "test hook for the thread pool", release);
  m.def("set_gemv_isa", &set_gemv_isa, "the GEMVs' path: \"avx512\" or \"avx2\"");
  m.def("gemv_isa", &gemv_isa, "the GEMVs' path now");
  m.def("dequant_rows", &dequant_rows, "selected rows of a quantized W as float32 [R, K]", release);

  py::class_<DecodeLinear>(m, "DecodeLinear")
      .def(py::init<torch::Tensor, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>, int64_t, int64_t,
                    c10::optional<torch::Tensor>>(),
           py::arg("weight"), py::arg("scales"), py::arg("mins"), py::arg("bits"), py::arg("group"), py::arg("bias"))
      .def(py::init<std::vector<DecodeLinear>, c10::optional<torch::Tensor>>(), py::arg("parts"), py::arg("bias"));
  py::class_<DecoderLayer>(m, "DecoderLayer")
      .def(py::init<torch::Tensor, torch::Tensor, DecodeLinear, DecodeLinear, DecodeLinear, DecodeLinear, int64_t,
                    int64_t, int64_t, double, double, std::string, c10::optional<torch::Tensor>,
                    c10::optional<torch::Tensor>, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>, bool,
                    bool, bool, std::optional<DecodeLinear>, std::optional<DecodeLinear>, c10::optional<torch::Tensor>,
                    c10::optional<torch::Tensor>>(),
           py::kw_only(), py::arg("attn_norm"), py::arg("mlp_norm"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"),
           py::arg("down"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("eps"),
           py::arg("scale"), py::arg("act"), py::arg("attn_out_norm") = py::none(),
           py::arg("mlp_out_norm") = py::none(), py::arg("q_norm") = py::none(), py::arg("k_norm") = py::none(),
           py::arg("v_norm") = false, py::arg("k_eq_v") = false, py::arg("shared") = false,
           py::arg("ple_gate") = py::none(), py::arg("ple_out") = py::none(), py::arg("ple_norm") = py::none(),
           py::arg("scalar") = py::none())
      .def("decode", &DecoderLayer::decode, "one decode step of the layer", release);
}
