"""Kronecker SGD vs dense SGD: time per step against d and m, state memory, and asynchronous speed-up.

Runs, in one process, dense SGD (nn.Linear + shifted ReLU + torch.optim.SGD on materialised batches)
and the implicit trainer (mask and tree search) on the same generated Kronecker data and batches,
then Hogwild SGD with 1 and 2 worker processes and synchronous SGD on one schedule. Writes
benchmarks/results/kron.md and kron.png. Single-threaded torch, float32.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F

from betty_like.backends.kron import DenseTwoLayerSGD, KronData, KroneckerLinear, KronTwoLayerSGD, async_sgd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DTYPE = torch.float32
N, BATCH, LR = 256, 16, 1.0  # training inputs, batch size, step size
D_SIDES, D_M = [8, 16, 32, 64, 128, 256, 512], 512  # d sweep: n1 = n2 = side, m fixed
M_VALUES, M_SIDE = [2**k for k in range(8, 17, 2)], 32  # m sweep: d = 32 * 32 fixed
ASYNC = {"n": 512, "m": 4096, "side": 16, "steps": 400}
RANK = 4  # rank of the initial weights: pre-activations close to Gaussian, P0 in O(m n RANK (p + q))
SPARSE = {"n": 32, "batch": 4, "side": 16, "active": 8, "m": [2**k for k in range(12, 21, 2)]}


def build(side: int, m: int, n: int = N, seed: int = 0):
    """Unit-norm factors, +-1/2 labels, rank-RANK initial weights with unit-variance entries, random signs."""
    g = torch.Generator().manual_seed(seed)
    data = KronData(
        F.normalize(torch.randn(n, side, generator=g), dim=1).to(DTYPE),
        F.normalize(torch.randn(n, side, generator=g), dim=1).to(DTYPE),
    )
    y = (torch.randint(0, 2, (n,), generator=g) - 0.5).to(DTYPE)
    layer = KroneckerLinear(side, side, m, rank=RANK, bias=False, std=1.0, dtype=DTYPE, generator=g)
    signs = (torch.randint(0, 2, (m,), generator=g) * 2 - 1).to(DTYPE)
    return data, y, layer, signs


def per_step(trainer, batches: torch.Tensor, warmup: int = 2) -> float:
    """Median seconds per step over the batches after `warmup` steps."""
    times = []
    for t, cols in enumerate(batches):
        start = time.perf_counter()
        trainer.step(cols)
        if t >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed(make):
    """(object, seconds to build it)."""
    start = time.perf_counter()
    obj = make()
    return obj, time.perf_counter() - start


def state_bytes(trainer) -> int:
    """Bytes of the training state each method keeps (weights, gradients / coefficients, Gram, trees)."""
    if isinstance(trainer, DenseTwoLayerSGD):
        w = trainer.linear.weight
        return 2 * w.numel() * w.element_size() + BATCH * trainer.data.d * w.element_size()
    tensors = [trainer.C, trainer.K, getattr(trainer.search, "_tree", trainer.P)]
    return sum(t.numel() * t.element_size() for t in tensors)


def compare(side: int, m: int, dense_steps: int, fast_steps: int) -> dict:
    """Time dense, mask and tree trainers on the same batches; one row of results."""
    data, y, layer, signs = build(side, m)
    batches = torch.randint(
        0, N, (max(dense_steps, fast_steps), BATCH), generator=torch.Generator().manual_seed(1)
    )
    row = {"side": side, "d": side * side, "m": m}
    for name in ("mask", "tree"):
        trainer, row[f"init_{name}"] = timed(
            lambda name=name: KronTwoLayerSGD(data, y, layer, signs, LR, search=name)
        )
        row[name] = per_step(trainer, batches[:fast_steps])
        row[f"mem_{name}"] = state_bytes(trainer)
        if name == "mask":
            row["active"] = (trainer.P[:, batches[0]] > trainer.shift).double().mean().item()
    dense, row["init_dense"] = timed(lambda: DenseTwoLayerSGD(data, y, layer, signs, LR))
    row["dense"] = per_step(dense, batches[:dense_steps])
    row["mem_dense"] = state_bytes(dense)
    del dense
    print(
        f"d={row['d']:>7} m={m:>6}  dense {row['dense'] * 1e3:8.2f} ms  mask {row['mask'] * 1e3:7.2f} ms  "
        f"tree {row['tree'] * 1e3:7.2f} ms  active {row['active']:.3f}",
        flush=True,
    )
    return row


def sparse_regime() -> list[dict]:
    """Mask vs tree when very few neurons fire: threshold set for about SPARSE['active'] per input."""
    rows = []
    for m in SPARSE["m"]:
        data, y, layer, signs = build(SPARSE["side"], m, n=SPARSE["n"], seed=4)
        with torch.no_grad():  # b = the (k+1)-th largest initial pre-activation: k pairs above it
            initial = layer(data.U, data.V).flatten()
        shift = initial.topk(SPARSE["active"] * SPARSE["n"] + 1).values[-1].item()
        batches = torch.randint(
            0, SPARSE["n"], (40, SPARSE["batch"]), generator=torch.Generator().manual_seed(5)
        )
        row = {"m": m, "shift": shift}
        for name in ("mask", "tree"):
            trainer = KronTwoLayerSGD(data, y, layer, signs, LR, shift=shift, search=name)
            row["active"] = trainer.P.gt(shift).sum().item() / SPARSE["n"]
            row[name] = per_step(trainer, batches)
            del trainer
        print(
            f"sparse m={m:>8}  mask {row['mask'] * 1e3:7.3f} ms  tree {row['tree'] * 1e3:7.3f} ms", flush=True
        )
        rows.append(row)
    return rows


def async_runs() -> dict:
    """Hogwild with 1 and 2 workers and synchronous SGD on one schedule: compute time and loss curves."""
    data, y, layer, signs = build(ASYNC["side"], ASYNC["m"], n=ASYNC["n"], seed=2)
    schedule = torch.randint(
        0, ASYNC["n"], (ASYNC["steps"], BATCH), generator=torch.Generator().manual_seed(3)
    )
    out = {}
    for label, workers, staleness, sync in [
        ("sync, 2 workers", 2, 0, True),
        ("hogwild, 1 worker", 1, 0, False),
        ("hogwild, 2 workers", 2, 0, False),
        ("hogwild, 2 workers, staleness 4", 2, 4, False),
    ]:
        trainer = KronTwoLayerSGD(data, y, layer, signs, lr=20.0)
        start_loss = trainer.full_loss().item()
        result = async_sgd(
            trainer, schedule, workers=workers, staleness=staleness, synchronous=sync, timeout=300
        )
        out[label] = {
            "seconds": result.seconds,
            "applied": int(result.applied.sum()),
            "start": start_loss,
            "final": trainer.full_loss().item(),
            "curve": result.losses,
        }
        print(f"{label:32s} {result.seconds:6.2f} s  final loss {out[label]['final']:.4f}", flush=True)
    return out


def crossover(rows: list[dict]) -> int | None:
    """The smallest swept d at which the mask trainer is faster than dense."""
    return next((r["d"] for r in rows if r["mask"] < r["dense"]), None)


def write(d_rows: list[dict], m_rows: list[dict], sparse: list[dict], runs: dict, seconds: float) -> None:
    """Results table and plot."""
    RESULTS.mkdir(exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = [axes[0, 0], axes[0, 1], axes[1, 1], axes[1, 0]]
    for key, style in (("dense", "o-"), ("mask", "s-"), ("tree", "^-")):
        ax[0].loglog([r["d"] for r in d_rows], [r[key] * 1e3 for r in d_rows], style, label=key)
        ax[1].loglog([r["m"] for r in m_rows], [r[key] * 1e3 for r in m_rows], style, label=key)
    ax[0].set(xlabel="d = n1 * n2", ylabel="ms per step", title=f"time vs d (m={D_M}, n={N}, S={BATCH})")
    ax[1].set(
        xlabel="m (neurons)", ylabel="ms per step", title=f"time vs m (d={M_SIDE**2}, n={N}, S={BATCH})"
    )
    ms = [r["m"] for r in m_rows]
    ax[1].loglog(ms, [m_rows[0]["mask"] * 1e3 * m / ms[0] for m in ms], "k:", label="linear in m")
    for key, style in (("mask", "s-"), ("tree", "^-")):
        ax[3].loglog([r["m"] for r in sparse], [r[key] * 1e3 for r in sparse], style, label=key)
    ax[3].set(
        xlabel="m (neurons)",
        ylabel="ms per step",
        title=f"very sparse: ~{SPARSE['active']} active per input (n={SPARSE['n']}, S={SPARSE['batch']})",
    )
    window = 20
    for label, run in runs.items():
        curve = run["curve"].unfold(0, window, 1).mean(1)
        ax[2].plot(range(window, window + curve.numel()), curve.numpy(), label=label)
    ax[2].set(xlabel="global step", ylabel=f"batch loss ({window}-step mean)", title="async vs sync SGD")
    for a in ax:
        a.legend()
        a.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "kron.png", dpi=110)

    def fmt_rows(rows):
        lines = [
            "| d | m | active frac | dense ms | mask ms | tree ms | dense / mask | dense / tree | "
            "state MiB dense / mask / tree | init s dense / mask |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            mem = " / ".join(f"{r[f'mem_{k}'] / 2**20:.1f}" for k in ("dense", "mask", "tree"))
            lines.append(
                f"| {r['d']} | {r['m']} | {r['active']:.3f} | {r['dense'] * 1e3:.2f} | "
                f"{r['mask'] * 1e3:.2f} | {r['tree'] * 1e3:.2f} | {r['dense'] / r['mask']:.1f}x | "
                f"{r['dense'] / r['tree']:.1f}x | {mem} | "
                f"{r['init_dense']:.3f} / {r['init_mask']:.3f} |"
            )
        return "\n".join(lines)

    def growth(rows, key):
        first, last = rows[0], rows[-1]
        return math.log(last[key] / first[key]) / math.log(last["m"] / first["m"])

    sparse_lines = "\n".join(
        f"| {r['m']} | {r['shift']:.2f} | {r['active']:.1f} | {r['mask'] * 1e3:.3f} | "
        f"{r['tree'] * 1e3:.3f} | {r['mask'] / r['tree']:.2f}x |"
        for r in sparse
    )
    one, two = runs["hogwild, 1 worker"], runs["hogwild, 2 workers"]
    async_lines = "\n".join(
        f"| {label} | {r['seconds']:.2f} | {r['applied']} | {r['start']:.4f} | {r['final']:.4f} |"
        for label, r in runs.items()
    )
    text = f"""# Kronecker SGD benchmark

