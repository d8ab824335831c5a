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
  (a point-mass draft distribution: the row's own, or with statistics given the corpus's n-grams'
  whichever is worth more, ``LookupConfig.corpus_draft``) and ``heads=1``.
* lookup trees (``LookupConfig.tree``): the losing one of those two drafts may be fed too, as a
  second branch after the position where the two first differ (``models.cache.TreeFeed``); it is
  verified where head 1 refused the fed draft's token right there, and a kept branch's keys and
  values move to their positions' slots (``KVCache.move``).

Only head 1 is unembedded at every fed position; heads 2..H only at each row's last kept
position (dynamo: the last fed one), once verification has said which it is. What ``speculative``
and ``lookup`` draft, and how a row's draft is chosen, lives in ``drafters.py``; how drafts are
sized (step cost, acceptance evidence) in ``drafting.py``.

Tokens, logits and the cache stay on the model's device; what the host decides with (the lookup
index, the drafters' evidence, per-row counts) is plain Python, updated from one transfer at the
end of each step (:meth:`_Decoder._end_step`), which is also the step's stop and NaN check (a lookup
index also reads each step's first token when it is drawn).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .drafters import Drafters, Proposal
from .drafting import STEP_COST, DraftConfig, Evidence, step_cost_tables
from .graphs import GraphedForward
from .lookup import CorpusDrafts, LookupConfig, NgramIndex
from .models.cache import TreeFeed
from .policy import DynamoConfig, dynamo_step
from .samplers import SamplingParams

STRATEGIES = ("ar", "dynamo", "speculative", "lookup")
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


