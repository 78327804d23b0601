// The Python module of hearthlm's AVX-512 kernels (kernels/cpu.py loads it on CPUs that have AVX-512 VNNI).
#include <torch/extension.h>

#include "gemm_avx512.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_gemm", &quant_gemm, "x [..., K] @ W^T (+ bias) for a quantized W [N, K] -> [..., N] float32 (VNNI)",
        py::call_guard<py::gil_scoped_release>());
  m.def("bf16_gemm", &bf16_gemm,
        "x [..., K] @ W^T (+ bias) for a bfloat16 W [N, K] -> [..., N] float32 (AMX or AVX512-BF16)",
        py::call_guard<py::gil_scoped_release>());
  m.def("avx512_bf16_available", &avx512_bf16_available, "whether the CPU has AVX512-BF16 (VDPBF16PS)");
  m.def("amx_available", &amx_available, "whether the AMX tile unit may be used in this process");
}
