"""Helpers for tests and benchmarks: well-conditioned random weights for fidelity checks."""
from __future__ import annotations

import torch


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, calibrate_shape=(2, 3, 128, 128)) -> torch.nn.Module:
    """Give every conv/BN non-trivial random weights and running statistics (for fidelity tests
    and benchmarks: the default init leaves BN an identity).

    Running statistics are first calibrated on a random batch (so activations stay normalised,
    as in a trained network, instead of growing through the residual attention blocks), then
    perturbed by a few percent so that they are not exactly the batch statistics.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.weight.copy_(torch.rand(mod.num_features, generator=g) * 0.5 + 0.75)
            mod.bias.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
        elif isinstance(mod, torch.nn.Conv2d) and mod.weight.requires_grad:  # not DFL's fixed conv
            fan_in = mod.weight[0].numel()
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
            if mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
    # Residual branches that end in a conv without activation (attention qkv/pe/proj, the MLP's
    # second conv) get small norm weights, as trained networks have: otherwise activations grow
    # through the chained residual attention blocks until fp32 softmax rounding dominates.
    for mod in model.modules():
        act, bn = getattr(mod, "act", None), getattr(mod, "bn", None)
        if isinstance(act, torch.nn.Identity):
            for sub in (bn.modules() if isinstance(bn, torch.nn.Module) else ()):
                if isinstance(sub, torch.nn.BatchNorm2d):
                    sub.weight.mul_(0.25)
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.25)
    if calibrate_shape is not None:
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.momentum = 1.0
        was_training = model.training
        model.train()
        model(torch.rand(calibrate_shape, generator=g))
        model.train(was_training)
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    for m in bns:
        m.running_mean.add_(torch.randn(m.num_features, generator=g) * 0.05 * m.running_var.sqrt())
        m.running_var.mul_(torch.rand(m.num_features, generator=g) * 0.2 + 0.9)
    return model
