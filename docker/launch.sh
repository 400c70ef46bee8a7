#!/usr/bin/env bash
# Run glmport in the container of a backend: the devices passed in, the folders mounted, shared memory
# sized for several processes; a glmport command, or an interactive shell.
#
# usage: docker/launch.sh --backend cuda|mlu|cpu [OPTIONS] [COMMAND [ARGS...]]
#
# COMMAND and ARGS are a glmport command line (train, infer, env, data, ...) run in the container; without
# a COMMAND you get a shell there. Options (before COMMAND):
#   --image IMAGE        the image (default glmport:BACKEND, as docker/README.md builds it)
#   --model DIR          mounted read-only at /model
#   --data DIR           mounted read-only at /data
#   --output DIR         mounted at /output (created if missing); `train` writes its run there
#                        (training_args.output_dir=/output, unless the arguments set it)
#   --config FILE        mounted read-only at /config/NAME. `train` with --config, --data and --model and no
#                        positional argument of its own runs `train /data /model /config/NAME`
#   --devices LIST       devices the container gets, e.g. 0,1 (cuda: GPU indices or UUIDs; mlu: card numbers,
#                        /dev/cambricon_devN); default all. The container sees only those
#   --nproc-per-node N   passed to `glmport train`: N processes, one per device
#   --shm-size SIZE      /dev/shm of the container (default 16g; Docker's 64m is too small for data-loader
#                        workers and the collectives' shared memory)
#   --name NAME          container name
#   -e, --env KEY=VALUE  environment variable in the container (repeatable)
#   --dry-run            print the docker command instead of running it
#
# A train command with --nnodes among its ARGS runs with the host's network, so that the nodes reach each
# other. GLMPORT_DEV_DIR (default /dev) is where the MLU device nodes are looked up.
set -euo pipefail

die() {
    echo "launch.sh: $*" >&2
    exit 2
}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

backend="" image="" model="" data="" output="" config="" devices="" nproc="" shm_size="16g" name=""
dry_run=false
envs=()
while [ $# -gt 0 ]; do
    case "$1" in
        --backend|--image|--model|--data|--output|--config|--devices|--nproc-per-node|--shm-size|--name|-e|--env)
            [ $# -ge 2 ] || die "$1 needs a value"
            case "$1" in
                --backend) backend=$2 ;;
                --image) image=$2 ;;
                --model) model=$2 ;;
                --data) data=$2 ;;
                --output) output=$2 ;;
                --config) config=$2 ;;
                --devices) devices=$2 ;;
                --nproc-per-node) nproc=$2 ;;
                --shm-size) shm_size=$2 ;;
                --name) name=$2 ;;
                -e|--env) envs+=("$2") ;;
            esac
            shift 2
            ;;
        --dry-run) dry_run=true; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (options go before the glmport command; see --help)" ;;
        *) break ;;
    esac
done
command=("$@")

case "$backend" in
    cuda|mlu|cpu) ;;
    "") die "--backend is required: cuda, mlu or cpu" ;;
    *) die "--backend $backend: expected cuda, mlu or cpu" ;;
