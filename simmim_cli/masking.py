"""The SimMIM mask generator: random masking on a coarse grid, expanded to the model's patch grid."""

from __future__ import annotations

import math

import torch

from .errors import SimmimError


class MaskGenerator:
    """Draws SimMIM masks.

    The image is cut into a coarse grid of ``mask_patch_size`` cells; ``ceil(cells * mask_ratio)`` cells,
    chosen uniformly without replacement, are masked; each cell is repeated ``mask_patch_size /
    model_patch_size`` times along both axes so the mask lines up with the encoder's patch tokens.
    """

    def __init__(self, img_size: int, mask_patch_size: int = 32, model_patch_size: int = 16, mask_ratio: float = 0.6):
        if mask_patch_size <= 0 or img_size % mask_patch_size:
            raise SimmimError(
                f"image size {img_size} is not a multiple of --mask-patch-size {mask_patch_size}; "
                f"use an --img-size that is (e.g. {max(1, img_size // max(mask_patch_size, 1)) * mask_patch_size})"
            )
        if mask_patch_size % model_patch_size:
            raise SimmimError(
                f"--mask-patch-size {mask_patch_size} is not a multiple of the model's patch size {model_patch_size}; "
                f"use a multiple such as {max(1, mask_patch_size // model_patch_size) * model_patch_size}"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise SimmimError(f"--mask-ratio {mask_ratio} is outside (0, 1); the paper uses 0.6")
        self.img_size = img_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.grid_size = img_size // mask_patch_size  # coarse cells per side
        self.scale = mask_patch_size // model_patch_size  # model patches per cell side
        self.num_masked = math.ceil(self.grid_size**2 * mask_ratio)

    @property
    def token_grid_size(self) -> int:
        """Side of the model's patch grid, the mask's spatial size."""
        return self.grid_size * self.scale

    def __call__(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Returns a bool mask ``(B, H/p, W/p)`` on the model patch grid, True where masked."""
        device = generator.device if generator is not None else device
        cells = self.grid_size**2
        noise = torch.rand(batch_size, cells, generator=generator, device=device)
        masked_cells = noise.topk(self.num_masked, dim=1).indices  # a uniform draw without replacement
        mask = torch.zeros(batch_size, cells, dtype=torch.bool, device=device)
        mask.scatter_(1, masked_cells, True)
        mask = mask.view(batch_size, self.grid_size, self.grid_size)
        return mask.repeat_interleave(self.scale, dim=1).repeat_interleave(self.scale, dim=2)

    def from_array(self, array) -> torch.Tensor:
        """Accepts a user-given 0/1 mask on the coarse (mask-patch) grid or the model patch grid.

        Returns a bool ``(H/p, W/p)`` mask on the model patch grid.
        """
        mask = torch.as_tensor(array)
        if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
            raise SimmimError(f"the mask must be a square 2-D 0/1 array, got shape {tuple(mask.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise SimmimError("the mask must hold only 0 and 1 (1 = masked)")
        mask = mask.bool()
        if mask.shape[0] == self.grid_size:
            return mask.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)
        if mask.shape[0] == self.token_grid_size:
            return mask
        raise SimmimError(
            f"the mask is {mask.shape[0]}x{mask.shape[1]}, but this model needs {self.grid_size}x{self.grid_size} "
            f"(mask-patch grid) or {self.token_grid_size}x{self.token_grid_size} (model patch grid)"
        )
