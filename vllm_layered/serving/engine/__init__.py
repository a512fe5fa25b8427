"""The serving engine: step-level batching of decomposition requests, on threads of its own.

- engine.py: ThreadedEngine (submit, abort, the step loop, preprocessing and decoding beside it) and EngineConfig;
- request.py: a request's life (what is submitted, its states, its handle, its output);
- scheduler.py: who runs (fair admission between tenants, which requests take each step);
- streams.py: ordering GPU work that crosses between the engine's threads;
- observer.py: the hooks metrics implement.
"""
