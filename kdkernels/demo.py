"""A short, real knowledge-distillation run on CPU with kdkernels.

    python -m kdkernels.demo [--kind fkl] [--steps 250] [--vocab 4096] [--seed 0]

1. builds a byte-level corpus from an embedded paragraph plus template sentences;
2. trains a small Transformer teacher LM on it (next-byte cross-entropy);
3. distills a smaller Transformer student from the frozen teacher with kdkernels.divergence;
4. compares the loss' fwd+bwd time and peak memory: kdkernels (backend="auto", the C++
   CPU kernels) against an inline eager PyTorch formula and kdkernels' plain-PyTorch
   reference (backend="reference").

The vocabulary is the 256 byte values padded to --vocab with unused tokens, so the LM head
and the loss work on realistically wide rows; the teacher learns to put ~0 mass on them.
No downloads; runs in about a minute on two cores.
"""
import argparse
import ctypes
import math
import random
import time

import torch
from torch import nn
from torch.nn import functional as F

import kdkernels

IGNORE = -100  # label of padding positions: kdkernels drops these rows
PAD = 0        # input byte fed at padding positions (never appears in the text)

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


class CharLM(nn.Module):
    """A small causal Transformer: byte embedding + learned positions -> pre-norm encoder
    layers with a causal mask -> linear head over the (padded) vocabulary."""

    def __init__(self, vocab, dim, layers, heads, max_len=256):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = self.body(self.emb(x) + self.pos[:x.shape[1]], mask=causal, is_causal=True)
        return self.head(self.norm(h))


def get_batch(data, batch, seq, gen):
    """Random windows of `data`; each sequence keeps a random length in [seq/2, seq] and is
    padded after it (input PAD, target IGNORE), as a real variable-length batch would be."""
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
    x = torch.stack([data[s:s + seq] for s in starts])
    y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
    lengths = torch.randint(seq // 2, seq + 1, (batch, 1), generator=gen)
    pad = torch.arange(seq)[None, :] >= lengths
    return x.masked_fill(pad, PAD), y.masked_fill(pad, IGNORE)


@torch.no_grad()
def heldout_ce(model, data, seq):
    """Mean next-byte cross-entropy (nats) over the held-out text, in windows of `seq`."""
    n = (len(data) - 1) // seq * seq
    x, y = data[:n].view(-1, seq), data[1:n + 1].view(-1, seq)
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()


def eager_loss(student, teacher, labels, kind, temperature, beta=0.5):
    """The usual eager PyTorch formula: KL or TRL's generalized JSD of the softened
    distributions over the kept rows, times T^2, mean over kept rows."""
    keep = (labels != IGNORE).flatten()
    lq = F.log_softmax(student.flatten(0, -2)[keep] / temperature, dim=-1)  # student
    lp = F.log_softmax(teacher.flatten(0, -2)[keep] / temperature, dim=-1)  # teacher
    kl = lambda log_a, log_b: F.kl_div(log_b, log_a, log_target=True, reduction="sum")  # noqa: E731
    if kind == "fkl":    # KL(p || q)
        loss = kl(lp, lq)
    elif kind == "rkl":  # KL(q || p)
        loss = kl(lq, lp)
    else:                # beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
        lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log(1 - beta)]), 0)
        loss = beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)
    return loss / keep.sum() * temperature ** 2


