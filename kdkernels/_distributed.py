"""Tensor-parallel plumbing shared by every vocabulary-parallel op: the process group, the
collectives (torch.distributed's own, on the caller's group) with a count of the bytes each
rank sends, and the KDKERNELS_DEBUG=1 check that the ranks agree.

Layout. Under tensor parallelism the logits (and lm_head rows) are split by vocabulary: rank r
holds a contiguous shard of the columns, shards in rank order, of any sizes (Megatron's
ColumnParallelLinear, torch.distributed.tensor.parallel's ColwiseParallel with Shard(-1)).
Everything that is per row (labels, masks, options, the rows themselves) is the same on every
rank: that is the caller's duty, checked by all_agree() when KDKERNELS_DEBUG=1.

Bytes. Each collective here adds the bytes of the tensor it reduces to TRAFFIC["bytes"], and
one to TRAFFIC["calls"]: what this rank hands to the collective per call (a ring all-reduce
sends about twice that over the wire, whatever the op). The tests check the counts against the
bounds each op documents."""
import os

import torch

TRAFFIC = {"bytes": 0, "calls": 0}


def check_group(process_group):
    """The process group of a vocabulary-parallel op: a torch.distributed ProcessGroup (or
    torch.distributed.group.WORLD), with torch.distributed initialized."""
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup, got "
                        f"{type(process_group).__name__}")
    return process_group


def resolve_group(group_name):
    """The ProcessGroup named group_name (ProcessGroup.group_name): how the ops that take a
    group pass it through torch.library's schema, as functional collectives do."""
    from torch.distributed.distributed_c10d import _resolve_process_group  # noqa: PLC0415

    return _resolve_process_group(group_name)


def all_reduce_(tensor, op, group):
    """In-place all-reduce of `tensor` over `group` ("max" or "sum"), counted in TRAFFIC."""
    import torch.distributed as dist  # noqa: PLC0415

    TRAFFIC["bytes"] += tensor.numel() * tensor.element_size()
    TRAFFIC["calls"] += 1
    dist.all_reduce(tensor, op={"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op],
                    group=group)
    return tensor


def all_gather(tensor, group):
    """The `tensor` of every rank of `group`, stacked in rank order (world, *shape); counted."""
    import torch.distributed as dist  # noqa: PLC0415

    TRAFFIC["bytes"] += tensor.numel() * tensor.element_size()
    TRAFFIC["calls"] += 1
    out = tensor.new_empty((dist.get_world_size(group),) + tuple(tensor.shape))
    dist.all_gather(list(out.unbind(0)), tensor.contiguous(), group=group)
    return out


class Layout:
    """Where this rank's vocabulary shard lies: its columns [offset, offset + width) of
    vocab = Σ widths, the shards of the ranks in rank order (widths: every rank's)."""

    def __init__(self, widths, rank):
        self.widths = widths
        self.offset, self.width = sum(widths[:rank]), widths[rank]
        self.vocab = sum(widths)

    def window(self, vocab):
        """How many of this shard's columns lie below a global vocab_size `vocab`."""
        return min(max(vocab - self.offset, 0), self.width)


@torch.compiler.disable  # (a collective: eager under torch.compile, as the ops that use it)
def layout(group, width, device):
    """The Layout of this rank's shard of `width` columns: one all-gather of the widths (the
    op derives the offsets from them; no offset argument)."""
    import torch.distributed as dist  # noqa: PLC0415

    widths = all_gather(torch.tensor([width], dtype=torch.int64, device=device), group)
    return Layout([int(w) for w in widths.reshape(-1).tolist()], dist.get_rank(group))


def debug():
    return os.environ.get("KDKERNELS_DEBUG") == "1"


def all_agree(group, what, values, device):
    """With KDKERNELS_DEBUG=1: ValueError unless every rank passed the same `values` (numbers:
    shapes, options, a checksum of the labels...; or a function returning them, called only
    then: no host sync otherwise). Otherwise nothing (no collective)."""
    if not debug():
        return
    import torch.distributed as dist  # noqa: PLC0415

    if callable(values):
        values = values()

    mine = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    for rank, theirs in enumerate(gathered):
        if not torch.equal(theirs, mine):
            raise ValueError(f"ranks disagree on {what}: this rank has {mine.tolist()}, rank "
                             f"{rank} has {theirs.tolist()} (per-row inputs and options must "
                             f"be the same on every rank of process_group)")


def from_dtensors(logits, names, process_group, vocab_dim=-1):
    """DTensor logits, as torch.distributed.tensor.parallel's ColwiseParallel(output_layouts=
    Shard(-1), use_local_output=False) produces them: (local shards, the mesh's group), or
    (logits, process_group) unchanged when none is a DTensor. Shard(-1) of the last dim on a
    1-D mesh is the vocabulary-parallel layout; Replicate() is the full rows (the ordinary
    path: group None). Both logits must have the same placement; to_local() keeps autograd, so
    the gradients reach the DTensors as DTensors of the same placement. vocab_dim: the
    vocabulary's dim (0 for lm_head weights and biases: ColwiseParallel's Shard(0))."""
    is_dt = [_is_dtensor(x) for x in logits]
    if not any(is_dt):
        return logits, process_group
    from torch.distributed.tensor import Replicate, Shard  # noqa: PLC0415

    if not all(is_dt):
        raise TypeError(f"{' and '.join(names)} must both be DTensors or both plain tensors")
    mesh, placements = logits[0].device_mesh, logits[0].placements
    for x, name in zip(logits, names):
        if x.device_mesh != mesh or x.placements != placements:
            raise ValueError(f"{' and '.join(names)} must share one device mesh and placement, "
                             f"got {x.placements} and {placements}")
    if mesh.ndim != 1:
        raise ValueError(f"{names[0]}: DTensor logits on a 1-D device mesh are supported, got "
                         f"a {mesh.ndim}-D mesh")
    placement = placements[0]
    if isinstance(placement, Shard) and placement.dim % logits[0].dim() == vocab_dim % logits[0].dim():
        if process_group is not None and process_group != mesh.get_group():
            raise ValueError("process_group differs from the DTensors' device mesh group")
        return tuple(x.to_local() for x in logits), mesh.get_group()
    if isinstance(placement, Replicate):
        return tuple(x.to_local() for x in logits), None
    raise ValueError(f"{names[0]}: DTensor placement {placement} is not supported: "
                     f"Shard({vocab_dim}) (the vocabulary) or Replicate()")


def _is_dtensor(x):
    try:
        from torch.distributed.tensor import DTensor  # noqa: PLC0415
    except ImportError:
        return False
    return isinstance(x, DTensor)


def local(x, name=None):
    """A DTensor's local tensor (labels or masks replicated over the mesh), else x. With a
    name, the DTensor must be Replicate() (hidden states: the column-parallel input)."""
    if not _is_dtensor(x):
        return x
    if name is not None:
        from torch.distributed.tensor import Replicate  # noqa: PLC0415

        if any(not isinstance(p, Replicate) for p in x.placements):
            raise ValueError(f"{name}: a DTensor must be Replicate() over the mesh (the "
                             f"column-parallel input), got {x.placements}")
    return x.to_local()
