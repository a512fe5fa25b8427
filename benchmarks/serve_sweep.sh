#!/usr/bin/env bash
# `vllm-layered serve --load-format dummy` on this machine (the released model's size with seeded random weights;
# other serve flags pass through, e.g. --quantization fp8, or --model DIR --load-format safetensors for a real
# checkpoint) and `vllm-layered bench sweep` beside it on loopback; results, plot and both logs go to OUTDIR.
#   SWEEP_ARGS="--rates 0.05,0.1,inf --num-requests 6 --steps 10" bash benchmarks/serve_sweep.sh OUTDIR [--model DIR]
set -u
out=$1; shift
python3 -m vllm_layered.cli serve --port 8011 --load-format dummy --served-model-name Qwen/Qwen-Image-Layered \
  --log-level warning "$@" > $out/server.log 2>&1 & spid=$!
python3 - <<'PY'
import time, httpx
for _ in range(300):
    try:
        if httpx.get("http://127.0.0.1:8011/health", timeout=2).status_code == 200: break
    except Exception: pass
    time.sleep(1)
PY
python3 -m vllm_layered.cli bench sweep --base-url http://127.0.0.1:8011 $SWEEP_ARGS --plot $out/sweep.png --result-json $out/sweep.json --disable-tqdm > $out/sweep.log 2>&1
kill $spid; wait $spid; tail -n 25 $out/sweep.log
