"""Thin clients of the layered-image server: they need only openai, httpx and pillow (no torch)."""

from vllm_layered.clients.client import AsyncLayeredClient, LayeredAPIError, LayeredClient, Progress
from vllm_layered.clients.layers import Layers

__all__ = ["AsyncLayeredClient", "LayeredAPIError", "LayeredClient", "Layers", "Progress"]
