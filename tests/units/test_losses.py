"""Alignment losses: values worked out by hand with plain math, directions, max-sim against loops, gradients."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ctrl.align.losses import coarse_loss, cosine_sim, fine_loss, gather_rows, info_nce, max_sim

TAU = 0.7


def nll(logits: list[float], positive: int) -> float:
    """-log softmax(logits)[positive], in plain python."""
    return -logits[positive] + math.log(sum(math.exp(x) for x in logits))


def test_info_nce_two_by_two_by_hand():
    sim = torch.tensor([[0.9, 0.1], [0.3, 0.4]])
    row0 = -math.log(math.exp(0.9 / TAU) / (math.exp(0.9 / TAU) + math.exp(0.1 / TAU)))
    row1 = -math.log(math.exp(0.4 / TAU) / (math.exp(0.3 / TAU) + math.exp(0.4 / TAU)))
    assert info_nce(sim, TAU).item() == pytest.approx((row0 + row1) / 2, abs=1e-6)


def test_info_nce_offset_picks_the_positive_among_more_keys():
    """Two local queries scored against four keys (a gathered global batch); their rows are keys 2 and 3."""
    sim = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    expected = (nll([x / TAU for x in (0.1, 0.2, 0.3, 0.4)], 2) + nll([x / TAU for x in (0.5, 0.6, 0.7, 0.8)], 3)) / 2
    assert info_nce(sim, TAU, offset=2).item() == pytest.approx(expected, abs=1e-6)


def test_coarse_loss_two_rows_by_hand():
    """tab rows (1, 0), (0, 1); text rows (2, 0), (1, 1): cosines text0.tab = (1, 0), text1.tab = (c, c),
    c = 1/sqrt 2. Lengths do not matter (cosine), so text0 is scaled by 2."""
    tab = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    c = 1 / math.sqrt(2)
    text_to_tab = (nll([1 / TAU, 0.0], 0) + nll([c / TAU, c / TAU], 1)) / 2
    tab_to_text = (nll([1 / TAU, c / TAU], 0) + nll([0.0, c / TAU], 1)) / 2
    assert coarse_loss(tab, text, TAU).item() == pytest.approx((text_to_tab + tab_to_text) / 2, abs=1e-6)
    assert coarse_loss(tab, text).item() == pytest.approx((text_to_tab + tab_to_text) / 2, abs=1e-6)  # tau 0.7
    # the two directions differ here, so averaging them is not a no-op
    assert text_to_tab != pytest.approx(tab_to_text, abs=1e-3)
    assert info_nce(cosine_sim(text, tab), TAU).item() == pytest.approx(text_to_tab, abs=1e-6)


def test_coarse_loss_is_symmetric_in_its_two_modalities():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    torch.testing.assert_close(coarse_loss(a, b, TAU), coarse_loss(b, a, TAU))


def max_sim_loops(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The definition, one (i, j, m, m') at a time."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=a.dtype)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            out[i, j] = sum(max(float(a[i, m] @ b[j, n]) for n in range(b.shape[1])) for m in range(a.shape[1]))
    return out


def test_max_sim_by_hand():
    """One query row with sub-spaces (1, 0), (0, 1); key rows with sub-spaces ((2, 1), (0, 3)) and
    ((-1, 0), (1, -1)). Row 0: max(2, 0) + max(1, 3) = 5; row 1: max(-1, 1) + max(0, -1) = 1."""
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    k = torch.tensor([[[2.0, 1.0], [0.0, 3.0]], [[-1.0, 0.0], [1.0, -1.0]]])
    torch.testing.assert_close(max_sim(q, k), torch.tensor([[5.0, 1.0]]))


def test_max_sim_matches_loops_and_is_not_symmetric():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 3, 4, generator=g), torch.randn(7, 2, 4, generator=g)  # b != N, M != M'
    torch.testing.assert_close(max_sim(a, b), max_sim_loops(a, b))
    c = torch.randn(5, 3, 4, generator=g)
    assert not torch.allclose(max_sim(a, c), max_sim(c, a).T)


def test_max_sim_without_gradient_is_the_same_as_with_it():
    """Validation (no autograd) takes another reduction than training; the values must not move."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(64, 4, 8, generator=g, requires_grad=True)
    b = torch.randn(96, 4, 8, generator=g, requires_grad=True)
    with torch.inference_mode():
        served = max_sim(a, b)
    assert torch.equal(served, max_sim(a, b).detach())
    torch.testing.assert_close(served, max_sim_loops(a.detach(), b.detach()))


