"""cuDNN FP8 (e4m3) attention over packed sequences, through the cuDNN frontend's Python graph API.

q, k, v: [S_total, H, D] e4m3 joint buffers (sequence b owns rows bounds[b]:bounds[b + 1]) with their scales
(kernels/fp8_attention.Fp8AttentionScales: q's and k's per layer, v's per sequence); returns the e4m3 output
[S_total, H, D], O ~= o8 / o_inv[b]. The math is cuDNN's per-tensor FP8 recipe: S = q8 k8^T * descale_q * descale_k
* softmax scale in float32, the probabilities P (relative to the running max) rounded to e4m3 after * 448
(scale_s: cuDNN's documented bound for e4m3 without dropout), O = P8 v8 * descale_s * descale_v / rowsum(P), then
e4m3(O * scale_o), saturating. On an H200 (cuDNN 9.19, 24 heads x 128) it ran 1.25x (9856 tokens) to 1.47x (24776)
the bf16 cuDNN kernel.

Needs the optional dependency ``nvidia-cudnn-frontend`` (import name ``cudnn``; the ``fp8-attention`` extra) and
a Hopper or newer GPU: cuDNN's FP8 attention forward does not run on Ada, and on Hopper it writes only e4m3 O
(a bf16 O from FP8 inputs is Blackwell-only), which is why the output and its scale go to the FP8 output
projections as they are.

Packed sequences: one graph call per sequence (batch 1, BSHD strides straight into the joint buffer: no copies),
each with its own V and O scales, so that a sequence's result does not depend on what it is packed with. Neither
batching equal-length sequences into one call nor a ragged (THD) graph would pay: one sequence of a Layered
request is already 14+ waves of 128-query tiles x 24 heads on 132 SMs, so a call per sequence loses under one
wave; one padded batched call cost what the separate calls cost, and torch's ragged cuDNN path measured 4-11x
slower (benchmarks/RESULTS.md, session 4). Batch 1 also keeps the number of graphs to build down (one per length).

Keys in whole tiles: cuDNN's FP8 kernel runs 8-12% faster when the key length is a multiple of `KEY_TILE` (256)
than at any other length (H200, cuDNN 9.19: 9800 tokens 1.45 -> 1.37 ms, 9606 1.41 -> 1.30, 24776 9.26 -> 8.45;
the output is bit-identical; benchmarks/attention_fp8.py section k, benchmarks/RESULTS.md session 9). So a
sequence of L tokens reads its keys and values in a window of L rounded up to `KEY_TILE` rows, and cuDNN's padding
mask (seq_len_kv = L) keeps the rows past L out of the softmax. Those rows are read in place: the next sequence's,
or past the last sequence the zero rows that `key_buffer` leaves after K's and V's (k and v may be longer than q).
A window that would run past the buffer (with Ulysses, whose all-to-alls make the buffers, or where a caller gives
plain ones) reads a copy of the sequence's K and V in a scratch buffer instead, whose rows past the copy are finite
(zeros, or an earlier copy's codes).

Masked rows must be finite. A NaN code in a masked row of K stays out of O, but one in V reaches it through
P = 0 times NaN (both seen on the H200, section k). The model's V codes cannot be NaN (`quantize_v` clamps them),
so a failed neighbour cannot spoil a sequence's output.

Graphs are built once per (device, length, key window, heads, head dim, softmax scale) and kept (LRU of
`GRAPH_CACHE_SIZE`): building one takes far longer than running it. They run on torch's current stream, through
one cuDNN handle per device, with a workspace and the key/value scratch kept per (device, stream).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vllm_layered.kernels.attention import check_seq_bounds, softmax_scale
from vllm_layered.kernels.fp8 import FP8_DTYPE, FP8_MAX
from vllm_layered.kernels.fp8_attention import Fp8AttentionScales, check_attention_inputs

__all__ = [
    "GRAPH_CACHE_SIZE", "INSTALL_HINT", "KEY_TILE", "MIN_CAPABILITY", "GraphCacheInfo", "KeyWindow",
    "clear_graph_cache", "cudnn_fp8_attention", "cudnn_frontend_error", "graph_cache_info", "key_buffer", "key_windows",
]

INSTALL_HINT = ("pip install 'vllm-layered[fp8-attention]' (or, without the frontend's CuTe DSL dependencies, which "
                "this graph does not use: pip install --no-deps 'nvidia-cudnn-frontend>=1.32')")
MIN_CAPABILITY = (9, 0)  # cuDNN's FP8 attention forward: Hopper and newer
GRAPH_CACHE_SIZE = 64
S_SCALE = FP8_MAX  # P <= 1 before its e4m3 cast: cuDNN's bound for e4m3 without dropout
KEY_TILE = 256  # key lengths that are multiples of this run cuDNN's fast kernel (module docstring)


@functools.cache
def _import_cudnn() -> tuple[Any | None, str | None]:
    try:
        import cudnn
    except (ImportError, OSError) as exc:  # OSError: the module is there but libcudnn did not load
        return None, f"the cuDNN frontend (`import cudnn`), which failed ({type(exc).__name__}: {exc}): {INSTALL_HINT}"
    return cudnn, None


def cudnn_frontend_error() -> str | None:
    """Why FP8 attention cannot use the cuDNN frontend here (with the pip command), or None if it imports."""
    return _import_cudnn()[1]


def _cudnn() -> Any:
    module, error = _import_cudnn()
    if module is None:
        raise RuntimeError(f"FP8 attention needs {error}")
    return module


@dataclass(frozen=True)
class _Graph:
    """A built sdpa_fp8 graph and its tensor descriptors (the variant pack's keys)."""

    graph: Any
    q: Any
    k: Any
    v: Any
    descale_q: Any
    descale_k: Any
    descale_v: Any
    descale_s: Any
    scale_s: Any
    scale_o: Any
    o: Any
    amax_o: Any
    workspace_size: int
    seq_len_q: Any = None  # the padding mask's lengths (a key window longer than the sequence), else None
    seq_len_kv: Any = None
    lengths: torch.Tensor | None = None  # int32 [1, 1, 1, 1] holding the sequence length, for both


@dataclass(frozen=True)
class KeyWindow:
    """Where sequence ``seq``'s attention reads its keys and values: rows ``start:start + length`` of the packed q
    and o, keys and values from row ``start`` over ``window`` rows (the length rounded up to `KEY_TILE`), in place
    or (``in_place`` False: the window would run past the buffer) from a scratch copy."""

    seq: int
    start: int
    length: int
    window: int
    in_place: bool


@dataclass(frozen=True)
class GraphCacheInfo:
    hits: int
    misses: int
    size: int


@dataclass
class _Scratch:
    """Device buffers of one (device, stream): made and used in that stream's order only."""

    workspace: torch.Tensor  # uint8, grown to the largest graph's need
    amax_o: torch.Tensor  # cuDNN's amax(O) output, not read
    scale_s: torch.Tensor  # S_SCALE
    descale_s: torch.Tensor  # 1 / S_SCALE
    keys: torch.Tensor | None = None  # e4m3 [2, rows, H, D]: K and V of a window past the buffer's end, finite rows


class _State:
    """Per-process cuDNN state: handles per device, built graphs (LRU), scratch buffers per (device, stream)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # cuDNN handles are not thread-safe; graphs are shared
        self.handles: dict[int, Any] = {}
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.scratch: dict[tuple[int, int], _Scratch] = {}
        self.hits = self.misses = 0


_state = _State()


def graph_cache_info() -> GraphCacheInfo:
    """Graph cache statistics since the last `clear_graph_cache` (a miss builds a graph)."""
    return GraphCacheInfo(_state.hits, _state.misses, len(_state.graphs))


def clear_graph_cache() -> None:
    with _state.lock:
        _state.graphs.clear()
        _state.hits = _state.misses = 0


def _handle(cudnn: Any, device: int) -> Any:
    handle = _state.handles.get(device)
    if handle is None:
        with torch.cuda.device(device):
            handle = _state.handles[device] = cudnn.create_handle()
    return handle


def _build_graph(
    cudnn: Any, handle: Any, length: int, heads: int, head_dim: int, scale: float, *, window: int | None = None,
    heuristics: Sequence[Any] | None = None, all_plans: bool = False, plan: tuple[int, dict] | None = None,
) -> _Graph:
    """The sdpa_fp8 graph of one sequence of ``length`` tokens, BSHD strides: q and o are [1, H, L, D] views of
    [L, H, D] rows, k and v [1, H, window, D] (default: the length); a longer window masks its rows past ``length``
    with cuDNN's padding mask. Stats are not generated (inference); amax(O) is an output (cuDNN's own tests declare
    it so), amax(S) stays virtual as the frontend recommends. ``heuristics`` (cuDNN heuristic modes, default A then
    FALLBACK) rank the candidate plans; the first that builds runs, or with ``all_plans`` every one is built;
    ``plan`` (engine id, knobs) builds that one plan instead (benchmarks/attention_fp8.py times them)."""
    window = length if window is None else window
    if window < length:
        raise ValueError(f"a key window of {window} rows cannot hold a sequence of {length}")
    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)

    def rows(name: str, n: int) -> Any:
        return graph.tensor(name=name, dim=[1, heads, n, head_dim], stride=[n * heads * head_dim, head_dim,
                                                                            heads * head_dim, 1], data_type=e4m3)

    q, k, v = rows("q", length), rows("k", window), rows("v", window)
    one = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
    descale_q, descale_k, descale_v, descale_s, scale_s, scale_o = (
        graph.tensor(name=name, **one)
        for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
    )
    mask: dict[str, Any] = {}
    if window > length:
        lengths = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.INT32)
        mask = dict(use_padding_mask=True, seq_len_q=graph.tensor(name="seq_len_q", **lengths),
                    seq_len_kv=graph.tensor(name="seq_len_kv", **lengths))
    o, _, _, amax_o = graph.sdpa_fp8(
        q=q, k=k, v=v,
        descale_q=descale_q, descale_k=descale_k, descale_v=descale_v,
        descale_s=descale_s, scale_s=scale_s, scale_o=scale_o,
        generate_stats=False, attn_scale=scale, name="sdpa_fp8", **mask,
    )
    o.set_output(True).set_dim([1, heads, length, head_dim]).set_stride(
        [length * heads * head_dim, head_dim, heads * head_dim, 1]).set_data_type(e4m3)
    amax_o.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
    steps = (
        ("validate", graph.validate),
        ("build_operation_graph", graph.build_operation_graph),
        ("create_execution_plans", lambda: graph.create_execution_plan(*plan) if plan else graph.create_execution_plans(
            list(heuristics or (cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK)))),
        ("check_support", graph.check_support),
        ("build_plans", lambda: graph.build_plans(cudnn.build_plan_policy.ALL) if all_plans else graph.build_plans()),
    )
    for step, run in steps:
        try:
            run()
        except Exception as exc:  # name the shape, the step and the versions: the error alone rarely says which
            raise RuntimeError(
                f"cuDNN could not build the FP8 attention graph for {length} tokens, {heads} heads x {head_dim} "
                f"({step}; cuDNN {cudnn.backend_version_string()}, frontend {cudnn.__version__}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    lengths = None
    if mask:
        device = torch.cuda.current_device()
        lengths = torch.full((1, 1, 1, 1), length, dtype=torch.int32, device=device)
    return _Graph(graph, q, k, v, descale_q, descale_k, descale_v, descale_s, scale_s, scale_o, o, amax_o,
                  graph.get_workspace_size(), mask.get("seq_len_q"), mask.get("seq_len_kv"), lengths)


def _graph(cudnn: Any, device: int, length: int, window: int, heads: int, head_dim: int, scale: float) -> _Graph:
    key = (device, length, window, heads, head_dim, scale)
    graph = _state.graphs.get(key)
    if graph is not None:
        _state.hits += 1
        _state.graphs.move_to_end(key)
        return graph
    _state.misses += 1
    graph = _build_graph(cudnn, _handle(cudnn, device), length, heads, head_dim, scale, window=window)
    _state.graphs[key] = graph
    while len(_state.graphs) > GRAPH_CACHE_SIZE:
        _state.graphs.popitem(last=False)
    return graph


def _scratch(device: int, stream: int, workspace_size: int) -> _Scratch:
    scratch = _state.scratch.get((device, stream))
    if scratch is None:
        one = dict(dtype=torch.float32, device=device)
        scratch = _state.scratch[(device, stream)] = _Scratch(
            torch.empty(max(workspace_size, 1), dtype=torch.uint8, device=device), torch.empty(1, **one),
            torch.full((1,), S_SCALE, **one), torch.full((1,), 1 / S_SCALE, **one),
        )
    elif scratch.workspace.numel() < workspace_size:
        scratch.workspace = torch.empty(workspace_size, dtype=torch.uint8, device=device)
    return scratch


def _keys_scratch(scratch: _Scratch, rows: int, heads: int, head_dim: int, device: int) -> torch.Tensor:
    """The (device, stream)'s [2, >= rows, H, D] key/value scratch, zero-filled where new, so every row is finite."""
    keys = scratch.keys
    if keys is None or keys.shape[1] < rows or keys.shape[2:] != (heads, head_dim):
        keys = scratch.keys = torch.zeros((2, rows, heads, head_dim), dtype=FP8_DTYPE, device=device)
    return keys


