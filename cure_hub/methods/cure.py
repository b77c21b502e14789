"""CURE: Conserve-Update-Revise (Gowda, Zonooz & Arani, ICLR 2024).

One optimiser step (Algorithm 1; equation numbers are the paper's, see docs/cure.md):

* Eq. 4  ``compute_loss``: x_adv by PGD on KL(p(x) || p(x + delta)), model in eval mode.
* Eq. 5  ``compute_loss``: L_adv = CE(f(x), y) + beta * KL(p(x) || p(x_adv)).
* Eq. 8  ``consistency_loss``: L_CR against the revision model; L = L_adv + gamma * L_CR.
* Eq. 6  ``compute_loss`` backpropagates CE(f(x), y) and CE(f(x_adv), y) to the masked weights
  (each through its own branch of the graph, outside any data-parallel reducer), and
  :class:`~cure_hub.methods.rgp.ProminenceScores` folds the gradients into
  RGP = alpha |g_nat| + (1 - alpha) |g_adv| as they arrive (summed across micro-batches and
  processes first where there are several).
* Mask   ``before_optimizer_step``: per tensor, :func:`~cure_hub.methods.rgp.prominence_mask`
  zeroes the gradient of L
  where RGP is below the tensor's p-th percentile (the weights "conserved" this step). With
  ``mask_interval`` k > 1 (a deviation from the paper), RGP and the masks are computed on steps
  0, k, 2k, ... only, and the last masks are applied in between.
* Eq. 7  ``after_optimizer_step``: with probability r_t, theta_rev <- d theta_rev + (1 - d) theta.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.profiler import record_function

from ..attacks import module_mode
from ..config import InputError, TrainConfig
from ..losses import kl_divergence
from ..model_configs import has_pretrained_weights, loads_pretrained_weights
from ..models import HeadNotFoundError
from .base import MAIN_LOSS, REGULARISER, Method, StepOutput, accuracy, unwrap
from .rgp import (ADVERSARIAL, NATURAL, ProminenceScores, all_reduce_sum, is_sharded, local, prominence_masks,
                  sharded_prominence_masks, world_size)


logger = logging.getLogger(__name__)

#: Accelerate's engines that split tensors in ways CURE's exact masks cannot follow ("FSDP" is FSDP1;
#: FSDP2 is supported, cure_hub.sharding.engine_name).
SHARDING_ENGINES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")
#: The revision model's share of the start at the last step from which a run is warned about.
START_SHARE_WARNED = 0.5

def revision_rate_at(step: int, total_steps: int, rate: float, floor: float, schedule: str) -> float:
    """The revision rate r_t: constant, or decayed linearly or by a half cosine from ``rate`` at
    step 0 to ``floor`` at the last step."""
    if schedule == "constant" or total_steps <= 1:
        return rate
    progress = min(step / (total_steps - 1), 1.0)
    if schedule == "linear":
        return floor + (rate - floor) * (1 - progress)
    return floor + (rate - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def revision_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The decay d of a revision after optimiser step ``step`` (Eq. 7): fixed, or with the official
    code's warm-up min(1 - 1/(t + 1), d), its counter t being ``step + 1`` there."""
    return min(1 - 1 / (step + 2), decay) if warmup else decay


def start_share_of_revision(config, total_steps: int) -> float:
    """The expected weight of the starting model in the revision model after ``total_steps``
    steps: each step revises with probability r_t by the decay d_t, which keeps d_t of the start's
    weight, so the share is prod_t (1 - r_t (1 - d_t)). The paper's r and d leave almost none of
    it after its 78,000 steps, and most of it after a few thousand."""
    c = config
    return math.prod(
        1 - revision_rate_at(step, total_steps, c.revision_rate, c.revision_rate_min, c.revision_rate_schedule)
        * (1 - revision_decay_at(step, c.revision_decay, c.revision_warmup))
        for step in range(total_steps)
    )


