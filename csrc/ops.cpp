// Schemas of kdkernels' native ops, defined once; each backend (csrc/cpu, later csrc/cuda)
// registers its kernels for its dispatch key. Fake kernels and autograd are registered from
// Python (kdkernels/ops/), after this library is loaded.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing kdkernels._C only has to load this library (its static initializers register
// the ops); it defines no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(kdkernels, m) {
  // See kdkernels/ops/divergence.py for the meaning of every argument and output.
  m.def("divergence_fwd(Tensor student, Tensor teacher, Tensor row_weight, int mode, bool swap, "
        "float mix, float temperature, float taid, bool reduce, bool grad_student, "
        "bool grad_teacher) -> (Tensor, Tensor, Tensor)");
  // The same rows into the caller's buffers (kdkernels/ops/divergence.py: rows_into), for the
  // ops built on them; grad_student may be the student buffer itself (in place). (div_mode, not
  // mode: torch's auto-functionalization of mutating ops takes a `mode` argument of its own.)
  m.def("divergence_rows_out(Tensor student, Tensor teacher, Tensor row_weight, int div_mode, "
        "bool swap, float mix, float temperature, float taid, Tensor(a!) loss_rows, "
        "Tensor(b!)? grad_student, Tensor(c!)? grad_teacher) -> ()");
  // The row kernel's passes split at the all-reduces of the vocabulary-parallel path, on this
  // rank's shard (csrc/cpu/divergence.h: the phases and the stats columns;
  // kdkernels/ops/vocab_parallel.py runs them).
  m.def("divergence_shard_rows(Tensor student, Tensor teacher, Tensor row_weight, int div_mode, "
        "bool swap, float mix, float temperature, float taid, int phase, Tensor(a!) stats, "
        "Tensor(b!)? grad_student, Tensor(c!)? grad_teacher) -> ()");
  // See kdkernels/ops/mixing_matrix.py.
  m.def("mixing_matrix_fwd(Tensor q, Tensor k, Tensor C, Tensor B, Tensor log_decay, Tensor? D, "
        "float scale, bool squared, Tensor? teacher_lse) -> (Tensor, Tensor, Tensor)");
  m.def("mixing_matrix_bwd(Tensor grad_loss, Tensor q, Tensor k, Tensor C, Tensor B, "
        "Tensor log_decay, Tensor? D, float scale, bool squared, Tensor lse, Tensor sq) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // See kdkernels/ops/dac_kl.py.
  m.def("dac_kl_fwd(Tensor student, Tensor teacher, Tensor lower, Tensor upper, Tensor row_weight, "
        "float temperature, bool reduce, bool grad_student, bool grad_bounds) "
        "-> (Tensor, Tensor, Tensor)");
  // See kdkernels/ops/token_relation.py.
  m.def("token_relation_fwd(Tensor fs, Tensor? xs, Tensor ft, Tensor? xt, Tensor? mask, "
        "float scale_s, float scale_t, bool causal, bool mse) -> (Tensor, Tensor)");
  m.def("token_relation_bwd(Tensor grad_rows, Tensor fs, Tensor? xs, Tensor ft, Tensor? xt, "
        "Tensor? mask, float scale_s, float scale_t, bool causal, bool mse, Tensor stats) "
        "-> (Tensor, Tensor)");
}
