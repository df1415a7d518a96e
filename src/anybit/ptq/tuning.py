"""BatchNorm tuning and bias tuning: whole-model corrections after the layers are quantized.

* :func:`bn_tuning` re-estimates BatchNorm running statistics of the quantized model on the
  calibration data with a cumulative average (``momentum=None``), so they describe the quantized
  activations rather than the float ones.
* :func:`bias_tuning` learns the biases of quantized layers and the BatchNorm and LayerNorm affine
  terms so the quantized model's outputs match the float model's (KL divergence of the logits, or
  the relative squared error of the hidden states of a model without logits); no labels are used.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import inputs as mi
from ..evaluation import compared_output, output_discrepancy
from ..progress import progress
from ..quant import QUANT_LAYER_TYPES, FLOAT_BITS, precision, quant_layers
from .calibdata import CalibData, batches, calibration_tensor
from .errors import PTQError

DEFAULT_BIAS_ITERS = 100
DEFAULT_BIAS_BATCH_SIZE = 50
DEFAULT_BIAS_LR = 1e-3


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def bn_tuning(model: nn.Module, calib_data: CalibData, *, batch_size: int = 128, float_model: nn.Module | None = None,
              reference_logits: torch.Tensor | None = None, num_samples: int | None = None, seed: int = 0,
              quiet: bool = True) -> dict:
    """Re-estimate the running mean/variance of every BatchNorm of ``model`` at its current precision.

    Statistics are reset and averaged over all calibration batches (``momentum=None``, a cumulative
    average) in one pass with every BatchNorm in training mode; momentum, train/eval modes and
    affine parameters are restored afterwards. With ``float_model`` the new statistics are kept
    only if they bring the logits closer to the float model's (KL on the calibration set;
    ``reference_logits`` may hold the float model's logits on the same data, computed once). Returns
    the number of BatchNorms, the mean absolute change of their running means and the KL.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise PTQError(f"batch_size={batch_size!r} is invalid for BN tuning: expected an integer >= 2")
    start = time.perf_counter()
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return {"batchnorms": 0, "seconds": 0.0}
    calib = calibration_tensor(calib_data, num_samples, seed)
    device = _device_of(model)
    saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]
    targets = reference_logits
    if targets is None and float_model is not None:
        targets = reference_logits if reference_logits is not None else float_logits(float_model, calib, device)
    kl_before = logits_kl(model, targets, calib, device) if targets is not None else None
    modes = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in bns]
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        chunks = list(batches(calib, batch_size))
        if len(chunks) > 1 and mi.num_samples(chunks[-1]) < 2:  # a batch of one has no variance
            chunks = chunks[:-1]
        for x in progress(chunks, desc="BN tuning", quiet=quiet):
            mi.run_model(model, mi.to_device(x, device))
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    shift = sum(float((bn.running_mean - old["running_mean"]).abs().mean()) for bn, old in zip(bns, saved)) / len(bns)
    result = {"batchnorms": len(bns), "mean_abs_shift": shift}
    if targets is not None:
        kl_after = logits_kl(model, targets, calib, device)
        reverted = not kl_after < kl_before
        if reverted:
            for bn, state in zip(bns, saved):
                bn.load_state_dict(state)
            kl_after = kl_before
        result.update({"kl_before": kl_before, "kl_after": kl_after, "reverted": reverted})
    result["seconds"] = time.perf_counter() - start
    return result


