"""Mask generators: exact visible count, permutations, determinism, block structure."""

import pytest
import torch

from urfm_fast.model.masking import block_masking, mask_from_ids, random_masking, split_ids


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


def test_attention_masking_is_a_permutation_with_a_fixed_visible_count():
    from urfm_fast import URFM, URFMConfig

    cfg = URFMConfig.preset("vit_tiny", img_size=64, depth=1, decoder_depth=1, decoder_embed_dim=32,
                            decoder_num_heads=2, mask_type="attention")
    model = URFM(cfg)
    keep_prob = torch.rand(5, cfg.num_patches).pow(4)  # uneven maps, different per image
    keep_prob[0, :3] = 0.0  # zero-probability patches are allowed
    ids = model.sample_ids(5, keep_prob=keep_prob, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (5, cfg.num_patches) and ids.dtype == torch.int64
    assert torch.equal(ids.sort(1).values, torch.arange(cfg.num_patches).expand(5, -1))
    # image 0: its three zero-probability patches are never among the visible ones
    assert not set(ids[0, : cfg.num_visible].tolist()) & {0, 1, 2}
    with pytest.raises(ValueError, match="keep_prob"):
        model.sample_ids(5)


def test_attention_masking_samples_without_replacement_in_proportion():
    """Gumbel-top-k draws the first visible patch with probability p_i, the second as a draw without
    replacement from the rest: the law of torch.multinomial(p, N, replacement=False)."""
    from urfm_fast.model.masking import attention_masking

    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    ids = attention_masking(p.expand(40000, -1), generator=torch.Generator().manual_seed(0))
    first = torch.bincount(ids[:, 0], minlength=4).float() / len(ids)
    torch.testing.assert_close(first, p, atol=0.01, rtol=0)
    # second draw given the first was patch 0: (0.3, 0.15, 0.05) / 0.5
    second = ids[ids[:, 0] == 0, 1]
    freq = torch.bincount(second, minlength=4).float()[1:] / len(second)
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.015, rtol=0)


def test_attention_masking_from_given_noise_is_deterministic_and_checked():
    from urfm_fast.model.masking import attention_masking

    p = torch.rand(3, 16)
    noise = torch.rand(3, 16)
    assert torch.equal(attention_masking(p, noise=noise), attention_masking(p, noise=noise))
    assert torch.equal(attention_masking(torch.ones(3, 16), noise=noise), torch.argsort(noise, 1, descending=True))
    with pytest.raises(ValueError, match="noise shape"):
        attention_masking(p, noise=noise[:, :4])
    with pytest.raises(ValueError, match="keep_prob"):
        attention_masking(p[0])
