"""Per-layer convolution algorithms against torch, and what ``auto`` makes of them.

For every distinct conv layer of ResNet-18 (224x224 input; shapes written out below) at batch 1 and
32, and for the digits CNN of the tests at batch 32, each algorithm's forward (no grad) and
forward+backward time is measured on identical inputs, interleaved round-robin with torch, after
warm-ups, as the median of repeated runs with half the interquartile range as spread; ratios to torch
are medians of per-round ratios. ``auto`` then picks per layer with its default tuner, and its choice is
compared with the best candidate and with torch on the timings measured here. End to end, one
training step (forward + backward) of ResNet-18 at batch 1 and of the digits CNN at batch 32 is timed
unswapped, swapped with the ``torch`` passthrough (its overhead) and swapped with ``auto``.

Writes ``benchmarks/results/conv_algorithms.md`` and ``conv_algorithms.png``. One torch thread.
Run timed benchmarks one at a time on a shared machine:
``flock /tmp/betty_bench.lock .venv/bin/python benchmarks/conv_algorithms.py``.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch
from torch import nn

from betty_like.backends.conv import ConvTuner, available, choices, swap
from betty_like.backends.registry import algorithm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SLOW_PROBE_S = 0.25  # a fwd+bwd probe slower than this gets the reduced repeat count
PRUNE = 3.0  # at batch > 1, an algorithm whose probe is this many times torch's is not timed further


@dataclass(frozen=True)
class Layer:
    name: str
    cin: int
    cout: int
    k: int
    stride: int
    pad: int
    hw: int  # input height = width
    count: int  # how many layers of the model have this shape
    groups: int = 1
    first: bool = False  # the input is data: no input gradient

    def conv(self) -> nn.Conv2d:
        return nn.Conv2d(self.cin, self.cout, self.k, self.stride, self.pad, groups=self.groups, bias=False)


RESNET18 = [
    Layer("conv1", 3, 64, 7, 2, 3, 224, 1, first=True),
    Layer("layer1 3x3", 64, 64, 3, 1, 1, 56, 4),
    Layer("layer2.0.conv1", 64, 128, 3, 2, 1, 56, 1),
    Layer("layer2 3x3", 128, 128, 3, 1, 1, 28, 3),
    Layer("layer2 downsample", 64, 128, 1, 2, 0, 56, 1),
    Layer("layer3.0.conv1", 128, 256, 3, 2, 1, 28, 1),
    Layer("layer3 3x3", 256, 256, 3, 1, 1, 14, 3),
    Layer("layer3 downsample", 128, 256, 1, 2, 0, 28, 1),
    Layer("layer4.0.conv1", 256, 512, 3, 2, 1, 14, 1),
    Layer("layer4 3x3", 512, 512, 3, 1, 1, 7, 3),
    Layer("layer4 downsample", 256, 512, 1, 2, 0, 14, 1),
]
LARGE_KERNEL = [  # not in either model: the regime where FFT convolution is expected to pay off
    Layer("11x11 kernel (extra)", 16, 16, 11, 1, 5, 64, 1),
]
DIGITS_CNN = [  # the CNN of tests/test_conv_backend.py, on 8x8 digits
    Layer("cnn.0", 1, 8, 3, 1, 1, 8, 1, first=True),
    Layer("cnn.2", 8, 8, 3, 1, 1, 8, 1, groups=2),
    Layer("cnn.5", 8, 12, 1, 1, 0, 4, 1),
]


@dataclass(frozen=True)
class Timing:
    """Milliseconds of one function over the interleaved rounds (``samples[r]`` is round ``r``)."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Half the interquartile range relative to the median (0.05 = the middle half lies within about ±5 %)."""
        return _half_iqr(self.samples) / self.median

    def ratio(self, other: Timing) -> tuple[float, float]:
        """Median and half-IQR of the per-round ratios ``self / other`` (paired: both ran in the same round)."""
        ratios = [a / b for a, b in zip(self.samples, other.samples, strict=True)]
        return statistics.median(ratios), _half_iqr(ratios)


