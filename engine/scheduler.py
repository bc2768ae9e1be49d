"""Continuous batching with chunked prefill under a token budget, prefix caching and preemption.

Each step the scheduler picks, in this order and within `max_num_batched_tokens` and `max_num_seqs`:
  1. running sequences with one token left to compute (decodes), oldest first;
  2. running sequences part-way through their prompt (prefill chunks), oldest first;
  3. waiting sequences (arrival order; preempted ones keep their place), after a prefix-cache lookup.
     An embedding input (engine.pooling) is admitted whole or waits: it is computed in one step, with
     no prefix-cache lookup (its every token's hidden state is pooled) and nothing registered there
     (a bidirectional encoder's K/V of a page depend on the tokens after it).
When a running sequence needs a page and none is free, the newest running sequence is preempted:
its pages are released (full ones stay in the prefix cache) and it goes back to waiting, to be
recomputed from its prompt plus the tokens it generated. The oldest sequence can always proceed (the
pool holds at least one max_model_len sequence), so nothing deadlocks and no request is lost.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools

from engine.kv_cache import ROOT_HASH, PageAllocator, page_hashes
from engine.pooling import PoolingParams
from engine.sampler import LOGIT_BIAS_ENTRIES, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_order = itertools.count()


@dataclasses.dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams | PoolingParams  # PoolingParams: an embedding input (prefill only)
    seed: int
    arrival: float = 0.0
    order: int = dataclasses.field(default_factory=lambda: next(_order))
    output_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[float] = dataclasses.field(default_factory=list)
    output_top_logprobs: list = dataclasses.field(default_factory=list)  # per output token: [(id, logprob)]
    num_computed: int = 0  # tokens whose KV is in the cache
    pages: list[int] = dataclasses.field(default_factory=list)
    hashes: list[bytes] = dataclasses.field(default_factory=list)  # of full pages computed so far
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    num_preemptions: int = 0
    first_token_time: float | None = None
    admitted: bool = False
    matcher: object | None = None  # structured output: the llguidance matcher of its grammar

    @property
    def embed(self) -> bool:
        """An embedding input: its prompt computed whole in one step, nothing generated."""
        return isinstance(self.params, PoolingParams)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        return self.num_tokens - self.num_computed


@dataclasses.dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens computed this step
    start: int  # position of the first of them

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token (its sampled token is kept)."""
        return self.start + self.num_new == self.seq.num_tokens


@dataclasses.dataclass
class StepPlan:
    scheduled: list[ScheduledSeq]  # decodes (num_new == 1) first, then prefill chunks
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)

    @property
    def num_decodes(self) -> int:
        return sum(1 for s in self.scheduled if s.num_new == 1)


def _bias_entries(seq: Sequence) -> int:
    return 0 if seq.embed else len(seq.params.logit_bias or ())


