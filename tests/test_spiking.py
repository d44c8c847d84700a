"""Spiking backend: exactness of the K=1 path, quantization levels, surrogate formulas, memory."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from betty_like.backends.spiking import (
    FeLIF,
    QuantizedLinear,
    Readout,
    SavedTensorMeter,
    TimeGrid,
    build_network,
    check_hypergrad_support,
    quantize,
    spike,
    surrogate,
)

NEURON_KW = {
    "lif": {"tau_mem": 2e-3, "tau_syn": 1e-3, "threshold": 0.5},
    "felif": {"tau_syn": 1e-3, "tau_sw": 1e-3, "tau_leak": 5e-3},
}


def _net(neuron: str, k: int, **kw):
    grid = TimeGrid(dt_fine=1e-4, fine_per_coarse=k)
    return build_network(
        [12, 16, 4], neuron=neuron, recurrent=True, grid=grid, neuron_kwargs=NEURON_KW[neuron], seed=3, **kw
    )


def _spikes(t: int = 48, batch: int = 5, features: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(t, batch, features, generator=gen) < 0.3).float()


def _plain_bptt(net, x: torch.Tensor) -> torch.Tensor:
    """Textbook BPTT at the fine step: every layer steps once per input step, all under autograd."""
    dt = net.grid.dt_fine
    weights = [layer.weights() for layer in net.layers]
    states = [layer.neuron.init_state(x.shape[1], x) for layer in net.layers]
    prev = [x.new_zeros(x.shape[1], layer.neuron.size) for layer in net.layers]
    outputs = []
    for xt in x:
        inp = xt
        for n, (layer, w) in enumerate(zip(net.layers, weights, strict=True)):
            drive = layer.synapse(inp, w[0])
            if layer.recurrent is not None:
                drive = drive + layer.recurrent(prev[n], w[1])
            states[n], inp = layer.neuron.step(states[n], drive, dt)
            prev[n] = inp
        outputs.append(inp)
    return torch.stack(outputs)


def _grads(net, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(net.parameters()), allow_unused=False))


@pytest.mark.parametrize("neuron", ["lif", "felif"])
def test_one_fine_step_per_coarse_step_is_plain_bptt_exactly(neuron):
    x, target = _spikes(), torch.randn(48, 5, 4)
    net = _net(neuron, 1)
    ours = net(x)
    ref = _plain_bptt(net, x)
    assert torch.equal(ours, ref)
    for a, b in zip(
        _grads(net, ((ours - target) ** 2).sum()), _grads(net, ((ref - target) ** 2).sum()), strict=True
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize("neuron", ["lif", "felif"])
@pytest.mark.parametrize("reduce", ["count", "mean", "last"])
def test_forward_is_the_fine_simulation_at_every_ratio(neuron, reduce):
    x = _spikes()
    full = _net(neuron, 1)(x)
    for k in (4, 16):
        net = _net(neuron, k)
        net.grid = TimeGrid(dt_fine=1e-4, fine_per_coarse=k, reduce=reduce)
        out = net(x)
        torch.testing.assert_close(out, full[k - 1 :: k], rtol=0, atol=1e-5)
        assert all(torch.isfinite(g).all() for g in _grads(net, out.square().sum()))


def test_spikes_actually_happen_in_the_test_network():
    net = _net("lif", 1)
    layer = net.layers[0]
    with torch.no_grad():
        _, out, _ = layer.fine_window(layer.init_state(5, _spikes()), _spikes(), layer.weights(), 1e-4)
    assert 0.01 < out.mean().item() < 0.9


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_quantized_synapses_take_only_two_to_the_k_levels(bits):
    w = torch.randn(4000) * 2
    q = quantize(w, bits, w_max=1.5)
    levels = torch.linspace(-1.5, 1.5, 2**bits)
    values = torch.unique(q)
    assert len(values) == 2**bits
    torch.testing.assert_close(values, levels)
    layer = QuantizedLinear(30, 20, bits=bits)
    assert len(torch.unique(layer.effective_weight())) <= 2**bits


def test_quantizer_gradient_is_clipped_straight_through():
    w = torch.tensor([-3.0, -0.4, 0.1, 0.9, 3.0], requires_grad=True)
    (g,) = torch.autograd.grad(quantize(w, 3, 1.0).sum(), w)
    assert g.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_device_variability_is_fixed_per_device_and_read_noise_fresh_per_use():
    a = QuantizedLinear(8, 8, d2d_sigma=0.1, seed=7)
    b = QuantizedLinear(8, 8, d2d_sigma=0.1, seed=7)
    assert torch.equal(a.d2d, b.d2d) and a.d2d.std() > 0
    noisy = QuantizedLinear(8, 8, c2c_sigma=0.1)
    x = torch.ones(1, 8)
    assert not torch.equal(noisy(x), noisy(x))


def _two_readout_steps(readout: Readout, u0: torch.Tensor, drives, dt: float, noise: bool) -> list[torch.Tensor]:
    state, outs = (u0,), []
    for d in drives:
        state, out = readout.step(state, d, dt, noise=noise)
        outs.append(out.double())
    return outs


def test_readout_membrane_noise_has_the_documented_moments_and_stays_in_the_membrane():
    """u <- exp(-dt/tau) u + drive + sigma N(0, 1) on noisy steps: against that math written out by hand."""
    tau, dt, sigma, n = 2e-3, 1e-3, 0.1, 200_000
    b = math.exp(-dt / tau)
    gen = torch.Generator().manual_seed(0)
    u0, d1, d2 = (torch.randn(n, 4, generator=gen) for _ in range(3))
    ideal1 = b * u0.double() + d1.double()
    ideal2 = b * ideal1 + d2.double()
    for readout, noise in ((Readout(4, tau=tau, c2c_sigma=sigma), False), (Readout(4, tau=tau), True)):
        outs = _two_readout_steps(readout, u0, (d1, d2), dt, noise)
        for out, ideal in zip(outs, (ideal1, ideal2), strict=True):
            assert ((out - ideal).abs().max() / ideal.abs().max()).item() < 1e-6

    torch.manual_seed(1)
    out1, out2 = _two_readout_steps(Readout(4, tau=tau, c2c_sigma=sigma), u0, (d1, d2), dt, True)
    r1, r2 = (out1 - ideal1).flatten(), (out2 - ideal2).flatten()
    # step 1 adds sigma N(0,1); step 2 decays it by b and adds a fresh draw: var sigma^2 (1 + b^2)
    assert abs(r1.std().item() / sigma - 1) < 0.02
    assert abs(r2.std().item() / (sigma * math.sqrt(1 + b * b)) - 1) < 0.02
    assert abs(r1.mean().item()) < 5 * sigma / math.sqrt(r1.numel())
    corr = torch.corrcoef(torch.stack([r1, r2]))[0, 1].item()
    assert abs(corr / (b / math.sqrt(1 + b * b)) - 1) < 0.02
    with pytest.raises(ValueError, match="c2c_sigma=-0.1"):
        Readout(4, c2c_sigma=-0.1)


def _formula(name: str, b: float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and second derivative of each surrogate, written out by hand."""
    if name == "fast_sigmoid":
        return 1 / (1 + b * x.abs()) ** 2, -2 * b * torch.sign(x) / (1 + b * x.abs()) ** 3
    if name == "arctan":
        c = math.pi / 2 * b
        return (b / 2) / (1 + (c * x) ** 2), -(b / 2) * 2 * c**2 * x / (1 + (c * x) ** 2) ** 2
    inside = (x.abs() < 1 / b).to(x.dtype)
    return b * (1 - b * x.abs()) * inside, -(b**2) * torch.sign(x) * inside


