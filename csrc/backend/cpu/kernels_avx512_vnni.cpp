// AVX-512 with VNNI: the AVX-512 kernels compiled again with vpdpwssd for the quant-panel dot
// products (one instruction where plain AVX-512 needs vpmaddwd + vpaddd). Called only after
// cpu_features() confirmed AVX512_VNNI.
#define PYSERVE_AVX512_VNNI 1
#include "backend/cpu/kernels_avx512.cpp"
