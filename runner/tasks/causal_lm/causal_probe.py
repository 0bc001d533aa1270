"""Whether a loaded model is causal: its prediction at a position may not read the tokens after it.

A causal-LM job scores each token from the tokens before it; a model that also reads the tokens
after (BERT's LM head without is_decoder) sees the answer, and its "perplexity" means nothing. No
config field says which a model is (GPT-2's and Llama's is_decoder is False too), so the loaded
model is asked: two short inputs that differ only at their last position; the logits at the first
position must not change. Run where the job's model is prepared, before any variant; torch is
imported here.
"""

from __future__ import annotations

import torch

# The probe's tokens: ids every vocabulary has; the inputs differ only at the last of them.
PROBE_IDS = ([1, 2, 3], [1, 2, 4])
PROBED_POSITION = 0
CHANGED_POSITION = len(PROBE_IDS[0]) - 1


def reads_later_tokens(model) -> bool:
    """Whether the logits at PROBED_POSITION change when the token at CHANGED_POSITION does."""
    model.eval()
    first, second = (first_logits(model, ids) for ids in PROBE_IDS)
    # Rounding moves a causal model's logits by ~1e-7; a model that reads ahead moves them by far
    # more (a random tiny BERT: ~1e-1).
    return not torch.allclose(first, second, rtol=1e-4, atol=1e-5)


def first_logits(model, ids: list[int]) -> torch.Tensor:
    inputs = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        output = model(input_ids=inputs, attention_mask=torch.ones_like(inputs))
    return output.logits[0, PROBED_POSITION].float()


def refusal(model) -> str | None:
    """Why a causal-LM job cannot take the model (a sentence a user can act on), or None."""
    if not reads_later_tokens(model):
        return None
    name = type(model).__name__
    return (
        f"{name} is not causal: its logits at position {PROBED_POSITION} change when the token at "
        f"position {CHANGED_POSITION} changes, so its perplexity would read the tokens it "
        "predicts; a causal-LM job takes a decoder: for a BERT-like model set is_decoder: true "
        "in model.config (or in its config.json)"
    )