def masked_parameter_names(model: nn.Module, scope: str, include=None, exclude=()) -> list[str]:
    """Names of the parameters CURE masks. Patterns match names with or without ``backbone.``."""

    def matches(name, patterns):
        bare = name.removeprefix("backbone.")
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(bare, p) for p in patterns)

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if include is not None:
        chosen = [n for n in names if matches(n, include)]
    elif scope == "all":
        chosen = names
    elif scope == "official":  # the official code: the first convolution of each block, never the stem
        chosen = [n for n in names[1:] if "conv1" in n]
    else:
        try:
            head = set(model.classifier_parameter_names()) if hasattr(model, "classifier_parameter_names") else set()
        except HeadNotFoundError:
            if not exclude:  # the user's patterns name what the head is
                raise
            head = set()
        chosen = [n for n in names if n not in head]
    return [n for n in chosen if not matches(n, exclude)]


class CURE(Method):
    name = "cure"
    title = "CURE (Conserve-Update-Revise, ICLR 2024)"
    #: The official code's, which produced the published numbers, and the better measured here
    #: (docs/cure.md, "The defaults against the official code and the paper"); Eq. 5 reads 1
    #: (``--cure-settings paper`` or ``--beta 1``).
    default_beta = 5.0
    retains_graph = True  # the RGP gradients of both branches come from one graph (ProminenceScores.add)
    collapse_advice = (
        "L_CR pulls the model towards a revision model that is still mostly its natural start (a fixed decay d near 1 "
        "over a short run): add --revision-warmup (the official code's decay warm-up), or raise --revision-rate and "
        "lower --revision-decay, or lower --lr or --gamma")

    @classmethod
    def card_settings(cls, method: dict) -> str:
        """Every switch of a CURE run, and the preset they came from (``--cure-settings``)."""
        warmup = ", warm-up min(1 − 1/(t+2), d)" if method.get("revision_warmup") else ""
        return (f"p = {method['percentile']}, α = {method['alpha']}, γ = {method['gamma']}, β = {method['beta']}, "
                f"r = {method['revision_rate']} ({method['revision_rate_schedule']}), d = {method['revision_decay']}{warmup}; "
                f"RGP on {'the TRADES KL' if method.get('rgp_adversarial_loss') == 'kl' else 'CE'} of x_adv"
                f"{', signed' if method.get('rgp_signed') else ''}, mask scope {method.get('mask_scope')}; revision model in "
                f"{method.get('revision_mode')} mode, buffers {method.get('revision_buffers')}; "
                f"settings: {method.get('cure_settings', 'default')} (`--cure-settings`)")

    # ---- checks before training -----------------------------------------------------------------
    @classmethod
    def check_start(cls, config: TrainConfig) -> None:
        """CURE fine-tunes a naturally trained model. From random weights it is refused where the
        architecture has pretrained ones (the bare ``--model vit_small`` most likely meant them),
        warned about for an architecture with none, and let through silently with ``--from-scratch``
        (which says the user knows)."""
        model, optim = config.model, config.optim
        if model.init_from or optim.warmup_epochs or loads_pretrained_weights(model.model, model.pretrained):
            return
        if has_pretrained_weights(model.model) and not model.from_scratch:
            raise InputError(
                f"CURE fine-tunes a naturally trained model, and {model.model} has pretrained weights: add --pretrained "
                f"(its own input size and normalisation; CIFAR images are resized), or --init-from RUN, --warmup-epochs N "
                f"(CURE-Eff), or --from-scratch to start from random weights anyway"
            )
        if not model.from_scratch:
            logger.warning("CURE from random weights: the method assumes a naturally trained start. Pass --init-from (a "
                           "natural model), --pretrained, or --warmup-epochs N (CURE-Eff), or --from-scratch to say so.")

    @classmethod
    def check_engine(cls, engine: str, config: TrainConfig) -> None:
        """CURE's masks are percentiles over whole tensors and its revision model a copy of the whole
        model. Under DDP every process holds whole tensors; under FSDP2 each holds row shards, and the
        masks are selected across them (:func:`~cure_hub.methods.rgp.sharded_prominence_masks`).
        FSDP1's flat parameters, DeepSpeed's and Megatron-LM's partitions have no such selection: the
        masks would silently differ from the method's, so they are refused rather than trained. Under
        FSDP2 micro-batches are not reduce-scattered until the last one, so the prominence scores
        cannot be folded per micro-batch: gradient accumulation is refused there (measured: a run
        of 2 micro-batches a step left DDP's by up to 4e-2 in the weights in 4 steps)."""
        if engine in SHARDING_ENGINES:
            raise InputError(
                f"CURE cannot train under {engine}: its masks are percentiles over whole tensors, which {engine} "
                "splits without a way to select them exactly. Shard with FSDP2 (accelerate launch --use_fsdp "
                "--fsdp_version 2), or train data-parallel (DDP: accelerate config, distributed type MULTI_GPU)"
            )
        if engine == "FSDP2" and config.optim.gradient_accumulation_steps > 1:
            raise InputError(
                f"CURE under FSDP2 takes one micro-batch per step, got --gradient-accumulation-steps "
                f"{config.optim.gradient_accumulation_steps}: raise --batch-size or the processes instead, or train under DDP"
            )

    def check_model(self, model: nn.Module) -> None:
        """A head that cannot be found fails now, not after a warm-up."""
        c = self.config
        if c.use_rgp:
            masked_parameter_names(model, c.mask_scope, c.mask_include, c.mask_exclude)

    def schedule_warnings(self, total_steps: int) -> list[str]:
        """Warns when the revision model would still be mostly the starting model at the last step:
        its consistency loss then pulls the model back towards natural training all run long (the
        paper's r and d average over the last ~5,000 of its 78,000 steps; docs/cure.md)."""
        c = self.config
        if not c.use_revision or (share := start_share_of_revision(c, total_steps)) < START_SHARE_WARNED:
            return []
        rate = f"r {c.revision_rate:g}" + (
            "" if c.revision_rate_schedule == "constant" else f" ({c.revision_rate_schedule} to {c.revision_rate_min:g})")
        return [f"CURE's revision model will still be about {100 * share:.0f}% the starting model at the last of {total_steps} "
                f"steps ({rate}, d {c.revision_decay:g}), so L_CR keeps pulling the model back to it. For a run this short raise "
                "--revision-rate or lower --revision-decay (the cpu-small benchmark: 0.5 and 0.95), or add --revision-warmup."]

    # ---- training ----------------------------------------------------------------------------
    def setup(self, model: nn.Module, total_steps: int, seed: int = 0) -> None:
        config = self.config
        model = unwrap(model)
        named = dict(model.named_parameters())
        self.masked_names = (
            masked_parameter_names(model, config.mask_scope, config.mask_include, config.mask_exclude)
            if config.use_rgp else []
        )
        if config.use_rgp and not self.masked_names:
            raise ValueError("no parameter matches the CURE mask scope; check mask_include / mask_exclude")
        self.masked_params = [named[n] for n in self.masked_names]
        self.total_steps = total_steps
        self._prominence = ProminenceScores(self.masked_params, config.alpha, config.rgp_signed, self.micro_batches,
                                            every_param=list(model.parameters()))
        self._step = 0  # the optimiser step being taken, counted from the method's start
        self._masks: list[torch.Tensor] | None = None  # the last masks (kept when mask_interval > 1)
        self._statistics: dict[str, torch.Tensor] = {}
        self.revision_model = None
        if config.use_revision:
            self.revision_model = self._copy(model).requires_grad_(False)  # a copy is not compiled, even of a compiled model
            if self.compile_models:
                self.revision_model.compile()
            # Each process has updated its batch-norm statistics on its own batches: start from their mean.
            for buffer, mean in zip(_floating_buffers(self.revision_model), _mean_across_processes(_floating_buffers(model))):
                buffer.copy_(mean)
            # A CPU generator seeded alike on every process: every rank makes the same revision draws.
            self.revision_generator = torch.Generator().manual_seed(seed)

    def _copy(self, model: nn.Module) -> nn.Module:
        """The revision model's start: a copy of ``model``. A module sharded by FSDP2 cannot be
        deep-copied: the trainer's :attr:`~cure_hub.methods.base.Method.sharded_copy` builds one
        sharded alike, and each process copies its own shards into it."""
        if not any(is_sharded(param) for param in model.parameters()):
            return copy.deepcopy(model)
        if self.sharded_copy is None:
            raise RuntimeError("CURE's revision model of an FSDP2-sharded model needs Method.sharded_copy")
        revision = self.sharded_copy(model)
        with torch.no_grad():
            for target, source in zip(revision.parameters(), model.parameters(), strict=True):
                local(target).copy_(local(source))
            for target, source in zip(revision.buffers(), model.buffers(), strict=True):
                target.copy_(source)
        return revision

    # ---- Eq. 8 -------------------------------------------------------------------------------
    def consistency_loss(self, images, adversarial, logits, adv_logits) -> torch.Tensor:
        """L_CR = KL(p_rev(x) || p(x)) + KL(p_rev(x_adv) || p(x_adv)), revision outputs as fixed targets."""
        revision = self.revision_model
        with torch.inference_mode():  # lighter than no_grad; the outputs only ever serve as targets
            if self.config.revision_mode == "train":  # batch statistics: each batch on its own
                with module_mode(revision, training=True):
                    rev_logits, rev_adv_logits = revision(images), revision(adversarial)
            else:  # eval mode: examples do not interact, so one forward pass serves both batches
                with module_mode(revision, training=False):
                    rev_logits, rev_adv_logits = revision(torch.cat([images, adversarial])).chunk(2)
        if self._prominence.sharded:  # FSDP2 keeps a root's gathered weights after a forward no backward follows
            from torch.distributed.fsdp import FSDPModule  # imported already by whoever sharded the model

            for module in revision.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
        return kl_divergence(rev_logits, logits) + kl_divergence(rev_adv_logits, adv_logits)

    # ---- Eqs. 4, 5, 6 and the objective -----------------------------------------------------
    def compute_loss(self, model, images, labels) -> StepOutput:
        # The record_function labels cost nothing unless a profiler runs (benchmarks/step_cost.py).
        config = self.config
        with record_function("cure.attack"):
            adversarial = self.adversarial_examples(model, images, labels, loss="kl")  # Eq. 4
        with record_function("cure.forward"):
            logits, adv_logits = model(images), model(adversarial)
        natural_ce = F.cross_entropy(logits.float(), labels)
        robust_kl = kl_divergence(logits, adv_logits)
        loss = natural_ce + config.beta * robust_kl  # Eq. 5
        metrics = {"clean_acc": accuracy(logits, labels), "adv_acc": accuracy(adv_logits, labels), "kl": robust_kl.detach(),
                   MAIN_LOSS: torch.maximum(natural_ce, config.beta * robust_kl).detach()}
        if self.revision_model is not None and config.gamma > 0:
            with record_function("cure.revision_forward"):
                consistency = self.consistency_loss(images, adversarial, logits, adv_logits)
            weighted = config.gamma * consistency
            loss = loss + weighted
            metrics.update(consistency=consistency.detach(), **{REGULARISER: weighted.detach()})
        metrics["loss"] = loss.detach()
        if self.masked_params and self._masks_due():
            if config.rgp_adversarial_loss == "ce":
                adversarial_term = F.cross_entropy(adv_logits.float(), labels)
            else:  # official code: the TRADES KL term, through both branches
                adversarial_term = robust_kl
            # Scaled like the fp16 backward of L, so these gradients do not underflow either; a
            # percentile mask does not change when a score is scaled.
            with record_function("cure.rgp_gradients"):
                self._prominence.add(self.scale_loss(natural_ce), NATURAL)
                self._prominence.add(self.scale_loss(adversarial_term), ADVERSARIAL)
        return StepOutput(loss, metrics)

    # ---- Eq. 6 and the mask (Algorithm 1, the update) ---------------------------------------
    def _masks_due(self) -> bool:
        return self._step % self.config.mask_interval == 0 or self._masks is None

    def before_optimizer_step(self, model) -> dict[str, torch.Tensor]:
        if not self.masked_params:
            return {}
        if self._masks_due() and not self._prominence.pending:
            raise RuntimeError("before_optimizer_step called before compute_loss")
        with record_function("cure.mask"):
            return self._mask_gradients()

    def _compute_masks(self) -> list[torch.Tensor]:
        """Eq. 6 and the percentile mask of every masked tensor, from this step's RGP gradients
        (under FSDP2, this process's part of each mask, selected across the shards)."""
        scores = self._prominence.take()
        if self._prominence.sharded:
            return sharded_prominence_masks(scores, self.config.percentile, [param.numel() for param in self.masked_params])
        return prominence_masks(scores, self.config.percentile)

    def _mask_gradients(self) -> dict[str, torch.Tensor]:
        masks = self._compute_masks() if self._masks_due() else self._masks
        if self.config.mask_interval > 1:
            self._masks = masks
        record = self.record_statistics
        statistics = {}
        for name, param, mask in zip(self.masked_names, self.masked_params, masks):
            if param.grad is None:
                continue
            grad = local(param.grad)  # under FSDP2 this process's shard, and the mask's
            magnitude = grad.norm(1) if record else None
            grad.mul_(mask)  # zero where conserved
            if record:
                statistics[name] = torch.stack([torch.count_nonzero(grad).float(), magnitude.float()])
        if not record:
            return {}
        if self._prominence.sharded:  # each process counted its own shards
            all_reduce_sum(list(statistics.values()))
        sizes = {name: param.numel() for name, param in zip(self.masked_names, self.masked_params)}
        self._statistics = statistics = {name: values / sizes[name] for name, values in statistics.items()}
        return {"updated_share": torch.stack(list(statistics.values()))[:, 0].mean()}

    def extra_weights(self) -> dict[str, nn.Module]:
        return {"revision": self.revision_model} if self.revision_model is not None else {}

    def layer_statistics(self) -> dict[str, dict[str, float]]:
        """Per masked tensor, the share of entries with a non-zero masked gradient and the mean
        gradient magnitude before masking (the paper's Figure 6), at the last step that recorded
        them, with the tensor's number of dimensions (a plot keeps matrices and kernels by it).
        Costs one host synchronisation."""
        values = torch.stack(list(self._statistics.values())).tolist() if self._statistics else []
        ndim = {name: param.ndim for name, param in zip(self.masked_names, self.masked_params)}
        return {
            name: {"updated_share": share, "grad_magnitude": magnitude, "ndim": ndim[name]}
            for name, (share, magnitude) in zip(self._statistics, values)
        }

    # ---- Eq. 7 --------------------------------------------------------------------------------
    def current_revision_rate(self, step: int) -> float:
        c = self.config
        return revision_rate_at(step, self.total_steps, c.revision_rate, c.revision_rate_min, c.revision_rate_schedule)

    @torch.no_grad()
    @record_function("cure.revision_update")
    def after_optimizer_step(self, model, step: int) -> None:
        self._step = step + 1
        if self.revision_model is None:
            return
        draw = torch.rand((), generator=self.revision_generator).item()
        if draw >= self.current_revision_rate(step):
            return
        decay = revision_decay_at(step, self.config.revision_decay, self.config.revision_warmup)
        model = unwrap(model)
        # Shard by shard under FSDP2: both models are sharded alike.
        revision_params = [local(p) for p in self.revision_model.parameters()]
        torch._foreach_lerp_(revision_params, [local(p).detach() for p in model.parameters()], 1 - decay)
        if self.config.revision_buffers == "average" and (model_buffers := _floating_buffers(model)):
            # Towards the mean of every process's statistics, so the revision model is the same on every process.
            model_buffers = _mean_across_processes(model_buffers)
            torch._foreach_lerp_(_floating_buffers(self.revision_model), model_buffers, 1 - decay)
            for rev_buffer, buffer in zip(self.revision_model.buffers(), model.buffers()):
                if not rev_buffer.is_floating_point():  # counters such as num_batches_tracked
                    rev_buffer.copy_(buffer)

    def state_dict(self) -> dict[str, Any]:
        state = {}
        if self.revision_model is not None:
            state.update(revision_model=self.revision_model.state_dict(), revision_generator=self.revision_generator.get_state())
        if self._masks is not None:  # reused until the next mask step: a resumed run must apply the same
            state.update(masks=self._masks, step=self._step)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.revision_model is not None:
            self.revision_model.load_state_dict(state["revision_model"])
            self.revision_generator.set_state(state["revision_generator"])
        if "masks" in state:
            self._masks, self._step = [mask.to(p.device) for mask, p in zip(state["masks"], self.masked_params)], state["step"]


def _floating_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b for b in model.buffers() if b.is_floating_point()]


def _mean_across_processes(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean over processes of each tensor (new tensors; ``tensors`` themselves in a single process)."""
    if not tensors or world_size() == 1:
        return tensors
    return [t.div_(world_size()) for t in all_reduce_sum([t.clone() for t in tensors])]
