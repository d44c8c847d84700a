"""Bilevel spiking network: learn neuron thresholds and leak time constants on validation data.

The lower problem trains the synaptic weights of a spiking network on generated Braille sweeps
with dual-timescale BPTT (forward at 1 us, backward every ``fine_per_coarse`` fine steps). The
upper problem owns the neurons' thresholds and membrane time constants and updates them with the
hypergradient of the validation loss through the lower problem's training steps. Both run through
the Engine like any other problems: the neuron modules are shared, so the upper problem's
parameters appear in the lower problem's loss (the ``u2l`` edge).

The baseline trains the same network's synapses with the same optimizer, data and steps while the
neuron parameters stay at their start; both are scored on test sweeps neither level trained on.

Run: ``python examples/spiking_bilevel.py [--iters 200]`` (about 20 s on one CPU core).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig
from betty_like.backends.spiking import SpikingNetwork, TimeGrid, build_network
from betty_like.data import braille


def logits(net: SpikingNetwork, events: torch.Tensor) -> torch.Tensor:
    """Class scores: the readout membrane averaged over the windows of one sweep."""
    return net(events.transpose(0, 1)).mean(0)


class Synapses(Problem):
    """Lower level: the synaptic weights, on training sweeps."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(logits(self.module, x), y)


class NeuronParameters(Problem):
    """Upper level: thresholds and membrane time constants, on validation sweeps."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(logits(self.synapses.module, x), y)


def batches(
    x: torch.Tensor, y: torch.Tensor, size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(y) - size + 1, size)]


def accuracy(net: SpikingNetwork, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (logits(net, x).argmax(1) == y).float().mean().item()


def problems(configs: Mapping[str, ProblemConfig], fine_per_coarse: int = 16, surrogate=None, seed: int = 0) -> list[Problem]:
    """The two problems on small generated data (the CLI experiment's factory, the example and its test)."""
    cfg = braille.BrailleConfig(steps=128)
    xtr, ytr = braille.make_dataset(8, cfg, seed=seed)
    xva, yva = validation_sweeps(seed)
    net = build_network(
        [braille.CHANNELS, 48, len(braille.LETTERS)],
        grid=TimeGrid(dt_fine=1e-6, fine_per_coarse=fine_per_coarse),
        sur=surrogate,
        readout_tau=50e-6,
        neuron_kwargs={"tau_mem": 64e-6, "tau_syn": 32e-6, "threshold": 0.1},
        seed=seed,
    )
    neurons = nn.ModuleList(layer.neuron for layer in net.layers if layer.neuron.spiking)
    synapses = [p for name, p in net.named_parameters() if "synapse" in name or "recurrent" in name]
    neuron_params = [p for n in neurons for p in (n.threshold, n.log_tau_mem)]
    lower = Synapses(
        "synapses",
        module=net,
        optimizer=torch.optim.SGD(synapses, lr=0.05),
        data=batches(xtr, ytr, 27, seed),
        config=configs.get("synapses", ProblemConfig(hypergrad="unroll", unroll_steps=2)),
    )
    upper = NeuronParameters(
        "neurons",
        module=neurons,
        optimizer=torch.optim.Adam(neuron_params, lr=1e-2),
        data=batches(xva, yva, 27, seed + 1),
        config=configs.get("neurons", ProblemConfig()),
    )
    return [upper, lower]


def validation_sweeps(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation sweeps the upper problem trains on and the example scores."""
    return braille.make_dataset(3, braille.BrailleConfig(steps=128), seed=seed + 1)


def build(iters: int, fine_per_coarse: int = 16, hypergrad: str = "unroll", surrogate=None, seed: int = 0):
    """The bilevel engine, the network, its neuron modules and the validation sweeps."""
    upper, lower = problems({"synapses": ProblemConfig(hypergrad=hypergrad, unroll_steps=2)}, fine_per_coarse, surrogate, seed)
    engine = Engine(
        [upper, lower],
        dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        config=EngineConfig(train_iters=iters, seed=seed),
    )
    return engine, lower.module, upper.module, validation_sweeps(seed)


def held_out_sweeps(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sweeps that neither level trains on, for the comparison."""
    return braille.make_dataset(3, braille.BrailleConfig(steps=128), seed=seed + 2)


def synapses_only(iters: int, fine_per_coarse: int = 16, seed: int = 0) -> float:
    """The baseline's test accuracy: the same network, data and synapse optimizer, neurons left at their start."""
    _, lower = problems({}, fine_per_coarse, seed=seed)
    Engine([lower], config=EngineConfig(train_iters=iters, seed=seed)).run()
    return accuracy(lower.module, *held_out_sweeps(seed))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--fine-per-coarse", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    engine, net, neurons, _ = build(args.iters, args.fine_per_coarse)
    test = held_out_sweeps(0)
    before = [n.threshold.detach().clone() for n in neurons]
    print(f"test accuracy before training: {accuracy(net, *test):.1%}")
    engine.run()
    print(f"test accuracy after {args.iters} iterations, bilevel (synapses + neurons): {accuracy(net, *test):.1%}")
    bilevel = accuracy(net, *test)
    baseline = synapses_only(args.iters, args.fine_per_coarse)
    print(f"test accuracy after {args.iters} iterations, synapses only (baseline):     {baseline:.1%}")
    for n, (neuron, start) in enumerate(zip(neurons, before, strict=True)):
        moved = (neuron.threshold.detach() - start).abs().mean().item()
        tau = neuron.log_tau_mem.detach().exp().mean().item()
        print(f"layer {n}: mean |threshold change| {moved:.4f}, mean tau_mem {tau * 1e6:.1f} us")
    return {"bilevel_accuracy": bilevel, "synapses_only_accuracy": baseline, "history": engine.history}


if __name__ == "__main__":
    main()
