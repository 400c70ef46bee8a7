#!/usr/bin/env bash
# The cpu container: docker/launch.sh --backend cpu [OPTIONS] [COMMAND [ARGS...]] (see docker/launch.sh).
exec "$(dirname "$0")/../launch.sh" --backend cpu "$@"
