"""The formulas users write by hand (the baselines), and Liger-Kernel's path for the same loss.

eager_fkl / eager_jsd follow the common PyTorch formulas (TRL's generalized_jsd_loss for JSD),
with temperature and T², mean over rows."""
import math

import torch
import torch.nn.functional as F


def eager_fkl(s, t, temperature=1.0):
    lq = F.log_softmax(s.float() / temperature, dim=-1)
    lp = F.log_softmax(t.float() / temperature, dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean() * temperature ** 2


def eager_jsd(s, t, temperature=1.0, beta=0.5):
    lq = F.log_softmax(s.float() / temperature, dim=-1)
    lp = F.log_softmax(t.float() / temperature, dim=-1)
    lm = torch.logsumexp(torch.stack([lq + math.log(1 - beta), lp + math.log(beta)]), dim=0)
    kl_p = F.kl_div(lm, lp, reduction="none", log_target=True)
    kl_q = F.kl_div(lm, lq, reduction="none", log_target=True)
    return (beta * kl_p + (1 - beta) * kl_q).sum(-1).mean() * temperature ** 2


def eager_tvd(s, t, temperature=1.0):
    p = F.softmax(t.float() / temperature, dim=-1)
    q = F.softmax(s.float() / temperature, dim=-1)
    return 0.5 * (p - q).abs().sum(-1).mean() * temperature ** 2


EAGER = {"fkl": eager_fkl, "jsd": eager_jsd, "tvd": eager_tvd}


def liger_loss(kind):
    """Liger-Kernel's path for the same loss (log_softmax by PyTorch, then Liger's op), or None."""
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss  # noqa: PLC0415
    except ImportError:
        return None
    if kind == "fkl":
        op = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return lambda s, t, temperature=1.0: op(F.log_softmax(s / temperature, -1),
                                               F.log_softmax(t / temperature, -1)) * temperature ** 2
    if kind == "jsd":
        op = LigerJSD(beta=0.5)
        return lambda s, t, temperature=1.0: op(F.log_softmax(s / temperature, -1),
                                               F.log_softmax(t / temperature, -1)) * temperature ** 2
    return None
