#!/usr/bin/env bash
# Run TensorBoard in the cluster on a gs:// log root and port-forward it to this machine.
#   scripts/tensorboard.sh gs://BUCKET/runs [IMAGE]       then open http://localhost:6006
# IMAGE (or TRAINER_IMAGE) is the trainer image you pushed: the placeholder is refused (exit 2),
# as scripts/submit.py refuses it. From a laptop with gcloud credentials,
# `python -m trainer.tensorboard --logdir gs://BUCKET/runs` works too (docs/tensorboard.md).
set -euo pipefail
logdir=${1:?usage: scripts/tensorboard.sh gs://BUCKET/PATH [IMAGE]}
image=${2:-${TRAINER_IMAGE:-}}
here=$(cd "$(dirname "$0")/.." && pwd)
# Rendered before kubectl runs: a refused image applies nothing.
manifests=$(PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" python3 - \
    "$here/k8s/tensorboard.yaml" "$logdir" "$image" <<'PY'
import json, string, sys
from trainer import TrainerError
from trainer.kube import PLACEHOLDER_IMAGE, check_image
template, logdir, image = sys.argv[1:]
try:
    usage = "scripts/tensorboard.sh gs://BUCKET/PATH REGISTRY/trainer:TAG"
    check_image(image or PLACEHOLDER_IMAGE, flag="IMAGE", usage=usage)
except TrainerError as error:
    print(f"tensorboard.sh: error: {error}", file=sys.stderr)
    sys.exit(2)
text = open(template).read()
print(string.Template(text).substitute(LOGDIR=json.dumps(logdir), IMAGE=json.dumps(image)))
PY
)
kubectl apply -f - <<<"$manifests"
kubectl rollout status deployment/trainer-tensorboard --timeout=300s
echo "TensorBoard on http://localhost:6006 (Ctrl-C to stop forwarding)"
exec kubectl port-forward service/trainer-tensorboard 6006:6006