esac
image=${image:-glmport:$backend}
if [ -n "$nproc" ]; then
    [[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node $nproc: expected a whole number, 1 or more"
    [ "${command[0]:-}" = train ] || die "--nproc-per-node goes with the train command"
fi
for variable in ${envs[@]+"${envs[@]}"}; do
    [[ "$variable" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env $variable: expected KEY=VALUE"
done

# Folders are bind-mounted with --mount, which takes any path but one with a comma.
absolute() {  # absolute path of an existing file or folder
    local path=$1 flag=$2
    [ -e "$path" ] || die "$flag $path: no such file or folder"
    case "$path" in *,*) die "$flag $path: docker cannot mount a path with a comma" ;; esac
    if [ -d "$path" ]; then (cd "$path" && pwd); else echo "$(cd "$(dirname "$path")" && pwd)/$(basename "$path")"; fi
}
mounts=()
if [ -n "$model" ]; then mounts+=(--mount "type=bind,source=$(absolute "$model" --model),target=/model,readonly"); fi
if [ -n "$data" ]; then mounts+=(--mount "type=bind,source=$(absolute "$data" --data),target=/data,readonly"); fi
if [ -n "$config" ]; then
    [ -f "$config" ] || die "--config $config: not a file"
    config_name=$(basename "$config")
    mounts+=(--mount "type=bind,source=$(absolute "$config" --config),target=/config/$config_name,readonly")
fi
if [ -n "$output" ]; then
    [ -e "$output" ] || $dry_run || mkdir -p "$output"
    if [ -e "$output" ]; then output=$(absolute "$output" --output); else output="$(cd "$(dirname "$output")" && pwd)/$(basename "$output")"; fi
    mounts+=(--mount "type=bind,source=$output,target=/output")
fi

# The devices. NVIDIA's runtime exposes the chosen GPUs (and renumbers them from 0); Cambricon's are
# device nodes: the control node, and per card its device node plus, where the driver creates them, the
# inter-process (cambricon_ipcmN) and communication (commuN) nodes its collectives use.
device_args=()
case "$backend" in
    cuda)
        if [ -n "$devices" ]; then device_args=(--gpus "\"device=$devices\""); else device_args=(--gpus all); fi
        ;;
    mlu)
        dev_dir=${GLMPORT_DEV_DIR:-/dev}
        node() {  # --device for one node, under the same name in the container
            if [ "$dev_dir" = /dev ]; then device_args+=(--device "/dev/$1"); else device_args+=(--device "$dev_dir/$1:/dev/$1"); fi
        }
        [ -e "$dev_dir/cambricon_ctl" ] || die "no $dev_dir/cambricon_ctl: is the Cambricon driver loaded on this host? (cnmon lists the cards)"
        cards=()
        for path in "$dev_dir"/cambricon_dev[0-9]*; do
            [ -e "$path" ] && cards+=("${path##*/cambricon_dev}")
        done
        [ ${#cards[@]} -gt 0 ] || die "no $dev_dir/cambricon_dev* on this host: is the Cambricon driver loaded? (cnmon lists the cards)"
        chosen=("${cards[@]}")
        if [ -n "$devices" ]; then
            IFS=, read -r -a chosen <<<"$devices"
            for card in "${chosen[@]}"; do
                [[ "$card" =~ ^[0-9]+$ ]] || die "--devices $devices: expected card numbers such as 0,1"
                [ -e "$dev_dir/cambricon_dev$card" ] || die "--devices: no $dev_dir/cambricon_dev$card; cards here: ${cards[*]}"
            done
        fi
        node cambricon_ctl
        for card in "${chosen[@]}"; do
            node "cambricon_dev$card"
            if [ -e "$dev_dir/cambricon_ipcm$card" ]; then node "cambricon_ipcm$card"; fi
            if [ -e "$dev_dir/commu$card" ]; then node "commu$card"; fi
        done
        if [ -x /usr/bin/cnmon ]; then device_args+=(--mount "type=bind,source=/usr/bin/cnmon,target=/usr/bin/cnmon,readonly"); fi
        ;;
    cpu)
        [ -z "$devices" ] || die "--devices: the cpu backend has no devices to choose"
        ;;
esac

# The glmport command line, with the mounted folders filled in for `train`.
if [ "${command[0]:-}" = train ]; then
    rest=("${command[@]:1}")
    positional=0
    for word in ${rest[@]+"${rest[@]}"}; do
        case "$word" in -*|*=*) ;; *) positional=$((positional + 1)) ;; esac
    done
    if [ -n "$config" ] && [ -n "$data" ] && [ -n "$model" ] && [ "$positional" -eq 0 ]; then
        rest=(/data /model "/config/$config_name" ${rest[@]+"${rest[@]}"})
    fi
    if [ -n "$output" ]; then
        case " ${rest[*]-} " in
            *" training_args.output_dir="*) ;;  # the user's own choice stands
            *) rest+=(training_args.output_dir=/output) ;;
        esac
    fi
    if [ -n "$nproc" ]; then rest+=(--nproc-per-node "$nproc"); fi
    command=(train ${rest[@]+"${rest[@]}"})
fi

docker=(docker run --rm --shm-size "$shm_size")
if [ -t 0 ] && [ -t 1 ]; then docker+=(-it); elif [ ${#command[@]} -eq 0 ]; then docker+=(-i); fi
if [ -n "$name" ]; then docker+=(--name "$name"); fi
for word in ${command[@]+"${command[@]}"}; do
    if [ "$word" = --nnodes ]; then docker+=(--network host); break; fi
done
docker+=(${device_args[@]+"${device_args[@]}"} ${mounts[@]+"${mounts[@]}"})
for variable in ${envs[@]+"${envs[@]}"}; do docker+=(-e "$variable"); done
if [ ${#command[@]} -eq 0 ]; then
    docker+=(--entrypoint bash "$image")
else
    docker+=("$image" "${command[@]}")
fi

if $dry_run; then
    # One line a shell runs as it is: words quoted only where they need it.
    line=""
    for word in "${docker[@]}"; do
        if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then line+=" $word"; else line+=" '${word//\'/\'\\\'\'}'"; fi
    done
    echo "${line# }"
    exit 0
fi
command -v docker >/dev/null || die "docker is not installed here (--dry-run prints the command)"
exec "${docker[@]}"
