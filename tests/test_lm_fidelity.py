"""The causal-LM benchmark's turns: how long they last and which plain timings they cut."""

from __future__ import annotations

import json
from types import SimpleNamespace

from benchmarks import lm_fidelity


def warmed_up(folder, ttft_ms: float, decode_ms: list[float]) -> None:
    generation = {"ttft_ms": ttft_ms, "decode_ms": decode_ms}
    (folder / "plain-ready.json").write_text(json.dumps({"warmup": [generation]}))


def test_turns_last_about_one_generation_of_the_precision(tmp_path):
    """A slow precision's turns are as long as its generation, so that its time to first token is
    as rarely cut as a fast one's; never under a second."""
    args = SimpleNamespace(turn_s=None)
    assert lm_fidelity.turn_window(args, tmp_path) == 1.0  # not warmed up yet
    warmed_up(tmp_path, 240.0, [200.0] * 31)
    assert lm_fidelity.turn_window(args, tmp_path) == (240 + 31 * 200) / 1000
    warmed_up(tmp_path, 70.0, [20.0] * 31)
    assert lm_fidelity.turn_window(args, tmp_path) == 1.0
    assert lm_fidelity.turn_window(SimpleNamespace(turn_s=2.5), tmp_path) == 2.5


def test_a_time_to_first_token_is_cut_only_by_a_turn_ending_inside_it():
    generation = {"started_unix": 100.0, "ttft_ms": 250.0}
    assert lm_fidelity.ttft_cut(generation, [(99.0, 100.1)])
    assert not lm_fidelity.ttft_cut(generation, [(99.0, 99.9), (100.8, 101.5)])
    assert not lm_fidelity.ttft_cut(generation, [])
