"""One decoding loop for every strategy (used by ``sampling.sample``).

State per row: the KV cache holds the row's tokens at positions ``0..len-1`` and ``last_logits``
are the heads' logits at position ``len-1``. A step is *propose -> feed -> verify -> commit*:
propose picks tokens from ``last_logits`` (and the lookup index), one forward feeds them (ragged:
each row feeds its own count, padding has position -1), verify decides how many are kept, commit
writes them out and takes the new ``last_logits`` at the row's last kept position.

* ``ar``: head 1 only (``heads=1``), one token per step.
* ``dynamo``: the step policy's n-gram is emitted directly (lossy).
* ``speculative``: the first token is drawn exactly from head 1 (the ``ar`` sampler); a draft
  continues it - the step policy's joint n-gram conditioned on it, or (hybrid, per row) the
  prompt-lookup draft, whichever promises more kept tokens per unit of step cost; the forward
  that feeds ``[t1, d2..dn]`` gives head 1 at every fed position, which verifies ``d2..dn`` left
  to right (greedy: exact match; sampling: accept ``d`` with probability ``min(1, p(d) / q(d))``).
  The cache keeps the accepted prefix (rolling back is lowering ``len``). On a rejection the
  replacement token must come from the residual ``(p - q)+``; its ``p`` is head 1 at the last kept
  position, i.e. the next step's ``last_logits``, so the next step draws its first token from that
  residual instead of ``p``. Every emitted token is thus distributed exactly as under ``ar``.
* ``lookup``: prompt-lookup decoding, no heads: as ``speculative`` with the lookup draft only
  (a point-mass draft distribution) and ``heads=1``.

Only head 1 is unembedded at every fed position; heads 2..H only at each row's last kept
position (dynamo: the last fed one), once verification has said which it is. How drafts are
sized (step cost, acceptance evidence) lives in ``drafting.py``.

Tokens, logits and the cache stay on the model's device; what the host decides with (the lookup
index, the drafters' evidence, per-row counts) is plain Python, updated from one transfer at the
end of each step (:meth:`_Decoder._end_step`), which is also the step's stop and NaN check (a lookup
index also reads each step's first token when it is drawn).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .drafting import STEP_COST, DraftConfig, Evidence, expected_kept, size_draft, size_drafts, step_cost_tables
from .graphs import GraphedForward
from .lookup import LookupConfig, NgramIndex
from .policy import DynamoConfig, dynamo_step
from .samplers import SamplingParams

STRATEGIES = ("ar", "dynamo", "speculative", "lookup")
# a row whose joint drafts have not been worth evaluating (drafts sized by cost) still evaluates them
# every this many steps, so that its acceptance evidence can recover when the heads get better
PROBE_EVERY = 16
# on a CPU, finished rows leave the batch (_Decoder._retire): the rows still decoding run smaller
# forwards. False keeps every row to the end (the reference the tests compare with).
RETIRE_FINISHED = True


@dataclass
class GenerationOutput:
    """Result of ``sample(..., return_dict_in_generate=True)``.

    sequences : LongTensor (B, S + max_new_tokens); prompt then new tokens, ``pad_token_id`` after
        a row stops.
    steps : LongTensor (B,); forward passes after prefill in which the row emitted tokens.
    new_tokens : LongTensor (B,); tokens emitted per row (EOS included).
    tokens_per_step : FloatTensor (B,); ``new_tokens / steps``.
    histogram : LongTensor (B, W); ``histogram[b, n-1]`` = steps in which row b emitted n tokens;
        W is the most one step can emit (H, or 1 + the lookup draft length).
    drafted, accepted : LongTensor (B,); speculative / lookup: draft tokens proposed beyond the
        first / accepted by verification (zero for other strategies).
    wall_time : float; seconds for the whole batch (prefill included).
    """

    sequences: torch.Tensor
    steps: torch.Tensor
    new_tokens: torch.Tensor
    tokens_per_step: torch.Tensor
    histogram: torch.Tensor
    drafted: torch.Tensor
    accepted: torch.Tensor
    wall_time: float


# ---------------------------------------------------------------- the loop


@dataclass
class Proposal:
    """What one step feeds.

    tokens : (B, W) int64; ``[t1, d2..dn]`` left-aligned, anything after ``n``.
    n : (B,) int64; tokens fed per row (0 for finished rows).
    q_ids, q_probs : (B, W, kq) or None; sampling only: the draft distribution of token j >= 1
        (``q_probs`` over ``q_ids``), what rejection sampling needs.
    from_lookup : (B,) bool or None; rows whose draft came from the lookup index.
    guess_joint, guess_lookup : (B,) int64 or None; each drafter's first draft token (-1: none),
        judged by head 1 at the first fed position whichever draft is fed (acceptance evidence;
        only where drafts are sized by cost, the one reader of the evidence).
    guess_joint_q : (B,) float64 or None; the joint's probability of its first draft token.
    judged : list of (B,) float64 or None; the guesses' acceptance probabilities (-1: no guess).
    """

    tokens: torch.Tensor
    n: torch.Tensor
    q_ids: Optional[torch.Tensor] = None
    q_probs: Optional[torch.Tensor] = None
    from_lookup: Optional[torch.Tensor] = None
    guess_joint: Optional[torch.Tensor] = None
    guess_joint_q: Optional[torch.Tensor] = None
    guess_lookup: Optional[torch.Tensor] = None
    accept: Optional[torch.Tensor] = None  # (B, H-1 or W-1) float64: the joint draft's acceptance estimates
    judged: Optional[list] = None
    joint_len: Optional[list] = None  # host, per row: joint tokens of a merged draft, -1 where not merged


@dataclass
class LookupDraft:
    """The lookup drafter's proposal, on the host (per row lists): the drafts, their sized lengths,
    values (expected kept tokens per unit of cost) and the acceptance estimates they were sized with."""

    drafts: list
    length: list
    value: list
    accept: Optional[list]  # None where drafts are used whole (no sizing)


class _Decoder:
    """The loop's state and its four stages (see the module docstring)."""

    def __init__(self, model, input_ids, mask, *, strategy, max_new_tokens, sampling: SamplingParams, eos_token_id,
                 pad_token_id, dynamo: DynamoConfig, draft: DraftConfig, lookup: LookupConfig, stats, backend,
                 graph_capture=None):
        self.model, self.strategy, self.sp = model, strategy, sampling
        self.pad_token_id = pad_token_id
        self.dynamo, self.draft, self.lookup, self.stats = dynamo, draft, lookup, stats
        if backend == "cuda":
            from .kernels import cuda_dynamo_step as step_policy
        else:
            step_policy = dynamo_step
        # sample() checked the inputs once: no per-step boundary check (and, on the torch path, its host sync)
        self.step_policy = functools.partial(step_policy, validate=False)
        B, S = input_ids.shape
        self.B, self.dev, self.H, self.V = B, input_ids.device, model.n_heads, model.vocab_size
        self.heads = self.H if strategy in ("dynamo", "speculative") else 1
        uses_lookup = strategy == "lookup" or (strategy == "speculative" and draft.hybrid)
        self.index = NgramIndex(input_ids, mask, lookup) if uses_lookup else None
        # heads on demand pay where the joint is evaluated on some steps only (drafts sized by cost, which
        # skips it where it cannot beat lookup's draft or no draft); DynaMo's thresholds evaluate it every
        # step, and there a separate catch-up call per step costs more than running all heads in every forward
        self.lazy = (strategy == "speculative" and self.H > 1 and hasattr(model, "extra_heads")
                     and draft.size_by == "cost")
        self.W = {"ar": 1, "dynamo": self.H, "lookup": 1 + lookup.max_draft,
                  "speculative": max(self.H, 1 + lookup.max_draft) if uses_lookup else self.H}[strategy]
        self.max_new = max_new_tokens
        self.static = self.dev.type != "cpu"  # fixed feed width: no host sync for T on accelerators
        prompt_len = mask.sum(1)  # (B,)
        self.cache = model.new_cache(B, max_len=int(prompt_len.max()) + max_new_tokens)  # drafts never pass it
        positions = torch.where(mask, mask.long().cumsum(1) - 1, -1)  # (B, S)
        hidden = model(input_ids, positions, self.cache, heads=self.heads,
                       logits_index=torch.full((B, 1), S - 1, dtype=torch.long, device=self.dev), output_hidden=True)
        self.last_logits = model.head_logits(hidden[:, 0])  # (B, heads, V)
        # the steps' forwards: eager, or replayed from one captured graph per shape (graphs.GraphedForward)
        self.forward = (GraphedForward(model, self.cache, graph_capture) if graph_capture is not None else
                        lambda ids, pos, **kw: model(ids, pos, self.cache, **kw))
        self.cache.lengths = prompt_len.clone()
        W, dev = self.W, self.dev
        self.out = torch.full((B, max_new_tokens + W), pad_token_id, dtype=torch.long, device=dev)  # + spare columns
        self.n_gen = torch.zeros(B, dtype=torch.long, device=dev)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        # the host's copy of what the step's one transfer brings back (see _end_step): per row lists
        self.done_h, self.n_gen_h = [False] * B, [0] * B
        self.steps_h, self.drafted_h, self.accepted_h = [0] * B, [0] * B, [0] * B
        self.hist_h = [[0] * W for _ in range(B)]
        self.kept_h = [0] * B  # tokens each row kept in the last step (the streamer's)
        self.since_joint_h = [0] * B  # steps since the row's joint was last evaluated
        self.joint_ev = Evidence(B, prior_first=0.0, prior_cont=0.0)  # first: prior is the heads' own q
        self.lookup_ev = Evidence(B, prior_first=0.5, prior_cont=0.8)  # a copied span tends to go on
        self.eos = torch.tensor(eos_token_id or [], dtype=torch.long, device=dev)
        self.seen = None
        if strategy in ("dynamo", "speculative") and dynamo.repetition_penalty != 1.0:
            self.seen = torch.zeros(B, self.V + 1, dtype=torch.bool, device=dev)  # column V: spare
            self.seen[torch.arange(B, device=dev)[:, None].expand(B, S)[mask], input_ids[mask]] = True
        self.residual = None  # (B, V) draft mass to remove from the next first token (sampled rejections)
        self.next_target = None  # head 1's target at each row's last position, when the last step computed it
        self.ar_w = torch.arange(W, device=dev)
        self.cost = self.cost_lookup = None
        self.joint_overhead = (0.0, 0.0)
        if strategy in ("speculative", "lookup") and draft.size_by == "cost":
            table = step_cost_tables(model, B, W, draft, dev, sampling.do_sample)
            self.cost = table[self.heads]  # a forward as this strategy runs it
            self.cost_lookup = table[1] if self.lazy or strategy == "lookup" else self.cost
            self.cost_lookup_h = self.cost_lookup.tolist()  # the host-side sizing's copy
            self.cost_h = self.cost.tolist()
            if strategy == "speculative":
                given = None if draft.step_cost is None else tuple(draft.step_cost)
                key = ("joint", id(model), str(dev), next(iter(model.parameters()), torch.empty(0)).dtype, B,
                       self.lazy, sampling.do_sample, self.dynamo.k, self.draft.joint_k, stats is None, given)
                if key not in STEP_COST:  # measured once per process, like the step cost
                    STEP_COST[key] = self._joint_overhead(table)
                self.joint_overhead = STEP_COST[key]
            # a joint draft's full cost: the forward and the policy call, and when the last forward ran
            # head 1 alone (heads on demand), bringing heads 2..H up to date first
            policy, catch_up = self.joint_overhead
            self.cost_joint_h = (self.cost + policy).tolist()
            self.cost_joint_behind_h = (self.cost + policy + catch_up).tolist()
        # heads on demand: while no row feeds a joint draft, the forward runs head 1 alone and keeps the
        # stem output; heads 2..H catch up on the skipped positions (one call) when the joint is next needed
        self.heads_len = prompt_len.clone()  # heads 2..H hold positions < heads_len
        self.stem_buf = None  # (B, max_len + 1, d) stem output by position; the last slot is spare
        self.step_heads = self.heads
        self.heads_behind = False  # the last forward ran head 1 alone: heads 2..H must catch up first
        # finished rows leave the batch where that is cheap and shapes may change (not under captured
        # graphs, nor on accelerators, whose step costs little more for more rows): rows_h[b] is
        # physical row b's index in the caller's batch, ``retired`` what the rows that left produced
        self.B0, self.rows_h, self.retired = B, list(range(B)), {}
        self.may_retire = (RETIRE_FINISHED and not self.static and graph_capture is None
                           and hasattr(self.cache, "select_rows"))

    def _joint_overhead(self, table) -> tuple:
        """What evaluating the joint costs beyond the forward, in units of a head-1, 1-token forward:
        (the policy call, timed here on the prefill's logits (fastest of 3); with heads on demand,
        bringing heads 2..H up to date (about their share of a forward), else 0). Zeros with a given
        step_cost."""
        if table["seconds"] is None:
            return 0.0, 0.0
        sync = torch.cuda.synchronize if self.dev.type == "cuda" else (lambda: None)
        cfg = dataclasses.replace(self.dynamo, k=min(self.draft.joint_k, self.dynamo.k), eps_b=0.0,
                                  adaptive_threshold=False)
        first = self.last_logits[:, 0].argmax(-1)
        best = float("inf")
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            self.step_policy(self.last_logits, cfg, stats=self.stats, first_tokens=first)
            sync()
            best = min(best, time.perf_counter() - t0)
        catch_up = 0.0
        if self.lazy:  # heads 2..H on one position + their logits; padding (-1) writes only the spare slot
            pos = torch.full((self.B, 1), -1, dtype=torch.long, device=self.dev)
            stem = self.model(torch.zeros_like(pos), pos, self.cache, heads=1, output_hidden=True, output_stem=True)[1]
            catch_up = float("inf")
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                self.model.head_logits(self.model.extra_heads(stem, pos, self.cache)[:, 0])
                sync()
                catch_up = min(catch_up, time.perf_counter() - t0)
        return best / table["seconds"], catch_up / table["seconds"]

    # ------------------------------------------------------------ propose

    def _head1_target(self, head1: torch.Tensor) -> torch.Tensor:
        """Head 1's target at some positions, (..., V) logits -> probs (..., V) when sampling, the
        argmax (...) when greedy. Computed once per fed position: verification, the drafters'
        evidence and the next step's first token all read it."""
        return self.sp.probs(head1) if self.sp.do_sample else head1.argmax(-1)

    def _first_token(self) -> torch.Tensor:
        """t1 (B,): exact from head 1 at the last position (its residual after a sampled rejection)."""
        target = self.next_target if self.next_target is not None else self._head1_target(self.last_logits[:, 0])
        if not self.sp.do_sample:
            return target
        p1 = target
        if self.residual is not None:
            res = (p1 - self.residual).clamp(min=0)
            mass = res.sum(-1, keepdim=True)
            p1 = torch.where(mass > 0, res / mass.clamp(min=1e-30), p1)
        return self.sp.pick(p1)

    def _policy(self, cfg, first_tokens=None):
        sp = self.sp
        return self.step_policy(self.last_logits, cfg, stats=self.stats, do_sample=sp.do_sample,
                                temperature=sp.temperature, top_k=sp.top_k, generator=sp.generator,
                                seen_tokens=None if self.seen is None else self.seen[:, :self.V],
                                first_tokens=first_tokens, max_tokens=self.max_new - self.n_gen)

    def propose(self, active, active_h) -> Proposal:
        B, W, dev = self.B, self.W, self.dev
        if self.strategy == "ar":
            return Proposal(self._first_token()[:, None], active.long())
        if self.strategy == "dynamo":
            pol = self._policy(self.dynamo)
            return Proposal(pol.tokens, torch.where(active, pol.n, 0))
        first = self._first_token()
        tokens = torch.full((B, W), -1, dtype=torch.long, device=dev)
        tokens[:, 0] = first
        prop = Proposal(tokens, torch.ones(B, dtype=torch.long, device=dev))
        lookup = self._lookup_draft(first, active_h) if self.index is not None else None
        joint_value, joint = None, False
        if self.strategy == "speculative" and self.H > 1:  # one head: nothing to draft with
            need = active_h
            if self.cost is not None:
                # skip the policy in rows where no joint draft could beat the lookup draft (or, without
                # one, feeding no draft), unless the row has not evaluated it for PROBE_EVERY steps
                alt = lookup.value if lookup is not None else [1.0 / self.cost_lookup_h[0]] * B
                lookup_len = lookup.length if lookup is not None else [0] * B
                need = [a and (self.since_joint_h[b] >= PROBE_EVERY or
                               not alt[b] >= self._joint_bound(b, against_lookup=lookup_len[b] > 0))
                        for b, a in enumerate(active_h)]
            joint = any(need)
            if joint:
                if self.lazy:
                    self._catch_up_heads()
                joint_value = self._joint_draft(prop, first, self.max_new - self.n_gen)
                if lookup is not None and self.cost is not None and self.draft.merge:
                    joint_value = self._merge_drafts(prop, joint_value, need)
            self.since_joint_h = [0 if joint else n + 1 for n in self.since_joint_h]
        use = self._use_lookup(prop, lookup, joint_value) if lookup is not None else None
        prop.n = torch.where(active, prop.n, 0)
        # this step's forward runs every head unless no row feeds a joint draft (heads on demand)
        self.step_heads = self.heads
        joint_rows = active if use is None else active & ~use
        if self.lazy and (not joint or not bool((joint_rows & (prop.n > 1)).any())):
            self.step_heads = 1
        if B > 1 and self.cost is not None and not self.static:  # static: the width is W whatever is fed
            lookup_accept = None
            if lookup is not None:
                D = self.lookup.max_draft
                lookup_accept = torch.tensor([a + [0.0] * (D - len(a)) for a in lookup.accept], dtype=torch.float64,
                                             device=dev)
            self._cap_to_batch(prop, lookup_accept, use, active)
        return prop

    def _joint_bound(self, b: int, against_lookup: bool) -> float:
        """The most a joint draft could be worth in row b: its value (expected kept tokens per unit
        of cost, the joint's overhead included) if the heads were certain of every draft token, with
        the rates _joint_draft would use (their prior q at its largest, 1). The heads' catch-up (when
        the last forward ran head 1 alone) is charged against a lookup draft, which usually wins the
        next steps too, so every switch to the joint pays it; against no draft it is not: a row that
        keeps feeding joint drafts runs every head in every forward and pays it once."""
        ev = self.joint_ev
        accept = [ev.first_rate(b, 1.0)] + [ev.cont_rate(b, 1.0)] * (self.H - 2)
        cost = self.cost_joint_behind_h if self.heads_behind and against_lookup else self.cost_joint_h
        return size_draft(accept, self.max_new - self.n_gen_h[b] - 1, cost)[1]

    def _cap_to_batch(self, prop: Proposal, lookup_accept, use, active):
        """A batch feeds as many columns as its longest draft, and every row pays for them: cap all
        drafts at the width w that maximises the batch's expected kept tokens per unit of the cost of
        feeding w columns (each row sized itself as if the batch fed its own width). Reads only the
        acceptance estimates the drafts were sized with (made before any token was drawn); no host sync."""
        B, W, dev = self.B, self.W, self.dev
        acc = torch.zeros(B, W - 1, dtype=torch.float64, device=dev)  # the fed draft's, token j = 1..W-1
        if prop.accept is not None:
            acc[:, :prop.accept.shape[1]] = prop.accept
        if use is not None:
            D = lookup_accept.shape[1]
            acc[:, :D] = torch.where(use[:, None], lookup_accept, acc[:, :D])
        acc = torch.where(self.ar_w[None, 1:] < prop.n[:, None], acc, 0.0)  # beyond a row's draft: 0
        total = (expected_kept(acc) * active[:, None]).sum(0)  # (W,): every row fed min(its n, w) tokens
        cost = self.cost if self.step_heads > 1 else self.cost_lookup
        prop.n = torch.minimum(prop.n, (total / cost[:W]).argmax() + 1)

    def _catch_up_heads(self):
        """Heads 2..H on the positions that head-1-only forwards skipped, from the saved stem
        outputs; then their logits at each row's last position are current."""
        behind = self.cache.lengths - self.heads_len  # (B,)
        Tc = int(behind.max())
        if Tc > 0:
            j = torch.arange(Tc, device=self.dev)
            pos = torch.where(j[None] < behind[:, None], self.heads_len[:, None] + j[None], -1)  # (B, Tc)
            d = self.stem_buf.shape[-1]
            h_stem = self.stem_buf.gather(1, pos.clamp(min=0)[:, :, None].expand(-1, -1, d))
            hidden = self.model.extra_heads(h_stem, pos, self.cache)  # (B, Tc, H-1, d)
            last = hidden[torch.arange(self.B, device=self.dev), (behind - 1).clamp(min=0)]  # (B, H-1, d)
            fresh = self.model.head_logits(last)
            self.last_logits[:, 1:] = torch.where((behind > 0)[:, None, None], fresh, self.last_logits[:, 1:])
        self.heads_len = self.cache.lengths.clone()

    def _joint_draft(self, prop: Proposal, first, remaining) -> torch.Tensor:
        """The heads' joint n-gram after ``first``, sized; fills ``prop``, returns its value (B,)."""
        B, W, dev = self.B, self.W, self.dev
        cfg = self.dynamo
        if self.draft.size_by == "cost":
            cfg = dataclasses.replace(cfg, k=min(self.draft.joint_k, cfg.k), eps_b=0.0, adaptive_threshold=False)
        pol = self._policy(cfg, first_tokens=first)
        jn = pol.n.clamp(max=remaining)  # (B,) 1..H
        H, k = pol.topk_ids.shape[1], pol.topk_ids.shape[2]
        if self.cost is not None:
            q = pol.draft_probs[:, 1:].double()  # (B, H-1, k) q_j over the top-k
            q_drawn = (q * (pol.topk_ids[:, 1:] == pol.tokens[:, 1:, None].clamp(min=0))).sum(-1)  # (B, H-1)
            prop.guess_joint = torch.where(jn > 1, pol.tokens[:, 1], -1)
            prop.guess_joint_q = q_drawn[:, 0]
            # acceptance of draft token j, known before it is drawn: greedy, the draft's own
            # probability of its (deterministic) token; sampling, sum_x q_j(x)^2, the chance that a
            # draw from q_j agrees with another.
            acc = (q * q).sum(-1) if self.sp.do_sample else q_drawn
            # token 1's is the row's observed first rate, later ones the observed continuation rate,
            # each with the heads' own estimate as its prior
            acc = self.joint_ev.rates(acc)
            d_len, value = size_drafts(acc, jn - 1, self.cost)
            prop.accept = acc
            if self.sp.do_sample:  # the choice against lookup must not read the drawn tokens
                value = size_drafts(acc[:, :1].expand_as(acc), jn - 1, self.cost)[1]
            jn = 1 + d_len
        else:
            value = (jn - 1).double()
        prop.n = jn
        prop.tokens[:, 1:H] = pol.tokens[:, 1:]
        if self.sp.do_sample:
            prop.q_ids = torch.zeros(B, W, k, dtype=torch.long, device=dev)
            prop.q_probs = torch.zeros(B, W, k, dtype=torch.float32, device=dev)
            prop.q_ids[:, :H], prop.q_probs[:, :H] = pol.topk_ids, pol.draft_probs
        return value

    def _merge_drafts(self, prop: Proposal, joint_value: torch.Tensor, need) -> torch.Tensor:
        """Hybrid: continue each row's joint draft with the lookup index's continuation of it, sized
        with the joint's acceptance estimates for its own tokens and lookup's for the continuation,
        where that is worth more than the joint draft alone (``DraftConfig.merge``). Returns the
        joint's value for the choice against the lookup draft: greedy, the merged draft's; sampling,
        unchanged, since that choice must not read drawn tokens (continuing a draft after its drawn
        tokens is only a longer draft: each token keeps its own conditional, a point mass here)."""
        B, W, H = self.B, self.W, self.H
        n_h, acc = prop.n.tolist(), prop.accept.tolist()
        drafts, values = prop.tokens[:, 1:H].tolist(), joint_value.tolist()
        ev = self.lookup_ev
        prop.joint_len = [-1] * B
        merged = {}
        for b in range(B):
            d = n_h[b] - 1
            if not need[b] or d < 1:
                continue
            cont = self.index.continuation(b, drafts[b][:d], min(W - 1 - d, self.max_new - self.n_gen_h[b] - 1 - d))
            if not cont:
                continue
            a = acc[b][:d] + [ev.first_rate(b)] + [ev.cont_rate(b)] * (len(cont) - 1)
            length, value = size_draft(a, d + len(cont), self.cost_h)
            if length > d and value > size_draft(a[:d], d, self.cost_h)[1]:
                merged[b] = (cont[:length - d], a)
                prop.joint_len[b] = d
                if not self.sp.do_sample:
                    values[b] = value
        if not merged:
            return joint_value
        tokens, accept = prop.tokens.tolist(), [r + [0.0] * (W - 1 - len(r)) for r in acc]
        n = list(n_h)
        for b, (cont, a) in merged.items():
            d = n_h[b] - 1
            tokens[b][1 + d:1 + d + len(cont)] = cont
            accept[b][:len(a)] = a
            n[b] = 1 + d + len(cont)
        dev = self.dev
        new = torch.tensor(tokens, dtype=torch.long, device=dev)
        if self.sp.do_sample:  # the continuation is a point mass at each of its tokens
            cols = torch.arange(W, device=dev)[None]
            at = (cols > prop.n[:, None] - 1) & (cols < torch.tensor(n, device=dev)[:, None])  # (B, W)
            point_ids = torch.zeros_like(prop.q_ids)
            point_ids[..., 0] = new.clamp(min=0)
            point_probs = torch.zeros_like(prop.q_probs)
            point_probs[..., 0] = 1.0
            prop.q_ids = torch.where(at[..., None], point_ids, prop.q_ids)
            prop.q_probs = torch.where(at[..., None], point_probs, prop.q_probs)
        prop.tokens = new
        prop.n = torch.tensor(n, dtype=torch.long, device=dev)
        prop.accept = torch.tensor(accept, dtype=torch.float64, device=dev)
        return torch.tensor(values, dtype=torch.float64, device=dev)

    def _lookup_draft(self, first, active_h) -> LookupDraft:
        """The prompt-lookup draft after ``first`` (B,), drafted and sized on the host, where the
        index lives (finished rows draft nothing)."""
        self.index.extend([[t] if a else [] for t, a in zip(first.tolist(), active_h)])
        drafts = self.index.drafts([self.max_new - g - 1 if a else 0 for g, a in zip(self.n_gen_h, active_h)])
        if self.cost is None:  # used whole
            return LookupDraft(drafts, [len(d) for d in drafts], [float(len(d)) for d in drafts], None)
        length, value, accept = [], [], []
        for b, d in enumerate(drafts):
            acc = [self.lookup_ev.first_rate(b)] + [self.lookup_ev.cont_rate(b)] * (len(d) - 1) if d else []
            n, v = size_draft(acc, len(d), self.cost_lookup_h)
            length.append(n)
            value.append(v)
            accept.append(acc)
        return LookupDraft(drafts, length, value, accept)

    def _use_lookup(self, prop: Proposal, lookup: LookupDraft, joint_value) -> torch.Tensor:
        """Feed the lookup draft (its sized length) in the rows where it is worth more than the
        joint's (``joint_value`` (B,), or None where no row evaluated the joint); returns those rows."""
        B, W, dev, D = self.B, self.W, self.dev, self.lookup.max_draft
        draft = torch.tensor([d + [-1] * (D - len(d)) for d in lookup.drafts], dtype=torch.long, device=dev).view(B, D)
        ld = torch.tensor(lookup.length, dtype=torch.long, device=dev)
        use = ld > 0
        if joint_value is not None:
            use &= torch.tensor(lookup.value, dtype=torch.float64, device=dev) > joint_value
        if self.cost is not None:
            prop.guess_lookup = draft[:, 0]  # -1 where the row has no draft
        prop.from_lookup = use
        prop.n = torch.where(use, 1 + ld, prop.n)
        prop.tokens[:, 1:1 + D] = torch.where(use[:, None], draft, prop.tokens[:, 1:1 + D])
        if self.sp.do_sample:  # a lookup draft is a point mass
            if prop.q_ids is None:
                prop.q_ids = torch.zeros(B, W, 1, dtype=torch.long, device=dev)
                prop.q_probs = torch.zeros(B, W, 1, dtype=torch.float32, device=dev)
            point_ids = torch.zeros_like(prop.q_ids[:, 1:1 + D])
            point_ids[..., 0] = draft.clamp(min=0)
            point_probs = torch.zeros_like(prop.q_probs[:, 1:1 + D])
            point_probs[..., 0] = 1.0
            prop.q_ids[:, 1:1 + D] = torch.where(use[:, None, None], point_ids, prop.q_ids[:, 1:1 + D])
            prop.q_probs[:, 1:1 + D] = torch.where(use[:, None, None], point_probs, prop.q_probs[:, 1:1 + D])
        return use

    # ------------------------------------------------------------ feed

    def feed(self, prop: Proposal, T: int) -> torch.Tensor:
        """One forward over the proposal's first T columns -> hidden (B, T, step_heads, d)."""
        fed = self.ar_w[None, :T] < prop.n[:, None]  # (B, T)
        ids = torch.where(fed, prop.tokens[:, :T], 0)
        pos = torch.where(fed, self.cache.lengths[:, None] + self.ar_w[None, :T], -1)
        if not self.lazy:
            return self.forward(ids, pos, heads=self.step_heads, output_hidden=True)
        hidden, h_stem = self.forward(ids, pos, heads=self.step_heads, output_hidden=True, output_stem=True)
        if self.stem_buf is None:
            self.stem_buf = h_stem.new_zeros(self.B, self.cache.max_len + 1, h_stem.shape[-1])
        slot = torch.where(fed, pos, self.cache.max_len)  # padding -> the spare slot
        self.stem_buf.scatter_(1, slot[:, :, None].expand(-1, -1, h_stem.shape[-1]), h_stem)
        return hidden

    # ------------------------------------------------------------ verify

    def verify(self, prop: Proposal, target: torch.Tensor):
        """Tokens kept per row (B,) (>= 1 for active rows) from head 1's target at every fed
        position (:meth:`_head1_target`: (B, T) greedy, (B, T, V) sampling). Draft j (j >= 1) is
        checked against head 1 at fed index j-1. Greedy: exact match; sampling: accept with
        probability min(1, p(d) / q(d)), and on the first rejection q_j becomes the residual of the
        next step's first token."""
        B, T = target.shape[:2]
        n, dev = prop.n, self.dev
        self.residual = None
        if T == 1:  # nothing drafted in any row
            return n
        d = prop.tokens[:, 1:T].clamp(min=0)  # (B, T-1)
        checked = torch.arange(1, T, device=dev)[None] < n[:, None]
        if not self.sp.do_sample:
            ok = target[:, :T - 1] == d
        else:
            p_d = target[:, :T - 1].gather(2, d[:, :, None])[:, :, 0].double()
            q_d = ((prop.q_ids[:, 1:T] == d[:, :, None]) * prop.q_probs[:, 1:T]).sum(-1).double()
            ok = self.sp.uniform((B, T - 1), dev) * q_d < p_d
        run = (ok & checked).long().cumprod(1)  # accepted prefix
        n_acc = run.sum(1)
        keep = torch.where(n >= 1, 1 + n_acc, 0)
        if self.sp.do_sample:
            rejected = (n_acc + 1 < n)  # a draft token was checked and refused
            r = n_acc.clamp(max=T - 2) + 1  # index of the refused draft token
            q = torch.zeros(B, self.V, device=dev).scatter_(1, prop.q_ids[torch.arange(B, device=dev), r],
                                                       prop.q_probs[torch.arange(B, device=dev), r])
            self.residual = torch.where(rejected[:, None], q, 0.0)
        return keep

    def _judge_first_guesses(self, prop: Proposal, target0: torch.Tensor, active):
        """Each drafter's first draft token against head 1's target at the first fed position
        (probs (B, V) or argmax (B,)): the probability it would be accepted (greedy: 0 or 1;
        sampling: min(1, p / q)), -1 where the drafter proposed none; into ``prop.judged``."""
        if prop.guess_joint is None and prop.guess_lookup is None:
            return
        prop.judged = []
        for guess, q in ((prop.guess_joint, prop.guess_joint_q), (prop.guess_lookup, None)):
            if guess is None:
                continue
            if self.sp.do_sample:
                accept = target0.gather(1, guess.clamp(min=0)[:, None])[:, 0].double()
                if q is not None:
                    accept = (accept / q.clamp(min=1e-30)).clamp(max=1.0)
            else:
                accept = (guess == target0).double()
            prop.judged.append(torch.where(active & (guess >= 0), accept, -1.0))

    # ------------------------------------------------------------ commit

    def commit(self, prop: Proposal, keep: torch.Tensor, T: int):
        """Write the kept tokens out (on the device); returns keep, cut after the first EOS."""
        tokens = prop.tokens[:, :T]
        if self.eos.numel():  # stop at the first EOS among the kept tokens
            is_eos = torch.isin(tokens, self.eos) & (self.ar_w[None, :T] < keep[:, None])
            has_eos = is_eos.any(-1)
            keep = torch.where(has_eos, is_eos.long().argmax(-1) + 1, keep)
            self.done |= has_eos
        kept = self.ar_w[None, :T] < keep[:, None]  # (B, T)
        spare = self.out.shape[1] - 1
        col = torch.where(kept, self.n_gen[:, None] + self.ar_w[None, :T], spare)
        self.out.scatter_(1, col, torch.where(kept, tokens, self.out[:, spare:]))
        if self.seen is not None:
            self.seen.scatter_(1, torch.where(kept, tokens.clamp(min=0), self.V), True)
        self.cache.lengths = self.cache.lengths + keep
        self.n_gen = self.n_gen + keep
        self.done |= self.n_gen >= self.max_new
        return keep

    def _end_step(self, prop: Proposal, keep, T: int, active, active_h, new_last):
        """The step's one host transfer: per row done, NaN, kept and fed counts, the drafters'
        judged guesses (and, with a lookup index, the fed tokens); then the host-side bookkeeping:
        statistics, the drafters' evidence, the index. Returns (all done, any NaN)."""
        bad = torch.isnan(new_last[:, :self.step_heads]).flatten(1).any(1) & active
        cols = [self.done, bad, keep, prop.n] + (prop.judged or [])
        rows = torch.stack([c.double() for c in cols], dim=1).tolist()
        fed = prop.tokens[:, 1:T].tolist() if self.index is not None else None
        from_lookup = prop.from_lookup.tolist() if prop.from_lookup is not None and prop.judged is not None else None
        drafting = self.strategy in ("speculative", "lookup")
        self.kept_h = [0] * self.B
        extend = [[] for _ in range(self.B)]
        for b, row in enumerate(rows):
            self.done_h[b] = row[0] > 0
            if not active_h[b]:
                continue
            kept, n = int(row[2]), int(row[3])
            self.kept_h[b] = kept
            self.n_gen_h[b] += kept
            self.steps_h[b] += 1
            self.hist_h[b][max(kept - 1, 0)] += 1
            if not drafting:
                continue
            drafted, accepted = max(n - 1, 0), max(kept - 1, 0)
            self.drafted_h[b] += drafted
            self.accepted_h[b] += accepted
            if prop.judged is not None:  # the evidence: only sizing by cost reads it
                judged = row[4:]
                if prop.guess_joint is not None and judged[0] >= 0:
                    self.joint_ev.add_first(b, judged[0])
                if prop.guess_lookup is not None and judged[-1] >= 0:
                    self.lookup_ev.add_first(b, judged[-1])
                lk = from_lookup is not None and from_lookup[b]
                d = -1 if lk or prop.joint_len is None else prop.joint_len[b]
                if d >= 0:  # a merged draft: the joint's tokens, then (if they all passed) lookup's
                    self.joint_ev.add_fed(b, d, min(accepted, d))
                    if accepted >= d:
                        self.lookup_ev.add_fed(b, drafted - d, accepted - d)
                elif drafted > 0:
                    (self.lookup_ev if lk else self.joint_ev).add_fed(b, drafted, accepted)
            if fed is not None:
                extend[b] = fed[b][:accepted]
        if fed is not None:
            self.index.extend(extend)
        return all(self.done_h), any(row[1] > 0 for row in rows)

    # ------------------------------------------------------------ one step

    def step(self, streamer):
        active = ~self.done
        active_h = [not d for d in self.done_h]
        prop = self.propose(active, active_h)
        T = self.W if self.static else max(int(prop.n.max()), 1)
        hidden = self.feed(prop, T)  # (B, T, heads, d)
        self.heads_behind = self.step_heads < self.heads
        rows = torch.arange(self.B, device=self.dev)
        if self.strategy == "dynamo":  # every head at each row's last fed position
            keep = prop.n
            last = hidden[rows, (prop.n - 1).clamp(min=0)]  # (B, heads, d)
            new_last = self.model.head_logits(last)
        else:
            head1 = self.model.head_logits(hidden[:, :, 0])  # (B, T, V)
            target = self._head1_target(head1)
            if self.cost is not None:
                self._judge_first_guesses(prop, target[:, 0], active)
            keep = self.verify(prop, target)
            at = (keep - 1).clamp(min=0)
            self.next_target = target[rows, at]
            new_last = head1[rows, at][:, None]
            if self.step_heads > 1:  # heads 2..H only at the last kept position
                new_last = torch.cat([new_last, self.model.head_logits(hidden[rows, at, 1:])], dim=1)
            elif self.heads > 1:  # heads on demand: stale until the next catch-up
                new_last = torch.cat([new_last, self.last_logits[:, 1:]], dim=1)
        keep = self.commit(prop, keep, T)
        if self.step_heads > 1:
            self.heads_len = self.cache.lengths.clone()
        self.last_logits = torch.where(active[:, None, None], new_last, self.last_logits)
        all_done, has_nan = self._end_step(prop, keep, T, active, active_h, new_last)
        if streamer is not None:
            put = [prop.tokens.new_empty(0)] * self.B0
            for b, kept in enumerate(self.kept_h):
                put[self.rows_h[b]] = prop.tokens[b, :kept].clone()
            streamer.put(put)
        if self.may_retire and not all_done and not has_nan and any(self.done_h):
            self._retire()
        return all_done, has_nan

    # ------------------------------------------------------------ finished rows leave

    def _row_result(self, b: int) -> tuple:
        """What physical row b produced: (tokens (max_new,), new tokens, steps, histogram, drafted, accepted)."""
        return (self.out[b, :self.max_new], self.n_gen_h[b], self.steps_h[b], self.hist_h[b], self.drafted_h[b],
                self.accepted_h[b])

    def _retire(self):
        """Drop the finished rows from every per-row tensor and list (their results kept aside), so that
        the rows still decoding run smaller forwards. On a CPU a decode step's cost grows with its rows
        (README, "Batches"), and the rows of a multi-token strategy finish at different steps."""
        keep = [b for b, d in enumerate(self.done_h) if not d]
        for b, d in enumerate(self.done_h):
            if d:
                self.retired[self.rows_h[b]] = self._row_result(b)
        idx = torch.tensor(keep, dtype=torch.long, device=self.dev)
        pick = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
        for name in ("out", "n_gen", "done", "seen", "residual", "next_target", "last_logits", "heads_len", "stem_buf"):
            setattr(self, name, pick(getattr(self, name)))
        self.cache.select_rows(idx)
        for name in ("rows_h", "done_h", "n_gen_h", "steps_h", "drafted_h", "accepted_h", "hist_h", "kept_h",
                     "since_joint_h"):
            setattr(self, name, [getattr(self, name)[b] for b in keep])
        self.joint_ev.select(keep)
        self.lookup_ev.select(keep)
        if self.index is not None:
            self.index.select(keep)
        self.B = len(keep)

    def results(self) -> list:
        """Per row of the caller's batch, in its order: :meth:`_row_result`."""
        out = dict(self.retired)
        for b, o in enumerate(self.rows_h):
            out[o] = self._row_result(b)
        return [out[o] for o in range(self.B0)]


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, strategy: str, max_new_tokens: int,
             sampling: SamplingParams, eos_token_id: Optional[list], pad_token_id: int, streamer,
             dynamo: DynamoConfig, stats, draft: Optional[DraftConfig] = None, lookup: Optional[LookupConfig] = None,
             backend: str = "torch", graph_capture=None) -> GenerationOutput:
    """The loop. Inputs are already validated by ``sample``; shapes as there. ``graph_capture``
    (:func:`graphs.cuda_capture`, or :func:`graphs.eager_capture` in tests) replays the steps' forwards
    from captured graphs."""
    t0 = time.perf_counter()
    dec = _Decoder(model, input_ids, attention_mask.bool(), strategy=strategy, max_new_tokens=max_new_tokens,
                   sampling=sampling, eos_token_id=eos_token_id, pad_token_id=pad_token_id, dynamo=dynamo,
                   draft=draft or DraftConfig(), lookup=lookup or LookupConfig(), stats=stats, backend=backend,
                   graph_capture=graph_capture)
    if bool(torch.isnan(dec.last_logits).any()):
        raise ValueError("the model returned NaN logits (step 0); expected finite values")
    step = 0
    while True:
        step += 1
        all_done, has_nan = dec.step(streamer)
        if has_nan:
            raise ValueError(f"the model returned NaN logits (step {step}); expected finite values")
        if all_done:
            break
    if streamer is not None:
        streamer.end()
    out, n_gen, steps, hist, drafted, accepted = zip(*dec.results())
    sequences = torch.cat([input_ids, torch.stack(out)], dim=1)
    host = lambda rows: torch.tensor(rows, dtype=torch.long, device=dec.dev)  # noqa: E731
    steps, n_gen = host(steps), host(n_gen)
    return GenerationOutput(sequences=sequences, steps=steps, new_tokens=n_gen,
                            tokens_per_step=n_gen.float() / steps.clamp(min=1).float(), histogram=host(hist),
                            drafted=host(drafted), accepted=host(accepted), wall_time=time.perf_counter() - t0)