# ----------------------------------------------------------------------------- memory
def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _setup_malloc():
    """Make glibc return big blocks to the OS at free() (fixed mmap threshold), so the
    resident peak of one call is not hidden by memory already cached from earlier calls."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, disables the dynamic one
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_mib(fn):
    """Run fn(); return (physical peak above the starting RSS in MiB, seconds fn took). The
    peak is VmHWM after resetting it through /proc/self/clear_refs; None if not permitted."""
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


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="fkl", choices=kdkernels.KINDS)
    ap.add_argument("--steps", type=int, default=250, help="distillation steps")
    ap.add_argument("--teacher-steps", type=int, default=250)
    ap.add_argument("--vocab", type=int, default=4096, help="padded vocabulary (>= 256)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--bench-steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.vocab < 256:
        ap.error("--vocab must be >= 256 (byte-level corpus)")
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    # 1. corpus: bytes, 90 % train / 10 % held out
    text = make_corpus(1500, random.Random(args.seed)).encode()
    data = torch.tensor(list(text), dtype=torch.long)
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    print(f"corpus: {len(data)} bytes ({len(set(text))} distinct), vocab padded to "
          f"{args.vocab}; batch {args.batch}x{args.seq}; {torch.get_num_threads()} threads")

    # 2. teacher: next-byte cross-entropy
    teacher = CharLM(args.vocab, dim=128, layers=2, heads=4)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for step in range(1, args.teacher_steps + 1):
        x, y = get_batch(train, args.batch, args.seq, gen)
        loss = F.cross_entropy(teacher(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == 1:
            print(f"  teacher step {step:4d}  ce {loss.item():.3f}")
    teacher.eval().requires_grad_(False)
    print(f"teacher trained in {time.perf_counter() - t0:.1f} s")

    # 3. distill a smaller student from the frozen teacher
    student = CharLM(args.vocab, dim=64, layers=1, heads=2)
    untrained = CharLM(args.vocab, dim=64, layers=1, heads=2)
    untrained.load_state_dict(student.state_dict())  # the student as it starts
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    kd = dict(kind=args.kind, temperature=args.temperature, ignore_index=IGNORE)
    print(f"distilling: kind={args.kind!r}, T={args.temperature}, {args.steps} steps")
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = get_batch(train, args.batch, args.seq, gen)
        with torch.no_grad():
            t_logits = teacher(x)
        loss = kdkernels.divergence(student(x), t_logits, labels=y, **kd)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == 1:
            print(f"  student step {step:4d}  {args.kind} {loss.item():.4f}")
    print(f"student distilled in {time.perf_counter() - t0:.1f} s")

    ln_v = math.log(args.vocab)
    print(f"\nheld-out cross-entropy (nats/byte; uniform over the vocab = {ln_v:.2f}):")
    print(f"  teacher             {heldout_ce(teacher, held, args.seq):.3f}")
    print(f"  distilled student   {heldout_ce(student, held, args.seq):.3f}")
    print(f"  untrained student   {heldout_ce(untrained, held, args.seq):.3f}")

    # 4. the loss alone, fwd+bwd, on real logits of one batch: kdkernels vs eager PyTorch
    x, y = get_batch(held, args.batch, args.seq, gen)
    with torch.no_grad():
        t_logits, s_logits = teacher(x), student(x)
    s_leaf = s_logits.clone().requires_grad_(True)
    _setup_malloc()
    candidates = [
        ("kdkernels (auto -> C++ CPU)",
         lambda: kdkernels.divergence(s_leaf, t_logits, labels=y, backend="auto", **kd)),
        ("kdkernels backend='reference'",
         lambda: kdkernels.divergence(s_leaf, t_logits, labels=y, backend="reference", **kd))]
    if args.kind in ("fkl", "rkl", "jsd"):
        candidates.insert(1, ("eager PyTorch, inline formula",
                              lambda: eager_loss(s_leaf, t_logits, y, args.kind, args.temperature)))

    rows = []
    for label, loss_fn in candidates:
        s_leaf.grad = None
        loss = loss_fn()
        loss.backward()  # warm-up; also the value and gradient on this batch
        value, grad = loss.item(), s_leaf.grad.clone()
        times, peaks = [], []
        for _ in range(args.bench_steps):
            s_leaf.grad = None  # freed before the baseline: the new grad counts in the peak
            peak, seconds = peak_extra_mib(lambda f=loss_fn: f().backward())
            times.append(seconds)
            peaks.append(peak)
        peak = None if None in peaks else max(peaks)
        rows.append((label, value, grad, 1e3 * sorted(times)[len(times) // 2], peak))

    kept = int((y != IGNORE).sum())
    print(f"\nloss fwd+bwd on one batch: {tuple(s_leaf.shape)} float32 logits, {kept} kept "
          f"rows; median of {args.bench_steps} steps after 1 warm-up")
    print(f"  {'backend':32s} {'loss':>12s} {'ms/step':>9s} {'peak extra MiB':>15s}")
    for label, value, _, ms, peak in rows:
        mem = "n/a" if peak is None else f"{peak:.1f}"
        print(f"  {label:32s} {value:12.8f} {ms:9.2f} {mem:>15s}")
    _, v_k, g_k, ms_k, _ = rows[0]
    for label, value, grad, ms, _ in rows[1:]:
        print(f"  vs {label}: |loss diff| {abs(v_k - value):.1e}, max |grad diff| "
              f"{(g_k - grad).abs().max().item():.1e}, kdkernels x{ms / ms_k:.1f} faster")
    print(f"  (each logits tensor is {s_leaf.numel() * 4 / 2**20:.1f} MiB; the student's "
          f"gradient is another one of those)")
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