def _half_iqr(values: tuple[float, ...] | list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / 2


def interleaved_ms(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, Timing]:
    """Milliseconds per function, the functions run round-robin so load bursts hit all alike."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def _step(impl, conv: nn.Conv2d, x: torch.Tensor, train: bool) -> Callable[[], object]:
    inputs = [conv.weight] + ([x] if x.requires_grad else [])

    def forward() -> object:
        with torch.no_grad():
            return impl(conv, x, conv.weight, None)

    def forward_backward() -> object:
        y = impl(conv, x, conv.weight, None)
        return torch.autograd.grad(y, inputs, torch.ones_like(y))

    return forward_backward if train else forward


def _probe_s(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_layer(layer: Layer, batch: int, args) -> dict:
    """Forward and forward+backward times of every algorithm on one layer, the errors, and auto's pick."""
    torch.manual_seed(0)
    conv = layer.conv()
    x = torch.randn(batch, layer.cin, layer.hw, layer.hw, requires_grad=not layer.first)
    names = available("conv2d", conv)
    if batch > 1 and not args.direct_at_batch:
        names.remove("direct")
    reference = algorithm("conv2d", "torch").impl(conv, x, conv.weight, None).detach()
    errors = {n: float((algorithm("conv2d", n).impl(conv, x, conv.weight, None).detach() - reference).abs().max()) for n in names}
    probes = {n: _probe_s(_step(algorithm("conv2d", n).impl, conv, x, True)) for n in names}
    notes = []
    if batch > 1:
        dropped = [n for n in names if n != "torch" and probes[n] > PRUNE * probes["torch"]]
        names = [n for n in names if n not in dropped]
        notes += [f"{n} not timed (one fwd+bwd {probes[n]:.2f} s, {probes[n] / probes['torch']:.0f}x torch)" for n in dropped]
    slow = [n for n in names if n != "torch" and probes[n] > SLOW_PROBE_S]
    if slow:
        notes.append(f"{', '.join(slow)}: {args.slow_warmup} warm-ups + median of {args.slow_repeats}, interleaved with torch (one fwd+bwd > {SLOW_PROBE_S} s)")
    # torch runs in both groups, so every algorithm has a torch timing from the same rounds ("torch@" + mode)
    row = {"layer": layer, "batch": batch, "errors": errors, "notes": notes}
    row |= {key: {} for key in ("fwd", "fwd+bwd", "torch@fwd", "torch@fwd+bwd")}
    for group, warmup, repeats in (
        ([n for n in names if n not in slow or n == "torch"], args.warmup, args.repeats),
        ([*slow, "torch"] if any(n != "torch" for n in slow) else [], args.slow_warmup, args.slow_repeats),
    ):
        for mode, train in (("fwd", False), ("fwd+bwd", True)):
            fns = {n: _step(algorithm("conv2d", n).impl, conv, x, train) for n in group}
            timings = interleaved_ms(fns, warmup, repeats) if fns else {}
            for n, t in timings.items():
                row[mode].setdefault(n, t)
                row["torch@" + mode].setdefault(n, timings["torch"])
    with tempfile.TemporaryDirectory() as tmp:
        tuner = ConvTuner(Path(tmp) / "auto.json", persist=False)
        model = swap(nn.Sequential(conv), "auto", tuner=tuner)
        model(x).sum().backward()
        row["auto"] = choices(model)[0]["algorithm"]
        row["auto_note"] = choices(model)[0]["why"]
    return row


# ---------------------------------------------------------------------------------------- end to end
class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet18(classes: int = 1000) -> nn.Module:
    """ResNet-18 (He et al. 2016) with the standard 224x224 layer shapes listed in ``RESNET18``."""
    stages, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        stages += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes),
    )


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(8, 12, 1), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 16, 10),
    )


def end_to_end(name: str, build: Callable[[], nn.Module], x: torch.Tensor, args) -> dict:
    """One training step (forward, backward) unswapped, with the passthrough and with auto."""
    models = {"unswapped": build(), "passthrough": swap(build(), "torch")}
    with tempfile.TemporaryDirectory() as tmp:
        models["auto"] = swap(build(), "auto", tuner=ConvTuner(Path(tmp) / "auto.json", persist=False))
        start = time.perf_counter()
        models["auto"](x).sum().backward()  # the search happens here, once
        search_s = time.perf_counter() - start
    steps = {k: (lambda m=m: m(x).sum().backward()) for k, m in models.items()}
    # short steps are noisy: time each variant for at least ``e2e_seconds`` in total
    repeats = max(args.repeats, math.ceil(args.e2e_seconds / _probe_s(steps["unswapped"])))
    ms = interleaved_ms(steps, args.warmup, repeats)
    picks = [r["algorithm"] for r in choices(models["auto"])]
    return {"name": name, "ms": ms, "search_s": search_s, "picks": picks, "repeats": repeats}


# ---------------------------------------------------------------------------------------- report
def _fmt(t: Timing | None) -> str:
    return "—" if t is None else f"{t.median:.3g} ±{t.spread:.0%}"


def _fmt_ratio(a: Timing, b: Timing) -> str:
    median, half_iqr = a.ratio(b)
    return f"{median:.3f} ±{half_iqr:.3f}"


