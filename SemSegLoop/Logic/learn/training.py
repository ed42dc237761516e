"""The training loop: one round of steps on sparse labels, for a time budget or a step count,
with progress callbacks, a cancel check every step, and the device chosen for the machine."""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from semsegloop.errors import TrainingError

DEFAULT_TIME_BUDGET_S = 60.0
# Steps that include one-off set-up (optimiser state, oneDNN primitives, the first step with
# every loss term): their durations do not estimate what a step or a prediction costs.
WARM_UP_STEPS = 2
# A step's cost is the median of this many latest steady steps (one slow step moves it little).
STEADY_WINDOW = 5


@dataclass
class TrainProgress:
    """What a progress callback receives (from the training thread)."""
    round: int
    step: int
    total_steps: int | None
    elapsed_s: float
    eta_s: float | None
    loss: float
    throughput: float                      # patches per second, smoothed
    val_dice: dict[str, float] | None = None
    phase: str = "train"                   # "train" | "done" | "cancelled"
    loss_parts: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"


@dataclass
class TrainResult:
    round: int
    steps: int
    seconds: float
    final_loss: float | None
    cancelled: bool
    checkpoint: str | None
    device: str
    val_dice: dict[str, float] | None = None
    # The engine's own accuracy estimate from held-out strokes: Dice per class of the fused
    # result, the network and the teacher ({"fused": {class: dice}, ...}); None without one.
    estimate: dict | None = None


