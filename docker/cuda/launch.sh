#!/usr/bin/env bash
# GPUs: all by default; CUDA_VISIBLE_DEVICES=0,1 picks some.
IMAGE=${IMAGE:-glmport:cuda} BACKEND=cuda
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    DEVICE_ARGS=(--gpus "\"device=$CUDA_VISIBLE_DEVICES\"" --ipc=host)
else
    DEVICE_ARGS=(--gpus all --ipc=host)
fi
source "$(dirname "$0")/../launch-common.sh"
