// The divergence row kernel for any CPU (ATen's portable Vectorized<float>).
#define CPU_CAPABILITY DEFAULT
#define KD_ROWS_FN divergence_rows_default
#define KD_SHARD_ROWS_FN divergence_shard_rows_default
#include "divergence_kernel.h"
