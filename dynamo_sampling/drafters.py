"""What ``speculative`` and ``lookup`` feed: the drafters, how a row's draft is chosen, and the
evidence they learn from (used by ``decoding``; the sizing rule and step costs are ``drafting.py``).

Per row and step, after the first token (drawn exactly from head 1): the heads' joint draft (the
DynaMo policy with that first token fixed), the lookup draft (the row's own prompt lookup, or with
statistics given the corpus's, ``lookup.CorpusDrafts``, whichever is worth more), or the joint's
continued by lookup's (merged), each sized by expected kept tokens per unit of step cost, the most
valuable fed; with lookup trees, the losing lookup draft beside it as a second branch where that pays.
:class:`Drafters` holds these steps as methods of the decoding loop's state (``decoding._Decoder``
derives from it): it reads the loop's batch shape and devices (``B``, ``W``, ``H``, ``dev``), its
configs (``sp``, ``dynamo``, ``draft``, ``lookup``, ``stats``), the step costs (``cost*``), per-row
host counts (``n_gen_h``, ``since_joint_h``), the drafters' sources and evidence (``index``,
``corpus``, ``joint_ev``, ``lookup_ev``, ``corpus_ev``) and the heads' state (``last_logits``,
``lazy``, ``heads_behind``, ``step_heads``), and calls ``_policy`` and ``_catch_up_heads``.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .drafting import expected_kept, size_draft, size_drafts

# a row whose joint drafts have not been worth evaluating (drafts sized by cost) still evaluates them
# every this many steps, so that its acceptance evidence can recover when the heads get better
PROBE_EVERY = 32
# a row whose last m evaluations of the joint fed no joint draft waits BACKOFF_BASE**m - 1 steps (at
# most PROBE_EVERY) before the next, even where the bound on the joint's value says it could win (base 4
# against 2: heads that always fail 0.87-0.90x -> 0.90-0.92x ar, real heads level; README)
MISS_BACKOFF = True
BACKOFF_BASE = 4
# in a batch, joint drafts are dropped when the heads they need cost the other rows more than they bring
BATCH_GATE = True


@dataclass
class Proposal:
    """What one step feeds.

    tokens : (B, W) int64; ``[t1, d2..dn]`` left-aligned, anything after ``n``.
    n : (B,) int64; tokens fed per row (0 for finished rows).
    q_ids, q_probs : (B, W, kq) or None; sampling only: the draft distribution of token j >= 1
        (``q_probs`` over ``q_ids``), what rejection sampling needs.
    from_lookup : (B,) bool or None; rows whose draft came from the lookup index.
    guess_joint, guess_lookup, guess_corpus : (B,) int64 or None; each drafter's first draft token (-1: none),
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
    guess_corpus: Optional[torch.Tensor] = None
    accept: Optional[torch.Tensor] = None  # (B, H-1 or W-1) float64: the joint draft's acceptance estimates
    judged: Optional[list] = None
    joint_len: Optional[list] = None  # host, per row: joint tokens of a merged draft, -1 where not merged
    corpus_rows: Optional[list] = None  # host, per row: the fed draft is the corpus's (lookup.CorpusDrafts)
    # lookup trees (LookupConfig.tree, one row): the other lookup drafter's draft continuing the fed one's
    # token ``fork`` (0: the first token), verified in the same forward (models.cache.TreeFeed)
    branch_rows: Optional[list] = None  # host, per row: (fork, tokens, the branch is the corpus's) or None
    other_rows: Optional[list] = None  # host, per row: the other lookup drafter's whole draft (or None)
    n_h: Optional[list] = None  # host copy of n, where a step has branches
    taken: Optional[list] = None  # host, per row, after verify: the branch was kept
    branch_kept: Optional[list] = None  # host, per row, after verify: its tokens kept
    last_at: Optional[torch.Tensor] = None  # (B,) int64, after verify: the fed column of the last kept token


