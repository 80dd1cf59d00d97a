"""Classifier-free guidance for every request of a step, with each distinct network sample run once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from .sampler import UNCONDITIONAL, Denoiser, Request


class Rows(Protocol):
    """Per-text conditioning that a list of row indices selects from (a family's Conditioning; a
    (E, L, D) tensor of hidden states in the tests)."""

    def __getitem__(self, rows: Any) -> Any: ...


ModelRun = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""run(inputs (B, C, h, w), t, conditioning rows (B)) -> float model outputs (B, C, h, w): a family's
network over a batch of samples (models/<family>.py)."""


@dataclass
class Prompts:
    """The distinct texts to encode, and for each prompt (0 = global) its cond/negative text and guidance."""

    texts: list[str]
    cond: list[int]
    negative: list[int]
    guidance: list[float]
    labels: list[str] = field(default_factory=list)

    def labelled_conds(self) -> list[tuple[str, str]]:
        """(label, conditional text) of every prompt."""
        return [(label, self.texts[i]) for label, i in zip(self.labels, self.cond)]


def guided_denoiser(run: ModelRun, conditioning: Rows, prompts: Prompts) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans) for every request of a step, all network samples batched together.

    conditioning: row i conditions on prompts.texts[i]. A sample is (input latent, text); each
    distinct one runs once, so requests on the same input
    whose prompts share a negative prompt share its unconditional pass (N regions: N+2 samples a
    step instead of 2(N+1)). Guidance <= 1 runs no unconditional pass (diffusers' convention).
    guides (the sampler's, when it has some): each input's guide crop, passed to `run` as the
    conditioning's "guides" rows, one per sample.
    A request for UNCONDITIONAL gets the global prompt's negative sample on its input, unguided (shared
    with the requests there that sample it anyway). `unconditional` (the sampler's, for region windows
    that take the canvas's): per input, an unconditional prediction to guide with instead of sampling one,
    for the requests on it whose negative prompt is the global prompt's; None: sample as usual.
    """

    def denoise(inputs: torch.Tensor, t: torch.Tensor, requests: list[Request],
                guides: torch.Tensor | None = None,
                unconditional: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        samples: dict[tuple[int, int], int] = {}

        def sample(latent: int, text: int) -> int:
            return samples.setdefault((latent, text), len(samples))

        cond, uncond = [], []
        for latent, p in requests:
            if p == UNCONDITIONAL:
                cond.append(sample(latent, prompts.negative[0]))
                uncond.append(None)
                continue
            cond.append(sample(latent, prompts.cond[p]))
            shared = unconditional[latent] if unconditional is not None and reads_canvas(prompts, p) else None
            uncond.append(None if prompts.guidance[p] <= 1 else shared if shared is not None
                          else sample(latent, prompts.negative[p]))
        rows = conditioning[[text for _, text in samples]]
        if guides is not None:  # each sample's guide crop rides with its conditioning row (families: "guides")
            rows = rows.with_rows("guides", guides[[latent for latent, _ in samples]])
        out = run(inputs[[latent for latent, _ in samples]], t, rows)
        guided = []
        for c, u, (_, p) in zip(cond, uncond, requests):
            if u is None:
                guided.append(out[c])
                continue
            u = out[u] if isinstance(u, int) else u.to(out.dtype)
            guided.append(u + prompts.guidance[p] * (out[c] - u))
        return torch.stack(guided)

    return denoise


def reads_canvas(prompts: Prompts, p: int) -> bool:
    """Whether prompt p, on a window, would guide with the canvas's unconditional (window_unconditional: canvas):
    its guidance on and its negative condition the global prompt's."""
    return prompts.guidance[p] > 1 and prompts.negative[p] == prompts.negative[0]


def shares_unconditional(prompts: Prompts, windowed) -> bool:
    """Whether any of the `windowed` prompts reads the canvas's unconditional. Where none would, the sampler's
    canvas views are not asked for it (multidiffusion's shared_unconditional stays off)."""
    return any(reads_canvas(prompts, p) for p in windowed)
