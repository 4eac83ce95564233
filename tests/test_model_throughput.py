"""bench/model_throughput.py at a tiny size: both tables print, and each is judged against the CPU targets."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import model_throughput  # noqa: E402


def test_verdict_bounds_are_inclusive():
    assert model_throughput.verdict(0.8, 0.8) == "met" and model_throughput.verdict(0.79, 0.8) == "NOT met"
    assert model_throughput.verdict(1.2, 1.2, at_most=True) == "met"
    assert model_throughput.verdict(1.21, 1.2, at_most=True) == "NOT met"


def test_tables_print_with_their_target_lines(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "titans_pytorch", None)  # the peer is optional: its absence is reported
    monkeypatch.setattr(model_throughput, "ROOF_SIZE", 256)
    monkeypatch.setattr(sys, "argv", ["model_throughput.py", "--threads", "1", "--variants", "swa", "mac",
                                      "--seq", "64", "--batch", "1", "--window", "32", "--chunk", "16",
                                      "--vocab", "64", "--repeats", "1", "--lengths", "32", "64"])
    model_throughput.main()
    out = capsys.readouterr().out
    rows = [line.split(" | ")[:3] for line in out.splitlines() if line.startswith(("| swa", "| mac"))]
    assert rows[:2] == [["| swa", "eager", "torch"], ["| mac", "eager", "torch"]]
    targets = [line for line in out.splitlines() if line.startswith("# target:")]
    assert len(targets) == 3, out  # MAC against SWA and the roof; lmm and mac by length
    assert re.match(r"# target: MAC \(eager, kernel torch\) FLOP/s [\d.]+× SWA's \(eager, the faster; "
                    r">= 0\.80\) and [\d.]+ of the roof \(>= 0\.50\): (met|NOT met)$", targets[0])
    assert all(re.match(rf"# target: {kind} µs/token at 64 / at 32 [\d.]+ \(<= 1\.20\): (met|NOT met)$", line)
               for kind, line in zip(("lmm", "mac"), targets[1:], strict=True))
    assert "titans-pytorch not installed" in out
