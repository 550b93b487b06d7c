"""Mask generators: exact visible count, permutations, determinism, block structure."""

import pytest
import torch

from urfm_fast.masking import block_masking, mask_from_ids, random_masking, split_ids


def assert_permutations(ids, n):
    assert ids.dtype == torch.int64
    assert torch.equal(ids.sort(1).values, torch.arange(n).expand_as(ids))


@pytest.mark.parametrize("n", [1, 16, 196])
def test_random_masking_is_a_permutation_per_sample(n):
    ids = random_masking(8, n)
    assert ids.shape == (8, n)
    assert_permutations(ids, n)


def test_random_masking_keeps_lowest_noise_and_is_deterministic():
    noise = torch.rand(4, 196)
    ids = random_masking(4, 196, noise=noise)
    keep, _, _ = split_ids(ids, 49)
    kept_noise = torch.gather(noise, 1, keep)
    assert (kept_noise.max(1).values <= noise.sort(1).values[:, 48] + 0).all()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(random_masking(4, 196, generator=g1), random_masking(4, 196, generator=g2))
    with pytest.raises(ValueError):
        random_masking(4, 196, noise=torch.rand(4, 195))


def test_random_masking_varies_between_samples():
    ids = random_masking(16, 196)
    mask = mask_from_ids(ids, 49)
    assert (mask.sum(1) == 147).all()
    assert len({tuple(m.tolist()) for m in mask}) == 16


@pytest.mark.parametrize("grid,num_masked", [(14, 147), (14, 98), (4, 12), (7, 1)])
def test_block_masking_exact_count_and_blocky(grid, num_masked):
    n = grid * grid
    ids = block_masking(32, grid, num_masked, generator=torch.Generator().manual_seed(0))
    assert_permutations(ids, n)
    mask = mask_from_ids(ids, n - num_masked).view(32, grid, grid)
    assert (mask.flatten(1).sum(1) == num_masked).all()
    if grid == 14 and num_masked == 98:
        # Block masks are spatially clustered: a masked patch has more masked 4-neighbours than under
        # random masking at the same ratio (expected 0.5 of its neighbours there).
        right = (mask[:, :, 1:] * mask[:, :, :-1]).sum() / mask[:, :, :-1].sum()
        rand = mask_from_ids(random_masking(32, n), n - num_masked).view(32, grid, grid)
        right_rand = (rand[:, :, 1:] * rand[:, :, :-1]).sum() / rand[:, :, :-1].sum()
        assert right > right_rand + 0.1


def test_block_masking_rejects_bad_count():
    with pytest.raises(ValueError):
        block_masking(2, 4, 16)