def select_device(device: str = "auto"):
    """'auto' -> CUDA, then Apple MPS, then CPU (using every core)."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device in ("gpu",):
        device = "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("device='cuda' was requested but no CUDA GPU is available "
                            "(use device='auto' or 'cpu')")
    if device == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                and torch.backends.mps.is_available()):
        raise TrainingError("device='mps' was requested but Apple MPS is not available")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise TrainingError(f"device='{device}' is not one of auto, cpu, cuda, mps")
    if device == "cpu":
        torch.set_num_threads(cpu_threads())
    return torch.device(device)


def cpu_bf16(device, dims: int, inference: bool = False) -> bool:
    """Run a network in bfloat16 on this CPU? Only where the CPU has native bf16 (AVX-512
    BF16 / AMX, which oneDNN uses): there a 3D UNet trains 1.7x and predicts 2.3x faster and
    the 2D CPU preset predicts a 1024^2 image 2.2x faster (bench/bench_predict_speed.py);
    elsewhere bf16 is emulated and slower. 2D training steps were slower in bf16, so 2D uses
    it for ``inference`` only. SEMSEGLOOP_CPU_BF16=0/1 overrides."""
    import torch

    if getattr(device, "type", str(device)) != "cpu" or (dims != 3 and not inference):
        return False
    env = os.environ.get("SEMSEGLOOP_CPU_BF16")
    if env is not None:
        return env.strip() not in ("0", "", "false", "no")
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device, dims: int, inference: bool = False):
    """The mixed-precision context for a forward pass: float16 on CUDA, bfloat16 on a CPU with
    native bf16 (cpu_bf16; ``inference``: a prediction, not a training step), else full
    precision."""
    import torch

    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        return torch.autocast(device_type="cuda")
    if cpu_bf16(device, dims, inference):
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_threads() -> int:
    """Cores this process may use ($SEMSEGLOOP_THREADS overrides, e.g. to leave one to the GUI)."""
    env = os.environ.get("SEMSEGLOOP_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def cancel_checker(cancel: Any) -> Callable[[], bool]:
    """Accept a threading.Event, a zero-argument callable, or None."""
    if cancel is None:
        return lambda: False
    if hasattr(cancel, "is_set"):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise TrainingError("cancel must be a threading.Event, a callable returning bool, or None")


class StepCancelled(InterruptedError):
    """Raised inside a forward or backward pass when the cancel is set (see cancel_inside)."""


@contextlib.contextmanager
def cancel_inside(model, is_cancelled: Callable[[], bool] | None, backward: bool = True):
    """Check ``is_cancelled`` before every layer of ``model``'s forward pass and, with
    ``backward``, as each parameter's gradient arrives, raising StepCancelled: a Stop lands
    within one layer rather than one whole step (a first 3D step takes seconds on a CPU).
    An interrupted pass changes nothing: weights move only in the optimiser step."""
    if is_cancelled is None:
        yield
        return

    def check(*_):
        if is_cancelled():
            raise StepCancelled("cancelled")

    def on_grad(grad):
        check()
        return None
    handles = [m.register_forward_pre_hook(check) for m in model.modules()]
    if backward:
        handles += [p.register_hook(on_grad) for p in model.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_training(model, sampler, loss_fn, *, device, round_index: int, batch_size: int,
                 learning_rate: float, steps: int | None = None,
                 time_budget_s: float | None = None,
                 progress: Callable[[TrainProgress], None] | None = None,
                 cancel: Any = None,
                 validate: Callable[[], dict[str, float]] | None = None,
                 validate_every_s: float = 10.0,
                 log: Callable[[dict], None] | None = None,
                 seed: int = 0, dims: int | None = None,
                 reserve: Callable[[float], float] | None = None
                 ) -> tuple[int, float, float | None, bool, dict | None]:
    """Train ``model`` in place. Returns (steps_done, seconds, last_loss, cancelled, val_dice).

    Stops at ``steps`` or ``time_budget_s``, whichever comes first (60 s when neither is
    given); ``reserve(seconds per step)`` is time the budget must keep for what follows the
    training (predicting the painted images), asked only once steps past the warm-up give a
    steady step time. The model's weights after the last completed optimiser step are always
    a valid model, so a cancel between steps loses at most the step in flight.
    """
    import torch

    if steps is not None and steps < 1:
        raise TrainingError(f"steps must be at least 1 (got {steps})")
    if time_budget_s is not None and time_budget_s <= 0:
        raise TrainingError(f"time_budget_s must be positive (got {time_budget_s})")
    if steps is None and time_budget_s is None:
        time_budget_s = DEFAULT_TIME_BUDGET_S
    is_cancelled = cancel_checker(cancel)
    torch.manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    t0 = time.perf_counter()
    last_val_t = t0
    step, last_loss, rate, val, step_s = 0, None, None, None, None
    durations: list[float] = []
    cancelled = False
    why = "cancelled"
    with cancel_inside(model, is_cancelled):
        try:
            while True:
                elapsed = time.perf_counter() - t0
                frac = max(step / steps if steps else 0.0,
                           elapsed / time_budget_s if time_budget_s else 0.0)
                if frac >= 1.0:
                    why = "steps" if steps and step >= steps else "budget"
                    break
                if time_budget_s and step >= 2:
                    # The next step would end past the budget (3D CPU steps take seconds), or
                    # leave less than the reserve for what follows. The reserve is estimated
                    # from steady steps only: the first WARM_UP_STEPS carry one-off set-up
                    # (2D: 2.2 and 2.4 s, then 0.27 s), which made a round keep a 19 s reserve
                    # and stop after two steps.
                    steady = durations[WARM_UP_STEPS:][-STEADY_WINDOW:]
                    step_s = float(np.median(steady)) if steady else min(durations[1:])
                    res = reserve(step_s) if reserve is not None and steady else 0.0
                    if elapsed + step_s + res > time_budget_s:
                        why = "reserve" if res and elapsed + step_s <= time_budget_s else "budget"
                        break
                if is_cancelled():
                    cancelled = True
                    break
                # Short warm-up, then cosine decay over the budget: the last steps refine
                # boundaries.
                lr = (learning_rate * min(1.0, (step + 1) / 10)
                      * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))))
                for g in opt.param_groups:
                    g["lr"] = lr
                ts = time.perf_counter()
                xb, yb = sampler.sample(batch_size)
                x = torch.from_numpy(xb).to(device, non_blocking=True)
                y = torch.from_numpy(yb).to(device, non_blocking=True)
                with autocast(device, dims if dims is not None else x.ndim - 2):
                    logits = model(x)
                if logits.dtype == torch.bfloat16:
                    logits = logits.float()
                loss, parts = loss_fn(logits, y, x, step)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                step += 1
                last_loss = float(loss.detach())
                if not math.isfinite(last_loss):
                    raise TrainingError(f"training diverged at step {step} (loss {last_loss}); "
                                        f"check the image normalisation or lower the learning "
                                        f"rate")
                dt = time.perf_counter() - ts
                durations.append(dt)
                inst = batch_size / max(dt, 1e-6)
                rate = inst if rate is None else 0.8 * rate + 0.2 * inst
                now = time.perf_counter()
                elapsed = now - t0
                if validate is not None and now - last_val_t >= validate_every_s:
                    val = validate()
                    model.train()
                    last_val_t = time.perf_counter()
                eta = _eta(step, steps, elapsed, time_budget_s)
                rec = TrainProgress(round=round_index, step=step, total_steps=steps,
                                    elapsed_s=elapsed, eta_s=eta, loss=last_loss,
                                    throughput=rate, val_dice=val, loss_parts=parts,
                                    device=str(device))
                if log is not None:
                    log({"event": "step", "round": round_index, "step": step,
                         "elapsed_s": round(elapsed, 3), "loss": last_loss, "lr": lr,
                         **{f"loss_{k}": v for k, v in parts.items()},
                         **({"val_dice": val} if val else {})})
                if progress is not None:
                    progress(rec)
        except StepCancelled:
            # Inside a forward/backward pass or a validation: the optimiser has not stepped,
            # so the weights, step count and loss are those of the last completed step.
            cancelled = True
    seconds = time.perf_counter() - t0
    if log is not None:
        log({"event": "train_stop", "round": round_index, "why": why, "steps": step,
             "elapsed_s": round(seconds, 3), "step_s": None if step_s is None else round(step_s, 4),
             "reserve_s": None if not (reserve and step_s) else round(reserve(step_s), 3)})
    if validate is not None and step > 0 and not cancelled:
        val = validate()
    return step, seconds, last_loss, cancelled, val


def _eta(step, steps, elapsed, budget):
    candidates = []
    if steps:
        candidates.append(elapsed / max(step, 1) * (steps - step))
    if budget:
        candidates.append(max(0.0, budget - elapsed))
    return min(candidates) if candidates else None


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
