"""A short, real knowledge-distillation run on CPU with kdkernels.fused_linear_divergence.

    python -m kdkernels.demo [--model hf|char] [--kind fkl] [--steps N] [--vocab 4096]
                             [--seed 0] [--plot kdkernels-demo.png] [--quick]

1. builds a byte-level corpus from an embedded paragraph plus template sentences; the byte
   values are the tokenizer, padded to --vocab unused tokens, so the LM heads and the loss
   work on realistically wide rows (the teacher learns to put ~0 mass on the padding);
2. builds a tiny causal-LM teacher and a smaller student: Llama models from transformers
   configs (random weights, nothing downloaded) when transformers is installed, otherwise
   small pure-PyTorch Transformers (--model char);
3. trains the teacher on next-byte cross-entropy, freezes it, and distills the student from
   both models' last hidden states and lm_head weights with kdkernels.fused_linear_divergence
   (the (tokens, vocab) logits are never materialized);
4. compares, on one held-out batch, the loss' forward+backward with kdkernels against the
   eager PyTorch formula (F.linear, log_softmax, the divergence) and kdkernels.divergence on
   materialized logits: loss value, median step time, peak extra memory;
5. saves a plot of the distillation loss curve and of that comparison (needs matplotlib).

Every number printed is measured in this run, on this machine. About a minute on two cores.
"""
import argparse
import ctypes
import importlib.util
import math
import os
import platform
import random
import sys
import time
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

import kdkernels
from kdkernels._backend import resolve_backend

IGNORE = -100  # label of padding positions: kdkernels drops these rows
PAD = 0        # input byte fed at padding positions (never appears in the text)
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

PARAGRAPH = """\
Knowledge distillation trains a small student network to imitate a larger teacher. \
Instead of learning only from the one correct next token, the student sees the whole \
distribution the teacher predicts, softened by a temperature, and so it learns which \
wrong answers are almost right. A language model that has to choose among thousands of \
tokens at every position spends much of its time and memory in that last step: the \
logits are wide, and an eager loss builds several copies of them. A fused kernel reads \
each row once, keeps the running maximum and the sums it needs, and writes the gradient \
in place, so the same loss costs less memory and usually less time. """

# A tiny grammar: enough regular structure that held-out text is predictable.
WORDS = {
    "det": ["the", "a", "every", "one", "that"],
    "adj": ["small", "red", "old", "quiet", "bright", "lazy", "clever", "green"],
    "noun": ["cat", "dog", "student", "teacher", "river", "house", "model", "bird"],
    "verb": ["sees", "follows", "teaches", "finds", "watches", "copies", "likes"],
    "prep": ["near", "behind", "under", "beside", "across"],
}


def make_corpus(n_sentences, rng):
    """The paragraph (twice) followed by n_sentences random sentences from WORDS."""
    w = lambda k: rng.choice(WORDS[k])  # noqa: E731
    sentences = []
    for _ in range(n_sentences):
        s = f"{w('det')} {w('adj')} {w('noun')} {w('verb')} {w('det')} {w('noun')}"
        if rng.random() < 0.5:
            s += f" {w('prep')} {w('det')} {w('adj')} {w('noun')}"
        sentences.append(s[0].upper() + s[1:] + ".")
    return PARAGRAPH * 2 + " ".join(sentences)


def get_batch(data, batch, seq, gen):
    """Random windows of `data`; each sequence keeps a random length in [seq/2, seq] and is
    padded after it (input PAD, target IGNORE), as a real variable-length batch would be.
    Padding on the right needs no attention mask in a causal model: no kept position sees it."""
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
    x = torch.stack([data[s:s + seq] for s in starts])
    y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
    lengths = torch.randint(seq // 2, seq + 1, (batch, 1), generator=gen)
    pad = torch.arange(seq)[None, :] >= lengths
    return x.masked_fill(pad, PAD), y.masked_fill(pad, IGNORE)


# ----------------------------------------------------------------------------- models
class Head(NamedTuple):
    """An LM head as the loss sees it: logits = softcap(scale·(h·Wᵀ + b))."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    softcap: float | None


class HFLM(nn.Module):
    """A transformers causal LM seen through the three calls the demo makes."""

    def __init__(self, model):
        super().__init__()
        self.lm = model

    def logits(self, x):
        return self.lm(input_ids=x).logits

    def hidden(self, x):
        """The base model's last hidden states (after the final norm), without the logits."""
        return self.lm.base_model(input_ids=x).last_hidden_state

    def head(self):
        """The output embedding and what the config applies after it: Cohere's logit_scale,
        Gemma's final_logit_softcapping (a Llama config has neither: 1.0 and None)."""
        config, out = self.lm.config, self.lm.get_output_embeddings()
        return Head(out.weight, out.bias, getattr(config, "logit_scale", None) or 1.0,
                    getattr(config, "final_logit_softcapping", None))


def hf_llama(vocab, dim, layers, heads, max_len):
    """A random-weight Llama built from its config (no download, no tokenizer)."""
    import transformers  # noqa: PLC0415 (optional dependency)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=8 * dim // 3,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
        max_position_embeddings=max_len, pad_token_id=PAD, bos_token_id=None,
        eos_token_id=None, use_cache=False)
    return HFLM(transformers.AutoModelForCausalLM.from_config(config))


