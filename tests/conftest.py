"""Shared test set-up: one intra-op thread. The tests use tiny tensors that gain nothing from
threads, and on a busy 2-core machine spinning OpenMP threads make them many times slower."""

import torch

torch.set_num_threads(1)
