"""The packed batch one transformer forward runs on, and the per-token metadata derived from it.

A forward holds several *sequences*: one per request and CFG branch. Sequence ``s`` is
``[text_s, noisy frames_s (layers+1), condition frame_s]``; sequences may differ in text length,
layer count and resolution, and each has its own timestep. Nothing is padded: image tokens of all
sequences are concatenated into one ``[N_img, C]`` tensor and text tokens into one ``[N_txt, C]``
tensor, and attention runs block-diagonally over a joint buffer where sequence ``s`` occupies the
contiguous rows ``cu_seqlens[s]:cu_seqlens[s+1]`` in the order text, then image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate
from typing import TYPE_CHECKING

import torch

from vllm_layered.model_executor.rope import layer3d_positions, rope_cos_sin
from vllm_layered.model_executor.sequence_layout import SequenceLayout

if TYPE_CHECKING:
    from vllm_layered.model_executor.parallel.ulysses import UlyssesExchange


@dataclass
class ForwardBatch:
    """Inputs of one packed transformer forward.

    image_tokens: [sum image_tokens, in_channels]  (noisy frames then condition frame, per sequence)
    text_embeds:  [sum text_len, joint_attention_dim]
    timesteps:    [S] float, the flow-matching sigma in [0, 1] of each sequence
    t_cond:       [S] long, the additional timestep condition (0 for RGB inputs, as the reference)
    modulation:   [num_layers, 2, S, 6C] or None: each sequence's row of its request's modulation table
                  (LayeredTransformer.modulation_table); None: the forward computes it from the timesteps
    """

    image_tokens: torch.Tensor
    text_embeds: torch.Tensor
    timesteps: torch.Tensor
    layouts: list[SequenceLayout]
    t_cond: torch.Tensor | None = None
    modulation: torch.Tensor | None = None

    def __post_init__(self) -> None:
        num_img = sum(s.image_tokens for s in self.layouts)
        num_txt = sum(s.text_len for s in self.layouts)
        if self.image_tokens.shape[0] != num_img:
            raise ValueError(f"image_tokens has {self.image_tokens.shape[0]} rows, layouts need {num_img}")
        if self.text_embeds.shape[0] != num_txt:
            raise ValueError(f"text_embeds has {self.text_embeds.shape[0]} rows, layouts need {num_txt}")
        if self.timesteps.shape != (len(self.layouts),):
            raise ValueError(f"timesteps shape {tuple(self.timesteps.shape)} != ({len(self.layouts)},)")
        if self.t_cond is None:
            self.t_cond = torch.zeros(len(self.layouts), dtype=torch.long, device=self.timesteps.device)
        modulation = self.modulation
        if modulation is not None and (modulation.dim() != 4 or modulation.shape[2] != len(self.layouts)):
            raise ValueError(f"modulation shape {tuple(modulation.shape)} is not [num_layers, 2, "
                             f"{len(self.layouts)}, 6C]")

    @property
    def num_sequences(self) -> int:
        return len(self.layouts)

    @property
    def num_noisy_tokens(self) -> int:
        return sum(s.noisy_tokens for s in self.layouts)

    def select(self, indices: list[int]) -> ForwardBatch:
        """The batch of sequences ``indices`` (in that order): how CFG-parallel ranks take their share."""
        img_starts = list(accumulate((s.image_tokens for s in self.layouts), initial=0))
        txt_starts = list(accumulate((s.text_len for s in self.layouts), initial=0))
        images = [self.image_tokens[img_starts[i] : img_starts[i + 1]] for i in indices]
        texts = [self.text_embeds[txt_starts[i] : txt_starts[i + 1]] for i in indices]
        # staged, not blocking: a blocking host-to-device copy would wait for the GPU work queued so far (every step)
        rows = torch.tensor(indices, dtype=torch.long).to(self.timesteps.device, non_blocking=True)
        return ForwardBatch(
            torch.cat(images) if images else self.image_tokens[:0],
            torch.cat(texts) if texts else self.text_embeds[:0],
            self.timesteps[rows],
            [self.layouts[i] for i in indices],
            self.t_cond[rows],
            None if self.modulation is None else self.modulation[:, :, rows],
        )


def _clip(spans: tuple[tuple[int, int, int], ...], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """The parts of (stream row, joint row, length) spans whose joint rows fall in [lo, hi)."""
    clipped = []
    for stream_row, joint_row, n in spans:
        start, end = max(joint_row, lo), min(joint_row + n, hi)
        if start < end:
            clipped.append((stream_row + start - joint_row, start, end - start))
    return clipped


@dataclass
class PackedMetadata:
    """Index tensors and RoPE tables shared by all blocks of one forward (built once per forward).

    img_seg / txt_seg: [N] int32 sequence id of each token (selects its timestep modulation)
    img_rows / txt_rows: [N] int64 row of each token in the joint attention buffer
    img_spans / txt_spans: per sequence (first row in the stream, first row in the joint buffer, length):
        each sequence's rows are contiguous on both sides, so projections can write straight into place
    cu_seqlens: [S+1] int32 sequence boundaries in the joint buffer (``seq_bounds``: the same on the host)
    img_cos / img_sin / txt_cos / txt_sin: [N, head_dim // 2] float32 rotation tables
    noisy_rows: [N_noisy] int64 rows of ``image_tokens`` that are noisy frames (the model output)
    total_tokens: rows of the joint buffer this process computes
    ulysses: set on a sequence-parallel rank (see ``shard``): attention then runs over the whole joint buffer
        (``cu_seqlens``) with a share of the heads, after an all-to-all
    """

    img_seg: torch.Tensor
    txt_seg: torch.Tensor
    img_rows: torch.Tensor
    txt_rows: torch.Tensor
    img_spans: tuple[tuple[int, int, int], ...]
    txt_spans: tuple[tuple[int, int, int], ...]
    cu_seqlens: torch.Tensor
    seq_bounds: tuple[int, ...]
    max_seqlen: int
    img_cos: torch.Tensor
    img_sin: torch.Tensor
    txt_cos: torch.Tensor
    txt_sin: torch.Tensor
    noisy_rows: torch.Tensor
    total_tokens: int
    ulysses: UlyssesExchange | None = None

    @classmethod
    def build(
        cls,
        layouts: list[SequenceLayout],
        *,
        axes_dims: tuple[int, int, int],
        theta: float,
        device: torch.device,
    ) -> PackedMetadata:
        img_seg, txt_seg, img_rows, txt_rows, noisy_rows = [], [], [], [], []
        img_pos, txt_pos, img_spans, txt_spans = [], [], [], []
        cu = [0]
        img_offset = txt_offset = 0
        for s, layout in enumerate(layouts):
            start = cu[-1]
            txt_seg.append(torch.full((layout.text_len,), s, dtype=torch.int32))
            img_seg.append(torch.full((layout.image_tokens,), s, dtype=torch.int32))
            txt_rows.append(torch.arange(start, start + layout.text_len))
            img_rows.append(torch.arange(start + layout.text_len, start + layout.total_tokens))
            noisy_rows.append(torch.arange(img_offset, img_offset + layout.noisy_tokens))
            txt_spans.append((txt_offset, start, layout.text_len))
            img_spans.append((img_offset, start + layout.text_len, layout.image_tokens))
            image_positions, text_positions = layer3d_positions(layout)
            img_pos.append(image_positions)
            txt_pos.append(text_positions)
            img_offset += layout.image_tokens
            txt_offset += layout.text_len
            cu.append(start + layout.total_tokens)
        img_cos, img_sin = rope_cos_sin(torch.cat(img_pos), axes_dims=axes_dims, theta=theta)
        txt_cos, txt_sin = rope_cos_sin(torch.cat(txt_pos), axes_dims=axes_dims, theta=theta)
        return cls(
            img_seg=torch.cat(img_seg).to(device),
            txt_seg=torch.cat(txt_seg).to(device),
            img_rows=torch.cat(img_rows).to(device),
            txt_rows=torch.cat(txt_rows).to(device),
            img_spans=tuple(img_spans),
            txt_spans=tuple(txt_spans),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
            seq_bounds=tuple(cu),
            max_seqlen=max(layout.total_tokens for layout in layouts),
            img_cos=img_cos.to(device),
            img_sin=img_sin.to(device),
            txt_cos=txt_cos.to(device),
            txt_sin=txt_sin.to(device),
            noisy_rows=torch.cat(noisy_rows).to(device),
            total_tokens=cu[-1],
        )

    def shard(self, exchange: UlyssesExchange) -> tuple[PackedMetadata, slice, slice]:
        """This rank's part of a sequence-parallel forward: the metadata, and the image and text rows it owns.

        Ranks own contiguous, near-equal ranges of the joint buffer (a range may cut a sequence anywhere).
        Image tokens appear in the joint buffer in stream order, and so do text tokens, so a joint range is
        one contiguous range of each stream; and the ranks' ranges laid end to end are the joint buffer, so
        the all-to-all over heads hands every rank the whole buffer in joint order (no permutation).
        """
        lo, hi = exchange.row_range
        img_spans, txt_spans = _clip(self.img_spans, lo, hi), _clip(self.txt_spans, lo, hi)
        img = _stream_range(img_spans)
        txt = _stream_range(txt_spans)
        noisy = (self.noisy_rows >= img.start) & (self.noisy_rows < img.stop)
        local = replace(
            self,
            img_seg=self.img_seg[img], txt_seg=self.txt_seg[txt],
            img_rows=self.img_rows[img] - lo, txt_rows=self.txt_rows[txt] - lo,
            img_spans=tuple((r - img.start, j - lo, n) for r, j, n in img_spans),
            txt_spans=tuple((r - txt.start, j - lo, n) for r, j, n in txt_spans),
            img_cos=self.img_cos[img], img_sin=self.img_sin[img],
            txt_cos=self.txt_cos[txt], txt_sin=self.txt_sin[txt],
            noisy_rows=self.noisy_rows[noisy] - img.start,
            total_tokens=hi - lo,
            ulysses=exchange,
        )
        return local, img, txt


def _stream_range(clipped: list[tuple[int, int, int]]) -> slice:
    """The stream rows covered by ``clipped`` spans (contiguous: see ``PackedMetadata.shard``)."""
    if not clipped:
        return slice(0, 0)
    return slice(clipped[0][0], clipped[-1][0] + clipped[-1][2])
