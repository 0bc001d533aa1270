"""The causal LM's reference: a plain `model.generate` loop, written without quantbench's code.

    python benchmarks/plain_lm.py MODEL_DIR PRECISION PROMPT.json THREADS NEW_TOKENS WARMUP
        [--int4-group-size G] [--until FILE] [--stop-when-ready]

loads the model in the precision (benchmarks/plain.py's `load`, with AutoModelForCausalLM), and
generates from the prompt (a JSON list of token ids) again and again with transformers'
`model.generate`: greedy, with the KV cache, exactly NEW_TOKENS new tokens (EOS or not), batch
size 1. A streamer reads the clock as each token comes out of generate: the first new token's time
from the call is the time to first token, each later token's time from the one before is a decode
step (and the prompt's hand-off, which generate makes after checking its inputs: setup_ms). WARMUP
generations run untimed first. With --stop-when-ready it stops itself (SIGSTOP) before its first
timed generation: the benchmark continues it for its turns. It generates until FILE
exists (at least once), then prints one JSON line: per generation, when it ended (Unix time), its
time to first token and its decode steps (ms) and its minor page faults (memory first touched),
and the tokens of the first one.

This is what quantbench times (runner/tasks/causal_lm/generation.py: a prefill pass whose end is
the first token, then one pass per further token fed the argmax and the cache; the last token is
chosen, never fed), done the way a user of transformers does it, generate's own bookkeeping
included.
"""

import argparse
import json
import os
import resource
import signal
import time

import torch
from plain import load
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.streamers import BaseStreamer


class TokenClock(BaseStreamer):
    """Reads the clock each time generate hands out tokens: the prompt first (after generate has
    checked its inputs, before it makes the cache and its logits processors), then each new one."""

    def __init__(self):
        self.prompt_at: float | None = None
        self.times: list[float] = []

    def put(self, value) -> None:
        if self.prompt_at is None:
            self.prompt_at = time.perf_counter()
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate_once(model, input_ids, config: GenerationConfig) -> tuple[dict, list[int]]:
    """One timed generation: ({ended_unix, ttft_ms, setup_ms, decode_ms}, the new tokens).
    setup_ms: from the call to the prompt's hand-off, generate's own checks."""
    clock = TokenClock()
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # outside the clock
    started = time.perf_counter()
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        generation_config=config,
        streamer=clock,
    )
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    times = [started, *clock.times]
    steps = [(b - a) * 1000 for a, b in zip(times, times[1:])]
    timed = {
        "ended_unix": time.time(),
        "ttft_ms": steps[0],
        "setup_ms": (clock.prompt_at - started) * 1000,
        "decode_ms": steps[1:],
        "minor_page_faults": faults,
    }
    return timed, output[0, input_ids.shape[1] :].tolist()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="a plain model.generate loop, timed per token")
    for name in ("model_dir", "precision", "prompt_file"):
        parser.add_argument(name)
    for name in ("threads", "new_tokens", "warmup"):
        parser.add_argument(name, type=int)
    parser.add_argument("--int4-group-size", type=int, default=128)
    parser.add_argument("--until", default=None)
    parser.add_argument("--stop-when-ready", action="store_true")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    prompt = json.loads(open(args.prompt_file).read())
    input_ids = torch.tensor([prompt], dtype=torch.long)
    model = load(args.model_dir, args.precision, "cpu", args.int4_group_size, AutoModelForCausalLM)
    # Greedy, exactly new_tokens tokens: min_new_tokens keeps EOS from ending it early, as
    # quantbench always decodes new_tokens.
    config = GenerationConfig(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=model.generation_config.pad_token_id,
    )
    generations, tokens = [], None
    with torch.inference_mode():
        for _ in range(args.warmup):
            generate_once(model, input_ids, config)
        if args.stop_when_ready:
            os.kill(os.getpid(), signal.SIGSTOP)
        while not generations or (args.until is not None and not os.path.exists(args.until)):
            timed, new = generate_once(model, input_ids, config)
            generations.append(timed)
            tokens = tokens or new
    print(json.dumps({"precision": args.precision, "generations": generations, "tokens": tokens}))


if __name__ == "__main__":
    main()
