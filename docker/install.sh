#!/usr/bin/env bash
# Install glmport into an image that already has its device's torch, then run `glmport env` as the image's
# smoke check. Run by every Dockerfile in docker/ from the copied source tree (the working directory).
#
# usage: docker/install.sh EXTRAS          e.g. docker/install.sh all,deepspeed
# PYTHON (default python3) is the interpreter that has torch; BUILD_ENV_FILE (default
# /etc/glmport/build-env.json) receives `glmport env --json`.
#
# pip must never replace the image's torch (a CUDA build, or the torch that Cambricon's torch_mlu was built
# against): the installed version becomes a constraint, so a glmport that needed another torch fails here,
# naming both versions, instead of pip silently downloading a CPU build over it.
set -euo pipefail

extras=${1:?usage: docker/install.sh EXTRAS (e.g. all,deepspeed)}
python=${PYTHON:-python3}
build_env_file=${BUILD_ENV_FILE:-/etc/glmport/build-env.json}

if ! torch_version=$("$python" -c 'import torch; print(torch.__version__)'); then
    echo "install.sh: $python cannot import torch: the base image must provide the device's torch" >&2
    exit 1
fi
echo "install.sh: keeping the image's torch $torch_version"

case ",$extras," in
    *,deepspeed,*)
        # Cambricon's DeepSpeed fork installs the import package `deepspeed` under the distribution name
        # deepspeed-mlu (or deepspeed_mlu): installing upstream DeepSpeed on top would overwrite it.
        if vendor=$("$python" -c 'import importlib.metadata as m
for name in ("deepspeed-mlu", "deepspeed_mlu"):
    try:
        print(name, m.version(name)); break
    except m.PackageNotFoundError:
        pass
else:
    raise SystemExit(1)'); then
            echo "install.sh: the base image has the vendor DeepSpeed ($vendor); build without the deepspeed" \
                 "extra (--build-arg EXTRAS=all) to keep it, or remove it from the image to use upstream DeepSpeed" >&2
            exit 1
        fi
        ;;
esac

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" >"$constraints"
"$python" -m pip install --no-cache-dir --constraint "$constraints" ".[$extras]"

if ! command -v glmport >/dev/null; then
    echo "install.sh: glmport was installed for $python but is not on PATH: put that environment's bin folder" \
         "on PATH in the Dockerfile (ENV PATH=...)" >&2
    exit 1
fi
# The smoke check: glmport imports, finds its plugins and backends, and reports what a run would use (no
# device is needed: at build time there is none). The JSON stays in the image for bug reports:
# docker run --rm --entrypoint cat IMAGE /etc/glmport/build-env.json
glmport env
mkdir -p "$(dirname "$build_env_file")"
glmport env --json >"$build_env_file"
