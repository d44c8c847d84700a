"""The ``"auto"`` tuner's cache file only saves re-timing: no fault in it may stop training."""

import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from betty_like.backends.conv import ConvTuner, choices, swap


def _train_step(model: nn.Module) -> None:
    model(torch.randn(2, 1, 6, 6)).sum().backward()


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 1))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("clash", ["below_a_file", "directory_at_the_file"])
def test_file_and_directory_clashes_are_logged_once_and_training_goes_on(tmp_path, monkeypatch, caplog, clash):
    if clash == "below_a_file":
        (tmp_path / "plain").write_text("a regular file where the cache directory should be")
        monkeypatch.setenv("BETTY_LIKE_CACHE_DIR", str(tmp_path / "plain" / "cache"))
    else:
        (tmp_path / "conv_auto.json").mkdir()
        monkeypatch.setenv("BETTY_LIKE_CACHE_DIR", str(tmp_path))
    model = swap(_model(), "auto")  # the default tuner, as ProblemConfig(backends={"conv2d": "auto"}) uses
    for _ in range(2):
        _train_step(model)
    assert len(choices(model)) == 2  # both layers chose, in memory
    written = [m for m in _warnings(caplog) if "cannot write the cache" in m]
    assert len(written) == 1 and "conv_auto.json" in written[0]


def test_an_unwritable_directory_keeps_choices_in_memory(tmp_path, monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    # root ignores directory modes, so the refusal is injected where the tuner creates its temporary file
    monkeypatch.setattr("tempfile.mkstemp", refuse)
    tuner = ConvTuner(tmp_path / "auto.json", warmup=0, repeats=1)
    model = swap(_model(), "auto", tuner=tuner)
    _train_step(model)
    _train_step(model)
    assert tuner.searches == 2 and len(tuner.entries) == 2 and not (tmp_path / "auto.json").exists()
    assert sum("cannot write the cache" in m and "Permission denied" in m for m in _warnings(caplog)) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_directory_keeps_choices_in_memory(tmp_path, caplog):
    tmp_path.chmod(0o500)
    try:
        tuner = ConvTuner(tmp_path / "auto.json", warmup=0, repeats=1)
        _train_step(swap(_model(), "auto", tuner=tuner))
    finally:
        tmp_path.chmod(0o700)
    assert len(tuner.entries) == 2 and "cannot write the cache" in caplog.text


def test_stale_and_corrupt_entries_are_timed_again_naming_the_file(tmp_path, caplog):
    path = tmp_path / "auto.json"
    tuner = ConvTuner(path, warmup=0, repeats=1)
    model = swap(_model(), "auto", tuner=tuner)
    _train_step(model)
    entries = json.loads(path.read_text())["entries"]
    one_by_one = next(k for k in entries if "kernel_size=(1, 1)" in k)
    three = next(k for k in entries if k != one_by_one)
    entries[one_by_one]["choice"] = "winograd"  # recorded by hand or by another version: cannot run a 1x1 conv
    entries[three] = {"choice": "no_such_algorithm", "ms": "garbled"}
    path.write_text(json.dumps({"format": 1, "entries": entries}))

    again = ConvTuner(path, warmup=0, repeats=1)
    fresh = swap(_model(), "auto", tuner=again)
    _train_step(fresh)
    assert again.searches == 2
    stale = [m for m in _warnings(caplog) if "is not one of its candidates" in m]
    assert len(stale) == 2 and all(str(path) in m for m in stale)
    assert any("'winograd'" in m and "kernel_size=(1, 1)" in m for m in stale)
    repaired = json.loads(path.read_text())["entries"]
    assert repaired[one_by_one]["choice"] != "winograd" and repaired[three]["choice"] != "no_such_algorithm"


WRITER = textwrap.dedent(
    """
    import pathlib, sys, time
    import torch
    from torch import nn
    from betty_like.backends.conv import ConvTuner

    path, first, count, ready, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    tuner = ConvTuner(path, warmup=0, repeats=1)
    layer = nn.Conv2d(1, 1, 3)
    pathlib.Path(ready).touch()
    while not pathlib.Path(go).exists():
        time.sleep(0.005)
    with torch.no_grad():
        for size in range(first, first + count):
            tuner.choose(layer, torch.randn(1, 1, size, size), ["torch", "im2col"])
    """
)


def test_two_processes_writing_one_cache_lose_nothing(tmp_path):
    path, go, count = tmp_path / "shared.json", tmp_path / "go", 20
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(first), str(count), str(tmp_path / f"ready{i}"), str(go)],
            stderr=subprocess.PIPE,
        )
        for i, first in enumerate((5, 5 + count))
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # both start writing at once
    for w in writers:
        assert w.wait(timeout=60) == 0, w.stderr.read().decode()
    assert len(json.loads(path.read_text())["entries"]) == 2 * count