@dataclass
class LookupDraft:
    """The lookup drafter's proposal, on the host (per row lists): the drafts, their sized lengths,
    values (expected kept tokens per unit of cost) and the acceptance estimates they were sized with;
    with corpus drafts, which rows' drafts are the corpus's and both drafters' first tokens."""

    drafts: list
    length: list
    value: list
    accept: Optional[list]  # None where drafts are used whole (no sizing)
    firsts: Optional[list] = None  # the row's own lookup draft's first token (-1: none), fed or not
    corpus: Optional[list] = None  # rows whose draft is the corpus's (with corpus drafts)
    corpus_firsts: Optional[list] = None  # the corpus draft's first token (-1: none), fed or not
    branches: Optional[list] = None  # per row: (fork, tokens, is the corpus's) of a second branch, or None
    others: Optional[list] = None  # per row: the losing drafter's draft (lookup trees), or None


def _point_masses(prop: Proposal, at: torch.Tensor):
    """Sampling: the draft distribution of token j becomes a point mass at ``prop.tokens[b, j]``
    wherever ``at[b, j]`` (B, W) (a lookup draft, or lookup's continuation of the joint's)."""
    ids = torch.zeros_like(prop.q_ids)
    ids[..., 0] = prop.tokens.clamp(min=0)
    probs = torch.zeros_like(prop.q_probs)
    probs[..., 0] = 1.0
    prop.q_ids = torch.where(at[..., None], ids, prop.q_ids)
    prop.q_probs = torch.where(at[..., None], probs, prop.q_probs)