class Scheduler:
    def __init__(self, allocator: PageAllocator, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, buckets: list[int] | None = None, trim_above: int = 64,
                 max_bias_entries: int = LOGIT_BIAS_ENTRIES):
        """buckets: the compiled steps' token buckets (None: no bucket awareness). A step whose
        token count falls between two buckets of at least `trim_above` tokens gives its last prefill
        chunk's excess back to the next step instead of padding up (with 14 buckets for 2048
        tokens, padding stays under 9% of the computed slots on bench serve's datasets, where
        padding up would waste up to 47%: `python -m bench.padding`). max_bias_entries: the
        logit_bias entries one step's sampler takes; a waiting request with a logit_bias is admitted
        only while the running ones' entries and its own fit (it waits, in order, otherwise)."""
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({max_num_seqs}): every running sequence needs a token slot each step")
        self.alloc = allocator
        self.page_size = allocator.page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.buckets = sorted(buckets or [])
        self.trim_above = trim_above
        self.max_bias_entries = max_bias_entries
        self.waiting: list[Sequence] = []  # sorted by order
        self.running: list[Sequence] = []  # sorted by order
        self.num_preemptions = 0
        self.num_chunked = 0  # prefill chunks that stopped short of the sequence's last token
        self.prompt_tokens_looked_up = 0
        self.prompt_tokens_hit = 0

    # ------------------------------------------------------------------ requests
    def add(self, seq: Sequence) -> None:
        self._insert(self.waiting, seq)

    @staticmethod
    def _insert(queue: list[Sequence], seq: Sequence) -> None:
        i = len(queue)
        while i > 0 and queue[i - 1].order > seq.order:
            i -= 1
        queue.insert(i, seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def free(self, seq: Sequence) -> None:
        """Release a sequence's pages (finished or aborted) and forget it."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.alloc.release(seq.pages)
        seq.pages = []

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.alloc.release(seq.pages)
        seq.pages, seq.num_computed, seq.hashes = [], 0, []
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._insert(self.waiting, seq)

    def _pages_needed(self, seq: Sequence, upto: int) -> int:
        return max(0, -(-upto // self.page_size) - len(seq.pages))

    def _grow(self, seq: Sequence, upto: int) -> bool:
        n = self._pages_needed(seq, upto)
        if n == 0:
            return True
        pages = self.alloc.allocate(n)
        if pages is None:
            return False
        seq.pages.extend(pages)
        return True

    # ------------------------------------------------------------------ one step
    def schedule(self) -> StepPlan:
        budget = self.max_num_batched_tokens
        planned: dict[int, ScheduledSeq] = {}
        preempted: list[Sequence] = []

        def make_room(seq: Sequence, upto: int) -> bool:
            """Pages for `seq` up to token `upto`, preempting newer running sequences if needed."""
            nonlocal budget
            while not self._grow(seq, upto):
                victim = self.running[-1]
                if victim.order <= seq.order:
                    return False  # nothing newer to preempt
                if id(victim) in planned:
                    budget += planned.pop(id(victim)).num_new
                self._preempt(victim)
                preempted.append(victim)
            return True

        for want_decode in (True, False):
            for seq in list(self.running):
                if seq not in self.running or id(seq) in planned or budget == 0:
                    continue
                if (seq.remaining == 1) != want_decode:
                    continue
                n = min(seq.remaining, budget)
                if make_room(seq, seq.num_computed + n):
                    planned[id(seq)] = ScheduledSeq(seq, n, seq.num_computed)
                    budget -= n
                elif want_decode and self.running and self.running[-1] is seq:
                    self._preempt(seq)  # the newest cannot get a page: it waits for one
                    preempted.append(seq)

        bias_in_use = sum(_bias_entries(s) for s in self.running)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if bias_in_use + _bias_entries(seq) > self.max_bias_entries:
                break  # its logit_bias does not fit the step's sampler until a biased request ends
            if seq.embed and seq.remaining > budget:
                break  # computed whole: it waits for a step with room for all of it
            if seq.num_computed == 0 and not seq.pages and not seq.embed:
                self._prefix_lookup(seq)
            n = min(seq.remaining, budget)
            if not self._grow(seq, seq.num_computed + n):
                if not self.running:  # cannot happen with a pool >= max_model_len; keep the request
                    raise RuntimeError("page pool too small for a single sequence")
                self.alloc.release(seq.pages)
                seq.pages, seq.num_computed, seq.hashes = [], 0, []
                break
            self.waiting.pop(0)
            bias_in_use += _bias_entries(seq)
            seq.status = Status.RUNNING
            self._insert(self.running, seq)
            planned[id(seq)] = ScheduledSeq(seq, n, seq.num_computed)
            budget -= n

        self._trim_to_bucket(list(planned.values()))  # before sorting: a chunk cut to 1 token sorts as a decode
        items = sorted(planned.values(), key=lambda s: (s.num_new != 1, s.seq.order))
        self.num_chunked += sum(1 for it in items if not it.samples)
        return StepPlan(items, preempted)

    def _trim_to_bucket(self, items: list[ScheduledSeq]) -> None:
        """Shorten the last prefill chunk that can give up the excess so the step fills a bucket
        exactly (see __init__); its pages stay allocated for the next step."""
        total = sum(it.num_new for it in items)
        below = [b for b in self.buckets if b <= total]
        if not below or below[-1] == total or below[-1] < self.trim_above:
            return
        excess = total - below[-1]
        for it in reversed(items):
            if it.num_new > excess and not it.seq.embed:
                it.num_new -= excess
                return

    def _prefix_lookup(self, seq: Sequence) -> None:
        tokens = seq.all_ids
        # At least the last token must be computed (its logits are sampled): look up whole pages
        # strictly before it.
        usable = (len(tokens) - 1) // self.page_size
        hashes = page_hashes(tokens[: usable * self.page_size], self.page_size)
        pages = self.alloc.lookup(hashes)
        seq.pages = pages
        seq.hashes = hashes[: len(pages)]
        seq.num_computed = len(pages) * self.page_size
        if not seq.admitted:
            seq.admitted = True
            seq.num_cached_tokens = seq.num_computed
            self.prompt_tokens_looked_up += len(seq.prompt_ids)
            self.prompt_tokens_hit += seq.num_computed

    # ------------------------------------------------------------------ after the step
    def advance(self, item: ScheduledSeq) -> None:
        """Account the step's computed tokens: new full pages enter the prefix cache."""
        seq = item.seq
        seq.num_computed = item.start + item.num_new
        if seq.embed:
            return
        full = seq.num_computed // self.page_size
        if full > len(seq.hashes):
            parent = seq.hashes[-1] if seq.hashes else ROOT_HASH
            new = page_hashes(seq.all_ids[: full * self.page_size], self.page_size, parent, len(seq.hashes))
            for i, h in enumerate(new, start=len(seq.hashes)):
                self.alloc.register(seq.pages[i], h)
            seq.hashes.extend(new)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prompt_tokens_hit / self.prompt_tokens_looked_up if self.prompt_tokens_looked_up else 0.0
