"""Padding waste of a token-bucket set on `bench serve`'s datasets, from the engine's own scheduler.

The engine compiles one step per token bucket and pads each step's tokens up to the next bucket, so
the bucket set trades compiled programs (cold start) against padded token slots (work). What a step
holds depends on the scheduler only (chunked prefill into a token budget, decodes first, preemption
when pages run out), not on the model: this drives engine.scheduler.Scheduler with a page pool and
synthetic requests (each dataset's IN/OUT token counts, arriving all at once or one every few steps)
and records every step's token count. Waste = padded slots / computed slots over the run, as the
engine's `padding_waste` statistic counts it.

    python -m bench.padding
"""

from __future__ import annotations

import itertools

import numpy as np

from bench.serve import DATASETS
from engine.kv_cache import PageAllocator
from engine.runner import bucket_for, token_buckets
from engine.sampler import SamplingParams
from engine.scheduler import Scheduler, Sequence


def step_sizes(input_len: int, output_len: int, *, num_prompts: int = 64, arrival_every: int = 0,
               max_num_batched_tokens: int = 2048, max_num_seqs: int = 256, page_size: int = 32,
               num_pages: int | None = None, buckets: list[int] | None = None, seed: int = 0) -> list[int]:
    """Token counts of every engine step serving `num_prompts` requests of input_len / output_len.

    Args:
      input_len, output_len: tokens per prompt and tokens generated per request.
      num_prompts: requests.
      arrival_every: steps between arrivals (0: every request arrives at the start).
      max_num_batched_tokens, max_num_seqs, page_size: the engine's options (its defaults).
      num_pages: the page pool (default: room for every request at once).
      buckets: the token buckets the scheduler fills (None: it does not know them).
      seed: the prompts' token ids (distinct prompts: no prefix-cache hits).
    Returns:
      One token count per step, in order.
    """
    rng = np.random.default_rng(seed)
    max_model_len = input_len + output_len
    pages = num_pages or num_prompts * -(-max_model_len // page_size) + 1
    sched = Scheduler(PageAllocator(pages, page_size), max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len, buckets=buckets)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    pending = [Sequence(f"r{i}", rng.integers(3, 30000, size=input_len).tolist(), params, seed=i)
               for i in range(num_prompts)]
    sizes = []
    for step in itertools.count():
        while pending and (arrival_every == 0 or step >= arrival_every * (num_prompts - len(pending))):
            sched.add(pending.pop(0))
        if not sched.has_work():
            if not pending:
                break
            continue
        plan = sched.schedule()
        if not plan.scheduled:
            raise RuntimeError("the scheduler made no progress")
        sizes.append(plan.num_tokens)
        for item in plan.scheduled:
            sched.advance(item)
            if item.samples:
                seq = item.seq
                seq.output_ids.append(1)
                if len(seq.output_ids) >= output_len:
                    sched.free(seq)
        if step > 10**6:
            raise RuntimeError("the simulation did not finish")
    return sizes


def waste(sizes: list[int], buckets: list[int]) -> float:
    """Padded slots / computed slots when each step runs at its bucket."""
    padded = sum(bucket_for(n, buckets) for n in sizes)
    return 1.0 - sum(sizes) / padded


def previous_buckets(max_tokens: int) -> list[int]:
    """The bucket rule before this one (for comparison): multiples of 8, each at most 25% above the
    previous, and max_tokens (28 programs for 2048 tokens)."""
    out, b = [], 8
    while b < max_tokens:
        out.append(b)
        b += max(8, (1 << (b.bit_length() - 1)) // 4)
    return out + [max_tokens]


def compare(max_num_batched_tokens: int = 2048) -> list[dict]:
    """Waste per workload: the previous rule padding up, and the engine's buckets with its scheduler
    filling them (and, for reference, the same buckets padded up without the scheduler's help)."""
    new = token_buckets(max_num_batched_tokens)
    old = previous_buckets(max_num_batched_tokens)
    rows = []
    for name, (i, o) in DATASETS.items():
        for every in (0, 1, 4, 16):
            plain = step_sizes(i, o, arrival_every=every, max_num_batched_tokens=max_num_batched_tokens)
            filled = step_sizes(i, o, arrival_every=every, max_num_batched_tokens=max_num_batched_tokens, buckets=new)
            rows.append({"workload": f"{name}, {'all at once' if every == 0 else f'one every {every} steps'}",
                         "previous": waste(plain, old), "padded_up": waste(plain, new), "engine": waste(filled, new),
                         "steps": len(plain), "engine_steps": len(filled)})
    return rows


def main() -> None:
    new, old = token_buckets(2048), previous_buckets(2048)
    print(f"padding waste (padded / computed token slots), max_num_batched_tokens 2048: previous rule {len(old)} "
          f"programs, engine {len(new)} programs {new}")
    print("| workload | previous, padded up | engine buckets, padded up | engine (scheduler fills buckets) | steps |")
    print("|---|---|---|---|---|")
    for r in compare():
        print(f"| {r['workload']} | {r['previous']:.1%} | {r['padded_up']:.1%} | {r['engine']:.1%} | "
              f"{r['steps']} -> {r['engine_steps']} |")


if __name__ == "__main__":
    main()
