"""Convolution backend: every algorithm against torch, double backward, registry and swap, auto, engine."""

import json

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from betty_like import Engine, EngineConfig, Problem, ProblemConfig
from betty_like.backends.conv import AlgorithmConv2d, ConvTuner, available, choice_table, choices, swap
from betty_like.backends.registry import algorithm, register

OURS = ["direct", "im2col", "winograd", "fft"]
# max |ours - torch| / max(1, max |torch|), float32, unit-normal inputs, default-initialised weights
TOL32 = {"direct": 1e-5, "im2col": 1e-5, "winograd": 5e-5, "fft": 5e-5}
# half types are computed in float32 and rounded once: compared with float32 torch on the same inputs
TOL_HALF = {torch.bfloat16: 1e-2, torch.float16: 2e-3}

# (in, out, kernel, stride, padding, dilation, groups, bias, padding_mode, (H, W))
SHAPES = [
    (3, 4, 3, 1, 1, 1, 1, True, "zeros", (7, 9)),
    (4, 6, 3, 1, 0, 1, 2, False, "zeros", (6, 6)),
    (2, 4, 3, 1, 1, 1, 1, True, "reflect", (5, 8)),
    (2, 3, 3, 1, "same", 1, 1, True, "circular", (6, 5)),
    (2, 3, 4, 1, "same", 1, 1, True, "zeros", (6, 7)),
    (2, 4, (2, 3), (2, 1), (1, 0), (1, 2), 1, True, "zeros", (8, 9)),
    (4, 4, 1, 2, 0, 1, 4, True, "zeros", (7, 7)),
    (3, 5, 5, 1, 2, 1, 1, True, "replicate", (8, 8)),
    (2, 2, 3, 2, 1, 2, 1, False, "zeros", (9, 9)),
]


def _conv(shape, dtype=torch.float32):
    cin, cout, k, s, p, d, g, bias, mode, _ = shape
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=bias, padding_mode=mode).to(dtype)


