"""Serving benchmarks (`vllm-layered bench serve|sweep`): a load generator for the images API of our server
and of vLLM-Omni. Needs httpx, numpy, pillow and tqdm (matplotlib for the sweep plot), no torch."""
