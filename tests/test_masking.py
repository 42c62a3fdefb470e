import math

import numpy as np
import pytest
import torch

from simmim_cli.errors import SimmimError
from simmim_cli.masking import MaskGenerator


def test_masks_have_the_paper_count_and_are_aligned_to_cells():
    generator = MaskGenerator(img_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    masks = generator(64, torch.Generator().manual_seed(0))
    assert masks.shape == (64, 48, 48) and masks.dtype == torch.bool
    cells = masks[:, ::8, ::8]  # one model patch per coarse cell
    assert (cells.sum(dim=(1, 2)) == math.ceil(36 * 0.6)).all()  # 22 of 36 cells, rounded up
    # every coarse cell is entirely masked or entirely visible
    expanded = cells.repeat_interleave(8, 1).repeat_interleave(8, 2)
    assert torch.equal(expanded, masks)


def test_every_cell_is_masked_about_equally_often():
    generator = MaskGenerator(img_size=224, mask_patch_size=32, model_patch_size=16, mask_ratio=0.6)
    masks = generator(4000, torch.Generator().manual_seed(1))[:, ::2, ::2].float()
    frequency = masks.mean(dim=0)
    expected = math.ceil(49 * 0.6) / 49
    assert torch.allclose(frequency, torch.full_like(frequency, expected), atol=0.04)


def test_same_seed_same_masks_other_seed_other_masks():
    generator = MaskGenerator(img_size=224, mask_patch_size=32, model_patch_size=16)
    first = generator(8, torch.Generator().manual_seed(7))
    again = generator(8, torch.Generator().manual_seed(7))
    other = generator(8, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_user_masks_on_either_grid():
    generator = MaskGenerator(img_size=64, mask_patch_size=32, model_patch_size=16)
    coarse = np.array([[1, 0], [0, 1]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(generator.from_array(coarse), expected)
    assert torch.equal(generator.from_array(expected.numpy().astype(np.uint8)), expected)
    with pytest.raises(SimmimError, match="3x3"):
        generator.from_array(np.zeros((3, 3)))
    with pytest.raises(SimmimError, match="only 0 and 1"):
        generator.from_array(np.full((2, 2), 2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"img_size": 200, "mask_patch_size": 32, "model_patch_size": 16}, "not a multiple of --mask-patch-size"),
        ({"img_size": 192, "mask_patch_size": 24, "model_patch_size": 16}, "not a multiple of the model's patch"),
        ({"img_size": 192, "mask_patch_size": 32, "model_patch_size": 16, "mask_ratio": 1.0}, "outside"),
    ],
)
def test_invalid_combinations_name_the_fix(kwargs, message):
    with pytest.raises(SimmimError, match=message):
        MaskGenerator(**kwargs)