_NORM_TYPES = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm with running statistics (something for BN tuning to do)."""
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


def tunable_biases(model: nn.Module) -> dict[str, nn.Parameter]:
    """Biases of quantized layers (and plain Conv2d/Linear), BatchNorm, LayerNorm and GroupNorm
    weights and biases, by name."""
    params = {}
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYER_TYPES + (nn.Conv2d, nn.Linear)) and getattr(m, "bias", None) is not None:
            params[f"{name}.bias"] = m.bias
        elif isinstance(m, _NORM_TYPES):
            for key in ("weight", "bias"):
                p = getattr(m, key, None)
                if isinstance(p, nn.Parameter):
                    params[f"{name}.{key}"] = p
    return params


@torch.no_grad()
def float_logits(float_model: nn.Module, calib: mi.Inputs, device=None) -> torch.Tensor:
    """The reference outputs of ``float_model`` (at full precision) for every calibration input, on the
    CPU: its logits, or its last hidden states if it has none (see :func:`anybit.evaluation.compared_output`)."""
    device = device if device is not None else _device_of(float_model)
    was_training = float_model.training
    float_model.eval()
    parts = []
    try:
        with precision(float_model, FLOAT_BITS) if quant_layers(float_model) else contextlib.nullcontext():
            for start in range(0, mi.num_samples(calib), 256):   # untrimmed: one sequence length for all
                x = mi.to_device(mi.take(calib, slice(start, start + 256)), device)
                parts.append(compared_output(mi.run_model(float_model, x))[1].float().cpu())
    finally:
        float_model.train(was_training)
    return torch.cat(parts)


@torch.no_grad()
def logits_kl(model: nn.Module, targets: torch.Tensor, calib: mi.Inputs, device=None,
              temperature: float = 1.0) -> float:
    """Mean discrepancy of ``model(calib)`` from the float outputs ``targets``, ``model`` in inference mode:
    ``KL(softmax(targets) || softmax(logits))`` per sample, or for hidden states the relative squared error
    per real token (:func:`anybit.evaluation.output_discrepancy`; padding excluded)."""
    device = device if device is not None else _device_of(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, mi.num_samples(calib), 256):
            s, c = _discrepancy(model, calib, targets, slice(start, start + 256), device, temperature)
            total, count = total + float(s), count + c
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _discrepancy(model, calib, targets, index, device, temperature) -> tuple[torch.Tensor, int]:
    x = mi.to_device(mi.trim_padding(mi.take(calib, index)), device)
    kind, out = compared_output(mi.run_model(model, x))
    return output_discrepancy(out, targets[index].to(device), kind, mi.token_mask(x), temperature)


def _minibatches(calib: mi.Inputs, batch_size: int, generator: torch.Generator):
    """Endless random mini-batches of sample indices, each sample once per epoch. For keyword inputs with a
    padding mask the batches are made of samples of similar length (consecutive in length order, the batch
    order shuffled), so each batch is trimmed of most of its padding: the same samples, far less compute."""
    n = mi.num_samples(calib)
    size = min(batch_size, n)
    mask = mi.token_mask(calib)
    while True:
        if mask is None:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - size + 1, size):
                yield order[start:start + size]
            continue
        noise = torch.rand(n, generator=generator)   # ties between equal lengths broken at random
        by_length = torch.argsort(mask.sum(1).float() + noise)
        groups = [by_length[start:start + size] for start in range(0, n - size + 1, size)]
        for g in torch.randperm(len(groups), generator=generator).tolist():
            yield groups[g]


def output_kind(model: nn.Module, calib: mi.Inputs, device=None) -> str:
    """``"logits"`` or ``"hidden"``: what PTQ compares in this model's output (one sample is run)."""
    device = device if device is not None else _device_of(model)
    with torch.no_grad():
        return compared_output(mi.run_model(model, mi.to_device(mi.take(calib, slice(0, 1)), device)))[0]


def bias_tuning(model: nn.Module, float_model: nn.Module, calib_data: CalibData, *, iters: int = DEFAULT_BIAS_ITERS,
                batch_size: int = DEFAULT_BIAS_BATCH_SIZE, lr: float = DEFAULT_BIAS_LR, optimizer: str = "adam",
                temperature: float = 1.0, reference_logits: torch.Tensor | None = None, num_samples: int | None = None,
                seed: int = 0, quiet: bool = True) -> dict:
    """Learn biases and BatchNorm/LayerNorm affine terms of ``model`` so its outputs match ``float_model``'s.

    Loss: ``KL(softmax(float) || softmax(quantized))`` over mini-batches of the calibration data,
    no labels -- or, for a model without logits, the relative squared error of its last hidden states
    per real token (padding excluded). Everything else (weights, ranges, BatchNorm statistics) stays
    fixed; BatchNorm runs in inference mode. The result is kept only if the discrepancy over the whole
    calibration set went down.
    ``optimizer`` is ``"adam"`` (default) or ``"sgd"`` (the reference code's, with ``lr=0.1``).
    ``reference_logits``: the float model's logits on the same data, if already computed.
    """
    if optimizer not in ("adam", "sgd"):
        raise PTQError(f"optimizer={optimizer!r} is unknown: expected 'adam' or 'sgd'")
    for key, value, minimum in (("iters", iters, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise PTQError(f"{key}={value!r} is invalid: expected an integer >= {minimum}")
    if not lr > 0 or not temperature > 0:
        raise PTQError(f"lr={lr!r} and temperature={temperature!r} must be positive")
    start = time.perf_counter()
    params = tunable_biases(model)
    if not params:
        return {"parameters": 0, "seconds": 0.0}
    calib = calibration_tensor(calib_data, num_samples, seed)
    device = _device_of(model)
    float_model.to(device)
    was_training = {m: m.training for m in list(model.modules()) + list(float_model.modules())}
    model.eval()
    float_model.eval()
    targets = reference_logits if reference_logits is not None else float_logits(float_model, calib, device)
    all_params = list(model.parameters())
    flags = [p.requires_grad for p in all_params]
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        kl_before = logits_kl(model, targets, calib, device, temperature)
        for p in all_params:
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        trainable = list(params.values())
        opt = (torch.optim.Adam(trainable, lr=lr) if optimizer == "adam"
               else torch.optim.SGD(trainable, lr=lr, momentum=0.9))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iters, 1))
        generator = torch.Generator().manual_seed(seed)
        draw = _minibatches(calib, batch_size, generator)
        for _ in progress(range(iters), desc="bias tuning", quiet=quiet):
            idx = next(draw)
            total, count = _discrepancy(model, calib, targets, idx, device, temperature)
            loss = total / max(count, 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        kl_after = logits_kl(model, targets, calib, device, temperature)
        reverted = not kl_after < kl_before
        if reverted:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])
            kl_after = kl_before
    finally:
        for p, flag in zip(all_params, flags):
            p.requires_grad_(flag)
        for m, mode in was_training.items():
            m.training = mode
    return {"parameters": sum(p.numel() for p in params.values()), "kl_before": kl_before, "kl_after": kl_after,
            "reverted": reverted, "iters": iters, "seconds": time.perf_counter() - start}

