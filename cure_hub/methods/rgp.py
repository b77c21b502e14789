"""Robust gradient prominence (Eq. 6) and the percentile masks CURE takes from it, with memory
bounded by design rather than by the model's size.

:class:`ProminenceScores` gathers RGP = alpha |g_nat| + (1 - alpha) |g_adv| of the masked tensors
from the two branches' backward passes. In one process with one micro-batch a step, each
gradient is folded into the score as autograd produces it and then dropped, so the two branch
gradients are never held whole: the score, one tensor per masked parameter, is all that stays
(about 1x the parameters' bytes; docs/cure.md, "Cost"). Summed over micro-batches or processes,
the magnitude must be taken of the sum, so there each branch's raw gradient is summed as it
arrives and reduced across processes in chunks (about 2x). :func:`prominence_masks` selects each
tensor's percentile, on an accelerator one chunk of tensors at a time.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

#: On a CPU, tensors this large take the sampled selection; its sample has _SAMPLE_SIZE entries.
_SAMPLED_SELECTION_MIN_SIZE, _SAMPLE_SIZE = 32_768, 4096
#: Chunks of tensors are at least this many to a whole set: the sort's and the all-reduce's
#: working memory is a fraction of the tensors' (see :func:`chunk_budget`).
CHUNKS = 32
NATURAL, ADVERSARIAL = 0, 1


def prominence_mask(score: torch.Tensor, percent: float) -> torch.Tensor:
    """Boolean mask of the entries of ``score`` that are updated (True) or conserved (False).

    Exactly ``floor(percent * n / 100)`` entries are conserved: those with the lowest scores, ties
    at the threshold broken by position (the entry that comes first in row-major order is
    conserved first), which matches a stable sort. A NaN score ranks above every number, as a
    stable sort puts NaN last: a NaN entry is conserved only when every number is. Runs on
    ``score``'s device, with no host copy of the tensor and no size limit (unlike
    ``torch.quantile``, which stops at 16 million elements).
    """
    flat = torch.nan_to_num(score.detach().reshape(-1), nan=math.inf, posinf=math.inf, neginf=-math.inf)
    conserved = math.floor(percent * flat.numel() / 100)
    if conserved == 0:
        return torch.ones_like(score, dtype=torch.bool)
    if flat.device.type == "cpu" and flat.numel() >= _SAMPLED_SELECTION_MIN_SIZE:
        keep = _keep_mask_by_sampled_selection(flat, conserved)
    else:
        keep = _keep_mask_without_synchronisation(flat, conserved)
    return keep.view_as(score)


def prominence_masks(scores: list[torch.Tensor], percent: float) -> list[torch.Tensor]:
    """:func:`prominence_mask` of each of ``scores``. On a CPU one tensor at a time (the sampled
    selection is faster there than sorting); on an accelerator by one sort per chunk of tensors
    (:func:`_keep_masks_by_one_sort`), with nothing read back to the host. A chunk holds
    consecutive tensors of at most :func:`chunk_budget` entries (a larger tensor alone), so the
    sort's working memory, about 70 bytes an entry, stays near 2 bytes per masked parameter or
    one largest tensor's worth, whatever the model's size."""
    if not scores:
        return []
    if scores[0].device.type == "cpu" or any(score.dtype == torch.float64 for score in scores):
        return [prominence_mask(score, percent) for score in scores]
    return _keep_masks_in_chunks(scores, percent)


def _keep_masks_in_chunks(scores: list[torch.Tensor], percent: float, budget: int | None = None) -> list[torch.Tensor]:
    return [mask for chunk in chunks(scores, budget) for mask in _keep_masks_by_one_sort(chunk, percent)]


def chunk_budget(tensors: list[torch.Tensor]) -> int:
    """Entries a chunk of ``tensors`` may hold: a 32nd of them all, or the largest tensor."""
    sizes = [tensor.numel() for tensor in tensors]
    return max(max(sizes, default=0), sum(sizes) // CHUNKS)


def chunks(tensors: list[torch.Tensor], budget: int | None = None) -> Iterator[list[torch.Tensor]]:
    """``tensors`` in runs of consecutive ones of at most ``budget`` entries in all (by default
    :func:`chunk_budget`); a tensor larger than the budget makes a run of its own."""
    budget = chunk_budget(tensors) if budget is None else budget
    run, entries = [], 0
    for tensor in tensors:
        if run and entries + tensor.numel() > budget:
            yield run
            run, entries = [], 0
        run.append(tensor)
        entries += tensor.numel()
    if run:
        yield run


def _keep_masks_by_one_sort(scores: list[torch.Tensor], percent: float) -> list[torch.Tensor]:
    """The masks of all ``scores`` at once, by one stable sort of a combined key: the tensor's index
    in the high 32 bits, the score's float32 bits made order-preserving in the low 32. Sorted, each
    tensor's entries stand in one block, in the tensors' order, in ascending order of score, ties in
    order of position (the reference's order); each tensor's first ``floor(percent * n / 100)``
    entries in its block are conserved. Fixed shapes, int64 positions (past 2^31 entries in all),
    no host synchronisation. Exact for scores of 32 bits or fewer (float64 ones take the per-tensor
    path)."""
    sizes = [score.numel() for score in scores]
    device = scores[0].device
    ascending = torch.cat([_ascending_keys(score.detach().reshape(-1)) for score in scores])  # in [0, 2^32)
    total = ascending.numel()
    # The sizes, block starts and conserved counts reach the device in one copy from pinned memory,
    # which the host does not wait for (a copy from pageable memory would block it).
    layout = torch.tensor([sizes, [0, *itertools.accumulate(sizes)][:-1], [math.floor(percent * n / 100) for n in sizes]],
                          pin_memory=device.type == "cuda")
    sizes_on_device, starts, conserved = layout.to(device, non_blocking=True)
    tensor_of = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes_on_device, output_size=total)
    order = (tensor_of * 2**32 + ascending).sort(stable=True).indices
    # Entry i of ``order`` belongs to tensor tensor_of[i], at rank i - start of its block.
    keep_in_order = torch.arange(total, device=device) - starts[tensor_of] >= conserved[tensor_of]
    keep = torch.empty(total, dtype=torch.bool, device=device)
    keep[order] = keep_in_order
    return [mask.view_as(score) for mask, score in zip(keep.split(sizes), scores)]


def _keep_mask_without_synchronisation(flat: torch.Tensor, conserved: int) -> torch.Tensor:
    """``kthvalue`` and a cumulative sum over the ties: fixed shapes, nothing read back to the host,
    so an accelerator never waits."""
    threshold = flat.kthvalue(conserved).values
    below = flat < threshold
    at_threshold = flat == threshold
    still_needed = conserved - below.sum(dtype=torch.int64)
    rank_among_ties = at_threshold.to(torch.int32).cumsum(0, dtype=torch.int64 if flat.numel() >= 2**31 else torch.int32)
    return ~(below | (at_threshold & (rank_among_ties <= still_needed)))


def _keep_mask_by_sampled_selection(flat: torch.Tensor, conserved: int) -> torch.Tensor:
    """The same mask on a CPU, where reading a value back costs nothing and ``kthvalue`` is a
    single-threaded quickselect over the whole tensor (most of the mask's time). As in Floyd and
    Rivest's selection, two order statistics of a random sample bracket the threshold; a few
    vectorised passes count the entries below the bracket and gather the few inside it, and
    ``kthvalue`` runs on those alone. Exact: a bracket that misses falls back to the full search."""
    size = flat.numel()
    # A random sample: a strided one is biased on convolution weights, whose layout repeats.
    positions = torch.randint(size, (_SAMPLE_SIZE,), generator=torch.Generator().manual_seed(size))
    sample = flat[positions].sort().values
    fraction = conserved / size
    centre = fraction * sample.numel()
    margin = 4 * math.sqrt(sample.numel() * fraction * (1 - fraction)) + 2  # four standard deviations of a sample rank
    low_index, high_index = math.floor(centre - margin), math.ceil(centre + margin)
    low = sample[low_index].item() if low_index >= 0 else -math.inf
    high = sample[high_index].item() if high_index < sample.numel() else math.inf
    below_low = int(torch.count_nonzero(flat < low))
    window = flat[(flat >= low) & (flat <= high)]
    rank = conserved - below_low
    if not 0 < rank <= window.numel():
        return _keep_mask_without_synchronisation(flat, conserved)
    threshold = window.kthvalue(rank).values
    keep = flat > threshold
    still_needed = conserved - below_low - int(torch.count_nonzero(window < threshold))
    if still_needed < int(torch.count_nonzero(window == threshold)):  # ties: conserve the first ones only
        keep[(flat == threshold).nonzero().squeeze(1)[still_needed:]] = True
    return keep


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a parameter (or gradient) of a module sharded by FSDP2's
    ``fully_shard``, which makes each a ``DTensor`` whose process holds a ``Shard(0)`` part."""
    # No tensor is a DTensor unless FSDP2 has imported the module; importing it here would add half
    # a second to the start of every command.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded ``tensor`` (the same storage), or ``tensor`` itself."""
    return tensor._local_tensor if is_sharded(tensor) else tensor


def world_size(group=None) -> int:
    """The processes of ``group`` (the default group when None); 1 without torch.distributed."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sums ``tensors`` across processes in place (identity in a single process), a chunk of them
    at a time, so the flattened copy stays a fraction of their size (:func:`chunks`). A sum is as
    good as a mean for a percentile mask, which does not change when a tensor is scaled."""
    if world_size() == 1:
        return tensors
    for chunk in chunks(tensors):
        flat = torch.cat([t.reshape(-1) for t in chunk])
        dist.all_reduce(flat)
        for t, part in zip(chunk, flat.split([t.numel() for t in chunk])):
            t.copy_(part.view_as(t))
    return tensors


class ProminenceScores:
    """RGP (Eq. 6) of ``params``, gathered branch by branch: :meth:`add` backpropagates one
    branch's loss, :meth:`take` returns the scores of the step (summed over its micro-batches and
    processes) and starts the next.

    The gradients come through hooks on the parameters during ``torch.autograd.grad``, each
    branch through its own part of the retained graph and outside any data-parallel reducer
    (``grad`` runs no ``AccumulateGrad``, so neither ``.grad`` nor DDP's hooks see them). A hook
    consumes its gradient and hands autograd a zero-stride placeholder in its stead, so the list
    ``grad`` returns holds no memory. The scores are computed with the same operations in the
    same order as from whole gradients (``|g_nat| * alpha``, then ``+ (1 - alpha) |g_adv|``), so
    they are bitwise the same.

    Under FSDP2 (``params`` sharded, :func:`is_sharded`) ``grad`` cannot reach the sharded
    parameters: each branch is a ``backward`` pass instead, whose reduce-scattered gradient
    shards are kept (the reduce-scatter has already summed them across processes, as their mean:
    a scale a percentile mask ignores) and ``.grad`` of ``every_param`` (the model's parameters)
    is put back as it was. The scores are then this process's parts of the tensors', for
    :func:`sharded_prominence_masks`.
    """

    def __init__(self, params: list[nn.Parameter], alpha: float, signed: bool, micro_batches: int = 1,
                 every_param: list[nn.Parameter] | None = None):
        self.params, self.alpha, self.signed = params, alpha, signed
        self.sharded = any(is_sharded(param) for param in params)
        self.every_param = every_param if every_param is not None else params
        #: Fold each gradient into the score as it arrives; otherwise sum raw gradients first.
        self.folds_on_arrival = micro_batches == 1 and world_size() == 1 and not self.sharded
        self._scores: list[torch.Tensor | None] | None = None
        self._sums: tuple[list, list] | None = None
        self._added: list[int] = []  # the branches added since the last take
        self._unreached: set[int] = set()  # the parameters no gradient has reached this step

    @property
    def pending(self) -> bool:
        """Whether a branch has been added since the last :meth:`take`."""
        return self._scores is not None or self._sums is not None

    def add(self, loss: torch.Tensor, branch: int) -> None:
        """Backpropagates ``loss`` (branch ``NATURAL`` or ``ADVERSARIAL``) to the parameters, the
        graph retained for the next branch and the loss's own backward."""
        if self.folds_on_arrival and branch in self._added:
            raise RuntimeError("a second micro-batch in a step of ProminenceScores(micro_batches=1): pass the number of "
                               "micro-batches a step has")
        self._added.append(branch)
        if self.folds_on_arrival and self._scores is None:
            self._scores, self._unreached = self._allocate_scores(), set(range(len(self.params)))
        if not self.folds_on_arrival and self._sums is None:
            self._sums = ([None] * len(self.params), [None] * len(self.params))
        if self.sharded:
            return self._add_by_backward(loss, branch)
        gather = self._fold if self.folds_on_arrival else self._sum
        handles = [param.register_hook(functools.partial(gather, branch, index)) for index, param in enumerate(self.params)]
        try:
            torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()

    def take(self) -> list[torch.Tensor]:
        """The step's scores, the same on every process; the scores of unused parameters are zero."""
        self._added = []
        if self.folds_on_arrival:
            scores, self._scores = self._scores, None
            for index in self._unreached:  # used by neither branch
                scores[index].zero_()
            return scores
        natural, adversarial = ([torch.zeros_like(local(p)) if g is None else g for p, g in zip(self.params, sums)] for sums in self._sums)
        self._sums = None
        if not self.sharded:  # a sharded gradient comes reduce-scattered, summed already
            all_reduce_sum(natural + adversarial)
        for index, (g_natural, g_adversarial) in enumerate(zip(natural, adversarial)):
            adversarial[index] = None  # the sums are ours: work in place, dropping each adversarial one once used
            if not self.signed:
                g_natural, g_adversarial = g_natural.abs_(), g_adversarial.abs_()
            natural[index] = g_natural.mul_(self.alpha).add_(g_adversarial, alpha=1 - self.alpha)
        return natural

    def _add_by_backward(self, loss: torch.Tensor, branch: int) -> None:
        """One branch's gradient shards, from a ``backward`` pass that leaves ``.grad`` as it was."""
        before = [param.grad for param in self.every_param]
        for param in self.every_param:
            param.grad = None
        try:
            loss.backward(retain_graph=True)
            for index, param in enumerate(self.params):
                if param.grad is not None:
                    self._sum(branch, index, local(param.grad))
        finally:
            for param, grad in zip(self.every_param, before):
                param.grad = grad

    def _fold(self, branch: int, index: int, grad: torch.Tensor) -> torch.Tensor:
        magnitude = grad if self.signed else grad.abs()
        score = self._scores[index]
        if branch == NATURAL:
            torch.mul(magnitude, self.alpha, out=score)
        else:
            if index in self._unreached:  # unused by the natural branch: its term is zero
                score.zero_()
            score.add_(magnitude, alpha=1 - self.alpha)
        self._unreached.discard(index)
        return _placeholder(grad)

    def _allocate_scores(self) -> list[torch.Tensor]:
        """One buffer for the scores of all the parameters of a dtype and device, made before the
        step's first backward pass and handed out as views: a CPU heap lays one block out better
        than a tensor at a time among the backward pass's temporaries (the step's resident peak
        rose by 1.34x the parameters' bytes over TRADES's with a tensor at a time, about 1.0x with
        one buffer; docs/cure.md, "Cost"), and the scores are freed together."""
        scores = [None] * len(self.params)
        for dtype, device in dict.fromkeys((p.dtype, p.device) for p in self.params):
            group = [i for i, p in enumerate(self.params) if (p.dtype, p.device) == (dtype, device)]
            flat = torch.empty(sum(self.params[i].numel() for i in group), dtype=dtype, device=device)
            for i, view in zip(group, flat.split([self.params[i].numel() for i in group])):
                scores[i] = view.view_as(self.params[i])
        return scores

    def _sum(self, branch: int, index: int, grad: torch.Tensor) -> torch.Tensor:
        sums = self._sums[branch]
        if sums[index] is None:
            sums[index] = grad.clone()  # autograd's own tensor may be a view or expanded
        else:
            sums[index].add_(grad)
        return _placeholder(grad)


def _placeholder(grad: torch.Tensor) -> torch.Tensor:
    """A zero of ``grad``'s shape that takes no memory (stride 0): what ``torch.autograd.grad``
    returns once a hook has consumed the gradient."""
    return torch.zeros((), dtype=grad.dtype, device=grad.device).expand_as(grad)


def sharded_prominence_masks(shards: list[torch.Tensor], percent: float, sizes: list[int], group=None) -> list[torch.Tensor]:
    """:func:`prominence_mask` of tensors sharded across the processes of ``group``, without
    gathering them: ``shards[i]`` is this process's part of tensor i (``sizes[i]`` entries in all),
    the tensor's flattened entries split into consecutive parts in the order of the processes' ranks
    (FSDP2's ``Shard(0)`` of a row-major tensor; a part may be empty). Returns this process's part
    of each mask, equal entry for entry to the mask of the whole tensor.

    A radix selection on the order-preserving keys of :func:`_keep_masks_by_one_sort`: four rounds
    of 256-bin histograms over the next 8 bits of the keys that share the threshold's prefix found
    so far, summed across processes in one all-reduce per round for all tensors at once, find
    each tensor's threshold key; one all-gather of the counts of entries at the threshold then
    breaks its ties by global position (lower ranks first), as a stable sort of the whole tensor
    would. Five collectives a step whatever the number of tensors, fixed shapes, nothing read
    back to the host. Scores of 32 bits or fewer (fp32, bf16, fp16).
    """
    if any(shard.dtype == torch.float64 for shard in shards):
        raise TypeError("sharded_prominence_masks selects on 32-bit keys: float64 scores are not supported")
    if not shards:
        return []
    device = shards[0].device
    keys = [_ascending_keys(shard.detach().reshape(-1)) for shard in shards]
    # The number of entries still to conserve at or above the current prefix, per tensor.
    remaining = torch.tensor([math.floor(percent * n / 100) for n in sizes], dtype=torch.int64, device=device)
    prefix = torch.zeros(len(shards), dtype=torch.int64, device=device)
    bins = torch.arange(256, device=device)
    for shift in (24, 16, 8, 0):
        histograms = torch.zeros(len(shards), 256, dtype=torch.int64, device=device)
        for index, key in enumerate(keys):
            matches = (key >> (shift + 8)) == prefix[index]
            histograms[index].scatter_add_(0, (key >> shift) & 255, matches.to(torch.int64))
        if world_size(group) > 1:
            dist.all_reduce(histograms, group=group)
        at_or_below = histograms.cumsum(1)
        # The bin holding the remaining-th smallest key (the first bin when nothing is to be conserved).
        chosen = torch.searchsorted(at_or_below, remaining.clamp(min=1).unsqueeze(1)).squeeze(1).clamp(max=255)
        below = (at_or_below - histograms).gather(1, chosen.unsqueeze(1)).squeeze(1)
        remaining = torch.where(remaining > 0, remaining - below, remaining)
        prefix = prefix * 256 + torch.where(remaining > 0, chosen, bins[0])
    # prefix is each tensor's threshold key; ``remaining`` entries at it are conserved, earliest first.
    at_threshold = [key == prefix[index] for index, key in enumerate(keys)]
    counts = torch.stack([tied.sum(dtype=torch.int64) for tied in at_threshold])
    if world_size(group) > 1:
        every = [torch.empty_like(counts) for _ in range(world_size(group))]
        dist.all_gather(every, counts, group=group)
        before = torch.stack(every[:dist.get_rank(group)]).sum(0) if dist.get_rank(group) else torch.zeros_like(counts)
    else:
        before = torch.zeros_like(counts)
    masks = []
    for index, (key, tied, shard) in enumerate(zip(keys, at_threshold, shards)):
        rank_among_ties = tied.to(torch.int64).cumsum(0) + before[index]
        conserved = (key < prefix[index]) | (tied & (rank_among_ties <= remaining[index]))
        masks.append((~conserved).view_as(shard))
    return masks


def _ascending_keys(flat: torch.Tensor) -> torch.Tensor:
    """Each score's float32 bits made order-preserving, in [0, 2^32) as int64: negative floats' bits
    inverted, positive ones' sign bit set; NaN ranks as +inf and -0.0 as 0.0, as in the reference."""
    flat = torch.nan_to_num(flat.float(), nan=math.inf, posinf=math.inf, neginf=-math.inf)
    flat = torch.where(flat == 0, 0.0, flat)  # -0.0 and 0.0 tie, as they compare equal
    bits = flat.view(torch.int32).to(torch.int64)  # sign and magnitude, read as two's complement
    return torch.where(bits < 0, ~bits, bits + 2**31)
