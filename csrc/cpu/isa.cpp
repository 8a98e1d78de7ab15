// Run-time ISA choice of the CPU kernels (isa.h) and the op that reports / forces it.

#include "cpu/isa.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <optional>

namespace sparse_kernels_cpu {
namespace {

std::optional<Isa> parse_isa(const std::string& name) {
  if (name == "generic") return Isa::generic;
  if (name == "avx2") return Isa::avx2;
  if (name == "avx512") return Isa::avx512;
  return std::nullopt;
}

Isa checked(const std::string& name, const char* where) {
  if (name == "auto") return detected_isa();
  const std::optional<Isa> isa = parse_isa(name);
  TORCH_CHECK(isa.has_value(), where, ": unknown CPU ISA '", name,
              "'; use generic, avx2, avx512 or auto");
  TORCH_CHECK(static_cast<int>(*isa) <= static_cast<int>(detected_isa()), where, ": this CPU ",
              "does not support ", name, " (it supports up to ", isa_name(detected_isa()), ")");
  return *isa;
}

Isa initial_isa() {
  const char* env = std::getenv("SPARSE_KERNELS_CPU_ISA");
  return env != nullptr && *env != '\0' ? checked(env, "SPARSE_KERNELS_CPU_ISA")
                                        : detected_isa();
}

std::atomic<int>& active() {
  static std::atomic<int> isa{static_cast<int>(initial_isa())};
  return isa;
}

// cpu_isa(name=None): the active ISA's name; with a name, forces that ISA first.
std::string cpu_isa(const std::optional<std::string>& name) {
  if (name) set_active_isa(*name);
  return isa_name(active_isa());
}

// cpu_isa_detected(): the best ISA this CPU supports, whatever is active.
std::string cpu_isa_detected() { return isa_name(detected_isa()); }

}  // namespace

Isa detected_isa() {
#if SK_HAVE_X86_VARIANTS
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
    return Isa::generic;
  }();
  return isa;
#else
  return Isa::generic;
#endif
}

Isa active_isa() { return static_cast<Isa>(active().load(std::memory_order_relaxed)); }

void set_active_isa(const std::string& name) {
  active().store(static_cast<int>(checked(name, "cpu_isa")), std::memory_order_relaxed);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

// Schemas: sparse_kernels/_ops.py (every op is declared there). No tensor arguments, so the
// dispatcher serves them from the CompositeImplicitAutograd kernel.
TORCH_LIBRARY_IMPL(sparse_kernels, CompositeImplicitAutograd, m) {
  m.impl("cpu_isa", &cpu_isa);
  m.impl("cpu_isa_detected", &cpu_isa_detected);
}

}  // namespace sparse_kernels_cpu
