"""What a sensitivity study will cost, predicted from its probe, and what it cost.

A measurement swaps a few layers between the FP32 model and the fully quantized one and runs the
blocks from the first swapped layer on (runner/study/replay.py), so its time is the base model's
head (embedding, final norm, LM head or classifier, scoring) plus the share of its blocks it runs,
plus one comparison with FP32. The probe times each base model's whole pass and its head alone;
a group's two measurements are predicted from where its layers sit. A group step adds one FP32
load, one full quantization and the recorded passes; the recipe tries about 2 log2(groups)
prefixes (runner/study/ranking.py recipe), each predicted at its upper bound here.
"""

from __future__ import annotations

import math

# The bound on a study's cost: this many times (measurements x one accuracy pass), plus
# one model load per call on a node.
COST_BOUND = 1.5


def swap(layers, keep) -> tuple[str, list[str]]:
    """(the base model, the layers swapped into it) for the model quantized all but keep: the
    FP32 model with the quantized layers swapped in, or the fully quantized one with the kept
    layers swapped back, whichever swaps fewer (runner/study/steps.py mixed)."""
    quantized = [name for name in layers if name not in keep]
    return ("fp32", quantized) if len(quantized) <= len(keep) else ("full", sorted(keep))


def measurement_s(model: dict, layers: list[str], keep: set[str]) -> float:
    """One measurement of the model quantized all but keep: the base swap chooses, from the first
    swapped layer's block on."""
    base, swapped = swap(layers, keep)
    blocks = model["blocks"]
    start = min((model["starts"].get(name, 0) for name in swapped), default=0)
    share = (blocks - start) / blocks if blocks else 1.0
    head, whole = model["head_s"][base], model["pass_s"][base]
    return head + share * max(whole - head, 0.0) + model["compare_s"]


def group_s(probe: dict, names: list[str]) -> float:
    """A group's two measurements: only (the group quantized) and all_but (the group kept)."""
    model, layers, members = probe["cost_model"], probe["layers"], set(names)
    return measurement_s(model, layers, set(layers) - members) + measurement_s(
        model, layers, members
    )


def step_s(probe: dict) -> float:
    """What a group or recipe step pays before its first measurement: the FP32 load, the full
    quantization, FP32's reference where it is not handed on, and both recorded passes."""
    reference = probe["fp32_pass_s"] if probe["reference"] is None else 0.0
    passes = sum(probe["cost_model"]["pass_s"].values())
    return probe["load_s"] + probe["quantize_s"] + reference + passes


def recipe_measurements(groups: int) -> int:
    """The most prefixes the recipe measures: doubling to the longest, then bisecting."""
    longest = max(groups - 1, 1)
    doubling = math.ceil(math.log2(longest)) + 1
    return doubling + max(math.ceil(math.log2(longest)) - 1, 0)


def predicted(probe: dict, shares: list[dict[str, list[str]]]) -> dict:
    """The groups' and the recipe's predicted seconds, and the measurements they make."""
    groups = {name: layers for share in shares for name, layers in share.items()}
    groups_s = len(shares) * step_s(probe) + sum(group_s(probe, n) for n in groups.values())
    count = recipe_measurements(len(probe["groups"]))
    each = probe["cost_model"]["pass_s"]["full"] + probe["cost_model"]["compare_s"]
    return {
        "groups_s": groups_s,
        "recipe_s": step_s(probe) + count * each,
        "measurements": 2 * len(groups),
        "recipe_measurements": count,
    }


def predicted_text(probe: dict, shares: list[dict], nodes: int) -> str:
    """The line the run prints before the groups start."""
    found = predicted(probe, shares)
    model = probe["cost_model"]
    replayed = (
        f"{model['blocks']} blocks replayed up to a group's first"
        if model["blocks"]
        else ("no block replayed")
    )
    return (
        f"{len(probe['groups'])} groups x 2 = {found['measurements']} measurements in "
        f"{len(shares)} Ray task(s) on {nodes} node(s), then the recipe (at most "
        f"{found['recipe_measurements']}): about {found['groups_s'] + found['recipe_s']:.0f} s "
        f"of work predicted ({found['groups_s']:.0f} s + {found['recipe_s']:.0f} s; a whole pass "
        f"{model['pass_s']['fp32']:.2f} s FP32, {model['pass_s']['full']:.2f} s quantized, "
        f"{replayed})"
    )


def cost(probe: dict, shares: list[dict], measured: list[dict], found: dict) -> dict:
    """What the study cost against what it was predicted to and the bound: COST_BOUND x
    (measurements x one accuracy pass) + one model load per call on a node, for the group and
    recipe steps (the probe measures what the bound is made of). measured: the group steps that
    ran in this run (a resumed study's earlier ones are not timed again)."""
    guess = predicted(probe, shares)
    measurements = sum(2 * len(o["groups"]) for o in measured) + len(found["recipe"]["tried"])
    tasks = len(measured) + 1
    measured_s = sum(o["wall_s"] for o in [*measured, found])
    bound_s = COST_BOUND * measurements * probe["pass_s"] + tasks * probe["load_s"]
    predicted_s = guess["groups_s"] + guess["recipe_s"]
    return {
        "measurements": measurements,
        "tasks": tasks,
        "pass_s": probe["pass_s"],
        "fp32_pass_s": probe["fp32_pass_s"],  # FP32's pass: a mostly-FP32 measurement's speed
        "quantize_s": probe["quantize_s"],
        "load_s": probe["load_s"],
        "predicted_s": round(predicted_s, 3),
        "measured_s": round(measured_s, 3),
        "measured_over_predicted": round(measured_s / predicted_s, 3) if predicted_s else None,
        "bound_s": round(bound_s, 3),
        "within_bound": measured_s <= bound_s,
    }
