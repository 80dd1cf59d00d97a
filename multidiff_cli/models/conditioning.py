"""A family's text conditioning as rows: what guidance, chunked calls and LoRA sets select, join and zero."""
from __future__ import annotations

from dataclasses import dataclass

import torch

AdapterSet = tuple[tuple[str, float], ...]
"""(LoRA file as an absolute path, scale) pairs, sorted by file; () is the bare model."""


@dataclass(frozen=True)
class Conditioning:
    """A family's text conditioning, one row per condition: named tensors that share their first
    dimension (SD: hidden_states; SDXL: hidden_states, pooled, time_ids), and the adapter set each row
    runs with (an index into `adapter_sets`; None: every row on the bare model).

    Rows select, concatenate and zero like the rows of one tensor, so guidance, chunking and LoRA
    grouping never look inside."""

    tensors: dict[str, torch.Tensor]
    adapter_index: torch.Tensor | None = None  # (E,) long, on the CPU
    adapter_sets: tuple[AdapterSet, ...] = ((),)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, rows) -> Conditioning:
        """The rows `rows` selects (an int list, a slice or an index tensor), as a tensor's rows would be."""
        cpu_rows = rows.cpu() if isinstance(rows, torch.Tensor) else rows
        index = None if self.adapter_index is None else self.adapter_index[cpu_rows]
        device = next(iter(self.tensors.values())).device
        tensor_rows = rows.to(device) if isinstance(rows, torch.Tensor) else rows
        return Conditioning({name: t[tensor_rows] for name, t in self.tensors.items()}, index, self.adapter_sets)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    @classmethod
    def cat(cls, parts: list[Conditioning]) -> Conditioning:
        """The rows of every part, in order (conditions encoded in groups, e.g. one per LoRA set)."""
        return cls({name: torch.cat([p.tensors[name] for p in parts]) for name in parts[0].tensors})

    def zeroed(self, rows: frozenset[int], names: tuple[str, ...]) -> Conditioning:
        """These rows of the tensors `names` set to zeros (SDXL's force_zeros_for_empty_prompt)."""
        if not rows:
            return self
        keep = torch.tensor([i not in rows for i in range(len(self))])
        out = {}
        for name, t in self.tensors.items():
            mask = keep.to(t.device, t.dtype).reshape(-1, *[1] * (t.dim() - 1))
            out[name] = t * mask if name in names else t
        return Conditioning(out, self.adapter_index, self.adapter_sets)

    def with_rows(self, name: str, tensor: torch.Tensor) -> Conditioning:
        """These rows with one more named tensor of the same rows (a sample's guide crop)."""
        return Conditioning({**self.tensors, name: tensor}, self.adapter_index, self.adapter_sets)

    def with_adapters(self, index: torch.Tensor, sets: list[AdapterSet]) -> Conditioning:
        return Conditioning(self.tensors, index, tuple(sets))

    def to(self, *args, **kwargs) -> Conditioning:
        return Conditioning({n: t.to(*args, **kwargs) for n, t in self.tensors.items()}, self.adapter_index,
                            self.adapter_sets)
