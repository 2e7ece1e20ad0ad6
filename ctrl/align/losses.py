"""Stage-1 alignment losses: InfoNCE with in-batch negatives over cosine (coarse) and max-sim (fine) similarity.

Every loss takes this process's b rows as queries and scores them against the N rows of the global batch
(`gather_rows`: all ranks' rows under data parallelism, the local rows otherwise). Row i's positive is the
other modality of the same row, at position `offset + i` of the global batch. Each rank's loss is the mean
over its rows, so with equal local batches the mean over ranks is the loss of the whole global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor


def gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """All ranks' rows, and where this rank's rows start in them (CLIP-style negatives from every device).

    Args:
        x: b x ... this rank's rows; b must be equal on every rank.

    Returns:
        (W*b x ... rows in rank order, index of this rank's first row); (x, 0) without a process group.
        Gradients reach x through its own slice: the gather's backward sums every rank's gradient of it.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x, 0
    rows = torch.cat(dist_fn.all_gather(x))
    if rows.requires_grad:
        # The gather's backward on gloo (an all_to_all) silently misreads strided gradients, e.g. of a
        # transpose of the gathered rows (torch 2.13; like pytorch/pytorch#192920), so hand it contiguous ones.
        rows.register_hook(torch.Tensor.contiguous)
    return rows, dist.get_rank() * x.shape[0]


def info_nce(sim: Tensor, temperature: float, offset: int = 0) -> Tensor:
    """Mean InfoNCE of b queries against N keys; query i's positive is key `offset + i`.

    Args:
        sim: b x N similarities.
        temperature: tau; logits are sim / tau.
        offset: index of the first query's positive among the keys.
    """
    positives = torch.arange(sim.shape[0], device=sim.device) + offset
    return F.cross_entropy(sim / temperature, positives)


def cosine_sim(queries: Tensor, keys: Tensor) -> Tensor:
    """b x d, N x d -> b x N cosine similarities."""
    return F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T


def max_sim(queries: Tensor, keys: Tensor) -> Tensor:
    """Late-interaction similarity: sum over the query's sub-spaces m of the max over the key's sub-spaces m'
    of <q_i,m , k_j,m'>. Not symmetric: the query side is the one summed over.

    Args:
        queries: b x M x d.
        keys: N x M' x d.

    Returns:
        b x N.
    """
    b, n, m_keys = queries.shape[0], keys.shape[0], keys.shape[1]
    if m_keys == 2:
        # Two key sub-spaces (the default): max(x0, x1) = x1 + relu(x0 - x1), and x0 - x1 = <q, k0 - k1>, so
        # M + 1 matmuls of b x N and a relu, with no b x 2N temporary and no max's indices. The same function
        # to the last bits; stage 1 on ML-100K 15.0 -> 11.6 s, validation AUC unchanged on both data sets
        # (benchmarks/stage1_speed/decision.md).
        key0, key1 = keys.unbind(1)
        gap = (key0 - key1).T
        total = queries.sum(1) @ key1.T
        for query in queries.unbind(1):
            total = total + F.relu(query @ gap)
        return total
    flat_keys = keys.transpose(0, 1).flatten(0, 1).T  # d x (M'*N); key j's sub-space m' is column m'*N + j
    # One matmul per query sub-space against every key sub-space at once: the largest temporary is
    # b x M'*N, never the b x N x M x M' x d of a broadcast. Its max over M' (the middle dimension) has the
    # same values either way: amax's forward is ~15x max's (validation, retrieval), max's backward ~2x amax's.
    total = torch.zeros(b, n, dtype=queries.dtype, device=queries.device)
    for query in queries.unbind(1):
        scores = (query @ flat_keys).view(b, m_keys, n)
        total = total + (scores.max(dim=1).values if scores.requires_grad else scores.amax(dim=1))
    return total


def coarse_loss(h_tab: Tensor, h_text: Tensor, temperature: float = 0.7) -> Tensor:
    """(L_text->tab + L_tab->text) / 2 with cosine similarity, negatives gathered from all ranks.

    Args:
        h_tab: b x d projected collaborative vectors of this rank's rows.
        h_text: b x d projected text vectors of the same rows.
        temperature: tau.
    """
    all_tab, offset = gather_rows(h_tab)
    all_text, _ = gather_rows(h_text)
    text_to_tab = info_nce(cosine_sim(h_text, all_tab), temperature, offset)
    tab_to_text = info_nce(cosine_sim(h_tab, all_text), temperature, offset)
    return (text_to_tab + tab_to_text) / 2


def fine_loss(sub_tab: Tensor, sub_text: Tensor, temperature: float = 0.7) -> Tensor:
    """(L_text->tab + L_tab->text) / 2 with max-sim; each direction's query side is its source modality
    (text->tab sums over the text's sub-spaces, as FILIP does per direction).

    Args:
        sub_tab: b x M x d collaborative sub-space vectors of this rank's rows.
        sub_text: b x M x d text sub-space vectors of the same rows.
        temperature: tau.
    """
    all_tab, offset = gather_rows(sub_tab)
    all_text, _ = gather_rows(sub_text)
    text_to_tab = info_nce(max_sim(sub_text, all_tab), temperature, offset)
    tab_to_text = info_nce(max_sim(sub_tab, all_text), temperature, offset)
    return (text_to_tab + tab_to_text) / 2
