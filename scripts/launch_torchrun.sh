#!/usr/bin/env bash
# Train on several nodes under torchrun (c10d rendezvous): run the same command on every node.
#
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0.example:29500 RDZV_ID=qwen3-p2o \
#     scripts/launch_torchrun.sh configs/qwen3-4b-deepscaler-8gpu.yaml --model.model /shared/Qwen3-4B ...
#
# The first argument is the config; the rest are more `fit` arguments, after it. torchrun starts NPROC_PER_NODE
# processes on this node and the rendezvous at RDZV_ENDPOINT (a host:port every node reaches; the nodes agree on
# who is node 0) gives them their ranks; Lightning reads them (TorchElasticEnvironment) and the run gets
# --trainer.num_nodes NNODES --trainer.devices NPROC_PER_NODE.
#
# Every run is launched with --ckpt_path last: the first launch starts the run (Lightning notes there is no
# checkpoint yet), a later launch of the same command resumes it from its last checkpoint, and with
# MAX_RESTARTS > 0 torchrun relaunches every process of the run after a failure, which resume the same way
# (--overwrite is refused: each relaunch would start the run over).
# The run folder, its checkpoints included, must be one folder that every node sees (a shared filesystem): under
# FSDP2 each rank writes its own shard of a checkpoint into it and reads them all on resume. Metrics, P²O
# searches, the exported policy and the summary are written by global rank 0 only.
#
# Environment: NNODES, NPROC_PER_NODE (processes = GPUs per node), RDZV_ENDPOINT (host:port), RDZV_ID (one id per
# run, the same on every node), MAX_RESTARTS (default 0), PYTHON (default: python).
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: NNODES=N NPROC_PER_NODE=P RDZV_ENDPOINT=host:port RDZV_ID=id $0 CONFIG [fit arguments]" >&2
  exit 2
fi
config=$1
shift
for arg in "$@"; do
  if [[ "$arg" == --overwrite* ]]; then
    echo "$0: no --overwrite here: a restart runs this same command again and would start the run over" \
      "each time. Remove the old run folder first, or give the run another one (--trainer.logger.init_args.name)." >&2
    exit 2
  fi
done
: "${NNODES:?set NNODES, the number of nodes}"
: "${NPROC_PER_NODE:?set NPROC_PER_NODE, the processes (GPUs) per node}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT, host:port of the rendezvous that every node reaches}"
: "${RDZV_ID:?set RDZV_ID, an id of this run, the same on every node}"

exec "${PYTHON:-python}" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --max-restarts "${MAX_RESTARTS:-0}" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" \
  -m p2o_lightning fit --config "$config" \
  --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE" --ckpt_path last "$@"
