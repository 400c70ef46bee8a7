#!/usr/bin/env bash
# The cuda container: docker/launch.sh --backend cuda [OPTIONS] [COMMAND [ARGS...]] (see docker/launch.sh).
exec "$(dirname "$0")/../launch.sh" --backend cuda "$@"