Generated by `benchmarks/kron.py` in {seconds:.0f} s. Timings were taken on a loaded 2-core CPU machine
(shared with other jobs), torch {torch.__version__}, `torch.set_num_threads(1)`, float32,
{platform.processor() or platform.machine()}. Per-step times are medians over the timed steps.

Setup: two-layer shifted-ReLU network, n = {N} training inputs x = u (x) v with unit-norm factors,
batch S = {BATCH}, threshold b = sqrt(0.4 ln m), rank-{RANK} initial weights with unit-variance entries.
"Dense" is `nn.Linear` + shifted ReLU + `torch.optim.SGD` on the batch materialised from its
factors; "mask" and "tree" are `KronTwoLayerSGD` with the two active-neuron searches. All three give
the same iterates (tested to 1e-10 in float64). State memory counts weights + gradients + one dense
batch for dense, and C, K and P (or the tree, which contains P) for ours.

## Time per step against d (n1 = n2 = {D_SIDES[0]} ... {D_SIDES[-1]}, m = {D_M})

{fmt_rows(d_rows)}

Measured crossover (first swept d where the mask trainer beats dense): d = {crossover(d_rows)}.

## Time per step against m (d = {M_SIDE**2})

{fmt_rows(m_rows)}

Growth exponent of time per step in m (log-log slope from m = {m_rows[0]["m"]} to {m_rows[-1]["m"]}):
dense {growth(m_rows, "dense"):.2f}, mask {growth(m_rows, "mask"):.2f}, tree {growth(m_rows, "tree"):.2f}.

