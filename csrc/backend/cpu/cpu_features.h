#pragma once
#include <string>

namespace pyserve::cpu {

// What the CPU *and* the OS allow (cpuid feature bits plus the XCR0 state the kernel enabled).
struct CpuFeatures {
  bool avx2 = false;    // AVX2 + FMA + F16C, YMM state enabled
  bool avx512 = false;  // AVX-512 F/BW/VL/DQ, ZMM + opmask state enabled
  bool avx512_vnni = false;
  bool avx512_bf16 = false;
  bool amx = false;     // AMX tiles reported by cpuid and enabled in XCR0 (use needs arch_prctl)
  std::string best_isa() const;  // "avx512_vnni" | "avx512" | "avx2" | "scalar"
};

const CpuFeatures& cpu_features();

}  // namespace pyserve::cpu
