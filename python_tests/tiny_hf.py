"""Tiny randomly initialized Hugging Face causal LMs and a tokenizer built in code, for the
trainer tests: nothing is downloaded (HF_HUB_OFFLINE=1 holds)."""
import torch

WORDS = ("the a every one that small red old quiet bright lazy clever green cat dog student "
         "teacher river house model bird sees follows teaches finds watches copies likes near "
         "behind under beside across and then is was").split()
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
VOCAB = 128  # the models' vocabulary: the tokenizer's words, then unused (padded) ids


def tokenizer():
    """A word-level PreTrainedTokenizerFast over WORDS: ids 0–3 the specials, then the words."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    vocab = {w: i for i, w in enumerate(SPECIALS + tuple(WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def sentences(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    pick = lambda: WORDS[int(torch.randint(len(WORDS), (1,), generator=g))]  # noqa: E731
    return [" ".join(pick() for _ in range(int(torch.randint(3, 9, (1,), generator=g))))
            for _ in range(n)]


def _ids():
    return dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def gemma2(hidden, layers, softcap=5.0, vocab=VOCAB):
    """Gemma 2: final-logit softcapping (small here, so that tanh bends the logits)."""
    import transformers  # noqa: PLC0415

    config = transformers.Gemma2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        head_dim=hidden // 2, max_position_embeddings=64, final_logit_softcapping=softcap,
        **_ids())
    return transformers.Gemma2ForCausalLM(config)


def cohere(hidden, layers, logit_scale=0.25, vocab=VOCAB):
    """Cohere: a logit scale (and tied embeddings)."""
    import transformers  # noqa: PLC0415

    config = transformers.CohereConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=64, logit_scale=logit_scale, **_ids())
    return transformers.CohereForCausalLM(config)


ARCHS = {"gemma2": gemma2, "cohere": cohere}


def pair(arch, seed=0):
    """(student, teacher) of one architecture: the teacher wider and deeper, frozen."""
    torch.manual_seed(seed)
    student = ARCHS[arch](32, 1)
    teacher = ARCHS[arch](48, 2).eval().requires_grad_(False)
    for m in (student, teacher):  # fp32 on CPU, eager attention: deterministic references
        m.config._attn_implementation = "eager"
    return student, teacher


def batch(tok, n=4, seed=0):
    """input_ids, attention_mask (right padding) and labels (−100 at the padding)."""
    enc = tok(sentences(n, seed), padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, labels
