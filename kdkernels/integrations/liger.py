"""Liger-Kernel 0.8.5's distillation losses with Liger's names, signatures and semantics, on
kdkernels' kernels: a Liger user changes one import. So far:

    LigerFusedLinearJSDLoss   liger_kernel.chunked_loss.LigerFusedLinearJSDLoss

Its contract (Liger's code, in our words): soft = Σ over rows with label != ignore_index of
the generalized JSD of softmax(z_t/T) and softmax(z_s/T) (β = 0 forward KL, β = 1 reverse KL,
otherwise β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q), divided by the number of those rows
(at least 1), no T²; hard = the cross-entropy of the student's logits at temperature 1 on the
same rows, same division; loss = weight_hard_loss·hard + weight_soft_loss·soft.

Where Liger's semantics are a known bug, the class keeps them and says so: a teacher
vocabulary larger than the student's pads the student's logits with 0 (probability e^0/Z for
columns the student cannot produce) rather than −inf; the class does the same (a zero-padded
copy of the student's weight, weight-sized), with the cross-entropy over the student's own
columns as Liger's. kdkernels.fused_linear_divergence(vocab_size=V_s) is the correct form."""
import torch

from ..fused_linear import fused_linear_divergence


class LigerFusedLinearJSDLoss(torch.nn.Module):
    """Liger's LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5,
    ignore_index=-100, temperature=1.0, compiled=True, chunk_size=1024,
    return_soft_hard_loss=False), called as (student_input, student_weight, teacher_input,
    teacher_weight, true_labels, student_bias=None, teacher_bias=None): the loss, or
    (loss, soft_loss, hard_loss) with return_soft_hard_loss. `compiled` is accepted and has no
    effect (the kernels need no compilation); chunk_size is the rows per chunk, as Liger's."""

    def __init__(self, weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, ignore_index=-100,
                 temperature=1.0, compiled=True, chunk_size=1024, return_soft_hard_loss=False):
        super().__init__()
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if temperature == 0:
            raise ValueError("temperature must be non-zero")
        self.weight_hard_loss, self.weight_soft_loss = float(weight_hard_loss), float(weight_soft_loss)
        self.beta, self.ignore_index = float(beta), int(ignore_index)
        self.temperature, self.compiled = float(temperature), compiled
        self.chunk_size, self.return_soft_hard_loss = int(chunk_size), bool(return_soft_hard_loss)

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, true_labels,
                student_bias=None, teacher_bias=None):
        beta = self.beta
        kind, b = ("fkl", 0.5) if beta == 0.0 else ("rkl", 0.5) if beta == 1.0 else ("jsd", beta)
        with_ce = self.weight_hard_loss != 0.0 or self.return_soft_hard_loss  # (Liger skips it)
        common = dict(labels=true_labels, ignore_index=self.ignore_index, t2_scale=False,
                      chunk_size=self.chunk_size, return_components=True, kind=kind, beta=b,
                      temperature=self.temperature)
        v_s, v_t = student_weight.shape[0], teacher_weight.shape[0]
        if v_t <= v_s:  # one call (Liger itself fails for v_t < v_s; here the first v_t count)
            out = fused_linear_divergence(
                student_input, student_weight, teacher_input, teacher_weight,
                student_bias=student_bias, teacher_bias=teacher_bias,
                hard_label_weight=self.weight_hard_loss if with_ce else 0.0,
                soft_label_weight=self.weight_soft_loss, **common)
            loss, soft_loss, hard_loss = out.loss, out.divergence, out.cross_entropy
        else:  # Liger's zero padding (the module comment), and its CE over the student's columns
            pad = v_t - v_s
            weight = torch.cat([student_weight, student_weight.new_zeros(pad, student_weight.shape[1])])
            bias = None if student_bias is None else torch.cat([student_bias,
                                                                student_bias.new_zeros(pad)])
            soft = fused_linear_divergence(
                student_input, weight, teacher_input, teacher_weight, student_bias=bias,
                teacher_bias=teacher_bias, soft_label_weight=self.weight_soft_loss, **common)
            loss, soft_loss, hard_loss = soft.loss, soft.divergence, torch.zeros_like(soft.loss)
            if with_ce:
                hard = fused_linear_divergence(
                    student_input, student_weight, teacher_input, teacher_weight[:v_s],
                    student_bias=student_bias, hard_label_weight=self.weight_hard_loss,
                    soft_label_weight=0.0, **common)
                loss, hard_loss = loss + hard.loss, hard.cross_entropy
        return (loss, soft_loss, hard_loss) if self.return_soft_hard_loss else loss