def report(rows: list[dict], e2e: list[dict], algos: list[str], args, seconds: float) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln), platform.processor())
    lines = [
        "# Convolution algorithms per layer (ResNet-18 and the digits CNN)",
        "",
        f"Machine: {cpu}, {torch.get_num_threads()} torch thread, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only (no GPU: the cuDNN choices were not measured)'}. "
        f"Medians of {args.repeats} runs after {args.warmup} warm-ups, algorithms interleaved round-robin, unless a row says otherwise; "
        f"times in ms, `±` is half the interquartile range over the runs (relative for times, absolute for ratios); "
        f"ratios are medians of per-round ratios (both sides ran in the same round); `auto` uses the default `ConvTuner` (its own timing, independent of these numbers). "
        f"ResNet-18 layers at batch {', '.join(map(str, args.batches))}, the digits CNN at batch 32. "
        f"Whole run {seconds / 60:.1f} min on a shared 2-core CPU machine loaded by other jobs (absolute times are noisy; "
        f"the interleaved ratios are the point). Produced by `benchmarks/conv_algorithms.py`.",
        "",
    ]
    for mode in ("fwd+bwd", "fwd"):
        lines += [f"## {mode} time per layer", "", "| layer | batch | " + " | ".join(algos) + " | auto picks | notes |", "|---" * (len(algos) + 4) + "|"]
        for r in rows:
            cells = [_fmt(r[mode].get(a)) for a in algos]
            lines.append(f"| {r['layer'].name} | {r['batch']} | " + " | ".join(cells) + f" | {r['auto']} | {'; '.join(r['notes'])} |")
        lines.append("")
    lines += [
        "## auto against the best candidate and against torch (fwd+bwd, timings above)",
        "",
        "| layer | batch | auto picks | best candidate | auto / best | auto / torch | auto within 5% of best |",
        "|---|---|---|---|---|---|---|",
    ]
    within = 0
    for r in rows:
        times = {a: t for a, t in r["fwd+bwd"].items() if a != "direct"}
        best = min(times, key=lambda a: times[a].median)
        if r["auto"] not in times:  # auto picked an algorithm not timed here
            lines.append(f"| {r['layer'].name} | {r['batch']} | {r['auto']} | {best} | — | — | not timed |")
            continue
        mine = times[r["auto"]]
        ratio = mine.median / times[best].median
        within += ratio <= 1.05
        lines.append(
            f"| {r['layer'].name} | {r['batch']} | {r['auto']} | {best} | {ratio:.3f} | {_fmt_ratio(mine, r['torch@fwd+bwd'][r['auto']])} | {'yes' if ratio <= 1.05 else '**no**'} |"
        )
    lines += ["", f"auto within 5% of the best candidate on {within} of {len(rows)} layer/batch rows.", ""]
    lines += ["## where a non-torch algorithm wins (fwd+bwd)", ""]
    wins = []
    for r in rows:
        times = r["fwd+bwd"]
        best = min(times, key=lambda a: times[a].median)
        if best != "torch":
            speedup, half_iqr = r["torch@fwd+bwd"][best].ratio(times[best])
            wins.append(
                f"- {r['layer'].name}, batch {r['batch']}: **{best}** {_fmt(times[best])} ms vs torch {_fmt(times['torch'])} ms"
                f" (torch / {best} per round: {speedup:.2f} ±{half_iqr:.2f})"
            )
    lines += wins or ["- none: torch is fastest on every layer"]
    lines += ["", "## end to end: one training step (forward + backward)", "", "| model | input | timed steps | unswapped | passthrough (`torch`) | passthrough / unswapped | auto | auto / unswapped | auto search (s, once) | auto's picks |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in e2e:
        ms = e["ms"]
        lines.append(
            f"| {e['name']} | {e['input']} | {e['repeats']} | {_fmt(ms['unswapped'])} | {_fmt(ms['passthrough'])} | {_fmt_ratio(ms['passthrough'], ms['unswapped'])} | "
            f"{_fmt(ms['auto'])} | {_fmt_ratio(ms['auto'], ms['unswapped'])} | {e['search_s']:.1f} | {', '.join(e['picks'])} |"
        )
    lines += claims(rows, e2e)
    lines += ["", "## auto's own measurements (the tuner's fwd+bwd medians behind each pick)", ""]
    lines += [f"- {r['layer'].name}, batch {r['batch']}: {r['auto']}: {r['auto_note']}" for r in rows]
    lines += ["", "## max abs error against torch (fp32, forward)", "", "| layer | batch | " + " | ".join(a for a in algos if a != "torch") + " |", "|---" * len(algos) + "|---|"]
    for r in rows:
        lines.append(f"| {r['layer'].name} | {r['batch']} | " + " | ".join(f"{r['errors'][a]:.1e}" if a in r["errors"] else "—" for a in algos if a != "torch") + " |")
    return "\n".join(lines) + "\n"


def claims(rows: list[dict], e2e: list[dict]) -> list[str]:
    """The ai3 paper's claims (``/work/shared/papers.md`` section 2) next to what this run measured."""
    worst = max(max(r["errors"].values()) for r in rows)
    overheads = [e["ms"]["passthrough"].ratio(e["ms"]["unswapped"]) for e in e2e]
    within_noise = all(abs(m - 1) <= max(h, 0.03) for m, h in overheads)
    timed = [r for r in rows if r["auto"] in r["fwd+bwd"]]
    autos = [r["fwd+bwd"][r["auto"]].ratio(r["torch@fwd+bwd"][r["auto"]])[0] for r in timed]
    faster = [f"{r['layer'].name} (batch {r['batch']}, {r['auto']})" for r, q in zip(timed, autos, strict=True) if q < 0.95]
    e2e_auto = [e["ms"]["auto"].ratio(e["ms"]["unswapped"])[0] for e in e2e]
    return [
        "",
        "## the paper's claims (ai3, arXiv 2410.08300) against this run",
        "",
        f"- *Outputs equivalent to PyTorch*: {'reproduced' if worst <= 1e-4 else 'NOT reproduced'}. Largest fp32 forward error of any algorithm on any layer "
        f"{worst:.1e} (bound 1e-4).",
        f"- *No framework overhead*: {'reproduced' if within_noise else 'not shown'} for the swap itself "
        "(passthrough / unswapped within 3% or within its half-IQR of 1). The `torch` passthrough costs "
        + ", ".join(f"{e['name']} {m:.3f} ±{h:.3f}x" for e, (m, h) in zip(e2e, overheads, strict=True))
        + " of the unswapped step (per-round ratio, median ± half-IQR).",
        f"- *Per-layer selection speeds models up* (ai3 on an L40S GPU: VGG16 0.46–0.49x, ResNet-152 0.59–0.64x "
        f"of torch's latency, against a CPU `torch` baseline, see papers.md): not reproduced and not testable "
        f"here: this CPU run has no cuDNN algorithms, and on CPU torch's oneDNN kernel is the fastest on most layers. "
        f"What `auto` does give: per layer, auto / torch from {min(autos):.2f} to {max(autos):.2f} (median of "
        f"per-round ratios); whole training steps auto / unswapped "
        + ", ".join(f"{e['name']} {r:.3f}" for e, r in zip(e2e, e2e_auto, strict=True))
        + f". Layers where auto's pick is at least 5% faster than torch: {', '.join(faster) or 'none'}.",
    ]


def plot(rows: list[dict], algos: list[str], path: Path) -> None:
    groups = sorted({(r["batch"], r["layer"] in DIGITS_CNN) for r in rows})
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 3.2 * len(groups)), squeeze=False)
    for ax, (batch, cnn) in zip(axes[:, 0], groups, strict=True):
        sel = [r for r in rows if r["batch"] == batch and (r["layer"] in DIGITS_CNN) == cnn]
        width = 0.8 / len(algos)
        for i, a in enumerate(algos):
            vals = [r["fwd+bwd"][a].median / r["fwd+bwd"]["torch"].median if a in r["fwd+bwd"] else float("nan") for r in sel]
            ax.bar([j + i * width for j in range(len(sel))], vals, width, label=a)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sel))], [r["layer"].name for r in sel], rotation=20, fontsize=7)
        ax.set_ylabel("time / torch")
        ax.set_title(f"{'digits CNN' if cnn else 'ResNet-18 (+ one 11x11 extra)'} layers, batch {batch}: fwd+bwd time relative to torch (lower is faster)", fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=len(algos))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--slow-warmup", type=int, default=2, help="warm-ups where one fwd+bwd exceeds 0.25 s")
    parser.add_argument("--slow-repeats", type=int, default=5, help="timed runs where one fwd+bwd exceeds 0.25 s")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--e2e-seconds", type=float, default=5.0, help="least timed seconds per end-to-end variant")
    parser.add_argument("--direct-at-batch", action="store_true", help="also time the reference `direct` at batch > 1")
    parser.add_argument("--out", type=Path, default=RESULTS / "conv_algorithms.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    for batch in args.batches:
        for layer in RESNET18 + LARGE_KERNEL:
            rows.append(time_layer(layer, batch, args))
            print(f"{layer.name} batch {batch}: {rows[-1]['fwd+bwd']} auto={rows[-1]['auto']}", flush=True)
    for layer in DIGITS_CNN:
        rows.append(time_layer(layer, 32, args))
    e2e = [
        {**end_to_end("ResNet-18", resnet18, torch.randn(1, 3, 224, 224), args), "input": "1x3x224x224"},
        {**end_to_end("digits CNN", digits_cnn, torch.randn(32, 1, 8, 8), args), "input": "32x1x8x8"},
    ]
    algos = [a for a in available("conv2d") if any(a in r["fwd+bwd"] for r in rows)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(rows, e2e, algos, args, time.perf_counter() - start))
    plot(rows, algos, args.out.with_suffix(".png"))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
