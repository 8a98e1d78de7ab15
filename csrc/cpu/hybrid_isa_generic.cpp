// The matmul kernels for baseline x86-64 (or any other CPU): no target beyond the build's own.
#define SK_ISA_NS generic
#include "cpu/hybrid_isa_entries.inc"