@pytest.mark.parametrize(
    "name,slope", [("fast_sigmoid", 25.0), ("arctan", 2.0), ("triangle", 1.0), ("triangle", 3.0)]
)
def test_surrogate_first_and_second_derivatives_match_formulas(name, slope):
    x = torch.linspace(-1.3, 1.3, 101, dtype=torch.float64).requires_grad_()
    out = spike(x, surrogate(name, slope))
    assert torch.equal(out, (x > 0).to(x.dtype))
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    d1, d2 = _formula(name, slope, x.detach())
    torch.testing.assert_close(g, d1)
    torch.testing.assert_close(h, d2)


def test_straight_through_surrogate_is_a_unit_box_and_first_order_only():
    x = torch.tensor([-0.6, -0.4, 0.0, 0.4, 0.6], requires_grad=True)
    sur = surrogate("straight_through")
    (g,) = torch.autograd.grad(spike(x, sur).sum(), x)
    assert g.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert not sur.second_order
    with pytest.raises(ValueError, match="first-order method"):
        check_hypergrad_support(sur, "unroll")
    check_hypergrad_support(sur, "darts")
    check_hypergrad_support(surrogate("arctan"), "neumann")


def test_learnable_slope_gets_a_gradient_only_through_the_backward_pass():
    slope = torch.tensor(4.0, requires_grad=True)
    x = torch.tensor([0.1, -0.2], requires_grad=True)
    out = spike(x, surrogate("fast_sigmoid", slope))
    assert torch.autograd.grad(out.sum(), slope, allow_unused=True)[0] is None
    (g,) = torch.autograd.grad(spike(x, surrogate("fast_sigmoid", slope)).sum(), x, create_graph=True)
    (ds,) = torch.autograd.grad(g.sum(), slope)
    expected = sum(-2 * abs(v) / (1 + 4 * abs(v)) ** 3 for v in (0.1, -0.2))
    assert ds.item() == pytest.approx(expected, rel=1e-5)


