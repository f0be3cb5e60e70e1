"""Deep-supervision training with HuggingFace Accelerate (one CPU, one GPU, or many processes).

The same code runs as a plain command and under ``accelerate launch`` / ``torchrun``. What it does per
epoch t of N: α_b = schedule_b(t, N) for every branch b (eq. 2), L = L₀ + Σ_b α_b L_b (eq. 1), SGD with
Caffe's bias learning-rate multiplier and weight decay on weights only, then validation of the main head
and of every branch head, logs, and atomic checkpoints (``last.pt`` every epoch, ``best.pt`` on the best
main-head top-1 error).

A branch whose α is 0 is not computed and not updated. In a multi-process run its parameters still join
the step's graph through a zero-weighted sum of their values, so every process reduces the same parameter
set and DDP never waits for a gradient that will not come (no ``find_unused_parameters`` scan needed);
the resulting zero gradients are dropped before the optimiser step, so momentum and weight decay leave the
idle branch alone exactly as in a single process.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainingError
from ..io import atomic_write_text
from ..ir import MAX_SEED, Network, OpKind, TrainConfig
from ..serialize import dumps
from .evaluate import evaluate
from .loss import LossTally, alphas, deep_supervision_loss
from .optim import make_optimizer, set_epoch_lr
from .rundir import RunLock, append_metrics, repair_run, write_epoch_checkpoints
from .state import (
    align_optimizer_state,
    init_from,
    restore_training_state,
    rng_state,
    saved_channels_last,
    seed_everything,
)


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to learn: that is the spec's TrainConfig, possibly overridden)."""

    data: str = "digits"
    out_dir: Path = Path("runs/default")
    resume: bool = False
    init_from: Path | None = None
    mixed_precision: str = "no"
    grad_accum: int = 1
    cpu: bool = False
    workers: int = 0
    strict: bool = False
    ten_crop: bool = False
    limit_train: int | None = None
    limit_val: int | None = None
    val_split: float | None = None
    """Hold out this fraction of the training set for per-epoch validation (the source's val set is unused)."""
    split_seed: int = 0
    """Which samples ``val_split`` holds out (independent of the training seed)."""
    progress: bool = True
    grad_monitor: int = 0
    """Record per-layer mean |grad| every this many steps (0 = off)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in total (for smoke tests and benchmarks)."""
    callbacks: tuple[Callable[[EpochMetrics], None], ...] = ()
    """Called on the main process after every epoch (its checkpoint saved) with that epoch's metrics."""
    memory_budget: int | None = None
    """Bytes one training may use (per GPU; for all processes together on CPU). ``None``: the GPU's free
    memory, or ``CNDS_MEMORY_BUDGET_GIB``, else the RAM available now."""
    channels_last: bool | None = None
    """Model and images in channels-last memory layout (NHWC). ``None``: :func:`default_channels_last` for
    the device, or for ``resume`` the layout the checkpoint was trained in (so resuming stays bit-exact)."""
    compile: bool = False
    """Train through ``torch.compile`` of the training module (evaluation stays eager)."""
    prefetch: int | None = None
    """Batches each loader worker prepares ahead (the DataLoader's ``prefetch_factor``; needs workers)."""
    curves_every: float = 60.0
    """Redraw ``curves.png`` after an epoch when this many seconds have passed since it was last drawn (a
    long run shows its curves as it goes; a drawing costs well under a second); always at the end."""


@dataclass
class EpochMetrics:
    epoch: int
    lr: float
    alphas: dict[str, float]
    train_loss: dict[str, float]
    val_top1_error: dict[str, float]
    val_top5_error: dict[str, float]
    images_per_s: float
    skipped: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def default_channels_last(device: torch.device) -> bool:
    """The layout a run uses unless told: channels-last on CPU, where every shipped network trains as fast or faster in it
    (0.53-1.02x the contiguous step in two runs; ``benchmarks/train_bench.py`` part 6, RESULTS.md), contiguous on GPUs,
    where fp32 convolutions were not measured here."""
    return device.type == "cpu"


