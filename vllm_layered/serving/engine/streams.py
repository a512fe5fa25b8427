"""Ordering GPU work that crosses from one engine thread (and its CUDA stream) to the other.

The step thread runs the transformer and the sampler on its CUDA stream; the aux thread runs preprocessing (text
encoder, VAE encode) and VAE decoding on its own, so that they overlap with denoising. Two streams give no order:
a kernel queued on one may run before, during or after one queued earlier on the other. On an H200 the decode
(aux) read the latents before the step stream's last Euler update had written them: layers 36.8/255 off.

And PyTorch's caching allocator hands a freed block to the next allocation on the stream that allocated it,
unaware that another stream may still have queued reads of it (the first noise, freed by the step thread once
the first Euler step replaced it, was allocated on the aux stream; the last latents, freed after decoding, on
the step stream).

So every tensor one stream writes and the other reads crosses with a ``Handoff``, the engine's only crossing:
- prepare (aux) -> first step: the DenoiseStates' noise, condition tokens, prompt embeddings and modulation
  tables (a table cached by the transformer was written on the aux stream too, before this handoff's event);
- last step -> decode (aux): the DenoiseState after its last Euler update.
A refinement of a decoded layer (a tree request) crosses the same two ways: its input is cropped from the decoded
layer's pixels on the host, so no tensor crosses between a parent's decode and its children's preprocessing.
``Handoff.send`` (producer thread, after queueing the writes) records an event on the producer's stream;
``Handoff.receive`` (consumer thread, before queueing the reads) makes the consumer's stream wait for it, a wait
on the GPU that blocks neither thread, and marks the tensors as used by the consumer's stream
(``Tensor.record_stream``), so their blocks are not reused before the consumer's queued work is done, whichever
thread frees them. Without CUDA there are no streams and a Handoff does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from vllm_layered.model_executor.denoise import DenoiseState


def new_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A CUDA stream of its own on ``device`` (None on the CPU)."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def use_stream(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    """Make ``stream`` the calling thread's current stream (a no-op for None)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def state_tensors(state: DenoiseState) -> Iterator[torch.Tensor]:
    """The tensors of a DenoiseState that live on the device and travel with it between threads."""
    for tensor in (state.latents, state.condition_tokens, state.prompt_embeds, state.negative_embeds, state.sigmas,
                   state.modulation):
        if tensor is not None and tensor.is_cuda:
            yield tensor


@dataclass(frozen=True)
class Handoff:
    """``tensors`` as written by the work queued on the producer's stream before ``event``."""

    tensors: tuple[torch.Tensor, ...]
    event: torch.cuda.Event | None

    @classmethod
    def send(cls, tensors: Iterable[torch.Tensor]) -> Handoff:
        """On the producing thread, after queueing the work that writes ``tensors`` (CUDA tensors only)."""
        tensors = tuple(tensors)
        if not tensors:
            return cls((), None)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(tensors[0].device))
        return cls(tensors, event)

    def receive(self) -> None:
        """On the consuming thread, before queueing any work that reads the tensors."""
        if self.event is None:
            return
        stream = torch.cuda.current_stream(self.tensors[0].device)
        stream.wait_event(self.event)
        for tensor in self.tensors:
            tensor.record_stream(stream)
