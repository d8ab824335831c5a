"""Tiny models that follow the MTP protocol with known outputs (used by the decoding tests)."""
import torch

from dynamo_sampling.models.cache import KVCache


class TableMTP(torch.nn.Module):
    """Head h's logits depend only on the current token: ``logits[b, t, h] = table[h, input_ids[b, t]]``.

    With head 1 a bigram table, the distribution of any continuation under ``ar`` is known exactly.
    table : (H, V, V) float; -inf entries are zero-probability successors.
    """

    def __init__(self, table: torch.Tensor, max_seq_len: int = 256):
        super().__init__()
        self.table = table.float()
        self.n_heads, self.vocab_size = table.shape[0], table.shape[-1]
        self.max_seq_len = max_seq_len

    def new_cache(self, batch_size, max_len=None, dtype=None, device=None):
        return KVCache(0, batch_size, 1, max_len or self.max_seq_len, 1, torch.float32, self.table.device)

    #: a token's logits depend on the token alone: a tree feed (several draft branches at once) needs nothing
    supports_tree = True

    def forward(self, input_ids, positions, cache=None, heads=None, logits_index=None, output_hidden=False,
                output_stem=False, tree=None):
        heads = heads or self.n_heads
        stem = input_ids[..., None].float()  # the "stem output" is the token itself
        if logits_index is not None:
            input_ids = input_ids.gather(1, logits_index)
        out = self.table[:heads, input_ids].permute(1, 2, 0, 3)  # (B, T, heads, V): the "hidden" is the logits
        return (out, stem) if output_stem else out

    def extra_heads(self, h_stem, positions, cache=None, rows=None):
        """Heads 2..H from saved stem outputs (heads on demand in the decoder), at ``rows`` (B, T') only if given."""
        if rows is not None:
            h_stem = h_stem.gather(1, rows[..., None].expand(-1, -1, h_stem.shape[-1]))
        return self.table[1:, h_stem[..., 0].long()].permute(1, 2, 0, 3)

    def head_logits(self, hidden):
        return hidden.float()


def ragged_prompts(n_rows: int, V: int, seed: int, min_len: int = 2, max_len: int = 12):
    """(input_ids, attention_mask), both (n_rows, S) int64, left-padded, random lengths and tokens."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n_rows,), generator=g)
    S = int(lens.max())
    ids = torch.zeros(n_rows, S, dtype=torch.long)
    mask = torch.zeros(n_rows, S, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        ids[i, S - n:] = torch.randint(0, V, (n,), generator=g)
        mask[i, S - n:] = 1
    return ids, mask


def left_padded(seed: int, V: int, lens=(5, 9, 2, 7), low: int = 0):
    """(input_ids, attention_mask), both (len(lens), max(lens)) int64: rows of the given lengths,
    left-padded, tokens uniform in [low, V)."""
    g = torch.Generator().manual_seed(seed)
    S = max(lens)
    ids = torch.zeros(len(lens), S, dtype=torch.long)
    mask = torch.zeros(len(lens), S, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, S - n:] = torch.randint(low, V, (n,), generator=g)
        mask[i, S - n:] = 1
    return ids, mask


def oracle_model(V: int = 16, H: int = 3, seed: int = 0) -> TableMTP:
    """Knows one fixed cyclic sequence: head h puts a +20 logit on the token h steps ahead."""
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(seed))
    succ = torch.empty(V, dtype=torch.long)
    succ[perm] = perm.roll(-1)
    table = torch.zeros(H, V, V)
    nxt = torch.arange(V)
    for h in range(H):
        nxt = succ[nxt]
        table[h, torch.arange(V), nxt] = 20.0
    model = TableMTP(table)
    model.successor = succ
    return model


def random_table_model(V: int = 6, H: int = 2, seed: int = 0, zero_prob: bool = True) -> TableMTP:
    """Random bigram-style heads; with ``zero_prob`` each token has one impossible successor."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(H, V, V, generator=g) * 1.5
    if zero_prob:
        table[:, torch.arange(V), (torch.arange(V) + 1) % V] = float("-inf")
    return TableMTP(table)


class NaNModel(TableMTP):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        return (out[0] * float("nan"), out[1]) if isinstance(out, tuple) else out * float("nan")


class SyncRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops that read a tensor's value on the host (what makes a GPU step wait)."""
    SYNCS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten.item")

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.SYNCS):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def count_branches(monkeypatch) -> dict:
    """{'fed': second branches fed, 'taken': kept} (lookup trees), counted as the loop runs."""
    from dynamo_sampling import decoding
    count, verify = {"fed": 0, "taken": 0}, decoding._Decoder._verify_branch

    def counted(self, prop, *args):
        out = verify(self, prop, *args)
        if prop.branch_rows is not None:
            count["fed"] += sum(b is not None for b in prop.branch_rows)
            count["taken"] += sum(prop.taken)
        return out
    monkeypatch.setattr(decoding._Decoder, "_verify_branch", counted)
    return count
