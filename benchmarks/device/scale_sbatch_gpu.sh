#!/usr/bin/env bash
# deploy/slurm/scale.sbatch's command line on a GPU machine without SLURM: `srun` and `scontrol`
# are replaced by shims that start one rank per GPU with SLURM's variables (SLURM_PROCID,
# SLURM_NTASKS, SLURM_LOCALID) set, so the recipe itself runs unchanged. Then the same job again
# with a larger step budget, as a requeued job would, to show it continues from its checkpoint;
# then the GPU tests (tests/test_scale_gpu.py). Writes logs and a JSON summary under OUT.
#
#   OUT=/tmp/out bash benchmarks/device/scale_sbatch_gpu.sh [CELLS] [PEAKS]
#
# Python packages the machine lacks travel as wheels in .whl/ (see benchmarks/README or the
# device notes); scatac_dist itself is imported from this checkout.
set -euo pipefail
OUT=${OUT:?set OUT}
CELLS=${1:-100000}
PEAKS=${2:-100000}
if [ -d .whl ] && [ -z "${NO_WHL:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
NGPU=${NGPU:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
SHIM=/tmp/slurm-shim
mkdir -p "$SHIM"
cat >"$SHIM/srun" <<'SH'
#!/usr/bin/env bash
# srun shim: drop srun's own options, start SLURM_NTASKS copies of the command, one per GPU
while [[ "${1:-}" == --* ]]; do shift; done
pids=()
for ((r = 0; r < SLURM_NTASKS; r++)); do
    SLURM_PROCID=$r SLURM_LOCALID=$r CUDA_VISIBLE_DEVICES=$r "$@" &
    pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
SH
printf '#!/usr/bin/env bash\necho localhost\n' >"$SHIM/scontrol"
printf '#!/usr/bin/env bash\nexec python3 -m scatac_dist.cli "$@"\n' >"$SHIM/scatac-dist"
chmod +x "$SHIM"/*
export PATH=$SHIM:$PATH SLURM_JOB_ID=4242 SLURM_JOB_NODELIST=localhost SLURM_NTASKS=$NGPU SLURM_CPUS_PER_TASK=8
export SCATAC_DIST_CHECKPOINTS=/tmp/ckpt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.csv" 2>/dev/null || printf "name\nnone\n" >"$OUT/gpu.csv"
t0=$(date +%s.%N)
python3 -m scatac_dist.cli --workers 8 --no-progress synth -o /tmp/atlas.zarr --cells "$CELLS" --peaks "$PEAKS" \
    --clusters 10 >"$OUT/synth.log" 2>&1
t1=$(date +%s.%N)
bash deploy/slurm/scale.sbatch /tmp/atlas.zarr --n-clusters 10 --max-iter 3000 --checkpoint-every 1000 \
    >"$OUT/scale_first.log" 2>&1
t2=$(date +%s.%N)
# "requeued": the same job with a larger budget continues from its newest checkpoint
bash deploy/slurm/scale.sbatch /tmp/atlas.zarr --n-clusters 10 --max-iter 4000 --checkpoint-every 1000 \
    >"$OUT/scale_requeued.log" 2>&1
t3=$(date +%s.%N)
python3 - "$OUT" "$t0" "$t1" "$t2" "$t3" "$CELLS" "$PEAKS" "$NGPU" <<'PY'
import json, sys
out, t0, t1, t2, t3, cells, peaks, ngpu = sys.argv[1:]
def summary(name):
    text = open(f"{out}/{name}").read()
    return json.loads(text[text.index("{\n"):text.rindex("}") + 1])
res = {"cells": int(cells), "peaks": int(peaks), "gpus": int(ngpu), "gpu": open(f"{out}/gpu.csv").read().splitlines()[1],
       "synth_s": float(t1) - float(t0), "first_job_s": float(t2) - float(t1), "requeued_job_s": float(t3) - float(t2),
       "first": summary("scale_first.log"), "requeued": summary("scale_requeued.log")}
json.dump(res, open(f"{out}/scale_sbatch_gpu.json", "w"), indent=1)
print(json.dumps({k: res[k] for k in ("gpu", "synth_s", "first_job_s", "requeued_job_s")}),
      {k: res["first"].get(k) for k in ("steps", "world_size", "cells_per_s")},
      {k: res["requeued"].get(k) for k in ("steps", "resumed_from", "cells_per_s")})
PY
timeout 240 python3 -m pytest -p no:cacheprovider -m gpu tests/test_scale_gpu.py -q -rA -o addopts="" >"$OUT/pytest_gpu.log" 2>&1 || true
tail -n 5 "$OUT/pytest_gpu.log"