def test_fine_loss_by_hand_uses_each_side_as_query_in_its_direction():
    tab = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [1.0, -1.0]]])
    text = torch.tensor([[[2.0, 1.0], [0.0, 3.0]], [[-1.0, 0.0], [1.0, -1.0]]])
    text_to_tab = max_sim_loops(text, tab).tolist()  # rows: text queries
    tab_to_text = max_sim_loops(tab, text).tolist()  # rows: tab queries
    expected = (sum(nll([x / TAU for x in text_to_tab[i]], i) for i in range(2)) / 2
                + sum(nll([x / TAU for x in tab_to_text[i]], i) for i in range(2)) / 2) / 2
    assert fine_loss(tab, text, TAU).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("key_subspaces", [2, 3])  # two: x1 + relu(x0 - x1); more: a max over them
def test_max_sim_gradient_matches_numerical(key_subspaces):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 3, 5, dtype=torch.double, generator=g, requires_grad=True)
    b = torch.randn(6, key_subspaces, 5, dtype=torch.double, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(max_sim, (a, b))


@pytest.mark.parametrize("loss", [coarse_loss, fine_loss])
def test_gradients_reach_both_sides(loss):
    g = torch.Generator().manual_seed(3)
    shape = (6, 16) if loss is coarse_loss else (6, 4, 8)
    a = torch.randn(shape, generator=g, requires_grad=True)
    b = torch.randn(shape, generator=g, requires_grad=True)
    loss(a, b, TAU).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def global_batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(4)
    shapes = [(8, 6), (8, 6), (8, 3, 4), (8, 3, 4)]  # tab, text, sub_tab, sub_text
    return tuple(torch.randn(shape, dtype=torch.double, generator=g) for shape in shapes)


def total_loss(tab, text, sub_tab, sub_text) -> torch.Tensor:
    return coarse_loss(tab, text, TAU) + fine_loss(sub_tab, sub_text, TAU)


def rank_loss_and_gradients(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: its half of the global batch, negatives gathered from the other half."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        local = [x[rank::2].clone().requires_grad_() for x in global_batch()]  # interleaved, as DistributedSampler
        loss = total_loss(*local)
        loss.backward()
        # A strided gradient into the gather (here of a transpose): gloo's backward needs it made contiguous.
        x = torch.ones(2, 3, requires_grad=True)
        weights = torch.arange(12.0).view(3, 4)
        (gather_rows(x)[0].T * weights).sum().backward()
        torch.save({"loss": loss.detach(), "grads": [x.grad for x in local], "strided": x.grad}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gathered_loss_over_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    """The mean over ranks of the losses is the global-batch loss, and each rank's inputs get the gradient of
    the sum over ranks (which DDP's averaging turns into the gradient of the mean), strided gradients too."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_loss_and_gradients, args=(port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    inputs = [x.clone().requires_grad_() for x in global_batch()]
    loss = total_loss(*inputs)
    loss.backward()
    assert (ranks[0]["loss"] + ranks[1]["loss"]).item() / 2 == pytest.approx(loss.item(), abs=1e-12)
    for i, x in enumerate(inputs):
        for r in range(2):
            torch.testing.assert_close(ranks[r]["grads"][i] / 2, x.grad[r::2], rtol=0, atol=1e-12)
    weights = torch.arange(12.0).view(3, 4)
    for r in range(2):  # both ranks' sums reach rank r's rows 2r, 2r + 1 of the gathered 4 rows
        torch.testing.assert_close(ranks[r]["strided"], 2 * weights.T[2 * r:2 * r + 2])
