"""``MultiBitTrainer``: train one network (or, for ``dedicated``, one per bit-width) for many bit-widths.

The loop, per epoch: (score samples if the sampler asks) → plan each bit-width's samples → for every
mini-batch and every trained bit-width, highest first: forward at that bit-width → loss (labels at the
top precision, a teacher's soft labels below it) → backward (gradients accumulate) → one optimizer step
→ log. Methods differ only in the networks built (:mod:`.methods`), the teacher assignment
(:class:`.Distillation`) and the sampler (:mod:`.sampling`).

Under ``torchrun`` (``distributed=`` a :class:`~.distributed.DistContext` of several ranks) the same loop
runs in every process: the networks are wrapped in ``DistributedDataParallel``, every step's global batch
is split between the ranks, gradients are averaged once per step, metrics are summed over the ranks, and
only rank 0 writes (see docs/distributed.md).
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..checkpoint import save
from ..data import make_loader
from ..evaluation import evaluate, logits_of
from ..progress import progress
from ..quant import PrecisionNotTrainedError, RangeNotCalibratedError, SwitchableBatchNorm, precision, set_precision
from ..report import CSVLog, RunRecorder, format_table, plot_accuracy_vs_bits
from .bn import reestimate_bn
from .config import DivergenceError, TrainConfig, TrainConfigError, config_differences
from .distill import Distillation, TeacherMemory
from .distributed import (
    DistContext,
    DistributedError,
    broadcast_buffers,
    combine_bn_statistics,
    digest,
    parameter_checksum,
    rank_seed,
    sync_buffers,
)
from .methods import METHODS, BitModels, build_models
from .optim import LRSchedule, build_optimizer
from .sampling import (
    CoresetOptions,
    EpochSampler,
    FullDataSampler,
    checked_plan,
    describe,
    make_sampler,
    plan_overlap,
)
from .state import ResumeError, has_state, load_state, read_state_header, rng_state, save_state, set_rng_state
from .step import MultiBitStep

LOG_COLUMNS = ["epoch", "bits", "lr", "loss", "ce", "train_acc", "test_loss", "test_acc", "samples",
               "train_s", "scoring_s", "eval_s"]
EVAL_BN_BATCHES = 5         # batches per bit-width re-estimating BatchNorm statistics before a per-epoch evaluation
MEMORY_LIMIT = 4 * 2**30   # bytes of teacher logits kept for distillation with coreset sampling
# Settings that may change between an interrupted run and its resumption (and between the ranks of a job).
RESUME_IGNORED = ("device", "quiet", "data_dir", "data_source", "out", "num_workers", "resume", "overwrite")
# Settings added since states were first saved, with the value older states imply.
_ADDED_SETTINGS = {"amp": "off"}
# Parts of a sampler's description that depend on the process, not on the run.
_SAMPLER_PROCESS_KEYS = ("rank", "world_size", "shard_size")
PHASES = ("scoring", "train", "eval", "final_bn")


class MultiBitTrainer:
    """Train ``model`` for every bit-width in ``config.bits`` with ``config.method``.

    ``model`` is any float ``nn.Module`` (converted here with the method's quantization spec; an
    already converted model is used as it is). ``train_data`` is a Dataset (or a DataLoader, whose
    dataset is used: the trainer batches by index so that each bit-width can see its own subset);
    ``test_data`` a Dataset or any iterable of ``(images, labels)`` batches, evaluated at every trained
    bit-width after each epoch (see ``config.eval_every``). With ``out_dir`` the trainer writes
    ``state/`` (for :meth:`fit` with ``resume=True``) and ``log.csv`` every epoch, and the checkpoint,
    ``run.json`` and ``accuracy.png`` at the end. ``run_info`` (model and data settings) is stored with
    the configuration and compared on resume; ``data_info`` (``{"dataset": ..., "options": {...}}``)
    goes into the checkpoint so that ``anybit eval`` finds the data again.

    ``distributed``: a :class:`~anybit.train.distributed.DistContext` from ``init_distributed()`` (its
    device replaces ``device``); every rank builds the trainer with the same arguments, only rank 0 writes
    to ``out_dir`` and prints. ``channels_last``: the networks and batches in channels-last memory format
    (default: on CUDA).
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset | DataLoader,
        test_data: Dataset | Iterable | None = None,
        config: TrainConfig | None = None,
        *,
        sampler: EpochSampler | None = None,
        device: str | torch.device = "cpu",
        out_dir: str | os.PathLike | None = None,
        quiet: bool = False,
        run_info: dict[str, Any] | None = None,
        data_info: dict[str, Any] | None = None,
        on_epoch_end: Callable[["MultiBitTrainer", dict], None] | None = None,
        distributed: DistContext | None = None,
        channels_last: bool | None = None,
    ) -> None:
        self.config = (config or TrainConfig()).resolved()
        cfg = self.config
        self.dist = distributed if distributed is not None else DistContext(device=torch.device(device))
        self.device = self.dist.device if distributed is not None else torch.device(device)
        self.quiet = quiet or not self.dist.is_main
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._writes = self.out_dir is not None and self.dist.is_main
        self.on_epoch_end = on_epoch_end
        self.train_set = train_data.dataset if isinstance(train_data, DataLoader) else train_data
        self.test_data = test_data
        self.run_info = dict(run_info or {})
        self.data_info = data_info or {"dataset": getattr(self.train_set, "name", None), "options": {}}

        self.bits = cfg.bits_desc                       # training order: highest precision first
        self._check_batch_split()
        self.models: BitModels = build_models(model, cfg, _example(self.train_set)).to(self.device)
        self.channels_last = self.device.type == "cuda" if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.models.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.models, cfg)
        self.schedule = LRSchedule(self.optimizer, cfg.schedule, cfg.epochs)
        self.sampler = sampler if sampler is not None else make_sampler(
            CoresetOptions(cfg.coreset_fraction, cfg.coreset_score, cfg.coreset_refresh, cfg.coreset_warmup,
                           cfg.seed), self.train_set, self.bits, distributed=self.dist)
        self.memory = self._teacher_memory()
        # every rank must train the same thing: compared before DistributedDataParallel touches the weights
        self.dist.check_same(self._agreement(), "the training settings, data and model")
        self._ddp = self._wrap_ddp()
        self.step = MultiBitStep(self.models, self.bits, cfg.distill, cfg.label_smoothing, self.memory,
                                 forward_module=self._runner, amp=cfg.amp)

        self.epoch = 0                                   # epochs completed
        self.history: list[dict] = []
        self.timings: dict[str, float] = {}
        self.samples = {str(b): {"train": 0, "scoring": 0, "final_bn": 0} for b in self.bits}
        self.final: dict[int, dict] = {}
        self.warnings: list[str] = []
        self.recorder = RunRecorder(self.out_dir, "train", self.full_config()) if self._writes else None
        self._log = CSVLog(self.out_dir / "log.csv", LOG_COLUMNS) if self._writes else None

    # ------------------------------------------------------------------ public API
    def full_config(self) -> dict:
        """Training settings plus ``run_info``: what a resumed run must match (and every rank must share)."""
        sampler = {k: v for k, v in describe(self.sampler).items() if k not in _SAMPLER_PROCESS_KEYS}
        return {**self.run_info, **self.config.to_dict(), "sampler": sampler}

    def fit(self, resume: bool = False) -> dict:
        """Train for ``config.epochs`` epochs (continuing a saved state with ``resume``); returns the
        final per-bit-width metrics, the per-epoch history, timings and samples processed."""
        cfg = self.config
        if resume:
            self._restore()
        else:
            _seed_everything(rank_seed(cfg.seed, self.dist.rank))
        start = time.perf_counter()
        for epoch in range(self.epoch, cfg.epochs):
            record = self._train_epoch(epoch)
            if epoch + 1 == cfg.epochs and cfg.final_bn_batches:
                record["seconds"]["final_bn"] = self._reestimate_bn(record)
            if self.test_data is not None and self._eval_due(epoch):
                record["seconds"]["eval"] = self._timed_eval(record, epoch)
            self._gather_rank_records(record)
            self._check_ranks_agree(epoch)
            self.history.append(record)
            self.epoch = epoch + 1
            now = time.perf_counter()
            self.add_time("fit", now - start)   # per epoch, so that the saved state carries it across --resume
            start = now
            self._end_epoch(record)
        self.add_time("fit", time.perf_counter() - start)
        self.final = self._final_metrics()
        if self.dist.is_main:   # the ranks hold the same weights: one of them warns
            self._warn_if_collapsed()
        if self._writes:
            self._write_outputs()
        for model in self._unique_models():
            set_precision(model, max(self.config.bits))
        self.dist.barrier("the end of training")   # every rank finishes with rank 0's outputs written
        return {"final": self.final, "history": self.history, "timings_s": dict(self.timings),
                "samples": {int(b): v for b, v in self.samples.items()}, "throughput": self.throughput()}

    def model_for(self, bits: int) -> nn.Module:
        """The trained network that runs at ``bits`` (for dedicated: the one trained nearest to it)."""
        return self.models.for_bits(bits)

    def evaluate(self, bits: Iterable[int] | None = None, data: Dataset | Iterable | None = None) -> dict[int, dict]:
        """:func:`anybit.evaluation.evaluate` (``accuracy``, ``loss``, ``samples``, ``seconds``) at each bit-width
        (default: the trained ones), keyed by bit-width, on ``data`` or the test data. A bit-width the model
        cannot run as it is (a switchable BatchNorm without statistics for it) is left out with a warning.
        With several ranks every rank must call it: a Dataset is split between them and the counts summed."""
        loader, sharded = self._eval_loader(data if data is not None else self.test_data)
        results, skipped = {}, {}
        for b in (self.bits if bits is None else bits):
            model = self.models.for_bits(b)
            try:
                with precision(model, b):
                    r = evaluate(model, loader, self.device, desc=f"eval {b}-bit", quiet=self.quiet)
            except (PrecisionNotTrainedError, RangeNotCalibratedError) as e:
                skipped[b] = str(e)   # the same on every rank: the model is the same
                continue
            results[b] = self._reduce_eval(r) if sharded else r
        if skipped and self.dist.is_main:
            warnings.warn(f"not evaluated at {sorted(skipped)} bits: {next(iter(skipped.values()))}", stacklevel=2)
        return results

    def throughput(self) -> dict:
        """Images per second per precision (forward and backward at that precision) and seconds per phase
        (scoring, training, evaluation, final BatchNorm statistics), per rank and for the job: the job's
        rate is all ranks' images over the slowest rank's time."""
        per_rank: dict[int, dict] = {}
        for record in self.history:
            for entry in record.get("ranks", []):
                acc = per_rank.setdefault(entry["rank"], {"rank": entry["rank"], "samples": {}, "train_s": {},
                                                           "seconds": dict.fromkeys(PHASES, 0.0)})
                for b, n in entry["samples"].items():
                    acc["samples"][b] = acc["samples"].get(b, 0) + n
                    acc["train_s"][b] = acc["train_s"].get(b, 0.0) + entry["train_s"].get(b, 0.0)
                for phase in PHASES:
                    acc["seconds"][phase] += entry["seconds"].get(phase, 0.0)
        ranks = [per_rank[r] for r in sorted(per_rank)]
        for acc in ranks:
            acc["images_per_s"] = {b: _rate(n, acc["train_s"][b]) for b, n in acc["samples"].items()}
            acc["train_images_per_s"] = _rate(sum(acc["samples"].values()), acc["seconds"]["train"])
        bits = [str(b) for b in self.bits]
        job = {
            "images_per_s": {b: _rate(sum(a["samples"].get(b, 0) for a in ranks),
                                      max((a["train_s"].get(b, 0.0) for a in ranks), default=0.0)) for b in bits},
            "train_images_per_s": _rate(sum(sum(a["samples"].values()) for a in ranks),
                                        max((a["seconds"]["train"] for a in ranks), default=0.0)),
            "seconds": {phase: max((a["seconds"][phase] for a in ranks), default=0.0) for phase in PHASES},
        }
        return {"world_size": self.dist.world_size, **job, "ranks": ranks}

    def summary_table(self, markdown: bool = False) -> str:
        """Per-bit-width table of the final metrics and samples processed."""
        rows = []
        for b in self.bits:
            m = self.final.get(b, {})
            s = self.samples[str(b)]
            rows.append([b, m.get("accuracy"), m.get("loss"), m.get("train_accuracy"), s["train"],
                         m.get("train_seconds")])
        headers = ["bits", "test top-1 %", "test loss", "train top-1 %", "samples", "train s"]
        return format_table(headers, rows, markdown=markdown)

    # ------------------------------------------------------------------ the loop
    def _train_epoch(self, epoch: int) -> dict:
        cfg, bits = self.config, self.bits
        stats = _EpochStats(bits, self.device)
        record: dict[str, Any] = {"epoch": epoch + 1, "seconds": {"scoring": 0.0, "train": 0.0}}

        # 1. sample: which data each bit-width sees this epoch
        if self.sampler.needs_scoring(epoch):
            t0 = time.perf_counter()
            info = self.sampler.update_scores(self.models.for_bits(bits[0]), self.train_set, list(bits), epoch,
                                              self.device)
            record["seconds"]["scoring"] = time.perf_counter() - t0
            record["scoring"] = dict(info or {})
            self._count_scoring(info)
        # the whole job's plan (every rank computes the same one); _StepBatches takes this rank's share
        planner = getattr(self.sampler, "global_plan", self.sampler.plan_epoch)
        plan = checked_plan(planner(epoch, list(bits)), list(bits), len(self.train_set))
        record["overlap"] = plan_overlap(plan, len(self.train_set))
        record["subsets"] = digest(plan)
        self.dist.check_same(record["subsets"], f"the data each bit-width trains on in epoch {epoch + 1}")
        batches = _StepBatches(self.train_set, plan, self._bit_batch_size(plan), cfg.seed, epoch, self.device,
                               cfg.num_workers, self.dist.rank, self.dist.world_size, self.channels_last)

        t0 = time.perf_counter()
        record["lr"] = self.optimizer.param_groups[0]["initial_lr"] * self.schedule.factor(epoch)
        bar = progress(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", total=len(batches), quiet=self.quiet)
        for step, batch in enumerate(bar):
            self.schedule.apply(epoch + step / len(batches))
            logits_at: dict[int, torch.Tensor] = {}
            step_losses = []
            for b in bits:
                # 2.-3. forward at b, loss (labels at the top precision, a teacher's soft labels below it if
                # distilling), backward: gradients of all bit-widths accumulate
                stats.timer.start(b)
                result = self.step.run_bit(b, batch, logits_at)
                stats.add(b, result.loss, result.logits, batch[b][1])
                stats.timer.stop(b)
                step_losses.append(result.loss)
            # 4. one optimizer step for all bit-widths (none after a NaN/inf loss: stop with the weights as they are)
            _check_finite(step_losses, bits, epoch, step, self.optimizer.param_groups[0]["lr"], self.out_dir,
                          self.dist)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if step % 20 == 0 and not getattr(bar, "disable", True):
                bar.set_postfix(loss=f"{stats.loss_now():.3f}")
        if self.dist.enabled:   # the ranks' running statistics (and teachers' memories) made equal
            sync_buffers(self.dist, self._unique_models())
            if self.memory is not None:
                self._merge_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        record["seconds"]["train"] = time.perf_counter() - t0
        record["steps"] = len(batches)
        # 5. log
        record["bits"], self._rank_bits = stats.summary(self.dist)
        for b in bits:
            self.samples[str(b)]["train"] += record["bits"][str(b)]["samples"]
        return record

    # ------------------------------------------------------------------ several processes
    def _check_batch_split(self) -> None:
        world = self.dist.world_size
        if world > 1 and (self.config.batch_size % world or self.config.batch_size // world < 2):
            raise DistributedError(
                f"batch_size={self.config.batch_size} is the global batch, split between {world} processes: it "
                f"must be a multiple of {world} with at least 2 samples per process (e.g. "
                f"{max(2, math.ceil(self.config.batch_size / world)) * world})")

    def _agreement(self) -> dict:
        """What every rank must share: settings, data sizes and labels, the model's tensors' names and shapes."""
        config = {k: v for k, v in self.full_config().items() if k not in RESUME_IGNORED}
        labels = getattr(self.train_set, "targets", None)
        shapes = [(name, list(t.shape)) for name, t in self.models.state_dict().items()]
        return {**config, "train_samples": len(self.train_set),
                "test_samples": len(self.test_data) if hasattr(self.test_data, "__len__") else None,
                "train_labels": digest({"labels": torch.as_tensor(labels)}) if labels is not None else None,
                "model_tensors": digest({"shapes": torch.tensor([d for _, shape in shapes for d in shape] or [0])})
                + f"/{len(shapes)}"}

    def _wrap_ddp(self) -> dict[int, nn.Module]:
        """Each network in DistributedDataParallel (keyed by the network's id). Buffers are not broadcast at
        every forward: per-precision BatchNorm statistics are averaged over the ranks at the end of each
        epoch instead (:func:`~.distributed.sync_buffers`)."""
        if not self.dist.enabled:
            return {}
        from torch.nn.parallel import DistributedDataParallel

        # newer torch calls it forward_sync_buffers (buffers are still synchronised once, at construction)
        no_forward_sync = ("forward_sync_buffers" if "forward_sync_buffers" in
                           inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers")
        kwargs: dict[str, Any] = {no_forward_sync: False, "process_group": self.dist.group}
        if self.device.type == "cuda":
            kwargs.update(device_ids=[self.device.index], output_device=self.device.index)
        wrapped = {}
        for member in self.models.values():
            # a switchable BatchNorm's other bit-widths' parameters are unused in each pass
            unused = any(isinstance(m, SwitchableBatchNorm) for m in member.modules())
            wrapped[id(member)] = DistributedDataParallel(member, find_unused_parameters=unused, **kwargs)
        return wrapped

    def _runner(self, bits: int) -> nn.Module:
        model = self.models.for_bits(bits)
        return self._ddp.get(id(model), model)

    def _merge_memory(self) -> None:
        """Each rank's teacher memory holds the logits of what it trained on; after an epoch every rank gets
        all of them (the mean where several ranks hold one sample)."""
        for t in self.memory.teachers:
            known = self.memory.known[t]
            count = self.dist.all_reduce_(known.float())
            if t not in self.memory.logits:
                continue
            total = self.dist.all_reduce_(self.memory.logits[t].float() * known[:, None])
            has = count > 0
            self.memory.logits[t] = torch.where(has[:, None], total / count.clamp_min(1)[:, None],
                                                torch.zeros_like(total)).to(torch.float16)
            self.memory.known[t] = has

    def _gather_rank_records(self, record: dict) -> None:
        """Every rank's own times and samples of this epoch, in ``record["ranks"]``; a bit-width's
        ``train_s`` becomes the slowest rank's."""
        mine = {"rank": self.dist.rank, "seconds": dict(record["seconds"]), **self._rank_bits}
        record["ranks"] = self.dist.all_gather_object(mine)
        for b, m in record["bits"].items():
            m["train_s"] = max(entry["train_s"][b] for entry in record["ranks"])

    def _check_ranks_agree(self, epoch: int) -> None:
        """The ranks' weights must stay equal (DistributedDataParallel averages the same gradients everywhere);
        a difference means a rank computed something the others did not, and training would silently fork."""
        if not self.dist.enabled:
            return
        sums = self.dist.all_gather_object(parameter_checksum(self._unique_models()))
        differ = [r for r, s in enumerate(sums) if s != sums[0]]
        if differ:
            raise DistributedError(
                f"after epoch {epoch + 1} the weights of rank(s) {differ} differ from rank 0's. Something in the "
                f"model changes its parameters outside the optimizer step (e.g. activation ranges initialised from "
                f"each rank's first batch: initialise them before training, anybit.calibrate_activations)")

    def _teacher_memory(self) -> TeacherMemory | None:
        """Where a student finds its teacher's logits when their batches differ (coreset sampling)."""
        teachers = Distillation(self.config.distill, self.bits).teacher_bits
        if not teachers or isinstance(self.sampler, FullDataSampler):
            return None
        classes = getattr(self.train_set, "num_classes", None)
        if classes and TeacherMemory.size_bytes(len(teachers), len(self.train_set), classes) > MEMORY_LIMIT:
            raise TrainConfigError(
                f"distillation with coreset sampling keeps each teacher's logits on every training sample: "
                f"{TeacherMemory.size_bytes(len(teachers), len(self.train_set), classes) / 2**30:.1f} GiB for "
                f"{len(teachers)} teacher bit-width(s), {len(self.train_set)} samples and {classes} classes. Use "
                f"distill='from-top' (one teacher) or distill='none'")
        return TeacherMemory(teachers, len(self.train_set), self.device)

    def _bit_batch_size(self, plan: dict) -> int:
        """Samples per bit-width and step. ``coreset_steps="full"``: a subset epoch takes as many steps as a
        full-data one (each bit-width's batch shrinks with the subset); else ``batch_size``."""
        cfg = self.config
        subset = next((idx.numel() for idx in plan.values() if idx is not None), None)
        if cfg.coreset_steps != "full" or subset is None:
            return cfg.batch_size
        full_steps = max(1, len(self.train_set) // cfg.batch_size)
        world = self.dist.world_size   # a multiple of the ranks, at least 2 samples each
        return max(2 * world, min(cfg.batch_size, subset // full_steps) // world * world)

    def _reestimate_bn(self, record: dict) -> float:
        """The final BatchNorm statistics pass (the same for every method; each dedicated model at its
        own bit-width). Returns its seconds."""
        seconds, record["final_bn"] = self._statistics_pass(self.config.final_bn_batches, self.config.seed)
        for b, counts in record["final_bn"].items():
            self.samples[b]["final_bn"] = self.samples[b].get("final_bn", 0) + counts["samples"]
        return seconds

    def _statistics_pass(self, batches: int, seed: int) -> tuple[float, dict[str, dict]]:
        """Every BatchNorm's running statistics re-estimated over ``batches`` training batches per bit-width
        (:func:`reestimate_bn`); returns (seconds, per-bit-width counts). With several ranks each runs its share
        of the one-process batches and every rank ends with the one-process statistics (below)."""
        cfg = self.config
        loader = make_loader(self.train_set, cfg.batch_size, shuffle=True, seed=seed, num_workers=cfg.num_workers)
        # The one-process batches, dealt out to the ranks (rank r takes batches r, r + N, ...); their
        # statistics are averaged over the ranks below, weighted by batches: the one-process averages.
        split = self.dist.enabled and min(batches, len(loader)) >= self.dist.world_size
        if split:
            loader = _EveryNth(loader, batches, self.dist.rank, self.dist.world_size)
        if self.models.shared:
            groups = [(self.models.for_bits(self.bits[0]), self.bits)]
        else:
            groups = [(self.models.for_bits(b), [b]) for b in self.bits]
        seconds, counts = 0.0, {}
        for model, bits in groups:
            done = reestimate_bn(model, loader, bits, batches, self.device)
            seconds += done["seconds"]
            counts.update({str(b): c for b, c in done["bits"].items()})
        if split:   # every statistics set, per-precision ones included
            combine_bn_statistics(self.dist, self._unique_models())
            for c in counts.values():   # the job's batches and samples, not this rank's
                c.update(batches=min(batches, len(loader.loader)),
                         samples=int(self.dist.all_reduce_(torch.tensor(c["samples"])).item()))
        else:   # one process, or fewer batches than ranks (each ran them all): rank 0's result is everyone's
            broadcast_buffers(self.dist, self._unique_models())
        return seconds, counts

    @torch.no_grad()
    def _warn_if_collapsed(self) -> None:
        """Warn when a training collapsed to chance: every trained bit-width gives one and the same output for
        every input, or one bit-width predicts a single class for every input while another has clearly learnt
        (accuracy 30 points above the most common label's share), on up to 64 training images spread over the
        training set."""
        n = min(len(self.train_set), 64)
        if n < 2:
            return
        index = torch.linspace(0, len(self.train_set) - 1, n).long().tolist()
        images = torch.stack([self.train_set[i][0] for i in index]).to(self.device)
        labels = torch.as_tensor([int(self.train_set[i][1]) for i in index], device=self.device)
        majority = float(labels.unique(return_counts=True)[1].max()) / n
        constant, one_class, learnt = [], [], False
        for b in self.bits:
            model = self.models.for_bits(b)
            was_training = model.training
            model.eval()
            try:
                with precision(model, b):
                    logits = logits_of(model(images)).float()
            finally:
                model.train(was_training)
            spread = float((logits - logits[:1]).abs().max())
            if not (math.isfinite(spread) and spread > 1e-6 * (1.0 + float(logits.abs().max()))):
                constant.append(b)
            if logits.dim() == 2:
                predicted = logits.argmax(1)
                if int(predicted.unique().numel()) == 1:
                    one_class.append(b)
                learnt = learnt or float((predicted == labels).float().mean()) >= majority + 0.3
        if len(constant) == len(self.bits):
            message = (f"training collapsed: at every trained bit-width ({', '.join(map(str, self.bits))}) the "
                       f"network gives the same output for every input, so it predicts one class (chance accuracy); "
                       f"lower the learning rate (--lr) or check the data and labels")
        elif one_class and learnt:
            message = (f"training collapsed at {', '.join(map(str, one_class))} bits: there the network predicts one "
                       f"class for every input (chance accuracy) while other trained bit-widths "
                       f"have learnt; lower the learning rate (--lr) or train again with another --seed")
        else:
            return
        self.warnings.append(message)
        warnings.warn(message, stacklevel=3)

    # ------------------------------------------------------------------ evaluation, state and outputs
    def _eval_due(self, epoch: int) -> bool:
        every = self.config.eval_every
        return epoch + 1 == self.config.epochs or (every > 0 and (epoch + 1) % every == 0)

    def _timed_eval(self, record: dict, epoch: int) -> float:
        """Test accuracy after an epoch. Before the last one, every BatchNorm's running statistics are first
        re-estimated on a few batches per bit-width (momentum averages lag far behind weights that still move
        fast, more so with a set per bit-width), so the line shows what the state saved after this epoch gives;
        after the last epoch the final statistics pass has just run and the checkpoint is evaluated as saved."""
        t0 = time.perf_counter()
        if epoch + 1 < self.config.epochs and self.config.final_bn_batches:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                # its augmentation draws must not change the training that follows
                self._statistics_pass(min(EVAL_BN_BATCHES, self.config.final_bn_batches),
                                      self.config.seed * 1_000_003 + epoch)
        for b, r in self.evaluate().items():
            record["bits"][str(b)].update(test_acc=r["accuracy"], test_loss=r["loss"], eval_s=r["seconds"])
        return time.perf_counter() - t0

    def _eval_loader(self, data) -> tuple[Iterable, bool]:
        """The loader, and whether it holds only this rank's share (a Dataset is split between the ranks;
        any other iterable is evaluated whole by every rank)."""
        if data is None:
            raise ValueError("no test data: pass test_data to MultiBitTrainer or data to evaluate()")
        if isinstance(data, Dataset):
            sharded = self.dist.enabled
            if sharded:
                data = Subset(data, self.dist.shard(len(data)).tolist())
            return DataLoader(data, batch_size=self.config.batch_size, shuffle=False,
                              num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda"), sharded
        return data, False

    def _reduce_eval(self, result: dict) -> dict:
        """One rank's evaluation of its share turned into the whole data's (counts and loss sums added)."""
        mine = (round(result["accuracy"] * result["samples"] / 100.0), result["loss"] * result["samples"],
                result["samples"], result["seconds"])
        parts = self.dist.all_gather_object(mine)
        correct, loss_sum, total = (sum(p[i] for p in parts) for i in range(3))
        return {"accuracy": 100.0 * correct / total, "loss": loss_sum / total, "samples": total,
                "seconds": max(p[3] for p in parts)}

    def _end_epoch(self, record: dict) -> None:
        for phase, seconds in record["seconds"].items():
            self.add_time(phase, seconds)
        rank_rng = self.dist.all_gather_object(rng_state()) if self.dist.enabled else None
        if self._writes:
            self._log.append(_log_rows(record))
            t0 = time.perf_counter()
            save_state(self.out_dir, self.epoch, self._state(rank_rng))
            self.add_time("state_save", time.perf_counter() - t0)
        if not self.quiet:
            print(epoch_line(record, self.config.epochs), file=sys.stderr, flush=True)
        if self.on_epoch_end is not None:
            self.on_epoch_end(self, record)

    def _state(self, rank_rng: list | None = None) -> dict:
        return {
            "config": self.full_config(),
            "world_size": self.dist.world_size,
            "rank_rng": rank_rng,
            "models": self.models.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "sampler": self.sampler.state_dict(),
            "teacher_memory": self.memory.state_dict() if self.memory is not None else None,
            "rng": rng_state(),
            "history": self.history,
            "timings": self.timings,
            "samples": self.samples,
        }

    def check_resumable(self) -> int:
        """Epochs done by the saved run in ``out_dir``; raises :class:`ResumeError` if its settings differ."""
        if self.out_dir is None or not has_state(self.out_dir):
            raise ResumeError(f"there is no training state to resume in {self.out_dir}: start the run without "
                              f"--resume (or with --overwrite)")
        header = read_state_header(self.out_dir)
        check_same_config(header["state"]["config"], self.full_config())
        return header["epoch"]

    def _restore(self) -> None:
        payload = None
        with self.dist.agreed("reading the saved training state"):   # rank 0 reads it, every rank gets it
            if self.dist.is_main:
                self.check_resumable()
                payload = load_state(self.out_dir)
        epoch, state = self.dist.broadcast_object(payload)
        self.models.load_state_dict(state["models"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.sampler.load_state_dict(state["sampler"])
        if self.memory is not None and state.get("teacher_memory") is not None:
            self.memory.load_state_dict(state["teacher_memory"])
        rank_rng = state.get("rank_rng")
        if rank_rng is not None and len(rank_rng) == self.dist.world_size:
            set_rng_state(rank_rng[self.dist.rank])
        elif self.dist.is_main:
            set_rng_state(state["rng"])
        else:   # resumed with another number of processes: fresh streams for the other ranks
            _seed_everything(rank_seed(self.config.seed, self.dist.rank) + epoch)
        self.history, self.timings, self.samples = state["history"], state["timings"], state["samples"]
        self.epoch = epoch
        if self._log is not None:
            self._log.rewrite(row for record in self.history for row in _log_rows(record))

    def _final_metrics(self) -> dict[int, dict]:
        """The result schema (docs/results.md) from the last epoch's record: per bit-width ``accuracy`` and ``loss``
        on the test data (None when not evaluated), ``train_accuracy``, ``train_loss`` (cross-entropy against the
        labels), ``objective`` (the loss optimised, distillation included) and ``train_seconds``."""
        if not self.history:
            return {}
        last = self.history[-1]["bits"]
        return {int(b): {"accuracy": m.get("test_acc"), "loss": m.get("test_loss"),
                         "train_accuracy": m.get("train_acc"), "train_loss": m.get("ce"), "objective": m.get("loss"),
                         "train_seconds": sum(r["bits"][b]["train_s"] for r in self.history)}
                for b, m in last.items()}

    def _write_outputs(self) -> None:
        t0 = time.perf_counter()
        self.save_checkpoint(self.out_dir / "model")
        accuracy = {b: m["accuracy"] for b, m in self.final.items() if m.get("accuracy") is not None}
        if accuracy:
            plot_accuracy_vs_bits({self.config.method: accuracy},
                                  self.out_dir / "accuracy.png",
                                  title=f"{self.run_info.get('model', 'model')} ({self.config.method})")
        self.add_time("save", time.perf_counter() - t0)
        rec = self.recorder
        for phase, seconds in self.timings.items():
            rec.data["timings_s"][phase] = seconds
        rec.data["metrics"] = {"final": self.final, "samples_processed": self.samples}
        rec.data["throughput"] = self.throughput()
        rec.data["distributed"] = {k: v for k, v in self.dist.describe().items() if k != "rank"}
        rec.data["epochs"] = self.history
        rec.data["sampler"] = describe(self.sampler)
        rec.data["method"] = METHODS[self.config.method].summary
        rec.data["conversion"] = getattr(self._unique_models()[0], "anybit_meta", {}).get("conversion")
        rec.data["parameters"] = sum(p.numel() for p in self.models.parameters())
        rec.data["warnings"] = self.warnings
        rec.write()

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Save the trained network(s) with :func:`anybit.save`; for ``dedicated``, the top bit-width's
        model goes to ``path`` and every other one to ``path-<b>bit``. Returns the main tensors' path."""
        path = Path(path)
        top = max(self.config.bits)
        common = {"method": self.config.method, "bits_trained": sorted(self.config.bits), "data": self.data_info,
                  "train_config": self.config.to_dict(), "final": self.final}
        if self.models.shared:
            model = self.models["all"]
            set_precision(model, top)
            return save(model, path, **common)
        members = {str(b): path.name if b == top else f"{path.name}-{b}bit" for b in self.config.bits}
        for b in self.config.bits:
            model = self.models[f"b{b}"]
            set_precision(model, b)
            save(model, path.with_name(members[str(b)]), member_bits=b, members=members, **common)
        return path.with_name(path.name + ".safetensors")

    def _unique_models(self) -> list[nn.Module]:
        return list(self.models.values())

    def add_time(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` to the run's ``timings_s[phase]`` (e.g. data loading timed by the caller)."""
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    def _count_scoring(self, info: dict | None) -> None:
        per_bit = (info or {}).get("samples_per_bits") or {}
        for b in self.bits:
            self.samples[str(b)]["scoring"] += int(per_bit.get(b, per_bit.get(str(b), 0)))


def check_same_config(saved: dict, current: dict) -> None:
    """Raise :class:`ResumeError` listing every setting that differs from the saved run's."""
    saved = {**_ADDED_SETTINGS, **saved}
    if isinstance(saved.get("sampler"), dict):
        saved["sampler"] = {k: v for k, v in saved["sampler"].items() if k not in _SAMPLER_PROCESS_KEYS}
    diff = config_differences(saved, current, ignore=RESUME_IGNORED)
    if diff:
        listed = "; ".join(f"{k}: saved {v[0]!r}, now {v[1]!r}" for k, v in diff.items())
        raise ResumeError(f"--resume needs the same settings as the interrupted run, but these differ: {listed}. "
                          f"Re-run with the saved settings, or start a new run (--overwrite or another --out)")


def _check_finite(losses: list[torch.Tensor], bits: list[int], epoch: int, step: int, lr: float,
                  out_dir: Path | None, ctx: DistContext | None = None) -> None:
    """Raise :class:`DivergenceError` if a loss of this step is NaN or infinite (one host sync per step). With
    several ranks the flags are summed over them, so every rank stops at the same step, whichever rank's loss
    it was (the averaged gradients are non-finite on all of them)."""
    bad = (~torch.isfinite(torch.stack([loss.detach().float() for loss in losses]))).float()
    if ctx is not None and ctx.enabled:
        ctx.all_reduce_(bad)
    if not bool(bad.any()):
        return
    i = int(bad.nonzero()[0, 0])
    b, value = bits[i], float(losses[i])
    became = f"became {value}" if not math.isfinite(value) else "became non-finite on another process"
    kept = (f"; the state after epoch {epoch} is kept in {out_dir / 'state'}" if out_dir is not None and epoch
            else "")
    raise DivergenceError(f"training diverged: the loss at {b} bits {became} in epoch {epoch + 1}, step "
                          f"{step + 1} (learning rate {lr:g}); lower the learning rate (--lr, TrainConfig.lr) and "
                          f"start again. Stopped before the optimizer step, nothing non-finite was saved{kept}")


def epoch_line(record: dict, epochs: int) -> str:
    """One line per finished epoch (printed whether or not stderr is a terminal, so logs show progress)."""
    seconds = sum(record["seconds"].values())
    parts = []
    for b, m in record["bits"].items():
        acc = m.get("test_acc")
        parts.append(f"{b}b {acc:.1f}%" if acc is not None else f"{b}b loss {m['loss']:.3f}")
    what = "test top-1" if any(m.get("test_acc") is not None for m in record["bits"].values()) else "train"
    return f"epoch {record['epoch']}/{epochs} ({seconds:.0f} s) {what}: " + ", ".join(parts)


def _log_rows(record: dict) -> list[dict]:
    return [{"epoch": record["epoch"], "bits": b, "lr": record["lr"], "scoring_s": record["seconds"]["scoring"],
             **m} for b, m in record["bits"].items()]


def _rate(samples: float, seconds: float) -> float | None:
    return samples / seconds if seconds > 0 else None


def _example(dataset) -> torch.Tensor | None:
    """One training input as a batch of one, for the conversion's check forward (None if unavailable)."""
    try:
        item = dataset[0]
    except Exception:  # noqa: BLE001 - any dataset; the check is skipped without an example
        return None
    x = item[0] if isinstance(item, (tuple, list)) else item
    return x.unsqueeze(0) if isinstance(x, torch.Tensor) else None


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _EveryNth:
    """Batches ``rank, rank + world_size, ...`` of the first ``limit`` batches of ``loader`` (re-iterable)."""

    def __init__(self, loader, limit: int, rank: int, world_size: int) -> None:
        self.loader, self.limit, self.rank, self.world_size = loader, limit, rank, world_size

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i >= self.limit:
                break
            if i % self.world_size == self.rank:
                yield batch


class _StepBatches:
    """Per step, ``{bits: (images, labels, dataset indices)}`` on the device. Bit-widths with the same plan share one
    batch object (so a teacher's logits can be reused); the shuffle comes from (seed, epoch).

    ``plan`` and ``batch_size`` are the whole job's: step k trains on the k-th ``batch_size`` indices of every
    list, and rank r of ``world_size`` takes every ``world_size``-th of them from the r-th on (the
    ``batch_size / world_size`` samples of its share). Together the ranks train exactly on the batches of a
    one-process run. ``num_workers`` loader processes in all, shared by the index lists' loaders."""

    def __init__(self, dataset, plan: dict[int, torch.Tensor | None], batch_size: int, seed: int, epoch: int,
                 device: torch.device, num_workers: int, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False) -> None:
        n = len(dataset)
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = None
        groups: dict[int, list[int]] = {}     # group id -> bit-widths that share an index list
        self.index_lists: list[torch.Tensor] = []
        for b, idx in plan.items():
            if idx is None:
                if order is None:
                    order = torch.randperm(n, generator=generator)
                idx = order
            for g, members in groups.items():
                if self.index_lists[g] is idx or torch.equal(self.index_lists[g], idx):
                    members.append(b)
                    break
            else:
                groups[len(self.index_lists)] = [b]
                self.index_lists.append(idx)
        self.groups = groups
        length = self.index_lists[0].numel()
        self.steps = max(1, length // batch_size) if length >= batch_size else 1
        self.rank, self.world_size = rank, world_size
        # this rank's part of each list, and its share of a batch
        self.local_lists = [self._local(idx, batch_size) for idx in self.index_lists]
        self.local_batch = batch_size // world_size if length >= batch_size else self.local_lists[0].numel()
        self.dataset, self.device, self.num_workers = dataset, device, num_workers
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def _local(self, idx: torch.Tensor, batch_size: int) -> torch.Tensor:
        if self.world_size == 1:
            return idx
        if idx.numel() >= batch_size:
            used = idx[: self.steps * batch_size]
        else:   # one short batch: wrapped around so that every rank gets as many samples
            total = math.ceil(idx.numel() / self.world_size) * self.world_size
            used = idx.repeat(math.ceil(total / idx.numel()))[:total]
        return used[self.rank::self.world_size]

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        loaders = []
        workers = max(1, self.num_workers // len(self.local_lists)) if self.num_workers else 0
        chunk_lists = [list(idx.split(self.local_batch))[: self.steps] for idx in self.local_lists]
        for chunks in chunk_lists:
            loaders.append(DataLoader(self.dataset, batch_sampler=[c.tolist() for c in chunks], num_workers=workers,
                                      pin_memory=self.device.type == "cuda"))
        non_blocking = self.device.type == "cuda"
        for step, parts in enumerate(zip(*loaders)):
            batch = {}
            for g, (images, labels) in enumerate(parts):
                fmt = self.memory_format if images.dim() == 4 else torch.contiguous_format
                triple = (images.to(self.device, non_blocking=non_blocking, memory_format=fmt),
                          labels.to(self.device, non_blocking=non_blocking),
                          chunk_lists[g][step].to(self.device, non_blocking=non_blocking))
                for b in self.groups[g]:
                    batch[b] = triple
            yield batch


class _Timer:
    """Accumulated wall time per key: perf_counter on CPU, CUDA events (read once per epoch) on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals: dict[int, float] = {}
        self._open: dict[int, Any] = {}
        self._events: list[tuple[int, Any, Any]] = []

    def start(self, key: int) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._open[key] = ev
        else:
            self._open[key] = time.perf_counter()

    def stop(self, key: int) -> None:
        begin = self._open.pop(key)
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((key, begin, end))
        else:
            self.totals[key] = self.totals.get(key, 0.0) + time.perf_counter() - begin

    def seconds(self) -> dict[int, float]:
        if self._events:
            torch.cuda.synchronize()
            for key, begin, end in self._events:
                self.totals[key] = self.totals.get(key, 0.0) + begin.elapsed_time(end) / 1000.0
            self._events.clear()
        return self.totals


class _EpochStats:
    """Per-bit-width sums kept as device tensors (no host sync per step); read once per epoch."""

    def __init__(self, bits: list[int], device: torch.device) -> None:
        self.bits = bits
        self.sums = torch.zeros(len(bits), 3, device=device)   # loss, hard-label CE, correct (per batch sums)
        self.row = {b: i for i, b in enumerate(bits)}
        self.samples = dict.fromkeys(bits, 0)
        self.timer = _Timer(device)
        self._last_loss: torch.Tensor | None = None

    def add(self, b: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.shape[0]
        with torch.no_grad():
            ce = F.cross_entropy(logits, labels, reduction="sum")
            correct = (logits.argmax(1) == labels).sum()
            self.sums[self.row[b]] += torch.stack([loss.detach() * n, ce, correct.to(ce.dtype)])
        self.samples[b] += n
        if b == self.bits[0]:
            self._last_loss = loss.detach()

    def loss_now(self) -> float:
        return float(self._last_loss) if self._last_loss is not None else float("nan")

    def summary(self, dist: DistContext) -> tuple[dict[str, dict], dict]:
        """The epoch's metrics over every rank's samples, and this rank's own samples and seconds per bit-width."""
        counts = torch.tensor([self.samples[b] for b in self.bits], dtype=self.sums.dtype, device=self.sums.device)
        both = dist.all_reduce_(torch.cat([self.sums, counts[:, None]], dim=1))
        rows, totals = both[:, :3].tolist(), [int(round(n)) for n in both[:, 3].tolist()]
        seconds = self.timer.seconds()
        out = {}
        for b in self.bits:
            n = max(totals[self.row[b]], 1)
            loss, ce, correct = rows[self.row[b]]
            out[str(b)] = {"loss": loss / n, "ce": ce / n, "train_acc": 100.0 * correct / n,
                           "samples": totals[self.row[b]],
                           "train_s": seconds.get(b, 0.0)}
        mine = {"samples": {str(b): self.samples[b] for b in self.bits},
                "train_s": {str(b): seconds.get(b, 0.0) for b in self.bits}}
        return out, mine
