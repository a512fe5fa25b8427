"""One packed transformer forward spread over several processes, one per GPU.

CFG-parallel: the forward's sequences (every request's conditional and unconditional branch) are split
between ``cfg_degree`` groups of ranks. Ulysses sequence-parallel: within a group, each of ``sp_degree``
ranks computes a range of the tokens, exchanging heads for tokens around attention. Rank 0 keeps the
engine, the text encoder, the VAE and the sampler; the other ranks only hold the transformer and follow.
"""

from vllm_layered.model_executor.parallel.config import ParallelConfig
from vllm_layered.model_executor.parallel.executor import CheckpointTransformer, ParallelTransformer

__all__ = ["CheckpointTransformer", "ParallelConfig", "ParallelTransformer"]