class _Decoder(Drafters):
    """The loop's state and its four stages (see the module docstring); what ``speculative`` and
    ``lookup`` propose is :class:`~dynamo_sampling.drafters.Drafters`'."""

    def __init__(self, model, input_ids, mask, *, strategy, max_new_tokens, sampling: SamplingParams, eos_token_id,
                 pad_token_id, dynamo: DynamoConfig, draft: DraftConfig, lookup: LookupConfig, stats, backend,
                 graph_capture=None):
        self.model, self.strategy, self.sp = model, strategy, sampling
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
        # the lookup drafter's second source, the corpus (sized by cost only: it needs the evidence)
        self.corpus = (CorpusDrafts(stats) if uses_lookup and hasattr(stats, "table") and lookup.corpus_draft > 0
                       and draft.size_by == "cost" else None)
        # heads on demand pay where the joint is evaluated on some steps only (drafts sized by cost, which
        # skips it where it cannot beat lookup's draft or no draft); DynaMo's thresholds evaluate it every
        # step, and there a separate catch-up call per step costs more than running all heads in every forward
        self.lazy = (strategy == "speculative" and self.H > 1 and hasattr(model, "extra_heads")
                     and draft.size_by == "cost")
        self.W = {"ar": 1, "dynamo": self.H, "lookup": 1 + lookup.max_draft,
                  "speculative": max(self.H, 1 + lookup.max_draft) if uses_lookup else self.H}[strategy]
        # lookup trees (LookupConfig.tree): with corpus drafts, on a CPU and a model that takes tree feeds, a
        # forward may feed the two lookup drafters' drafts as two branches, up to Wf tokens
        by_default = lookup.tree is None and B == 1 and strategy == "lookup"
        self.tree = ((lookup.tree or by_default) and self.corpus is not None and input_ids.device.type == "cpu"
                     and graph_capture is None and getattr(model, "supports_tree", False))
        self.Wf = 1 + 2 * lookup.max_draft if self.tree else self.W
        self.max_new = max_new_tokens
        self.static = self.dev.type != "cpu"  # fixed feed width: no host sync for T on accelerators
        prompt_len = mask.sum(1)  # (B,)
        need = int(prompt_len.max()) + max_new_tokens  # kept tokens never pass it, chains of drafts neither
        # a tree's second branch writes slots past the fed draft's: up to max_draft more where the context allows
        self.cache = model.new_cache(B, max_len=min(need + lookup.max_draft, model.max_seq_len) if self.tree else need)
        self.tree_slack = self.cache.max_len - need  # Drafters._branch: room for a branch beyond a row's cap
        positions = torch.where(mask, mask.long().cumsum(1) - 1, -1)  # (B, S)
        hidden = model(input_ids, positions, self.cache, heads=self.heads,
                       logits_index=torch.full((B, 1), S - 1, dtype=torch.long, device=self.dev), output_hidden=True)
        self.last_logits = model.head_logits(hidden[:, 0])  # (B, heads, V)
        # the steps' forwards: eager, or replayed from one captured graph per shape (graphs.GraphedForward)
        self.graphed = graph_capture is not None
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
        self.joint_eval_h = [False] * B  # rows that evaluated the joint this step
        self.joint_miss_h = [0] * B  # the row's evaluations in a row whose joint draft was not fed
        self.joint_ev = Evidence(B, prior_first=0.0, prior_cont=0.0)  # first: prior is the heads' own q
        self.lookup_ev = Evidence(B, prior_first=0.5, prior_cont=0.8)  # a copied span tends to go on
        self.corpus_ev = Evidence(B, prior_first=0.4, prior_cont=0.5)  # the corpus's most frequent follower
        # a second branch's first token, judged where the fed draft's token at the fork was refused
        self.branch_ev = Evidence(B, prior_first=0.3, prior_cont=0.0)
        self.eos = torch.tensor(eos_token_id or [], dtype=torch.long, device=dev)
        self.seen = None
        if strategy in ("dynamo", "speculative") and dynamo.repetition_penalty != 1.0:
            self.seen = torch.zeros(B, self.V + 1, dtype=torch.bool, device=dev)  # column V: spare
            self.seen[torch.arange(B, device=dev)[:, None].expand(B, S)[mask], input_ids[mask]] = True
        self.residual = None  # (B, V) draft mass to remove from the next first token (sampled rejections)
        self.next_target = None  # head 1's target at each row's last position, when the last step computed it
        self.ar_w = torch.arange(W, device=dev)
        self.ar_f = torch.arange(self.Wf, device=dev)
        self.cost = self.cost_lookup = None
        self.joint_overhead = (0.0, 0.0)
        if strategy in ("speculative", "lookup") and draft.size_by == "cost":
            table = step_cost_tables(model, B, self.Wf, draft, dev, sampling.do_sample,
                                     context=int(prompt_len.max()) + max_new_tokens // 2)
            self.cost = table[self.heads]  # a forward as this strategy runs it
            self.cost_lookup = table[1] if self.lazy or strategy == "lookup" else self.cost
            self.cost_lookup_h = self.cost_lookup.tolist()  # the host-side sizing's copy
            # what a draft of d = 0, 1, ... tokens costs the row that feeds it: with heads on demand and one
            # row, no draft runs head 1 alone (the heads catch up when the joint is next fed); in a batch
            # every head runs whenever any row feeds a joint draft, and a row's d = 0 is priced as that
            self.cost_draft = (torch.cat([self.cost_lookup[:1], self.cost[1:]]) if self.lazy and B == 1
                               else self.cost)
            self.cost_draft_h = self.cost_draft.tolist()
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
        if self.strategy == "ar":
            return Proposal(self._first_token()[:, None], active.long())
        if self.strategy == "dynamo":
            pol = self._policy(self.dynamo)
            return Proposal(pol.tokens, torch.where(active, pol.n, 0))
        return self.propose_draft(self._first_token(), active, active_h)  # drafters.py

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
            # every skipped position writes the heads' keys and values; only each row's last is read
            last = self.model.extra_heads(h_stem, pos, self.cache, rows=(behind - 1).clamp(min=0)[:, None])[:, 0]
            fresh = self.model.head_logits(last)  # (B, H-1, V)
            self.last_logits[:, 1:] = torch.where((behind > 0)[:, None, None], fresh, self.last_logits[:, 1:])
        self.heads_len = self.cache.lengths.clone()

    # ------------------------------------------------------------ feed

    def feed(self, prop: Proposal, T: int, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One forward over the proposal's first T columns -> hidden (B, T, step_heads, d), or
        (B, T', step_heads, d) at ``rows`` (B, T') only (the heads' layers run there alone)."""
        kw, slot = {}, None
        if prop.branch_rows is not None:
            ids, pos, slot, kw["tree"] = self._tree_feed(prop, T)
            fed = pos >= 0
        else:
            fed = self.ar_w[None, :T] < prop.n[:, None]  # (B, T)
            ids = torch.where(fed, prop.tokens[:, :T], 0)
            pos = torch.where(fed, self.cache.lengths[:, None] + self.ar_w[None, :T], -1)
        if rows is not None:
            return self.forward(ids, pos, heads=self.step_heads, output_hidden=True, logits_index=rows)
        if not self.lazy:
            return self.forward(ids, pos, heads=self.step_heads, output_hidden=True, **kw)
        hidden, h_stem = self.forward(ids, pos, heads=self.step_heads, output_hidden=True, output_stem=True, **kw)
        if self.stem_buf is None:
            self.stem_buf = h_stem.new_zeros(self.B, self.cache.max_len + 1, h_stem.shape[-1])
        slot = torch.where(fed, pos if slot is None else slot, self.cache.max_len)  # padding -> the spare slot
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
        T = min(T, self.W)  # a second branch's columns follow the fed draft's (_verify_branch)
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
            # scatter_add_: a point mass (drafters._point_masses) over a joint's k columns repeats its id with
            # probability 0 in the others, and scatter_ would keep any one of the repeats' values
            q = torch.zeros(B, self.V, device=dev).scatter_add_(1, prop.q_ids[torch.arange(B, device=dev), r],
                                                           prop.q_probs[torch.arange(B, device=dev), r])
            self.residual = torch.where(rejected[:, None], q, 0.0)
        if prop.other_rows is not None:
            keep = self._verify_branch(prop, target, n_acc, keep)
        return keep

    # Lookup trees: what they add to a step is decided on the host, per row in Python, with a few torch ops
    # for the whole batch (on a CPU a tensor op costs ~5-10 us: per step, vectorised versions of the methods
    # below measured ~0.45 ms against a ~4.5 ms one-row step, more than the branches brought).

    def _settle_branches(self, prop: Proposal) -> int:
        """Drop the branches whose fork the batch's width cap cut off (the fed draft must keep its
        token after the fork); returns the widest row's tokens, its fed draft's and its branch's."""
        prop.n_h = prop.n.tolist()
        widest = 0
        for b, br in enumerate(prop.branch_rows):
            if br is not None and br[0] + 1 >= prop.n_h[b]:
                prop.branch_rows[b] = br = None
            widest = max(widest, prop.n_h[b] + (len(br[1]) if br is not None else 0))
        if not any(prop.branch_rows):
            prop.branch_rows = None
        return widest

    def _tree_feed(self, prop: Proposal, T: int):
        """A forward over two branches per row: the fed draft ``[t1, d2..dn]`` in columns 0..n-1, then
        the second branch, which continues the fed draft's token ``fork``. Each token writes the slot
        of its column past the row's length and reads its ancestors only. Returns (ids, positions,
        slots, TreeFeed), (B, T) each."""
        tokens_h, L_h = prop.tokens.tolist(), self.cache.lengths.tolist()
        rows = []
        for b, n in enumerate(prop.n_h):
            fork, br, _ = prop.branch_rows[b] or (0, [], None)
            L, m = L_h[b], len(br)
            ids = tokens_h[b][:n] + br + [0] * (T - n - m)
            pos = [L + j for j in range(n)] + [L + fork + 1 + k for k in range(m)] + [-1] * (T - n - m)
            attend = [[u <= t for u in range(n)] + [False] * (T - n) for t in range(n)]
            attend += [[u <= fork for u in range(n)] + [n <= u <= t for u in range(n, T)] for t in range(n, n + m)]
            rows.append([ids, pos] + attend + [[False] * T] * (T - n - m))
        host = torch.tensor(rows, dtype=torch.long, device=self.dev)  # (B, 2 + T, T)
        slots = self.cache.lengths[:, None] + self.ar_f[None, :T]
        return host[:, 0], host[:, 1], slots, TreeFeed(slots, host[:, 2:].bool())

    def _verify_branch(self, prop: Proposal, target: torch.Tensor, n_acc: torch.Tensor, keep: torch.Tensor):
        """Second branches: a row's is reached where head 1 refused its fed draft's token after
        ``fork`` (exactly ``fork`` draft tokens kept); its first token is then checked against head 1
        at the fork, the rest at the branch's own columns. Greedy: exact match. Sampling: draws from
        head 1 at the fork, given that its fed token was refused, come from ``p`` without that token,
        so the branch's first token is kept with probability ``p(b) / (1 - p(a))`` and, refused, both
        leave the next step's first token (the residual); later tokens as any point-mass draft.
        Sets ``prop.taken``, ``branch_kept`` (host lists) and, where a branch was kept, ``last_at``;
        returns the tokens kept.

        The branch's first-token evidence (``branch_ev``) is judged wherever the fed draft was refused
        right where the other drafter's draft first differs from it, whether a branch was fed or not
        (head 1 at that position is computed either way): greedy 0 or 1, sampling ``p(b) / (1 - p(a))``."""
        B = len(prop.other_rows)
        prop.taken, prop.branch_kept = [False] * B, [0] * B
        n_h = prop.n.tolist() if prop.n_h is None else prop.n_h  # _settle_branches' copy, where it ran
        r_h, tokens_h = n_acc.tolist(), prop.tokens.tolist()
        checks = []  # (row, r, a, the branch's tokens, fed)
        for b, other in enumerate(prop.other_rows):
            r, n = r_h[b], n_h[b]  # refused at draft token r + 1
            if other is None or r + 1 >= n or len(other) <= r or other[:r] != tokens_h[b][1:1 + r]:
                continue
            a = tokens_h[b][1 + r]
            if other[r] == a:  # the other draft holds the refused token too
                continue
            fed = prop.branch_rows is not None and prop.branch_rows[b] is not None
            checks.append((b, r, a, prop.branch_rows[b][1] if fed else [other[r]], fed))
        if not checks:
            return keep
        if self.sp.do_sample:  # per row p(a), p(b1) at the fork, p(b_k) at branch column k - 1: one gather
            idx = [(b, col, tok) for b, r, a, br, _ in checks
                   for col, tok in [(r, a), (r, br[0])] + [(n_h[b] + k - 1, br[k]) for k in range(1, len(br))]]
            rows_i, cols_i, toks_i = zip(*idx)
            p_all = target[list(rows_i), list(cols_i), list(toks_i)].tolist()
            u_all = self.sp.uniform((sum(len(c[3]) for c in checks if c[4]),), self.dev).tolist()
        else:
            t_all = target.tolist()
        keep_h = keep.tolist()
        at_h = [max(k - 1, 0) for k in keep_h]
        both, refused, taken_rows = [], [], []
        i = j = 0
        for b, r, a, br, fed in checks:
            m = len(br)
            if self.sp.do_sample:
                p = p_all[i:i + 1 + m]
                i += 1 + m
                judged = min(p[1] / max(1.0 - p[0], 1e-30), 1.0)
                u = u_all[j:j + m] if fed else [1.0]
                j += m if fed else 0
                ok = [u[0] < judged] + [u[k] < p[k + 1] for k in range(1, m)]
            else:
                t = t_all[b]
                ok = [br[0] == t[r]] + [br[k] == t[n_h[b] + k - 1] for k in range(1, m)]
                judged = float(ok[0])
            self.branch_ev.add_first(b, judged)
            if not fed:
                continue
            kept = 0
            while kept < m and ok[kept]:
                kept += 1
            if kept == 0:
                both.append((b, br[0]))  # both refused at the fork: the residual holds a already
                continue
            prop.taken[b], prop.branch_kept[b] = True, kept
            keep_h[b], at_h[b] = 1 + r + kept, n_h[b] + kept - 1
            taken_rows.append(b)
            if kept < m:
                refused.append((b, br[kept]))
        if self.sp.do_sample:
            res = self.residual
            if taken_rows:
                res[taken_rows] = 0.0
            for pairs in (both, refused):
                if pairs:
                    at = torch.tensor(list(zip(*pairs)), dtype=torch.long, device=self.dev)  # (2, rows): row, token
                    res.index_put_((at[0], at[1]), res.new_ones(at.shape[1]), accumulate=True)
        if not taken_rows:
            return keep
        out = torch.tensor([keep_h, at_h], dtype=torch.long, device=self.dev)
        prop.last_at = out[1]
        return out[0]

    def _keep_branch(self, prop: Proposal):
        """Where a second branch was kept: its tokens follow the fed draft's first ``fork`` in
        ``prop.tokens`` (what commit writes out) and its keys and values (and, with heads on demand,
        stem outputs) move from their columns' slots to their positions' (``KVCache.move``)."""
        L_h, spare = self.cache.lengths.tolist(), self.cache.max_len
        K = max(prop.branch_kept)
        cells, src, dst = [], [[spare] * K for _ in prop.taken], [[spare] * K for _ in prop.taken]
        for b, taken in enumerate(prop.taken):
            if not taken:
                continue
            fork, br, _ = prop.branch_rows[b]
            for k in range(prop.branch_kept[b]):
                cells.append((b, 1 + fork + k, br[k]))
                src[b][k], dst[b][k] = L_h[b] + prop.n_h[b] + k, L_h[b] + fork + 1 + k
        rows_i, cols_i, toks_i = zip(*cells)
        prop.tokens[list(rows_i), list(cols_i)] = torch.tensor(toks_i, dtype=torch.long, device=self.dev)
        moves = torch.tensor([src, dst], dtype=torch.long, device=self.dev)
        self.cache.move(moves[0], moves[1])
        if self.stem_buf is not None:
            d = self.stem_buf.shape[-1]
            at = lambda i: i[:, :, None].expand(-1, -1, d)  # noqa: E731
            self.stem_buf.scatter_(1, at(moves[1]), self.stem_buf.gather(1, at(moves[0])))

    # ------------------------------------------------------------ commit

    def commit(self, prop: Proposal, keep: torch.Tensor, T: int):
        """Write the kept tokens out (on the device); returns keep, cut after the first EOS."""
        T = min(T, self.W)  # a kept branch is in prop.tokens by now (_keep_branch)
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
        lk = [] if prop.from_lookup is None else [prop.from_lookup]
        cols = [self.done, bad, keep, prop.n] + lk + (prop.judged or [])
        rows = torch.stack(cols, dim=1).tolist()  # promoted to the widest dtype in one op
        j = 4 + len(lk)  # the judged guesses' first column
        fed = prop.tokens[:, 1:T].tolist() if self.index is not None else None
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
            branch = prop.branch_rows is not None and prop.branch_rows[b] is not None
            self.drafted_h[b] += drafted + (len(prop.branch_rows[b][1]) if branch else 0)
            self.accepted_h[b] += accepted
            from_lookup = bool(lk) and row[4] > 0
            if self.joint_eval_h[b]:  # evaluated this step: was its draft the one fed?
                self.joint_miss_h[b] = 0 if drafted and not from_lookup else self.joint_miss_h[b] + 1
            if prop.judged is not None:  # the evidence: only sizing by cost reads it
                trunk_accepted = accepted
                if branch:
                    trunk_accepted = self._branch_evidence(prop, b, accepted)
                self._add_evidence(prop, b, row[j:], drafted, trunk_accepted, from_lookup)
            if fed is not None:
                extend[b] = fed[b][:accepted]
        if fed is not None:
            self.index.extend(extend)
        return all(self.done_h), any(row[1] > 0 for row in rows)

    def _branch_evidence(self, prop: Proposal, b: int, accepted: int) -> int:
        """A second branch's step into its drafter's evidence: its draft (the shared tokens up to the
        fork, then the branch) as fed (its first token's, ``branch_ev``, is _verify_branch's). Returns
        the fed draft's own accepted tokens."""
        fork, tokens, is_corpus = prop.branch_rows[b]
        taken, kept, m = prop.taken[b], prop.branch_kept[b], len(tokens)
        ev = self.corpus_ev if is_corpus else self.lookup_ev
        ev.add_fed(b, fork + m, fork + kept if taken else min(accepted, fork))
        return fork if taken else accepted

    # ------------------------------------------------------------ one step

    def step(self, streamer):
        active = ~self.done
        active_h = [not d for d in self.done_h]
        prop = self.propose(active, active_h)
        if prop.branch_rows is not None:  # lookup trees: the rows' fed drafts, then their branches
            T = self._settle_branches(prop)
        else:
            T = self.W if self.static else max(int(prop.n.max()), 1)
        if self.lazy and T == 1:  # no row feeds a draft (e.g. the batch's drafts capped away): head 1 alone
            self.step_heads = 1
        rows = torch.arange(self.B, device=self.dev)
        self.heads_behind = self.step_heads < self.heads
        if self.strategy == "dynamo":  # every head at each row's last fed position, and there only
            keep = prop.n
            at = (prop.n - 1).clamp(min=0)
            if self.graphed:  # a captured graph's inputs are ids and positions: all rows, then pick
                last = self.feed(prop, T)[rows, at]
            else:
                last = self.feed(prop, T, rows=at[:, None])[:, 0]  # (B, heads, d)
            new_last = self.model.head_logits(last)
        else:
            hidden = self.feed(prop, T)  # (B, T, heads, d)
            head1 = self.model.head_logits(hidden[:, :, 0])  # (B, T, V)
            target = self._head1_target(head1)
            if self.cost is not None:
                self._judge_first_guesses(prop, target[:, 0], active)
            keep = self.verify(prop, target)
            at = (keep - 1).clamp(min=0)
            if prop.last_at is not None:  # a second branch was kept (lookup trees, _verify_branch)
                at = prop.last_at
                self._keep_branch(prop)
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
                     "since_joint_h", "joint_eval_h", "joint_miss_h"):
            setattr(self, name, [getattr(self, name)[b] for b in keep])
        for ev in (self.joint_ev, self.lookup_ev, self.corpus_ev, self.branch_ev):
            ev.select(keep)
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
