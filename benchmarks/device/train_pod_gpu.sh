#!/usr/bin/env bash
# The Kubernetes training pod's command line (deploy/k8s/overlays/train-gpu/job.yaml) on a GPU
# machine without Kubernetes: pod 0 of a one-node Job, one rank per GPU under NCCL. The
# container's command, args and env are read from the manifest and `$(VAR)` is expanded as the
# kubelet does; what the cluster would set is set here: JOB_COMPLETION_INDEX=0, NNODES=1,
# GPUS_PER_NODE=<GPUs>, the volume /data -> a local folder, the rendezvous endpoint (pod 0's
# DNS name) -> 127.0.0.1. Writes the scale summary (cells_per_s, world_size) to
# $OUT/train_pod_gpu.json. tests/test_k8s.py runs the same line as two CPU pods (gloo).
#
#   OUT=/tmp/out bash benchmarks/device/train_pod_gpu.sh [CELLS] [PEAKS] [-- scale options]
#
# Python packages the machine lacks travel as wheels in .whl/ (as for scale_sbatch_gpu.sh);
# scatac_dist itself is imported from this checkout. On CPU: NGPU=1 SCATAC_DIST_DEVICE=cpu.
set -euo pipefail
OUT=${OUT:?set OUT}
CELLS=${1:-100000}
PEAKS=${2:-100000}
shift $(( $# > 2 ? 2 : $# )); [ "${1:-}" = "--" ] && shift
if [ -d .whl ] && [ -z "${NO_WHL:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
NGPU=${NGPU:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
SHIM=/tmp/pod-shim
mkdir -p "$SHIM" /tmp/pod-data
printf '#!/usr/bin/env bash\nexec python3 -m scatac_dist.cli "$@"\n' >"$SHIM/scatac-dist"
chmod +x "$SHIM/scatac-dist"
export PATH=$SHIM:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.csv" 2>/dev/null || printf "name\nnone\n" >"$OUT/gpu.csv"
t0=$(date +%s.%N)
python3 -m scatac_dist.cli --workers 8 --no-progress synth -o /tmp/pod-data/atlas.zarr --cells "$CELLS" \
    --peaks "$PEAKS" --clusters 10 --overwrite >"$OUT/synth.log" 2>&1
t1=$(date +%s.%N)
python3 - "$OUT" "$NGPU" "$t0" "$t1" "$@" <<'PY'
import json, os, re, subprocess, sys, time
import yaml

out, ngpu, t0, t1, *extra = sys.argv[1:]
job = yaml.safe_load(open("deploy/k8s/overlays/train-gpu/job.yaml"))
c = job["spec"]["template"]["spec"]["containers"][0]
env = {"JOB_COMPLETION_INDEX": "0"}
for e in c["env"]:
    if "value" in e:
        env[e["name"]] = e["value"]
env |= {"NNODES": "1", "GPUS_PER_NODE": ngpu, "SCATAC_DIST_STORE": "/tmp/pod-data/atlas.zarr"}
env["SCATAC_DIST_DEVICE"] = os.environ.get("SCATAC_DIST_DEVICE", env["SCATAC_DIST_DEVICE"])
env.pop("NCCL_SOCKET_IFNAME")  # the pod network's interface; here NCCL picks the machine's
expand = lambda s: re.sub(r"\$\(([A-Za-z_]\w*)\)", lambda m: env.get(m.group(1), m.group(0)), s)
endpoint = f"{job['metadata']['name']}-0.{job['spec']['template']['spec']['subdomain']}:29400"
argv = [expand(a).replace(endpoint, "127.0.0.1:29400") for a in c["command"] + c["args"]] + extra
print("pod 0:", " ".join(argv), file=sys.stderr)
start = time.time()
done = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True)
open(f"{out}/train_pod.log", "w").write(done.stderr)
open(f"{out}/train_pod.out", "w").write(done.stdout)
if done.returncode:
    sys.exit(f"the pod's command failed ({done.returncode}); see {out}/train_pod.log")
summary = json.loads(done.stdout[done.stdout.index("{"):])
res = {"argv": argv, "gpus": int(ngpu), "gpu": open(f"{out}/gpu.csv").read().splitlines()[1],
       "synth_s": float(t1) - float(t0), "pod_s": time.time() - start,
       "world_size": summary.get("world_size"), "cells_per_s": summary.get("cells_per_s"), "scale": summary}
json.dump(res, open(f"{out}/train_pod_gpu.json", "w"), indent=1)
print(json.dumps({k: res[k] for k in ("gpus", "gpu", "world_size", "cells_per_s", "pod_s")}))
PY