class CharLM(nn.Module):
    """A small causal Transformer in pure PyTorch: byte embedding + learned positions ->
    pre-norm encoder layers with a causal mask -> norm -> linear head over the vocabulary."""

    def __init__(self, vocab, dim, layers, heads, max_len):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)

    def hidden(self, x):
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = self.body(self.emb(x) + self.pos[:x.shape[1]], mask=causal, is_causal=True)
        return self.norm(h)

    def logits(self, x):
        return self.out(self.hidden(x))

    def head(self):
        return Head(self.out.weight, self.out.bias, 1.0, None)


def build_models(kind, vocab, max_len):
    """(teacher, student, description)."""
    if kind == "hf":
        return (hf_llama(vocab, dim=192, layers=3, heads=6, max_len=max_len),
                hf_llama(vocab, dim=96, layers=2, heads=4, max_len=max_len),
                "transformers LlamaForCausalLM from LlamaConfig")
    return (CharLM(vocab, dim=128, layers=2, heads=4, max_len=max_len),
            CharLM(vocab, dim=64, layers=1, heads=2, max_len=max_len),
            "pure-PyTorch CharLM")


# ----------------------------------------------------------------------------- losses
def fused_loss(hs, s_head, ht, t_head, labels, **kd):
    """kdkernels.fused_linear_divergence from hidden states and heads: no (N, V) logits."""
    return kdkernels.fused_linear_divergence(
        hs, s_head.weight, ht, t_head.weight, student_bias=s_head.bias,
        teacher_bias=t_head.bias, student_logit_scale=s_head.scale,
        teacher_logit_scale=t_head.scale, student_softcap=s_head.softcap,
        teacher_softcap=t_head.softcap, labels=labels, **kd)


def project(h, head):
    """The logits an eager implementation materializes: softcap(scale·(h·Wᵀ + b))."""
    z = F.linear(h, head.weight, head.bias) * head.scale
    return z if head.softcap is None else head.softcap * torch.tanh(z / head.softcap)


def eager_loss(student, teacher, labels, *, kind, temperature, beta, skew, ignore_index):
    """The usual eager PyTorch formula over the kept rows of two logits tensors (fp32): the
    divergence of the softened distributions, times T², mean over kept rows."""
    keep = (labels != ignore_index).flatten()
    lq = F.log_softmax(student.flatten(0, -2)[keep] / temperature, dim=-1)  # student
    lp = F.log_softmax(teacher.flatten(0, -2)[keep] / temperature, dim=-1)  # teacher
    kl = lambda log_a, log_b: F.kl_div(log_b, log_a, log_target=True, reduction="sum")  # noqa: E731
    mix = lambda w, log_a, log_b: torch.logaddexp(log_a + math.log(w),  # noqa: E731
                                                  log_b + math.log1p(-w))
    if kind == "fkl":         # KL(p || q)
        loss = kl(lp, lq)
    elif kind == "rkl":       # KL(q || p)
        loss = kl(lq, lp)
    elif kind == "jsd":       # beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
        lm = mix(beta, lp, lq)
        loss = beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)
    elif kind == "tvd":       # 1/2 sum |p - q|
        loss = 0.5 * (lp.exp() - lq.exp()).abs().sum()
    elif kind == "skew_fkl":  # KL(p || skew p + (1 - skew) q)
        loss = kl(lp, mix(skew, lp, lq))
    else:                     # skew_rkl: KL(q || skew q + (1 - skew) p)
        loss = kl(lq, mix(skew, lq, lp))
    return loss / keep.sum() * temperature ** 2


def windows(data, seq):
    """All of `data` as consecutive windows of `seq` bytes: (inputs, next-byte targets)."""
    n = (len(data) - 1) // seq * seq
    return data[:n].view(-1, seq), data[1:n + 1].view(-1, seq)


