"""Views: the overlapping model-sized windows that cover a canvas (MultiDiffusion's panorama equation, Eq. 7)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # views are plain numbers until a tensor is cropped: validate and preview plan them without torch
    import torch


@dataclass(frozen=True)
class View:
    """A window of the latent canvas, in latent cells. Columns wrap around the canvas when `wrap`."""

    top: int
    left: int
    height: int
    width: int
    canvas_width: int
    wrap: bool = False

    def columns(self, device=None) -> torch.Tensor:
        import torch

        cols = torch.arange(self.left, self.left + self.width, device=device)
        return cols % self.canvas_width if self.wrap else cols

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """The view's window of a (..., H, W) tensor."""
        rows = x[..., self.top : self.top + self.height, :]
        if self.wrap and self.left + self.width > self.canvas_width:
            return rows.index_select(-1, self.columns(x.device))
        return rows[..., self.left : self.left + self.width]

    def add_to(self, canvas: torch.Tensor, values: torch.Tensor) -> None:
        """canvas[view] += values, in place; wrapped columns land on the other edge."""
        rows = canvas[..., self.top : self.top + self.height, :]
        rows.index_add_(-1, self.columns(canvas.device), values)


def axis_starts(length: int, window: int, stride: int, wrap: bool = False) -> list[int]:
    """Window starts along one axis so every cell is covered: the last window snaps to the edge;
    with `wrap`, windows start every `stride` cells all the way round."""
    if length <= window:
        return [0]
    if wrap:
        return list(range(0, length, stride))
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def make_views(latent_hw: tuple[int, int], window: int, stride: int, wrap: bool = False) -> list[View]:
    """Cover an (h, w) latent canvas with window x window views (smaller where the canvas is smaller).

    `wrap` (360-degree panoramas) makes views run across the left/right edge, so the two edge
    columns are neighbours in some view and the picture has no seam.
    """
    h, w = latent_hw
    view_h, view_w = min(window, h), min(window, w)
    wrap = wrap and w > window
    return [
        View(top, left, view_h, view_w, w, wrap)
        for top in axis_starts(h, window, stride)
        for left in axis_starts(w, window, stride, wrap)
    ]


def full_view(latent_hw: tuple[int, int]) -> View:
    """The whole canvas as one view."""
    return View(0, 0, latent_hw[0], latent_hw[1], latent_hw[1])

