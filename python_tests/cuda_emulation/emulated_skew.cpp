// Mode skew's CUDA kernels compiled for the CPU (see emulated_divergence.cpp).
#include "divergence_skew.cu"
