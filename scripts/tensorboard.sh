#!/usr/bin/env bash
# Run TensorBoard in the cluster on a gs:// log root and port-forward it to this machine.
#   scripts/tensorboard.sh gs://BUCKET/runs [IMAGE]       then open http://localhost:6006
# (From a laptop with gcloud credentials: `python -m trainer.tensorboard --logdir gs://BUCKET/runs`.)
set -euo pipefail
logdir=${1:?usage: scripts/tensorboard.sh gs://BUCKET/PATH [IMAGE]}
image=${2:-${TRAINER_IMAGE:-ghcr.io/example/trainer:0.1.0}}
here=$(cd "$(dirname "$0")/.." && pwd)
python3 - "$here/k8s/tensorboard.yaml" "$logdir" "$image" <<'PY' | kubectl apply -f -
import json, string, sys
template, logdir, image = sys.argv[1:]
text = open(template).read()
print(string.Template(text).substitute(LOGDIR=json.dumps(logdir), IMAGE=json.dumps(image)))
PY
kubectl rollout status deployment/trainer-tensorboard --timeout=300s
echo "TensorBoard on http://localhost:6006 (Ctrl-C to stop forwarding)"
exec kubectl port-forward service/trainer-tensorboard 6006:6006
