#!/usr/bin/env bash
# Shared by the per-backend launch scripts: run `glmport train` in a container with the folders mounted.
# usage: launch.sh MODEL_DIR DATA_DIR CONFIG OUTPUT_DIR [extra glmport train arguments]
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: $(basename "$0") MODEL_DIR DATA_DIR CONFIG OUTPUT_DIR [extra glmport train arguments]" >&2
    exit 2
fi
model=$(realpath "$1"); data=$(realpath "$2"); config=$(realpath "$3"); output=$(realpath -m "$4"); shift 4
for path in "$model" "$data" "$config"; do
    [ -e "$path" ] || { echo "$path does not exist" >&2; exit 2; }
done
mkdir -p "$output"
exec docker run --rm "${DEVICE_ARGS[@]}" \
    -v "$model":/model:ro -v "$data":/data:ro -v "$config":/config.yaml:ro -v "$output":/output \
    "$IMAGE" train /data /model /config.yaml --backend "$BACKEND" "training_args.output_dir=/output" "$@"
