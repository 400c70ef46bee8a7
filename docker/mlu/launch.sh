#!/usr/bin/env bash
# MLUs: every /dev/cambricon_dev* by default; MLU_VISIBLE_DEVICES=0,1 limits what the job sees.
IMAGE=${IMAGE:-glmport:mlu} BACKEND=mlu
DEVICE_ARGS=(--ipc=host --device /dev/cambricon_ctl)
for dev in /dev/cambricon_dev*; do [ -e "$dev" ] && DEVICE_ARGS+=(--device "$dev"); done
[ -n "${MLU_VISIBLE_DEVICES:-}" ] && DEVICE_ARGS+=(-e "MLU_VISIBLE_DEVICES=$MLU_VISIBLE_DEVICES")
source "$(dirname "$0")/../launch-common.sh"