@torch.no_grad()
def heldout_ce(model, x, y):
    """Mean next-byte cross-entropy (nats)."""
    return F.cross_entropy(model.logits(x).flatten(0, 1), y.flatten()).item()


@torch.no_grad()
def heldout_kd(student, teacher, x, y, kd):
    """The distillation loss of the student to the teacher."""
    return fused_loss(student.hidden(x), student.head(), teacher.hidden(x), teacher.head(), y,
                      **kd).item()


# ----------------------------------------------------------------------------- progress
class Progress:
    """A training loop's progress: a tqdm bar on a terminal (a \\r line without tqdm), and
    five plain lines when stdout is a log file or a pipe."""

    def __init__(self, desc, total):
        self.desc, self.total, self.step = desc, total, 0
        self.tty = sys.stdout.isatty()
        self.bar = None
        if self.tty and importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm  # noqa: PLC0415 (optional dependency)
            self.bar = tqdm(total=total, desc=f"  {desc}", file=sys.stdout, leave=True)
        self.marks = {1, total} | {round(total * k / 4) for k in range(1, 4)}

    def update(self, status):
        self.step += 1
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=False)
            self.bar.update()
        elif self.tty:
            print(f"\r  {self.desc} {self.step}/{self.total}  {status}", end="", flush=True)
        elif self.step in self.marks:
            print(f"  {self.desc} step {self.step:4d}/{self.total}  {status}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            print()


# ----------------------------------------------------------------------------- memory
def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _libc_call(name, *args):
    try:
        getattr(ctypes.CDLL("libc.so.6"), name)(*args)
    except (OSError, AttributeError):  # not glibc: the peak may then hide reused memory
        pass


def _setup_malloc():
    """Make glibc return big blocks to the OS at free() (fixed mmap threshold), so the
    resident peak of one call is not hidden by memory already cached from earlier calls."""
    _libc_call("mallopt", -3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, disables the dynamic one


def peak_extra_mib(fn):
    """Run fn(); return (physical peak above the starting RSS in MiB, seconds fn took). The
    peak is VmHWM after resetting it through /proc/self/clear_refs; None if not permitted.
    glibc's free memory is handed back first (malloc_trim), so reusing it counts as new."""
    _libc_call("malloc_trim", 0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = _rss_kib("VmRSS")
    except OSError:
        start = None
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    try:
        return (None if start is None else (_rss_kib("VmHWM") - start) / 1024), seconds
    except OSError:
        return None, seconds


# ----------------------------------------------------------------------------- benchmark
def compare_losses(student, teacher, x, y, kd, reps):
    """The distillation loss' forward+backward on one batch, three ways, with gradients to the
    student's hidden states, lm_head weight and bias: a list of dicts (name, loss, ms (median
    of `reps` after one warm-up), peak_mib (the largest of the reps), loss_rel_diff and
    grad_rel_diff (the largest over the gradients) against the first, eager)."""
    with torch.no_grad():
        hs, ht = student.hidden(x), teacher.hidden(x)
    s_head, t_head = student.head(), teacher.head()
    leaf = lambda t: None if t is None else t.detach().clone().requires_grad_(True)  # noqa: E731
    hs = leaf(hs)
    s_head = s_head._replace(weight=leaf(s_head.weight), bias=leaf(s_head.bias))
    inputs = [t for t in (hs, s_head.weight, s_head.bias) if t is not None]
    backend = resolve_backend("auto", hs.device, (hs.dtype,))
    candidates = [
        (f"eager PyTorch (F.linear, log_softmax, {kd['kind']})",
         lambda: eager_loss(project(hs, s_head), project(ht, t_head), y, **kd)),
        (f"kdkernels.fused_linear_divergence [{backend}]",
         lambda: fused_loss(hs, s_head, ht, t_head, y, **kd)),
        (f"F.linear + kdkernels.divergence [{backend}]",
         lambda: kdkernels.divergence(project(hs, s_head), project(ht, t_head), labels=y, **kd)),
    ]
    _setup_malloc()
    rows = []
    for name, loss_fn in candidates:
        for t in inputs:
            t.grad = None
        loss = loss_fn()
        loss.backward()  # warm-up; also the value and the gradients on this batch
        value, grads = loss.item(), [t.grad.clone() for t in inputs]
        times, peaks = [], []
        for _ in range(reps):
            for t in inputs:
                t.grad = None  # freed before the baseline: the new gradients count in the peak
            peak, seconds = peak_extra_mib(lambda f=loss_fn: f().backward())
            times.append(seconds)
            peaks.append(peak)
        rows.append(dict(name=name, loss=value, grads=grads,
                         ms=1e3 * sorted(times)[len(times) // 2],
                         peak_mib=None if None in peaks else max(peaks)))
    eager_grads = rows[0]["grads"]
    for r in rows:
        r["loss_rel_diff"] = abs(r["loss"] - rows[0]["loss"]) / abs(rows[0]["loss"])
        r["grad_rel_diff"] = max(((g - e).abs().max() / e.abs().max()).item()
                                 for g, e in zip(r.pop("grads"), eager_grads))
    return rows


def print_table(rows, n_rows, n_kept, vocab, reps):
    eager = rows[0]
    print(f"\nthe loss alone, forward+backward, on one held-out batch: {n_kept} kept rows of "
          f"{n_rows}, vocab {vocab}, float32;\nmedian time of {reps} runs after 1 warm-up, peak "
          f"resident memory above the inputs")
    print(f"  {'method':46s} {'loss':>11s} {'ms':>8s} {'speed-up':>8s} {'peak MiB':>9s} "
          f"{'memory':>7s}")
    for r in rows:
        mem = ("n/a", "") if r["peak_mib"] is None or eager["peak_mib"] is None else (
            f"{r['peak_mib']:.1f}", f"{r['peak_mib'] / max(eager['peak_mib'], 1e-3):.2f}x")
        print(f"  {r['name']:46s} {r['loss']:11.7f} {r['ms']:8.1f} "
              f"{eager['ms'] / r['ms']:7.2f}x {mem[0]:>9s} {mem[1]:>7s}")
    print(f"  speed-up and memory are relative to eager; one ({n_rows}, {vocab}) float32 logits "
          f"tensor is {n_rows * vocab * 4 / 2**20:.1f} MiB")
    for r in rows[1:]:
        print(f"  {r['name']} vs eager: max rel. diff of the loss {r['loss_rel_diff']:.1e}, "
              f"of the gradients {r['grad_rel_diff']:.1e}")


def save_plot(path, losses, kind, rows, title):
    """The distillation loss per step, and time and memory per method; False without
    matplotlib (nothing written)."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    from matplotlib.figure import Figure  # noqa: PLC0415 (optional dependency; no pyplot)
    fig = Figure(figsize=(13, 4), layout="constrained")
    ax_loss, ax_time, ax_mem = fig.subplots(1, 3)
    ax_loss.plot(range(1, len(losses) + 1), losses)
    ax_loss.set(title=f"student distillation loss ({kind})", xlabel="step", ylabel="loss")
    names = [r["name"].replace(" (", "\n(").replace(" [", "\n[") for r in rows]
    ax_time.bar_label(ax_time.barh(names, [r["ms"] for r in rows], color="tab:blue"),
                      fmt="%.0f", padding=2)
    ax_time.set(title="loss forward+backward", xlabel="ms (median)")
    ax_mem.bar_label(ax_mem.barh(names, [r["peak_mib"] or 0.0 for r in rows],
                                 color="tab:orange"), fmt="%.0f", padding=2)
    ax_mem.set(title="peak extra memory", xlabel="MiB")
    for ax in (ax_time, ax_mem):
        ax.invert_yaxis()
        ax.margins(x=0.15)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    return True


def machine():
    """The CPU model, core count, torch threads and versions, for the record."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, kdkernels {kdkernels.__version__}")


# ----------------------------------------------------------------------------- main
FULL = dict(teacher_steps=150, steps=150, batch=32, bench_steps=5)
QUICK = dict(teacher_steps=10, steps=10, batch=8, bench_steps=2)  # --quick: a smoke run


def main(argv=None):
    """Run the demo; return its results: a dict (see the end of this function)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("hf", "char"), default="hf" if HAS_TRANSFORMERS else "char",
                    help="transformers Llama models (default when installed) or pure-PyTorch ones")
    ap.add_argument("--kind", default="fkl", choices=kdkernels.KINDS)
    ap.add_argument("--steps", type=int, help=f"distillation steps (default {FULL['steps']})")
    ap.add_argument("--teacher-steps", type=int,
                    help=f"teacher training steps (default {FULL['teacher_steps']})")
    ap.add_argument("--vocab", type=int, default=4096, help="padded vocabulary (>= 256)")
    ap.add_argument("--batch", type=int, help=f"sequences per batch (default {FULL['batch']})")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--bench-steps", type=int,
                    help=f"timed repetitions of each loss (default {FULL['bench_steps']})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="kdkernels-demo.png", help="where to save the plot")
    ap.add_argument("--quick", action="store_true",
                    help=f"a few steps only: {', '.join(f'{k}={v}' for k, v in QUICK.items())}")
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.vocab < 256:
        ap.error("--vocab must be >= 256 (byte-level corpus)")
    if args.model == "hf" and not HAS_TRANSFORMERS:
        ap.error("--model hf needs transformers (pip install transformers), or use --model char")
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    kd = dict(kind=args.kind, temperature=args.temperature, beta=0.5, skew=0.1,
              ignore_index=IGNORE)
    print(f"machine: {machine()}")

    # 1. corpus: bytes, 90 % train / 10 % held out
    text = make_corpus(1500, random.Random(args.seed)).encode()
    data = torch.tensor(list(text), dtype=torch.long)
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    print(f"corpus: {len(data)} bytes ({len(set(text))} distinct), vocab padded to "
          f"{args.vocab}; batches of {args.batch}x{args.seq}")

    # 2. models
    teacher, student, description = build_models(args.model, args.vocab, args.seq)
    size = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"  # noqa: E731
    print(f"models: {description}; teacher {size(teacher)} parameters (hidden "
          f"{teacher.head().weight.shape[1]}), student {size(student)} (hidden "
          f"{student.head().weight.shape[1]})")

    # 3. teacher: next-byte cross-entropy
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    bar = Progress("teacher", args.teacher_steps)
    for _ in range(args.teacher_steps):
        x, y = get_batch(train, args.batch, args.seq, gen)
        loss = F.cross_entropy(teacher.logits(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(f"ce {loss.item():.3f}")
    bar.close()
    teacher.eval().requires_grad_(False)
    print(f"teacher trained in {time.perf_counter() - t0:.1f} s")

    # 4. distill the student from the frozen teacher: hidden states + heads -> fused loss
    held_x, held_y = windows(held, args.seq)
    metrics = dict(student_ce_before=heldout_ce(student, held_x, held_y),
                   student_kd_before=heldout_kd(student, teacher, held_x, held_y, kd))
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    print(f"distilling with kdkernels.fused_linear_divergence: kind={args.kind!r}, "
          f"T={args.temperature}, {args.steps} steps")
    losses = []
    t0 = time.perf_counter()
    bar = Progress("student", args.steps)
    for _ in range(args.steps):
        x, y = get_batch(train, args.batch, args.seq, gen)
        with torch.no_grad():
            t_hidden = teacher.hidden(x)
        loss = fused_loss(student.hidden(x), student.head(), t_hidden, teacher.head(), y, **kd)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.update(f"{args.kind} {losses[-1]:.4f}")
    bar.close()
    print(f"student distilled in {time.perf_counter() - t0:.1f} s")

    metrics.update(teacher_ce=heldout_ce(teacher, held_x, held_y),
                   student_ce_after=heldout_ce(student, held_x, held_y),
                   student_kd_after=heldout_kd(student, teacher, held_x, held_y, kd))
    print(f"\nheld-out text, {held_x.numel()} bytes (cross-entropy of the uniform "
          f"distribution over the vocab: {math.log(args.vocab):.2f} nats)")
    print(f"  {'':20s} {'cross-entropy':>14s} {args.kind + ' to the teacher':>18s}")
    print(f"  {'teacher':20s} {metrics['teacher_ce']:14.3f}")
    for when, label in (("before", "student, before"), ("after", "student, distilled")):
        print(f"  {label:20s} {metrics['student_ce_' + when]:14.3f} "
              f"{metrics['student_kd_' + when]:18.4f}")

    # 5. the loss alone, forward+backward on one held-out batch: kdkernels vs eager
    x, y = get_batch(held, args.batch, args.seq, gen)
    rows = compare_losses(student, teacher, x, y, kd, args.bench_steps)
    print_table(rows, x.numel(), int((y != IGNORE).sum()), args.vocab, args.bench_steps)

    # 6. the plot
    plot = os.path.abspath(args.plot)
    if save_plot(plot, losses, args.kind, rows, f"kdkernels demo ({args.model} models, "
                 f"vocab {args.vocab}): {machine()}"):
        print(f"\nplot saved to {plot}")
    else:
        plot = None
        print("\nplot skipped: matplotlib is not installed (pip install matplotlib)")
    seconds = time.perf_counter() - t_start
    print(f"total {seconds:.1f} s")
    return dict(model=args.model, kind=args.kind, **metrics, distill_losses=losses,
                bench=rows, plot=plot, seconds=seconds)


if __name__ == "__main__":
    main()