# ---- sampling ------------------------------------------------------------------------------------


class GlobalBatchSampler(torch.utils.data.Sampler[int]):
    """Index order for one process in one epoch.

    The epoch's permutation depends only on (seed, epoch); it is cut into global batches and each
    global batch into ``world`` contiguous slices, so N processes together see exactly the samples one
    process sees with the same global batch, and a resumed epoch replays the same order.
    """

    def __init__(self, n: int, global_batch: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.global_batch, self.seed, self.epoch = n, global_batch, seed, epoch
        self.rank, self.world = rank, world
        self.local = global_batch // world
        self.batches = n // global_batch  # drop the last partial global batch

    def __iter__(self) -> Iterator[int]:
        from ..data import mix_seed

        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g).tolist()
        for i in range(self.batches):
            start = i * self.global_batch + self.rank * self.local
            yield from perm[start : start + self.local]

    def __len__(self) -> int:
        return self.batches * self.local


# ---- the trainer --------------------------------------------------------------------------------------


_OVERRIDE_RANGES = {
    "epochs": (1, None), "batch": (1, None), "lr": (0.0, None), "momentum": (0.0, 1.0),
    "weight_decay": (0.0, None), "seed": (0, MAX_SEED),
}


def effective_config(net: Network, overrides: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """The spec's solver settings (or ``base``: a resumed run's own) with the CLI's overrides applied (checked
    like the spec's own values)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    for key, value in given.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise TrainingError(f"--{key.replace('_', '-')} must be a finite number, got {value}")
        lo, hi = _OVERRIDE_RANGES.get(key, (None, None))
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise TrainingError(f"--{key.replace('_', '-')} must be {bounds}, got {value}")
    return replace(base or net.train, **given)


def check_speed_options(opts: RunOptions) -> None:
    """Refuse, in one line, a speed option this machine cannot honour (rather than silently ignore it)."""
    on_cpu = opts.cpu or not torch.cuda.is_available()
    if opts.mixed_precision == "fp16" and on_cpu:
        # Accelerate would run fp16 on CPU as plain fp32 without saying so
        raise TrainingError("--precision fp16 needs a CUDA GPU (it has no autocast on CPU here); "
                            "use --precision bf16 on CPU")
    if opts.mixed_precision not in ("no", "bf16", "fp16"):
        raise TrainingError(f"unknown precision '{opts.mixed_precision}'; choose fp32, bf16 or fp16")
    if opts.prefetch is not None and opts.workers < 1:
        raise TrainingError("--prefetch needs loader worker processes (--workers N with N >= 1)")
    if opts.compile:
        import shutil

        if on_cpu and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            raise TrainingError("--compile on CPU needs a C++ compiler (g++ or clang++) on PATH")


SYNC_EVERY = 25
"""Steps between reads of device values on the host (progress bar, non-finite loss check): each read
waits for the accelerator to finish every queued step, so the loop does not read one per step."""


class Trainer:
    """Trains one network; ``run()`` returns the per-epoch metrics."""

    def __init__(self, net: Network, cfg: TrainConfig, opts: RunOptions) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.net, self.cfg, self.opts = net, cfg, opts
        self.out = Path(opts.out_dir)
        check_speed_options(opts)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
        # TensorBoard through Accelerate's trackers when it is installed; JSONL/CSV/PNG always.
        self.tensorboard = importlib.util.find_spec("tensorboard") is not None
        self.acc = Accelerator(
            cpu=opts.cpu or _workers_without_gpu(),
            mixed_precision=opts.mixed_precision,
            gradient_accumulation_steps=opts.grad_accum,
            kwargs_handlers=[ddp],
            log_with="tensorboard" if self.tensorboard else None,
            project_dir=str(self.out),
        )
        world = self.acc.num_processes
        if cfg.batch % (world * opts.grad_accum):
            raise TrainingError(
                f"batch {cfg.batch} is not divisible by processes ({world}) × gradient accumulation ({opts.grad_accum})"
            )
        self.micro_batch = cfg.batch // (world * opts.grad_accum)
        norms = [n.group for n in net.nodes if n.kind is OpKind.BATCHNORM]
        if norms and self.micro_batch == 1:  # one value per channel: no batch statistics to normalise with
            raise TrainingError(
                f"batchnorm ({norms[0]}{' …' if len(norms) > 1 else ''}) needs at least 2 examples per micro-batch, "
                f"but batch {cfg.batch} over {world} process{'es' * (world > 1)} × {opts.grad_accum} accumulation "
                "gives 1; "
                "raise --batch-size or lower --grad-accum / --processes")
        self._check_memory()
        self.start_epoch = 0
        self.step = 0
        self.history: list[dict] = []
        self.best_error: float | None = None
        self.best_epoch: int | None = None
        self.grad_log: list[dict] = []
        self.epoch_running: int | None = None
        """The epoch in progress (0-based), for the line an interrupted run prints."""
        self.saved_epoch: int | None = None
        """The epoch ``last.pt`` holds (``None``: no checkpoint yet)."""

    # -- setup
    def _check_memory(self) -> None:
        """Refuse, before loading data or allocating a tensor, a training whose parameters, gradients,
        optimiser state and activations (estimated from the IR) exceed the memory budget."""
        from ..memory import check_fits, default_budget, training_estimate

        estimate = training_estimate(self.net, self.micro_batch, self.cfg.optimizer, self.cfg.momentum)
        on_gpu = self.acc.device.type == "cuda"
        processes = 1 if on_gpu else self.acc.num_processes  # CPU processes share this machine's RAM
        if self.opts.memory_budget is not None:
            budget, where = self.opts.memory_budget, "--memory-budget"
        elif on_gpu and not os.environ.get("CNDS_MEMORY_BUDGET_GIB"):
            budget, where = torch.cuda.mem_get_info(self.acc.device)[0], f"free memory of {self.acc.device}"
        else:
            budget, where = default_budget()
        self._weights_budget = self.opts.memory_budget  # the module is built under the same flag
        check_fits(estimate, budget, where, processes=processes)

    def _load_data(self):
        from ..data import load_source

        self.data = load_source(
            self.opts.data, self.net, strict=self.opts.strict, ten_crop=self.opts.ten_crop,
            limit_train=self.opts.limit_train, limit_val=self.opts.limit_val, seed=self.cfg.seed,
            val_split=self.opts.val_split, split_seed=self.opts.split_seed,
        )
        global_micro = self.micro_batch * self.acc.num_processes
        if len(self.data.train) < global_micro * self.opts.grad_accum:
            raise TrainingError(
                f"the training set of --data {self.data.source or self.opts.data} has {len(self.data.train)} "
                f"examples, fewer than one batch of {self.cfg.batch}; give a --batch-size of "
                f"{len(self.data.train)} or less, or more data"
            )

    def _write_run_description(self) -> None:
        """The run folder's description of the network and the data, written once every check that can
        refuse the run has passed, so a refused run leaves nothing behind."""
        if not self.acc.is_main_process:
            return
        if not self.opts.resume:
            atomic_write_text(self.out / "network.ir.json", dumps(self.net))
        # what the per-epoch validation numbers were measured on
        atomic_write_text(self.out / "data.json", json.dumps({
            "source": self.opts.data, "description": self.data.description,
            "train_examples": len(self.data.train), "val_examples": len(self.data.val),
            "val_split": self.opts.val_split, "split_seed": self.opts.split_seed if self.opts.val_split else None,
            "limit_train": self.opts.limit_train, "limit_val": self.opts.limit_val,
        }, indent=1) + "\n")

    def _train_loader(self, epoch: int):
        from ..data import make_loader

        sampler = GlobalBatchSampler(
            len(self.data.train), self.micro_batch * self.acc.num_processes, self.cfg.seed, epoch,
            self.acc.process_index, self.acc.num_processes,
        )
        loader = make_loader(self.data.train, self.micro_batch, shuffle=False, workers=self.opts.workers,
                             seed=self.cfg.seed, drop_last=True, sampler=sampler, pin_memory=self.pin_memory,
                             prefetch=self.opts.prefetch)
        loader.set_epoch(epoch)  # augmentation randomness is a function of (seed, epoch): resumable
        return loader

    def _val_loader(self):
        from ..data import make_loader

        n = len(self.data.val)
        world, rank = self.acc.num_processes, self.acc.process_index
        indices = list(range(rank, n, world))  # disjoint shards; sums are all-reduced
        subset = torch.utils.data.Subset(self.data.val, indices)
        return make_loader(subset, max(1, self.micro_batch), shuffle=False, workers=self.opts.workers, seed=0,
                           pin_memory=self.pin_memory, prefetch=self.opts.prefetch)

    @property
    def pin_memory(self) -> bool:
        """Page-locked batches on a CUDA device: the copy to the GPU then runs asynchronously."""
        return self.acc.device.type == "cuda"

    def _build(self):
        from ..backends.pytorch import build_module

        seed_everything(self.cfg.seed)
        self.model = build_module(self.net, memory_budget=self._weights_budget)
        self.optimizer = make_optimizer(self.model, self.cfg)
        if self.opts.resume:
            self._restore()
        elif self.opts.init_from is not None:
            report = init_from(self.model, self.opts.init_from)
            if not report.copied:
                raise TrainingError(
                    "--init-from copied nothing: no parameter of that checkpoint has the name and shape of one of "
                    f"'{self.net.name}'", path=str(self.opts.init_from))
            self.print(report.format(str(self.opts.init_from)))
        self.channels_last = self._layout()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        align_optimizer_state(self.optimizer)  # a resumed state follows its parameters into their layout
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self._autocast_without_output_conversion()
        self._idle_params: dict[frozenset[str], list[torch.nn.Parameter]] = {}
        # The module the step loop calls: compiled with --compile (it shares the parameters, so checkpoints,
        # evaluation and the optimiser see the same tensors); compilation happens at its first call.
        self.train_module = torch.compile(self.model) if self.opts.compile else self.model
        self.compile_seconds: float | None = None

    def _autocast_without_output_conversion(self) -> None:
        """Keep the forward's output type under mixed precision. Accelerate wraps the forward in autocast
        and then converts its outputs to fp32 by walking them as tensors, which turns a CndsOutput into its
        main logits and drops the branches' logits. The losses and the evaluation cast every head's logits
        to fp32 themselves, so only the autocast is kept."""
        from types import MethodType

        from accelerate.utils import get_mixed_precision_context_manager

        model = self.acc.unwrap_model(self.model)
        original = getattr(model, "_original_forward", None)
        if self.acc.native_amp and original is not None:
            autocast = get_mixed_precision_context_manager(self.acc.native_amp, self.acc.autocast_handler)
            model.forward = MethodType(autocast(original.__func__), model)

    def idle_parameters(self, idle) -> list[torch.nn.Parameter]:
        """Parameters only the ``idle`` heads (α = 0 this epoch) use; a branch node shared with an active
        head is not idle."""
        key = frozenset(idle)
        if key not in self._idle_params:
            self._idle_params[key] = self.acc.unwrap_model(self.model).head_parameters(*key, excluding_others=True)
        return self._idle_params[key]

    def _restore(self):
        # Every process reads the same files and picks the same checkpoint; only the main one repairs them.
        resumed = repair_run(self.out, self.net, write=self.acc.is_main_process)
        ckpt = resumed.checkpoint
        for note in resumed.notes:
            self.print(f"note: {note}")
        restore_training_state(self.model, self.optimizer, ckpt, resumed.path)
        self.start_epoch = self.saved_epoch = int(ckpt["epoch"])
        self.step = int(ckpt.get("step", 0))
        self.history = list(ckpt.get("metrics", []))
        self.best_error = None if resumed.best_lost else ckpt.get("best_val_error")
        self.best_epoch = None if resumed.best_lost else ckpt.get("best_epoch", _recorded_best(self.history))
        self.grad_log = list(ckpt.get("grad_log", []))
        self.saved_channels_last = saved_channels_last(ckpt)
        if self.start_epoch > self.cfg.epochs:
            raise TrainingError(f"the run has trained {self.start_epoch} epochs already, more than --epochs "
                                f"{self.cfg.epochs}: nothing to train; give --epochs above {self.start_epoch} to "
                                "train it further", path=str(self.out))
        self.print(f"resumed {resumed.path} at epoch {self.start_epoch}/{self.cfg.epochs}"
                   + (": the run is complete, nothing to train" if self.start_epoch == self.cfg.epochs else ""))

    def _layout(self) -> bool:
        """Channels-last or not: as asked, else as the resumed checkpoint was trained, else the default."""
        asked = self.opts.channels_last
        if not self.opts.resume:
            return default_channels_last(self.acc.device) if asked is None else asked
        if asked is not None and asked != self.saved_channels_last:
            self.print(f"note: resuming in {_layout_name(asked)} layout, the checkpoint was trained in "
                       f"{_layout_name(self.saved_channels_last)}: from here the weights round differently than "
                       "in an uninterrupted run")
        return self.saved_channels_last if asked is None else asked

    def interruption(self) -> str:
        """The line a Ctrl-C prints: where the run stopped and what is kept."""
        last = self.out / "last.pt"
        where = (f"at epoch {self.epoch_running + 1} step {self.step}" if self.epoch_running is not None
                 else "before the first epoch")
        if self.saved_epoch is not None:
            return f"{where}; {last} (epoch {self.saved_epoch}) is intact: resume with --resume"
        if self.opts.resume:
            return f"{where}; {last} is kept: resume with --resume"
        return f"{where}; no epoch was completed, so nothing was saved"

    def print(self, *args) -> None:
        if self.acc.is_main_process:
            print(*args, flush=True)

    # -- checkpoints
    def _state(self, epoch: int) -> dict:
        model = self.acc.unwrap_model(self.model)
        return {
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None,
            "epoch": epoch,
            "step": self.step,
            "rng": rng_state(),
            "spec_name": self.net.name,
            "spec_text": dumps(self.net),
            "ir_hash": self.net.digest(),
            "train_config": json.dumps(asdict(self.cfg)),
            "metrics": self.history,
            "best_val_error": self.best_error,
            "best_epoch": self.best_epoch,
            "grad_log": self.grad_log,
            "channels_last": self.channels_last,
        }

    def _save(self, epoch: int, is_best: bool) -> None:
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return

        def committed():
            self.saved_epoch = epoch

        write_epoch_checkpoints(self.out, self._state(epoch), is_best, committed)  # the order rundir.py lays out

    # -- the loop
    def run(self) -> list[dict]:
        """Train (or resume) into ``out_dir``, holding its lock throughout (the main process takes it)."""
        self.out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.out, note=self.print) if self.acc.is_main_process else contextlib.nullcontext()
        with lock:
            return self._run()

    def _run(self) -> list[dict]:
        self._curves_drawn, self._curves_epochs = time.monotonic(), None  # when, and over how many epochs
        if self.acc.is_main_process:
            for stale in self.out.glob(".*.tmp"):  # a write killed half-way; the real file is intact
                stale.unlink(missing_ok=True)
        self._load_data()
        self._build()
        self._write_run_description()
        if self.tensorboard:
            self.acc.init_trackers("tensorboard", config={k: v for k, v in flatten_metrics(asdict(self.cfg)).items()
                                                          if isinstance(v, (int, float, str, bool))})
        self.print(f"training {self.net.name} on {self.data.description}: {self.cfg.epochs} epoch{'s' * (self.cfg.epochs != 1)}, "
                   f"batch {self.cfg.batch} ({self.acc.num_processes} process{'es' * (self.acc.num_processes > 1)} × "
                   f"{self.micro_batch}"
                   f"{f' × {self.opts.grad_accum} accumulation' if self.opts.grad_accum > 1 else ''}), "
                   f"device {self.acc.device}"
                   + (f" ({torch.get_num_threads()} threads)" if self.acc.device.type == "cpu" else "")
                   + f", mixed precision {self.opts.mixed_precision}, {_layout_name(self.channels_last)} layout")
        for epoch in range(self.start_epoch, self.cfg.epochs):
            self.epoch_running = epoch
            metrics = self._epoch(epoch)
            if metrics is None:
                break
            self._check_finite(epoch, metrics)  # before anything is saved: a diverged run is never "best"
            self.history.append(asdict(metrics))
            err = metrics.val_top1_error["main"]
            is_best = self.best_error is None or err < self.best_error
            if is_best:
                self.best_error, self.best_epoch = err, epoch + 1
            self._save(epoch + 1, is_best)
            self._log(metrics)
            if self.acc.is_main_process:
                for callback in self.opts.callbacks:
                    callback(metrics)
            if self.opts.max_steps is not None and self.step >= self.opts.max_steps:
                break
        if self.acc.is_main_process:
            self._write_logs()
        self.acc.end_training()
        return self.history

    def _step_functions(self):
        """``(backward, step)`` for one micro-batch. Without loss scaling, accumulation or a DeepSpeed-style
        engine, Accelerate's wrappers do nothing but checks that cannot change during a run (optional
        packages looked up, signatures inspected, a division by 1), so the loop calls torch directly."""
        from accelerate.utils import DistributedType

        acc = self.acc
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        direct = (acc.scaler is None and self.opts.grad_accum == 1
                  and acc.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                               DistributedType.MULTI_GPU))
        if not direct:
            def step() -> None:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)

            return acc.backward, step

        def backward(loss: torch.Tensor) -> None:
            loss.backward()

        def step() -> None:
            inner.step()
            inner.zero_grad(set_to_none=True)

        return backward, step

    def _epoch(self, epoch: int) -> EpochMetrics | None:
        cfg, acc = self.cfg, self.acc
        lr = set_epoch_lr(self.optimizer, cfg, epoch)
        weights = alphas(self.net, epoch, cfg.epochs)
        active = tuple(name for name, a in weights.items() if a > 0)
        idle = [name for name, a in weights.items() if a == 0]
        loader = self._train_loader(epoch)
        heads = ("main",) + active
        # per-head loss sums stay on the device; the host reads them every SYNC_EVERY steps at most
        tally = LossTally(heads, acc.device)
        batches = images_seen = skipped = 0
        bar = None
        if self.opts.progress and acc.is_main_process:
            from tqdm import tqdm

            bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                       dynamic_ncols=True, leave=False)
            alpha_post = {f"α[{k}]": f"{weights[k]:.3f}" for k in active}
        backward, step = self._step_functions()
        accumulate = self.opts.grad_accum > 1  # with 1, Accelerate's context only counts steps
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        model = self.train_module
        self.model.train()
        start = time.perf_counter()
        for images, labels, n_skipped in loader:
            skipped += int(n_skipped)
            if images.ndim == 4:
                images = images.to(acc.device, non_blocking=self.pin_memory, memory_format=memory_format)
            else:
                images = images.to(acc.device, non_blocking=self.pin_memory)
            labels = labels.to(acc.device, non_blocking=self.pin_memory)
            empty = labels.shape[0] == 0  # every image of this micro-batch was unreadable
            if empty and acc.num_processes == 1:
                continue
            first_compiled_call = self.opts.compile and self.compile_seconds is None
            if first_compiled_call:
                compile_start = time.perf_counter()
            with acc.accumulate(self.model) if accumulate else contextlib.nullcontext():
                out = model(images, branches=active)
                if empty:  # other processes still step: contribute exact-zero gradients to the all-reduce
                    loss = 0.0 * sum(p.sum() for p in self.model.parameters())
                    parts = {"main": loss.detach()}
                else:
                    loss, parts = deep_supervision_loss(self.net, out.logits, out.aux, labels, weights)
                if idle and acc.num_processes > 1:
                    loss = loss + 0.0 * sum(p.sum() for p in self.idle_parameters(idle))
                tally.add(loss, parts)
                backward(loss)
                if idle and acc.num_processes > 1:
                    # The all-reduce is done; drop the zeros so the optimiser skips the idle branch
                    # (no momentum, no weight decay), exactly as a single process does.
                    for p in self.idle_parameters(idle):
                        p.grad = None
                if acc.sync_gradients:
                    self._monitor_gradients()
                step()
            if first_compiled_call:
                self.compile_seconds = time.perf_counter() - compile_start
                self.print("torch.compile: the first step (compilation included) took "
                           f"{self.compile_seconds:.1f} s")
            if acc.sync_gradients:
                self.step += 1
            batches += 1
            images_seen += images.shape[0] * acc.num_processes
            stop = self.opts.max_steps is not None and self.step >= self.opts.max_steps
            if batches % SYNC_EVERY == 0:
                self._check_losses(epoch, tally, parts)
            if bar is not None:
                if batches % SYNC_EVERY == 0 or batches == 1:
                    elapsed = time.perf_counter() - start
                    post = {"loss": f"{float(parts['main']):.3f}", **alpha_post,
                            "img/s": f"{images_seen / max(elapsed, 1e-9):.0f}"}
                    bar.set_postfix(post, refresh=False)
                bar.update(1)
            if stop:
                break
        if batches:
            self._check_losses(epoch, tally, parts)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        means = acc.reduce(tally.sums / max(1, batches), "mean").tolist()
        train_loss = dict(zip(heads, means, strict=True))
        stats: dict = {}
        top1, top5, val_skipped = evaluate(
            self.model, self._val_loader(), acc.device, self.acc.unwrap_model(self.model).branch_names,
            ten_crop=self.opts.ten_crop, reduce=lambda t: acc.reduce(t.to(acc.device), "sum").cpu(), stats=stats,
        )
        self._val_nonfinite = int(acc.reduce(torch.tensor(stats.get("nonfinite", 0), device=acc.device), "sum").item())
        return EpochMetrics(
            epoch=epoch + 1, lr=lr, alphas=weights, train_loss=train_loss, val_top1_error=top1,
            val_top5_error=top5, images_per_s=images_seen / max(seconds, 1e-9),
            skipped=int(acc.reduce(torch.tensor(skipped + val_skipped, device=acc.device), "sum").item()),
            seconds=seconds,
        )

    def _check_losses(self, epoch: int, tally: LossTally, parts: dict[str, torch.Tensor]) -> None:
        """Stop on a non-finite loss seen since the last check (read from the device here, not per step)."""
        if tally.fold():
            self._non_finite(epoch, parts)

    def _monitor_gradients(self) -> None:
        every = self.opts.grad_monitor
        if not every or self.step % every:
            return
        model = self.acc.unwrap_model(self.model)
        record = {"step": self.step}
        for layer in self.net.trunk:
            for op in layer.ops:
                if op.kind.value == "conv2d":
                    g = model.get_submodule(op.name).weight.grad
                    if g is not None:
                        record[layer.name] = float(g.abs().mean())
        self.grad_log.append(record)

    def _check_finite(self, epoch: int, metrics: EpochMetrics) -> None:
        """Weights and metrics must be finite after an epoch; a finite loss does not prove it (the step after
        the last loss, or --lr 1e30 with one step per epoch, can leave NaN weights)."""
        model = self.acc.unwrap_model(self.model)
        bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        values = [*metrics.train_loss.values(), *metrics.val_top1_error.values()]
        nonfinite = getattr(self, "_val_nonfinite", 0)
        if bad or nonfinite or not all(math.isfinite(v) for v in values):
            kept = self.out / "last.pt"
            where = f"the last good checkpoint {kept} is kept" if kept.exists() else "no checkpoint was written"
            what = (f"non-finite weights ({', '.join(bad[:3])}{' …' if len(bad) > 3 else ''})" if bad else
                    f"non-finite outputs on {nonfinite} validation examples" if nonfinite else "non-finite metrics")
            raise TrainingError(f"{what} after epoch {epoch + 1}: the run diverged; training stopped and {where}; "
                                "lower the learning rate (--lr) or check the settings", path=str(self.out))

    def _non_finite(self, epoch: int, parts: dict[str, torch.Tensor]) -> None:
        bad = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
        kept = self.out / "last.pt"
        where = f"the last good checkpoint {kept} is kept" if kept.exists() else "no checkpoint was written yet"
        raise TrainingError(
            f"non-finite loss at epoch {epoch + 1}, by step {self.step} (last losses: {bad}); "
            f"training stopped and {where}; "
            "lower the learning rate (--lr) or check the data",
            path=str(self.out),
        )

    # -- logs
    def _log(self, m: EpochMetrics) -> None:
        if not self.acc.is_main_process:
            return
        heads = " ".join(f"{h} {m.val_top1_error[h] * 100:.2f}/{m.val_top5_error[h] * 100:.2f}"
                         for h in m.val_top1_error)
        alpha = " ".join(f"α[{k}]={v:.3f}" for k, v in m.alphas.items())
        losses = " ".join(f"{k} {v:.4f}" for k, v in m.train_loss.items())
        skipped = f" skipped {m.skipped}" if m.skipped else ""
        append_metrics(self.out, asdict(m))  # the records first: a closed output pipe stops the run at the print
        self._write_csv()  # whole each epoch: a spreadsheet open on a long run sees every finished epoch
        if time.monotonic() - self._curves_drawn >= self.opts.curves_every:
            self._draw_curves()
        if self.tensorboard:
            self.acc.log({k: v for k, v in flatten_metrics(asdict(m)).items() if isinstance(v, (int, float))},
                         step=m.epoch)
        print(f"epoch {m.epoch}/{self.cfg.epochs}: lr {m.lr:.4g} {alpha} | train loss {losses} | "
              f"val top-1/top-5 error % {heads} | {m.images_per_s:.0f} img/s{skipped}", flush=True)

    def _write_csv(self) -> None:
        rows = [flatten_metrics(m) for m in self.history]
        if rows:
            keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "epoch", k))
            text = io.StringIO()
            w = csv.DictWriter(text, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
            atomic_write_text(self.out / "metrics.csv", text.getvalue())

    def _draw_curves(self) -> None:
        from .plots import plot_curves

        plot_curves(self.history, self.out / "curves.png", title=self.net.name)
        self._curves_drawn, self._curves_epochs = time.monotonic(), len(self.history)

    def _write_logs(self) -> None:
        self._write_csv()  # a resumed run that had no epoch left still gets its table
        if self.history and self._curves_epochs != len(self.history):
            self._draw_curves()
        if self.grad_log:
            atomic_write_text(self.out / "gradients.json", json.dumps(self.grad_log))


def _workers_without_gpu() -> bool:
    """One of several processes (torchrun's WORLD_SIZE) on a machine without a GPU: Accelerate then makes
    each a lone single process unless told to use the CPU, and every one would train the whole run alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _layout_name(channels_last: bool) -> str:
    return "channels-last" if channels_last else "contiguous (NCHW)"


def _recorded_best(history: list[dict]) -> int | None:
    """The best epoch of a history (checkpoints from before ``best_epoch`` was stored)."""
    best = min(history, key=lambda m: m["val_top1_error"]["main"], default=None)
    return best["epoch"] if best else None


def flatten_metrics(m: dict) -> dict:
    row = {}
    for k, v in m.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                row[f"{k}/{kk}"] = vv
        else:
            row[k] = v
    return row


