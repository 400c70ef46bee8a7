#!/usr/bin/env bash
IMAGE=${IMAGE:-glmport:cpu} BACKEND=cpu
DEVICE_ARGS=()
source "$(dirname "$0")/../launch-common.sh"