## Mask vs tree when activation is very sparse

n = {SPARSE["n"]}, S = {SPARSE["batch"]}, d = {SPARSE["side"] ** 2}, threshold b set for about
{SPARSE["active"]} active neurons per input.

| m | b | active per input | mask ms | tree ms | mask / tree |
|---|---|---|---|---|---|
{sparse_lines}

## Asynchronous SGD (n = {ASYNC["n"]}, m = {ASYNC["m"]}, d = {ASYNC["side"] ** 2})

{ASYNC["steps"]} steps of S = {BATCH}, step size 20, one fixed batch schedule for every run.

Seconds run from the release of all workers to the last worker's end (process start-up excluded).

| run | seconds | updates applied | start loss | final loss |
|---|---|---|---|---|
{async_lines}

Hogwild speed-up with 2 workers over 1: {one["seconds"] / two["seconds"]:.2f}x (2 cores shared with other
jobs).

![plot](kron.png)
"""
    (RESULTS / "kron.md").write_text(text)


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    compare(D_SIDES[0], D_M, dense_steps=3, fast_steps=3)  # warm-up: first-call allocations and dispatch
    d_rows = [compare(side, D_M, dense_steps=5 if side >= 256 else 10, fast_steps=30) for side in D_SIDES]
    m_rows = [compare(M_SIDE, m, dense_steps=5 if m >= 2**14 else 10, fast_steps=20) for m in M_VALUES]
    sparse = sparse_regime()
    runs = async_runs()
    write(d_rows, m_rows, sparse, runs, time.perf_counter() - start)


if __name__ == "__main__":
    main()
