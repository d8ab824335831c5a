"""Tree feeds: several drafts verified in one forward (models.cache.TreeFeed) give each branch the
logits a plain chain feed of that branch gives, and moving the kept branch's slots leaves the cache as
feeding that branch alone would."""

import pytest
import torch

from dynamo_sampling import TinyMTP, TinyMTPConfig
from dynamo_sampling.models.cache import TreeFeed

V = 97


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyMTP(TinyMTPConfig(vocab_size=V, n_layer=3, n_heads=3, d_model=48, n_attn_heads=4, d_ff=96,
                                 max_seq_len=64)).eval()


def tree_inputs(root, trunk, branch, fork, L):
    """One row: [root, trunk..., branch...]; the branch continues trunk node ``fork`` (0: the root)."""
    n = 1 + len(trunk)
    ids = [root] + trunk + branch
    pos = [L + j for j in range(n)] + [L + fork + 1 + k for k in range(len(branch))]
    slots = list(range(L, L + len(ids)))
    T = len(ids)
    attend = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        for u in range(T):
            if t < n:
                attend[t, u] = u <= t
            else:
                attend[t, u] = u <= fork or n <= u <= t
    return (torch.tensor([ids]), torch.tensor([pos]), torch.tensor([slots]), attend[None])


def prefilled(model, prompt, heads):
    cache = model.new_cache(1, 48)
    model(prompt, torch.arange(prompt.shape[1])[None], cache, heads=heads)
    return cache


@pytest.mark.parametrize("fork", [0, 1, 2])
@pytest.mark.parametrize("heads", [1, 3])
def test_tree_feed_equals_each_branch_fed_alone(model, fork, heads):
    torch.manual_seed(fork)
    prompt = torch.randint(0, V, (1, 11))
    L = prompt.shape[1]
    root, trunk, branch = 5, [7, 8, 9], [11, 12]
    ids, pos, slots, attend = tree_inputs(root, trunk, branch, fork, L)
    with torch.inference_mode():
        cache = prefilled(model, prompt, heads)
        tree = model(ids, pos, cache, heads=heads, tree=TreeFeed(slots, attend))  # (1, T, heads, V)
        chain_a = model(ids[:, :4], pos[:, :4], prefilled(model, prompt, heads), heads=heads)
        chain_ids = torch.tensor([[root] + trunk[:fork] + branch])
        chain_b = model(chain_ids, L + torch.arange(chain_ids.shape[1])[None], prefilled(model, prompt, heads),
                        heads=heads)
    torch.testing.assert_close(tree[:, :4], chain_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tree[:, 4:], chain_b[:, 1 + fork:], rtol=1e-4, atol=1e-4)


def test_moving_the_kept_branch_equals_feeding_it(model):
    """After a tree feed keeps the branch (fork 1, both branch tokens), its slots moved to their
    positions: the next token's logits equal those after feeding the kept tokens as a chain."""
    torch.manual_seed(3)
    prompt = torch.randint(0, V, (1, 9))
    L, fork = prompt.shape[1], 1
    root, trunk, branch = 4, [6, 2, 3], [13, 14]
    ids, pos, slots, attend = tree_inputs(root, trunk, branch, fork, L)
    kept = [root] + trunk[:fork] + branch
    nxt = L + len(kept)
    with torch.inference_mode():
        cache = prefilled(model, prompt, 3)
        model(ids, pos, cache, heads=3, tree=TreeFeed(slots, attend))
        src = torch.tensor([[L + 4, L + 5]])
        cache.move(src, L + fork + 1 + torch.arange(2)[None])
        after_tree = model(torch.tensor([[1]]), torch.tensor([[nxt]]), cache, heads=3)
        ref = prefilled(model, prompt, 3)
        model(torch.tensor([kept]), L + torch.arange(len(kept))[None], ref, heads=3)
        after_chain = model(torch.tensor([[1]]), torch.tensor([[nxt]]), ref, heads=3)
    torch.testing.assert_close(after_tree, after_chain, rtol=1e-4, atol=1e-4)


def test_tree_feed_needs_the_fast_path_and_a_cache(model):
    ids, pos, slots, attend = tree_inputs(1, [2], [3], 0, 0)
    with pytest.raises(ValueError, match="fast path"):
        model(ids, pos, model.new_cache(1, 8), tree=TreeFeed(slots, attend), reference=True)
    with torch.inference_mode(), pytest.raises(ValueError, match="needs a cache"):
        model(ids, pos, None, tree=TreeFeed(slots, attend))


def test_tree_feed_of_two_rows_equals_each_branch_fed_alone(model):
    """Two rows at different lengths (the general mask path, slots scattered per row): each row's
    branches get the logits their chains get."""
    torch.manual_seed(5)
    prompts = [torch.randint(0, V, (1, 7)), torch.randint(0, V, (1, 12))]
    branches = [(3, [4, 5, 6], [7], 1), (8, [9, 10], [11, 12], 0)]
    with torch.inference_mode():
        cache = model.new_cache(2, 48)
        ids = torch.zeros(2, 12, dtype=torch.long)
        pos = torch.full((2, 12), -1)
        ids[0, 5:], ids[1] = prompts[0][0], prompts[1][0]
        pos[0, 5:], pos[1] = torch.arange(7), torch.arange(12)
        model(ids, pos, cache, heads=3)
        rows = [tree_inputs(*br[:3], br[3], p.shape[1]) for br, p in zip(branches, prompts)]
        T = max(r[0].shape[1] for r in rows)
        ids, pos, slots = (torch.full((2, T), fill) for fill in (0, -1, 0))
        attend = torch.zeros(2, T, T, dtype=torch.bool)
        for b, (i, p, s, a) in enumerate(rows):
            t = i.shape[1]
            ids[b, :t], pos[b, :t], slots[b, :t], attend[b, :t, :t] = i[0], p[0], s[0], a[0]
        tree = model(ids, pos, cache, heads=3, tree=TreeFeed(slots, attend))
        for b, ((root, trunk, branch, fork), prompt) in enumerate(zip(branches, prompts)):
            L, n = prompt.shape[1], 1 + len(trunk)
            chain_a = model(torch.tensor([[root] + trunk]), L + torch.arange(n)[None], prefilled(model, prompt, 3))
            chain_ids = torch.tensor([[root] + trunk[:fork] + branch])
            chain_b = model(chain_ids, L + torch.arange(chain_ids.shape[1])[None], prefilled(model, prompt, 3))
            torch.testing.assert_close(tree[b:b + 1, :n], chain_a, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(tree[b:b + 1, n:n + len(branch)], chain_b[:, 1 + fork:], rtol=1e-4, atol=1e-4)
