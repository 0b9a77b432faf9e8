#!/usr/bin/env bash
# scMVP on a GPU machine: a generated multiome atlas (CELLS cells, GENES genes + PEAKS peaks),
# then one training epoch under torchrun, one rank per GPU (NCCL, bf16 autocast), and the outputs
# (--max-steps caps the steps when given). Writes the scmvp summary (cells_per_s, world_size,
# seconds) and the GPU's name to $OUT/scmvp_gpu.json.
#
#   OUT=/tmp/out bash benchmarks/device/scmvp_gpu.sh [CELLS] [PEAKS] [GENES] [-- scmvp options]
#
# Python packages the machine lacks travel as wheels in .whl/ (as for scale_sbatch_gpu.sh);
# scatac_dist itself is imported from this checkout. On CPU: NGPU=2 DEVICE=cpu (gloo).
set -euo pipefail
OUT=${OUT:?set OUT}
CELLS=${1:-100000}
PEAKS=${2:-25000}
GENES=${3:-2000}
shift $(( $# > 3 ? 3 : $# )); [ "${1:-}" = "--" ] && shift
if [ -d .whl ] && [ -z "${NO_WHL:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
NGPU=${NGPU:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
DEVICE=${DEVICE:-cuda}
STORE=${STORE:-/tmp/scmvp-gpu/atlas.zarr}
mkdir -p "$(dirname "$STORE")"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.csv" 2>/dev/null || printf "name\nnone\n" >"$OUT/gpu.csv"
t0=$(date +%s.%N)
python3 -m scatac_dist.cli --workers "$(( $(nproc) > 8 ? 8 : $(nproc) ))" --no-progress synth -o "$STORE" \
    --cells "$CELLS" --peaks "$PEAKS" --genes "$GENES" --clusters 10 --overwrite >"$OUT/synth.log" 2>&1
t1=$(date +%s.%N)
torchrun --standalone --nproc-per-node "$NGPU" -m scatac_dist.cli --no-progress scmvp "$STORE" \
    --device "$DEVICE" --n-clusters 10 --max-epochs 1 "$@" >"$OUT/scmvp.out" 2>"$OUT/scmvp.log"
t2=$(date +%s.%N)
python3 - "$OUT" "$NGPU" "$CELLS" "$PEAKS" "$GENES" "$t0" "$t1" "$t2" <<'PY'
import json, sys
out, ngpu, cells, peaks, genes, t0, t1, t2 = sys.argv[1:]
text = open(f"{out}/scmvp.out").read()
summary, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
res = {"gpus": int(ngpu), "gpu": open(f"{out}/gpu.csv").read().splitlines()[1], "cells": int(cells),
       "peaks": int(peaks), "genes": int(genes), "synth_s": float(t1) - float(t0),
       "scmvp_s": float(t2) - float(t1), **summary}
json.dump(res, open(f"{out}/scmvp_gpu.json", "w"), indent=1)
print(json.dumps(res))
PY
