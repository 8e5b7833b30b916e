// Mode kl's CUDA kernels compiled for the CPU (see emulated_divergence.cpp).
#include "divergence_kl.cu"