def _graph_bytes(k: int, t: int = 256) -> int:
    net = _net("lif", k)
    with SavedTensorMeter() as meter:
        out = net(_spikes(t=t))
    out.sum().backward()
    return meter.bytes


def test_graph_memory_at_coarse_ratio_is_below_full_bptt():
    full, coarse = _graph_bytes(1), _graph_bytes(16)
    assert coarse < 0.3 * full


def test_graph_memory_follows_the_coarse_step_count_not_the_fine_one():
    assert _graph_bytes(8, t=64) == _graph_bytes(32, t=256)


def test_user_mistakes_raise_named_errors():
    with pytest.raises(ValueError, match="fine_per_coarse"):
        TimeGrid(fine_per_coarse=0)
    with pytest.raises(ValueError, match="reduce"):
        TimeGrid(reduce="max")
    with pytest.raises(ValueError, match="multiple of"):
        _net("lif", 5)(_spikes())
    with pytest.raises(ValueError, match="unknown surrogate"):
        surrogate("relu")
    with pytest.raises(ValueError, match="bits"):
        QuantizedLinear(3, 3, bits=0)
    with pytest.raises(ValueError, match="threshold"):
        FeLIF(3, threshold=1.5)
    with pytest.raises(ValueError, match="neuron"):
        build_network([3, 3], neuron="izhikevich")


def _example():
    path = Path(__file__).resolve().parents[1] / "examples" / "spiking_bilevel.py"
    spec = importlib.util.spec_from_file_location("spiking_bilevel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bilevel_example_learns_neuron_parameters_through_the_engine():
    engine, net, neurons, _ = _example().build(iters=3, fine_per_coarse=16)
    start = [n.threshold.detach().clone() for n in neurons]
    engine.run()
    for n, before in zip(neurons, start, strict=True):
        assert torch.isfinite(n.threshold).all() and not torch.equal(n.threshold, before)
    hypergrad = engine.status("neurons").gradient
    assert hypergrad and all(torch.isfinite(g).all() for g in hypergrad.values())


def test_bilevel_example_refuses_first_order_surrogate_with_unrolled_hypergradients():
    example = _example()
    # the engine itself refuses: the neurons declare first_order_only for a straight-through surrogate
    with pytest.raises(
        ValueError, match=r"problem 'synapses' uses hypergrad='unroll'.*\['LIF'\].*first-order"
    ):
        example.build(iters=1, surrogate=surrogate("straight_through"))
    example.build(iters=1, hypergrad="darts", surrogate=surrogate("straight_through"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_and_gradients_match_cpu():
    x = _spikes()
    cpu = _net("lif", 4)
    gpu = _net("lif", 4).cuda()
    out_cpu, out_gpu = cpu(x), gpu(x.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-4, atol=1e-4)
    for a, b in zip(_grads(cpu, out_cpu.square().sum()), _grads(gpu, out_gpu.square().sum()), strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-3)
