"""Triton kernels (GPU; on CPU under TRITON_INTERPRET=1). Imported lazily: importing this
package imports triton."""