class Drafters:
    """The drafting steps of the decoding loop (see the module docstring)."""

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

    def propose_draft(self, first: torch.Tensor, active, active_h) -> Proposal:
        """``speculative`` and ``lookup``: ``first`` (B,) (head 1's exact token), then each row's draft:
        the joint's (evaluated only where it could win), lookup's, or the joint's continued by
        lookup's, whichever is worth most; capped for the batch."""
        B, W, dev = self.B, self.W, self.dev
        lookup = self._lookup_draft(first, active_h) if self.index is not None else None
        joint_value, joint, need = None, False, None
        if self.strategy == "speculative" and self.H > 1:  # one head: nothing to draft with
            need = active_h
            if self.cost is not None:
                # skip the policy in rows where no joint draft could beat the lookup draft (or, without
                # one, feeding no draft), unless the row has not evaluated it for PROBE_EVERY steps
                alt = lookup.value if lookup is not None else [1.0 / self.cost_lookup_h[0]] * B
                lookup_len = lookup.length if lookup is not None else [0] * B
                need = [a and self._wants_joint(b, alt[b], lookup_len[b] > 0) for b, a in enumerate(active_h)]
            joint = any(need)
            self.joint_eval_h = need
            self.since_joint_h = [0 if joint else n + 1 for n in self.since_joint_h]
        if not joint and lookup is None and not self.static:  # nothing to draft: an ar step's proposal
            self.step_heads = 1 if self.lazy else self.heads
            return Proposal(first[:, None], active.long())
        tokens = torch.full((B, W), -1, dtype=torch.long, device=dev)
        tokens[:, 0] = first
        prop = Proposal(tokens, torch.ones(B, dtype=torch.long, device=dev))
        if joint:
            if self.lazy:
                self._catch_up_heads()
            joint_value = self._joint_draft(prop, first, self.max_new - self.n_gen)
            if lookup is not None and self.cost is not None and self.draft.merge:
                joint_value = self._merge_drafts(prop, joint_value, need)
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

    def _wants_joint(self, b: int, alt: float, against_lookup: bool) -> bool:
        """Whether row b evaluates the joint this step (drafts sized by cost): a probe after PROBE_EVERY
        steps without; else where its bound beats ``alt`` (the lookup draft's value, or feeding no
        draft's) and, after m evaluations in a row that fed no joint draft, BACKOFF_BASE**m - 1 steps have passed."""
        since = self.since_joint_h[b]
        if since >= PROBE_EVERY:
            return True
        m = self.joint_miss_h[b] if MISS_BACKOFF else 0
        return since >= min(BACKOFF_BASE ** m - 1, PROBE_EVERY) and not alt >= self._joint_bound(b, against_lookup)

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
        kept = expected_kept(acc) * active[:, None]  # (B, W): each row fed min(its n, w) tokens
        total = kept.sum(0)
        cost = self.cost if self.step_heads > 1 else self.cost_lookup
        if self.lazy and self.step_heads > 1:  # at width 1 no row feeds a draft: head 1 runs alone (step())
            cost = torch.cat([self.cost_lookup[:1], cost[1:]])
        value = total / cost[:W]  # the batch's expected kept tokens per unit of cost, by width
        if self.lazy and self.step_heads > 1 and BATCH_GATE:
            # every row pays for the heads that the rows feeding joint drafts need: unless the batch keeps
            # more tokens per unit of cost with them, those rows feed their first token alone and the step
            # runs head 1 alone (the rows' own choices ignored that the others pay). bool(): a host read,
            # free here (this method runs on a CPU only, see propose_draft)
            joint_rows = (active if use is None else active & ~use) & (prop.n > 1)
            value_h1 = torch.where(joint_rows[:, None], active[:, None].double(), kept).sum(0) / self.cost_lookup[:W]
            if not bool(value.max() > value_h1.max()):
                prop.n = torch.where(joint_rows, 1, prop.n)
                self.step_heads, value = 1, value_h1
        prop.n = torch.minimum(prop.n, value.argmax() + 1)

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
            d_len, value = size_drafts(acc, jn - 1, self.cost_draft)
            prop.accept = acc
            if self.sp.do_sample:  # the choice against lookup must not read the drawn tokens
                value = size_drafts(acc[:, :1].expand_as(acc), jn - 1, self.cost_draft)[1]
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
        B, W = self.B, self.W
        n_h, acc, tokens = prop.n.tolist(), prop.accept.tolist(), prop.tokens.tolist()
        values = joint_value.tolist()
        ev = self.lookup_ev
        prop.joint_len = [-1] * B
        merged = {}
        for b in range(B):
            d = n_h[b] - 1
            if not need[b] or d < 1:
                continue
            cont = self.index.continuation(b, tokens[b][1:1 + d], min(W - 1 - d, self.max_new - self.n_gen_h[b] - 1 - d))
            if not cont:
                continue
            a = acc[b][:d] + [ev.first_rate(b)] + [ev.cont_rate(b)] * (len(cont) - 1)
            length, value = size_draft(a, d + len(cont), self.cost_draft_h)
            if length > d and value > size_draft(a[:d], d, self.cost_draft_h)[1]:
                merged[b] = (cont[:length - d], a)
                prop.joint_len[b] = d
                if not self.sp.do_sample:
                    values[b] = value
        if not merged:
            return joint_value
        accept = [r + [0.0] * (W - 1 - len(r)) for r in acc]
        n = list(n_h)
        for b, (cont, a) in merged.items():
            d = n_h[b] - 1
            tokens[b][1 + d:1 + d + len(cont)] = cont
            accept[b][:len(a)] = a
            n[b] = 1 + d + len(cont)
        dev = self.dev
        prop.tokens = torch.tensor(tokens, dtype=torch.long, device=dev)
        n_new = torch.tensor(n, dtype=torch.long, device=dev)
        if self.sp.do_sample:  # the continuation is a point mass at each of its tokens
            _point_masses(prop, (self.ar_w[None] >= prop.n[:, None]) & (self.ar_w[None] < n_new[:, None]))
        prop.n = n_new
        prop.accept = torch.tensor(accept, dtype=torch.float64, device=dev)
        return torch.tensor(values, dtype=torch.float64, device=dev)

    def _lookup_draft(self, first, active_h) -> LookupDraft:
        """The prompt-lookup draft after ``first`` (B,), drafted and sized on the host, where the
        index lives (finished rows draft nothing); with corpus drafts, each row's own lookup draft or
        the corpus's (:class:`~dynamo_sampling.lookup.CorpusDrafts`), whichever is worth more."""
        self.index.extend([[t] if a else [] for t, a in zip(first.tolist(), active_h)])
        caps = [self.max_new - g - 1 if a else 0 for g, a in zip(self.n_gen_h, active_h)]
        drafts = self.index.drafts(caps)
        if self.cost is None:  # used whole
            return LookupDraft(drafts, [len(d) for d in drafts], [float(len(d)) for d in drafts], None)
        out = LookupDraft(drafts, [], [], [], firsts=[d[0] if d else -1 for d in drafts])
        corpus, most = self.corpus, min(self.lookup.corpus_draft, self.lookup.max_draft)
        if corpus is not None:
            out.corpus, out.corpus_firsts = [False] * self.B, [-1] * self.B
        if self.tree:
            out.branches, out.others = [None] * self.B, [None] * self.B
        for b, d in enumerate(drafts):
            n, v, acc = self._sized(self.lookup_ev, b, len(d))
            if corpus is not None and caps[b] > 0:
                c = corpus.draft(self.index.tail(b, corpus.context), min(caps[b], most))
                if c:
                    out.corpus_firsts[b] = c[0]
                    cn, cv, cacc = self._sized(self.corpus_ev, b, len(c))
                    other = (d, False)
                    if cv > v:
                        drafts[b], n, v, acc, out.corpus[b] = c, cn, cv, cacc, True
                    else:
                        other = (c, True)
                    if self.tree and n > 0 and other[0]:
                        out.others[b] = other[0]
                        out.branches[b], v = self._branch(b, drafts[b][:n], acc, *other, caps[b], v)
            out.length.append(n)
            out.value.append(v)
            out.accept.append(acc)
        return out

    def _branch(self, b: int, trunk: list, acc: list, other: list, is_corpus: bool, cap: int, value: float):
        """Lookup trees: ``other`` (the losing drafter's draft) as a second branch beside ``trunk`` (the
        fed draft, sized, with acceptance estimates ``acc``), continuing trunk's token ``fork``, where
        the two first differ. Its tokens are kept only where head 1 refuses the trunk's token there
        and then takes the branch's: the branch's first token is judged by ``branch_ev`` (it is right
        where the trunk's is wrong), the rest by its drafter's continuation rate. Sized by expected
        kept tokens per unit of cost, ``1 + len(trunk) + m`` tokens fed. Returns ((fork, tokens,
        is_corpus) or None, the draft's value)."""
        n, fork = len(trunk), 0
        while fork < min(n, len(other)) and trunk[fork] == other[fork]:
            fork += 1
        # the branch's slots follow the trunk's: within the cache (cap + tree_slack more slots after the first)
        most = min(min(len(other), self.lookup.max_draft, cap) - fork, cap + self.tree_slack - n)
        if fork >= n or most < 1:
            return None, value
        cost, acc = self.cost_lookup_h, [min(max(a, 0.0), 1.0) for a in acc[:n]]
        kept, surv = 1.0, 1.0  # the trunk's expected kept tokens; the chance of reaching its token j
        for j, a in enumerate(acc):
            if j == fork:
                reach = surv
            surv *= a
            kept += surv
        surv = reach * (1.0 - acc[fork])  # at the fork, the trunk's token refused
        cont = (self.corpus_ev if is_corpus else self.lookup_ev).cont_rate(b)
        best, extra = 0, 0.0
        for m in range(1, most + 1):
            surv *= self.branch_ev.first_rate(b) if m == 1 else cont
            extra += surv
            if (kept + extra) / cost[n + m] > value:
                best, value = m, (kept + extra) / cost[n + m]
        return ((fork, other[fork:fork + best], is_corpus) if best else None), value

    def _sized(self, ev, b: int, d: int) -> tuple:
        """A d-token draft of a drafter with evidence ``ev`` (its first and continuation rates) in
        row b, sized on the host: (length, value, acceptance estimates)."""
        acc = [ev.first_rate(b)] + [ev.cont_rate(b)] * (d - 1) if d else []
        n, v = size_draft(acc, d, self.cost_lookup_h)
        return n, v, acc

    def _use_lookup(self, prop: Proposal, lookup: LookupDraft, joint_value) -> torch.Tensor:
        """Feed the lookup draft (its sized length) in the rows where it is worth more than the
        joint's (``joint_value`` (B,), or None where no row evaluated the joint); returns those rows."""
        B, W, dev, D = self.B, self.W, self.dev, self.lookup.max_draft
        # one host-to-device copy: per row the draft (-1 padded), its sized length and, where drafts are sized by
        # cost, each drafter's first token (-1 where it has no draft)
        guesses = [] if self.cost is None else [lookup.firsts]
        if guesses and lookup.corpus is not None:
            guesses.append(lookup.corpus_firsts)
        packed = torch.tensor([d + [-1] * (D - len(d)) + [n] + [g[b] for g in guesses]
                               for b, (d, n) in enumerate(zip(lookup.drafts, lookup.length))],
                              dtype=torch.long, device=dev).view(B, D + 1 + len(guesses))
        if joint_value is None and lookup.others and any(lookup.others):  # a joint's draft is a chain
            prop.other_rows = lookup.others
            if any(lookup.branches):
                prop.branch_rows = lookup.branches
        draft, ld = packed[:, :D], packed[:, D]
        use = ld > 0
        if joint_value is not None:
            use &= torch.tensor(lookup.value, dtype=torch.float64, device=dev) > joint_value
        if guesses:
            prop.guess_lookup = packed[:, D + 1]
            if len(guesses) > 1:
                prop.guess_corpus, prop.corpus_rows = packed[:, D + 2], lookup.corpus
        prop.from_lookup = use
        prop.n = torch.where(use, 1 + ld, prop.n)
        prop.tokens[:, 1:1 + D] = torch.where(use[:, None], draft, prop.tokens[:, 1:1 + D])
        if self.sp.do_sample:  # a lookup draft is a point mass
            if prop.q_ids is None:
                prop.q_ids = torch.zeros(B, W, 1, dtype=torch.long, device=dev)
                prop.q_probs = torch.zeros(B, W, 1, dtype=torch.float32, device=dev)
            _point_masses(prop, use[:, None] & (self.ar_w[None] >= 1) & (self.ar_w[None] <= D))
        return use

    def _judge_first_guesses(self, prop: Proposal, target0: torch.Tensor, active):
        """Each drafter's first draft token against head 1's target at the first fed position
        (probs (B, V) or argmax (B,)): the probability it would be accepted (greedy: 0 or 1;
        sampling: min(1, p / q)), -1 where the drafter proposed none; into ``prop.judged``."""
        if prop.guess_joint is None and prop.guess_lookup is None:
            return
        prop.judged = []
        for guess, q in ((prop.guess_joint, prop.guess_joint_q), (prop.guess_lookup, None), (prop.guess_corpus, None)):
            if guess is None:
                continue
            if self.sp.do_sample:
                accept = target0.gather(1, guess.clamp(min=0)[:, None])[:, 0].double()
                if q is not None:
                    accept = (accept / q.clamp(min=1e-30)).clamp(max=1.0)
            else:
                accept = (guess == target0).double()
            prop.judged.append(torch.where(active & (guess >= 0), accept, -1.0))

    def _add_evidence(self, prop: Proposal, b: int, judged: list, drafted: int, accepted: int, lk: bool):
        """Row b's step into the drafters' evidence: the judged first guesses (``prop.judged``'s row,
        in _judge_first_guesses' order), and the fed draft's drafted / accepted tokens (``lk``: it was
        lookup's, the row's own or the corpus's)."""
        guessed = [ev for guess, ev in ((prop.guess_joint, self.joint_ev), (prop.guess_lookup, self.lookup_ev),
                                        (prop.guess_corpus, self.corpus_ev)) if guess is not None]
        for ev, j in zip(guessed, judged):
            if j >= 0:
                ev.add_first(b, j)
        d = -1 if lk or prop.joint_len is None else prop.joint_len[b]
        if d >= 0:  # a merged draft: the joint's tokens, then (if they all passed) lookup's
            self.joint_ev.add_fed(b, d, min(accepted, d))
            if accepted >= d:
                self.lookup_ev.add_fed(b, drafted - d, accepted - d)
        elif drafted > 0:
            corpus = lk and prop.corpus_rows is not None and prop.corpus_rows[b]
            (self.corpus_ev if corpus else self.lookup_ev if lk else self.joint_ev).add_fed(b, drafted, accepted)
