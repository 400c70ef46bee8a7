#!/usr/bin/env bash
# The mlu container: docker/launch.sh --backend mlu [OPTIONS] [COMMAND [ARGS...]] (see docker/launch.sh).
exec "$(dirname "$0")/../launch.sh" --backend mlu "$@"
