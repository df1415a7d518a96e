"""The public multi-bit training step: a plain PyTorch loop, a framework that runs backward itself, per-bit
batches with the teachers' logit memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import anybit
from anybit.train import MultiBitStep, TeacherMemory, TrainConfig, prepare_model, reestimate_bn

BITS = (1, 4, 32)


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
    )


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = torch.randn(n, 1, 8, 8, generator=g) * 0.3 + labels.float().view(-1, 1, 1, 1)
    return images, labels


def test_a_plain_loop_trains_every_bit_width_and_ends_with_the_statistics_pass():
    torch.manual_seed(0)
    model = prepare_model(net(), TrainConfig(method="emqnet", bits=BITS))
    step = MultiBitStep(model, BITS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images, labels = data()
    first = None
    for epoch in range(8):
        for i in range(0, 96, 32):
            result = step(images[i:i + 32], labels[i:i + 32])
            optimizer.step()
            optimizer.zero_grad()
            first = first or {b: float(r.loss) for b, r in result.items()}
    last = {b: float(r.loss) for b, r in result.items()}
    assert step.bits == [32, 4, 1] and all(last[b] < first[b] - 0.2 for b in BITS), (first, last)
    info = reestimate_bn(model, [(images, labels)], step.bits, batches=1)
    assert set(info["bits"]) == set(BITS)
    model.eval()
    for b in BITS:
        with anybit.precision(model, b):
            assert (model(images).argmax(1) == labels).float().mean() > 0.6


def test_loss_for_a_framework_gives_the_gradients_of_the_step():
    torch.manual_seed(0)
    model = prepare_model(net(), TrainConfig(method="emqnet", bits=BITS))
    images, labels = data(32)
    step = MultiBitStep(model, BITS, distill="recursive")
    model.train()
    step(images, labels)
    direct = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    total = step.loss((images, labels))
    assert total.requires_grad
    total.backward()
    summed = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(direct) == len(summed) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(direct, summed))


def test_per_bit_batches_take_the_teacher_s_logits_from_the_memory():
    torch.manual_seed(0)
    model = prepare_model(net(), TrainConfig(method="emqnet", bits=BITS))
    images, labels = data(64)
    memory = TeacherMemory([32, 4], 64, "cpu")
    step = MultiBitStep(model, BITS, distill="recursive", memory=memory)
    halves = [torch.arange(0, 32), torch.arange(32, 64)]
    batch = {b: (images[idx], labels[idx], idx) for b, idx in zip(BITS, (halves[0], halves[1], halves[0]))}
    step(batch)                                  # 32 and 1 bits on the first half, 4 bits on the second
    assert memory.known[32][:32].all() and not memory.known[32][32:].any()
    assert memory.known[4][32:].all() and not memory.known[4][:32].any()
    teacher_of_1 = step._teacher(1, batch, {})   # 1 bit's teacher (4 bits) never saw the first half
    assert teacher_of_1 is not None and not teacher_of_1[1].any()
    swapped = {32: batch[32], 4: batch[32], 1: batch[4]}
    logits, known = step._teacher(1, swapped, {})
    assert known.all() and torch.allclose(logits, memory.logits[4][32:].float())
    with pytest.raises(ValueError, match="no entry for bit-widths"):
        step({32: batch[32]})


def test_the_step_needs_a_converted_shared_model():
    with pytest.raises(TypeError, match="prepare_model"):
        MultiBitStep(net(), BITS)
    with pytest.raises(ValueError, match="dedicated"):
        prepare_model(net(), TrainConfig(method="dedicated", bits=BITS))


def test_the_own_loop_example_in_training_md_runs():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    section = text[text.index("## Your own training loop"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    namespace: dict = {}
    exec(compile(code, "training.md", "exec"), namespace)
    assert set(namespace["losses"]) == {1, 2, 4, 8, 32}
