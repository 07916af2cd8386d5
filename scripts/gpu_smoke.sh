#!/usr/bin/env bash
# The GPU smoke run: every stage on profiles/gpu-smoke.yaml (YOLOv5s at 640, a few epochs), then the
# CUDA checks (scripts/gpu_checks.py: AMP with the unscaled sparsity penalty, CUDA latency), ONNX
# Runtime's CUDA and TensorRT providers when present, and with 2 or more GPUs the baseline stage
# with train.nproc 1 against 2 (DDP over NCCL, SyncBatchNorm). Untested on a GPU so far.
#
#   bash scripts/gpu_smoke.sh [work dir]     (default $SMOKE_DIR or /tmp/slimloop-gpu-smoke)
#
# Writes everything under the work dir (summary.txt at the end); copies it to $OUT when set.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${1:-${SMOKE_DIR:-/tmp/slimloop-gpu-smoke}}
PY=${PYTHON:-python}
export PYTHONPATH="$REPO/src:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MPLBACKEND=Agg
export SLIMLOOP_CACHE="$WORK/store"
mkdir -p "$WORK"
cd "$WORK"
cp "$REPO/profiles/gpu-smoke.yaml" params.yaml
: > timings.txt

now_ms() { date +%s%3N; }
stage() {  # stage NAME [args...]: python -m flows.NAME on params.yaml, timed
  local name=$1 t0
  shift
  t0=$(now_ms)
  echo "== $name"
  "$PY" -m "flows.$name" --params params.yaml --quiet "$@"
  echo "$name $(( $(now_ms) - t0 )) ms" | tee -a timings.txt
}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.cuda.device_count(), 'GPU(s)')"
stage prepare
stage baseline
stage compress --no-prefect
stage control
stage quantize
stage latency
stage report
echo "== CUDA checks"
"$PY" "$REPO/scripts/gpu_checks.py" --params params.yaml --baseline models/baseline | tee gpu_checks.json

echo "== ONNX Runtime GPU providers"
for rt in onnxruntime-cuda onnxruntime-tensorrt; do
  provider=$("$PY" -c "from slimloop.deploy.runtimes import ORT_PROVIDERS; print(ORT_PROVIDERS['$rt'])")
  if "$PY" -c "import onnxruntime as o, sys; sys.exit('$provider' not in o.get_available_providers())"; then
    stage latency --runtime "$rt" --compare --out "metrics/latency_$rt.json"
  else
    echo "$rt: $provider absent (install onnxruntime-gpu / TensorRT to measure it)" | tee -a timings.txt
  fi
done

gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
  echo "== DDP: baseline stage with train.nproc 1 and 2 (5 epochs each, sync_bn)"
  for n in 1 2; do
    "$PY" - "$n" <<'PYEOF'
import sys, yaml
n = int(sys.argv[1])
raw = yaml.safe_load(open("params.yaml"))
raw["train"].update(nproc=n, sync_bn=True, epochs=5)
open(f"params_ddp{n}.yaml", "w").write(yaml.safe_dump(raw, sort_keys=False))
PYEOF
    t0=$(now_ms)
    "$PY" -m flows.baseline --params "params_ddp$n.yaml" --out "models/ddp$n" --metrics "metrics/ddp$n.json" --quiet
    echo "baseline nproc=$n $(( $(now_ms) - t0 )) ms" | tee -a timings.txt
  done
  "$PY" - <<'PYEOF' | tee -a timings.txt
import json
a, b = (json.load(open(f"metrics/ddp{n}.json")) for n in (1, 2))
print(f"DDP mAP@0.5: 1 process {a['map50']:.3f}, 2 processes {b['map50']:.3f}")
PYEOF
else
  echo "DDP speed-up: not measured ($gpus GPU)" | tee -a timings.txt
fi

{ echo "# gpu smoke $(date -u +%FT%TZ)"; cat timings.txt; echo; cat gpu_checks.json; } > summary.txt
cat summary.txt
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/gpu-smoke"
  cp -r summary.txt timings.txt gpu_checks.json metrics reports "$OUT/gpu-smoke/" 2>/dev/null || true
fi