def _input(shape, dtype=torch.float32, layout="contiguous", batch=2):
    x = torch.randn(batch, shape[0], *shape[-1], dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def _forward_and_grads(conv, x, name):
    x = x.detach().requires_grad_(True)
    params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
    y = algorithm("conv2d", name).impl(conv, x, conv.weight, conv.bias)
    grads = torch.autograd.grad(y, [x, *params], torch.ones_like(y) + torch.arange(y.numel()).reshape(y.shape) % 3)
    return y, grads


def _grid(shapes, ids):
    """(algorithm, shape) pairs where the algorithm is offered (winograd is not, outside 3x3 stride 1)."""
    return [
        pytest.param(name, shape, id=f"{name}-{i}")
        for name in OURS
        for shape, i in zip(shapes, ids, strict=True)
        if name in available("conv2d", _conv(shape))
    ]


# ---------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name, shape", _grid(SHAPES, range(len(SHAPES))))
def test_float32_output_and_gradients_match_torch(name, shape, layout):
    conv, x = _conv(shape), _input(shape, layout=layout)
    y, grads = _forward_and_grads(conv, x, name)
    y_ref, grads_ref = _forward_and_grads(conv, x, "torch")
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert _err(y, y_ref) <= TOL32[name]
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert _err(g, g_ref) <= TOL32[name]
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name, shape", _grid([SHAPES[0], SHAPES[1], SHAPES[5]], ["basic", "groups", "strided"]))
def test_half_types_accumulate_in_float32(name, shape, dtype):
    conv = _conv(shape, dtype)
    x = _input(shape, dtype, layout="channels_last")
    y, grads = _forward_and_grads(conv, x, name)
    reference = _conv(shape)  # float32 copies of the same (rounded) parameters
    reference.load_state_dict({k: v.float() for k, v in conv.state_dict().items()})
    y_ref, grads_ref = _forward_and_grads(reference, x.float(), "torch")
    assert y.dtype == dtype
    assert _err(y, y_ref) <= TOL_HALF[dtype]
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.dtype == dtype and _err(g, g_ref) <= TOL_HALF[dtype]


def test_winograd_is_offered_only_for_3x3_stride_1_dilation_1():
    offered = {i: "winograd" in available("conv2d", _conv(s)) for i, s in enumerate(SHAPES)}
    assert offered == {0: True, 1: True, 2: True, 3: True, 4: False, 5: False, 6: False, 7: False, 8: False}
    assert "direct" in available("conv2d") and "direct" not in available("conv2d", _conv(SHAPES[0]), tunable_only=True)
    assert not any(n.startswith("cud") for n in available("conv2d", _conv(SHAPES[0])))  # CPU layer


DOUBLE_SHAPES = [
    (2, 4, 3, 1, 1, 1, 2, True, "reflect", (4, 5)),
    (2, 2, (3, 2), (2, 1), (0, 1), (1, 2), 1, True, "zeros", (6, 5)),
]


@pytest.mark.parametrize("name, shape", _grid(DOUBLE_SHAPES, ["3x3-groups-reflect", "strided-dilated"]))
def test_gradcheck_and_gradgradcheck_in_float64(name, shape):
    conv = _conv(shape, torch.float64)
    x = _input(shape, torch.float64, batch=1).requires_grad_(True)
    impl = algorithm("conv2d", name).impl

    def f(x, w, b):
        return impl(conv, x, w, b)

    args = (x, conv.weight.detach().requires_grad_(True), conv.bias.detach().requires_grad_(True))
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_unbatched_input_and_autocast_follow_torch():
    conv = _conv(SHAPES[0])
    x = _input(SHAPES[0])[0]
    model = swap(nn.Sequential(conv), "im2col")
    assert torch.allclose(model(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.unsqueeze(0))
    assert out.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------- registry and swap
class Residual(nn.Module):
    """A residual block whose skip convolution is also reachable under a second name."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.skip = nn.Conv2d(3, 8, 1, stride=1)
        self.alias = self.skip
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x))) + self.skip(x)
        return self.head(y.mean((2, 3)))


def test_swap_keeps_parameters_state_dict_and_optimizer():
    model = Residual()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 6, 6)
    reference = model(x)
    swap(model, ["winograd", "fft", "im2col"])
    assert [type(m) for m in (model.conv1, model.conv2, model.skip)] == [AlgorithmConv2d] * 3
    assert model.alias is model.skip  # every path to a shared layer gets the same replacement
    assert list(model.parameters()) == params and isinstance(model.conv1, nn.Conv2d)
    assert list(model.state_dict()) == list(before)
    assert torch.allclose(model(x), reference, atol=1e-5)
    model(x).sum().backward()
    optimizer.step()  # built before the swap, it still steps the model's parameters
    assert not torch.equal(model.conv1.weight, before["conv1.weight"])
    fresh = Residual()
    fresh.load_state_dict(model.state_dict())  # a checkpoint of the swapped model loads into a plain one
    swap(model, "torch").load_state_dict(before)  # and a plain checkpoint into the swapped model
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_swap_shares_hooks_and_training_mode():
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    model.eval()
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    swap(model, "direct")
    model(torch.randn(1, 1, 5, 5))
    assert seen == [torch.Size([1, 2, 3, 3])] and not model[0].training


@pytest.mark.parametrize(
    "policy, message",
    [
        ("wino", "unknown conv2d algorithm 'wino'"),
        (["torch", "fft"], "the conv2d policy list has 2 entries but the module has 3 Conv2d layers ['conv1', 'conv2', 'skip']"),
        (["torch", "winograd", "winograd"], "layer 'skip' (3, 8, kernel_size=(1, 1), stride=(1, 1)): the policy gave 'winograd', which does not apply"),
        (7, "a conv2d policy is a name, a list of names, a callable"),
    ],
)
def test_policy_errors_name_the_layer_value_and_choices(policy, message):
    with pytest.raises((ValueError, TypeError)) as info:
        swap(Residual(), policy)
    assert message in str(info.value)
    if "does not apply" in message:
        assert "algorithms for this layer: ['torch', 'direct', 'im2col', 'fft']" in str(info.value)


def test_callable_policy_is_asked_once_per_shape_and_checked():
    asked = []

    def policy(layer, shape):
        asked.append((layer.kernel_size, shape))
        return "winograd" if "winograd" in available("conv2d", layer) else "im2col"

    model = swap(Residual(), policy)
    for size in (6, 6, 7):
        model(torch.randn(2, 3, size, size))
    assert len(asked) == 6 and asked[0] == ((3, 3), (2, 3, 6, 6))
    assert {r["algorithm"] for r in choices(model) if r["layer"] == "skip"} == {"im2col"}
    bad = swap(Residual(), lambda layer, shape: "winograd")
    with pytest.raises(ValueError, match=r"layer 'skip' .*the policy callable for input shape \(2, 3, 6, 6\) gave 'winograd'"):
        bad(torch.randn(2, 3, 6, 6))


def test_register_and_swap_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="already registered"):
        register("conv2d", "im2col", algorithm("conv2d", "im2col").impl)
    with pytest.raises(ValueError, match="unknown op 'conv3d'"):
        available("conv3d")

    class MyConv(nn.Conv2d):
        pass

    with pytest.raises(TypeError, match="layer 'mine' is a MyConv"):
        swap(nn.ModuleDict({"mine": MyConv(1, 1, 3)}), "torch")
    with pytest.raises(TypeError, match="wrap the Conv2d in nn.Sequential"):
        swap(nn.Conv2d(1, 1, 3), "torch")


# ---------------------------------------------------------------------------------------- auto
def test_auto_times_once_caches_in_a_json_file_and_reuses_it(tmp_path):
    path = tmp_path / "sub" / "auto.json"
    x = torch.randn(2, 3, 6, 6)
    model = Residual()
    reference = model(x)
    tuner = ConvTuner(path, warmup=0, repeats=2)
    swap(model, "auto", tuner=tuner)
    model(x).sum().backward()
    model(x)
    assert tuner.searches == 3 and path.exists()
    entries = json.loads(path.read_text())["entries"]
    tried = [set(e["ms"]) | set(e["pruned_probe_ms"]) for e in entries.values()]
    assert len(entries) == 3 and all(t >= {"torch", "im2col", "fft"} and "direct" not in t for t in tried)
    assert all("torch" in e["ms"] for e in entries.values())  # the passthrough is always timed in full
    table = choice_table(model)
    assert all(f"| {label} |" in table for label in ("conv1", "conv2", "skip")) and "fwd+bwd ms" in table
    assert _err(model(x), reference) <= max(TOL32.values())

    again = ConvTuner(path, warmup=0, repeats=2)
    other = swap(Residual(), "auto", tuner=again)
    other(x).sum().backward()
    assert again.searches == 0  # every choice came from the file
    assert [r["algorithm"] for r in choices(other)] == [r["algorithm"] for r in choices(model)][:3]


def test_auto_prefers_torch_unless_clearly_faster(tmp_path):
    tuner = ConvTuner(tmp_path / "a.json")  # defaults: 10% faster and 0.1 ms saved per call
    assert tuner._pick({"torch": 1.0, "fft": 0.92}) == "torch"  # 8%: within noise
    assert tuner._pick({"torch": 1.0, "fft": 0.85, "im2col": 0.88}) == "fft"
    assert tuner._pick({"torch": 0.2, "im2col": 0.16}) == "torch"  # 20% but only 40 us: not worth leaving torch


def test_unreadable_cache_is_ignored_and_rewritten(tmp_path, caplog):
    path = tmp_path / "auto.json"
    path.write_text("{not json")
    tuner = ConvTuner(path, warmup=0, repeats=1)
    model = swap(nn.Sequential(nn.Conv2d(1, 2, 3)), "auto", tuner=tuner)
    model(torch.randn(1, 1, 5, 5))
    assert "ignoring unreadable cache" in caplog.text
    assert len(json.loads(path.read_text())["entries"]) == 1


@pytest.mark.skipif("ai3_direct" not in available("conv2d"), reason="the optional aithree package is not installed")
@pytest.mark.parametrize("name", ["ai3_direct", "ai3_smm"])
def test_ai3_candidates_are_guarded_and_differentiable_twice(name):
    conv = _conv(SHAPES[2])
    x = _input(SHAPES[2], layout="channels_last")  # ai3 alone is wrong on this layout
    y, grads = _forward_and_grads(conv, x, name)
    y_ref, grads_ref = _forward_and_grads(conv, x, "torch")
    assert _err(y, y_ref) <= 1e-5 and all(_err(a, b) <= 1e-5 for a, b in zip(grads, grads_ref, strict=True))
    conv64 = _conv(DOUBLE_SHAPES[1], torch.float64)
    impl = algorithm("conv2d", name).impl
    args = (
        _input(DOUBLE_SHAPES[1], torch.float64, batch=1).requires_grad_(True),
        conv64.weight.detach().requires_grad_(True),
        conv64.bias.detach().requires_grad_(True),
    )
    assert torch.autograd.gradgradcheck(lambda *a: impl(conv64, *a), args)
    assert name not in available("conv2d", _conv(SHAPES[1]))  # groups != 1 is not offered


# ---------------------------------------------------------------------------------------- engine
class Classifier(Problem):
    def training_step(self, batch):
        x, y = batch
        losses = F.cross_entropy(self.module(x), y, reduction="none")
        weights = self.reweight(losses.detach().unsqueeze(1)).squeeze(1)
        return (weights * losses).mean()


class Reweight(Problem):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.classifier(x), y)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return (x[:64], torch.tensor(y[:64])), (x[64:128], torch.tensor(y[64:128]))


def _hypergradient(digits, backend, method):
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(8, 12, 1), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 16, 10),
    )
    weights = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1), nn.Sigmoid())
    train, valid = digits
    inner = Classifier(
        "classifier", module=cnn, optimizer=torch.optim.SGD(cnn.parameters(), lr=0.1, momentum=0.9), data=[train],
        config=ProblemConfig(hypergrad=method, unroll_steps=2, backends={"conv2d": backend} if backend is not None else {}, iterations=20),
    )
    outer = Reweight("reweight", module=weights, optimizer=torch.optim.SGD(weights.parameters(), lr=0.1), data=[valid])
    engine = Engine([outer, inner], {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}, EngineConfig(train_iters=4))
    engine.run()
    return engine.status("reweight").gradient, cnn


@pytest.mark.parametrize("method", ["unroll", "cg"])
def test_reweighting_hypergradient_is_the_same_with_every_backend(digits, method, tmp_path, monkeypatch):
    monkeypatch.setenv("BETTY_LIKE_CACHE_DIR", str(tmp_path))
    reference, _ = _hypergradient(digits, None, method)
    per_layer = ["winograd", "winograd", "im2col"]  # winograd cannot run the 1x1 layer
    backends = ["torch", "auto", "direct", "im2col", "fft", per_layer] if method == "unroll" else ["auto", per_layer]
    for backend in backends:
        grads, cnn = _hypergradient(digits, backend, method)
        assert all(isinstance(m, AlgorithmConv2d) for m in cnn if isinstance(m, nn.Conv2d))
        for key, g in reference.items():
            assert _err(grads[key], g) <= 1e-4, (backend, key)
    assert (tmp_path / "conv_auto.json").exists()


def test_engine_names_the_problem_in_backend_errors(digits):
    with pytest.raises(ValueError, match=r"has 1 entries but the module has 3 Conv2d layers \['classifier.0'"):
        _hypergradient(digits, ["torch"], "unroll")
