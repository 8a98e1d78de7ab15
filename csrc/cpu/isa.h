// Instruction set of the CPU matmul kernels, chosen at run time.
//
// The library is built for the baseline x86-64 (no -march flags), and the hot kernels are compiled
// once per ISA (hybrid_isa_*.cpp); each call takes the variant active_isa() names. So one build
// is correct on any x86-64 CPU and runs AVX2 or AVX-512 code where the CPU has it.
#pragma once

#include <string>

namespace sparse_kernels_cpu {

enum class Isa { generic = 0, avx2 = 1, avx512 = 2 };

// The best ISA this CPU supports (generic on non-x86 builds).
Isa detected_isa();

// The ISA the kernels use: detected_isa(), or SPARSE_KERNELS_CPU_ISA (generic | avx2 | avx512)
// at load time, or the last set_active_isa().
Isa active_isa();

// Forces `name` (generic | avx2 | avx512, or auto for detected_isa()); raises when the CPU lacks
// it.
void set_active_isa(const std::string& name);

const char* isa_name(Isa isa);

}  // namespace sparse_kernels_cpu

// Whether this build carries the AVX2 / AVX-512 kernel variants (x86-64 with GCC or Clang).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SK_HAVE_X86_VARIANTS 1
#else
#define SK_HAVE_X86_VARIANTS 0
#endif