def key_buffer(shape: tuple[int, int, int], device: torch.device | str) -> torch.Tensor:
    """An e4m3 buffer for K or V of ``shape`` [S_total, H, D] with KEY_TILE - 1 zero rows after it: written in its
    first S_total rows and given whole to `cudnn_fp8_attention`, it lets every key window read in place."""
    rows, heads, head_dim = shape
    buffer = torch.empty((rows + KEY_TILE - 1, heads, head_dim), dtype=FP8_DTYPE, device=device)
    buffer[rows:].zero_()
    return buffer


def key_windows(bounds: Sequence[int], rows: int) -> list[KeyWindow]:
    """Each non-empty sequence's key window (see the module docstring): its length rounded up to `KEY_TILE`, read in
    place where it ends within the ``rows`` of the packed buffer."""
    windows = []
    for seq, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end > start:
            window = -(-(end - start) // KEY_TILE) * KEY_TILE
            windows.append(KeyWindow(seq, start, end - start, window, start + window <= rows))
    return windows


def _bshd(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows start:end of t [S_total, H, D] as the graphs' [1, H, L, D] view."""
    return t[start:end].unsqueeze(0).transpose(1, 2)


def cudnn_fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scales: Fp8AttentionScales,
    bounds: Sequence[int],
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """FP8 attention over packed sequences on cuDNN (see the module docstring); same arguments and result as
    fp8_attention.fp8_attention_ref. q: [S_total, H, D] e4m3, contiguous (rows of H * D); k, v: the same, or longer
    (`key_buffer`); ``bounds``: the sequence boundaries on the host (cu_seqlens as integers). Keys and values are
    read in `key_windows`, so every row of k and v must be finite, not only the sequences'."""
    check_attention_inputs(q, k, v, scales, len(bounds) - 1)
    if not q.is_cuda:
        raise ValueError(f"cuDNN FP8 attention runs on CUDA tensors, got {q.device}")
    if any(not t.is_contiguous() for t in (q, k, v)):
        raise ValueError("q, k, v must be contiguous [S_total, H, D] buffers")
    bounds = check_seq_bounds(bounds, q.shape[0])
    scale = softmax_scale(scale, q.shape[-1])
    cudnn = _cudnn()
    _, heads, head_dim = q.shape
    device = q.device.index if q.device.index is not None else torch.cuda.current_device()
    out = torch.empty(q.shape, dtype=FP8_DTYPE, device=q.device)
    with _state.lock, torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        handle = _handle(cudnn, device)
        cudnn.set_stream(handle, stream)  # a no-op while the stream stays the same
        for w in key_windows(bounds, k.shape[0]):
            g = _graph(cudnn, device, w.length, w.window, heads, head_dim, scale)
            scratch = _scratch(device, stream, g.workspace_size)
            if w.in_place:
                keys, values, key_row = k, v, w.start
            else:  # the window would run past the buffer: a copy of the sequence's K and V, finite rows after it
                keys, values = _keys_scratch(scratch, w.window, heads, head_dim, device)
                keys[: w.length].copy_(k[w.start : w.start + w.length])
                values[: w.length].copy_(v[w.start : w.start + w.length])
                key_row = 0
            pack = _variant_pack(g, scratch, (q, keys, values, out), scales, w, key_row)
            g.graph.execute(pack, scratch.workspace, handle=handle)
    return out


def _variant_pack(
    g: _Graph, scratch: _Scratch, qkvo: tuple[torch.Tensor, ...], scales: Fp8AttentionScales, w: KeyWindow,
    key_row: int,
) -> dict[Any, torch.Tensor]:
    """Graph g's tensors for window w: rows w.start.. of q and out, w.window rows from ``key_row`` of k and v."""
    q, k, v, out = qkvo
    pack = {
        g.q: _bshd(q, w.start, w.start + w.length), g.o: _bshd(out, w.start, w.start + w.length),
        g.k: _bshd(k, key_row, key_row + w.window), g.v: _bshd(v, key_row, key_row + w.window),
        g.descale_q: scales.q, g.descale_k: scales.k,
        g.descale_v: scales.v[w.seq : w.seq + 1], g.scale_o: scales.o_inv[w.seq : w.seq + 1],
        g.descale_s: scratch.descale_s, g.scale_s: scratch.scale_s, g.amax_o: scratch.amax_o,
    }
    if g.lengths is not None:
        pack[g.seq_len_q] = pack[g.seq_len_kv] = g.lengths
    return pack
