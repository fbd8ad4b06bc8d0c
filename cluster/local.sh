#!/usr/bin/env bash
# A multi-node Ray cluster on this machine: one head plus N worker nodes (separate raylets, as on
# real machines), with Ray token authentication on and the dashboard on 127.0.0.1 only.
#
#   cluster/local.sh up [--workers N]     # prints the `ray job submit` line to use
#   cluster/local.sh status
#   cluster/local.sh down                 # stops this cluster's processes only
#
# Settings (environment): DLRAY_NODE_CPUS (2 per node), DLRAY_RAY_PORT (6379), DLRAY_DASHBOARD_PORT
# (8265), DLRAY_CLIENT_PORT (10001), DLRAY_PORT_BASE (20000; node i uses BASE+100*i .. +99),
# DLRAY_RAY_TEMP_DIR (/tmp/dlray-ray), DLRAY_OBJECT_STORE_BYTES (500 MB per node).
#
# Ray 2.60's `ray start` swaps a loopback --node-ip-address for the machine's address and its gRPC
# servers (GCS, raylets) listen on every interface, so token auth, not the bind address, is what
# keeps other hosts out; only the dashboard (job submission) and the Ray Client server stay on
# 127.0.0.1.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${DLRAY_RAY_PORT:-6379}"
DASHBOARD_PORT="${DLRAY_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${DLRAY_CLIENT_PORT:-10001}"
PORT_BASE="${DLRAY_PORT_BASE:-20000}"
CPUS="${DLRAY_NODE_CPUS:-2}"
# Every node shares this machine's /dev/shm; Ray's default (30% of memory) per node would overcommit it.
OBJECT_STORE="${DLRAY_OBJECT_STORE_BYTES:-500000000}"
# Not Ray's default /tmp/ray: `down` finds this cluster's processes by it, so another Ray on the
# machine (a test session's ray.init, say) is left alone, and neither finds the other's address file.
TEMP_DIR="${DLRAY_RAY_TEMP_DIR:-/tmp/dlray-ray}"
ADDRESS="127.0.0.1:$PORT"
DASHBOARD="http://127.0.0.1:$DASHBOARD_PORT"

usage() {
    sed -n '2,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

find_ray() {
    SHELL_RAY="$(command -v ray || true)"  # what the user's shell runs, for the printed command
    RAY="${RAY_BIN:-$SHELL_RAY}"
    if [[ -z "$RAY" && -x "$REPO/.venv/bin/ray" ]]; then
        RAY="$REPO/.venv/bin/ray"
    fi
    [[ -n "$RAY" ]] || { echo "error: ray not found; activate dlray's virtualenv or set RAY_BIN" >&2; exit 1; }
    # Job entrypoints (`dlray train ...`) run through a shell with the raylet's PATH.
    export PATH="$(dirname "$RAY"):$PATH"
    # Every node and every client must agree; Ray reads the token itself from ~/.ray/auth_token.
    export RAY_AUTH_MODE=token
}

# Processes of this cluster: any whose command line names TEMP_DIR or points at this cluster's GCS
# port (the Ray Client server names only that), plus their descendants (workers retitle themselves
# `ray::...`). The values reach awk through its environment, so that awk's own command line
# matches nothing.
cluster_pids() {
    ps -eo pid=,ppid=,args= | DIR="$TEMP_DIR" GCS_PORT="$PORT" SELF="$$" awk '
        {
            pid = $1; parent[pid] = $2; $1 = $2 = ""
            gcs = "--(gcs[-_])?address=[^ ]*:" ENVIRON["GCS_PORT"] "( |$)"
            if (pid != ENVIRON["SELF"] && (index($0, ENVIRON["DIR"]) || $0 ~ gcs)) mine[pid] = 1
        }
        END {
            do { grew = 0; for (p in parent) if (!(p in mine) && (parent[p] in mine)) { mine[p] = 1; grew = 1 } } while (grew)
            for (p in mine) print p
        }'
}

node_ports() {  # distinct ports per raylet: several share this host
    local base=$((PORT_BASE + 100 * $1))
    echo --node-manager-port $base --object-manager-port $((base + 1)) \
        --dashboard-agent-listen-port $((base + 2)) --dashboard-agent-grpc-port $((base + 3)) \
        --runtime-env-agent-port $((base + 4)) --metrics-export-port $((base + 5)) \
        --min-worker-port $((base + 10)) --max-worker-port $((base + 99))
}

submit_line() {
    local ray_cmd="ray"
    [[ "$SHELL_RAY" == "$RAY" ]] || ray_cmd="$RAY"
    # An absolute storage path: every node here shares this disk, while a relative one would land
    # in the job's temporary copy of --working-dir, which Ray deletes.
    echo "RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$("$RAY" get-auth-token 2>/dev/null) $ray_cmd job submit" \
        "--address $DASHBOARD --working-dir . -- dlray train jobs/debug/cnn_cpu.yaml run.storage_path=$REPO/runs"
}

up() {
    local workers=1
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --workers) workers="${2:?--workers needs a number}"; shift 2 ;;
            --workers=*) workers="${1#*=}"; shift ;;
            *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
        esac
    done
    [[ "$workers" =~ ^[0-9]+$ && "$workers" -le 50 ]] || { echo "error: --workers must be 0..50, got $workers" >&2; exit 2; }
    find_ray
    if [[ -n "$(cluster_pids)" ]]; then
        echo "error: a cluster from $TEMP_DIR is already running; cluster/local.sh down first" >&2
        exit 1
    fi
    local port
    for port in "$PORT" "$DASHBOARD_PORT" "$CLIENT_PORT"; do
        # Ray would move a busy dashboard elsewhere and the printed address would be wrong.
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "error: 127.0.0.1:$port is in use (another Ray?); pick free ports with DLRAY_RAY_PORT, DLRAY_DASHBOARD_PORT, DLRAY_CLIENT_PORT" >&2
            exit 1
        fi
    done

    # Reuses ~/.ray/auth_token (or RAY_AUTH_TOKEN) when there is one, as every ray.init on this machine does.
    "$RAY" get-auth-token --generate >/dev/null
    local token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    [[ -f "$token_file" ]] && chmod 600 "$token_file"

    # Inherited by every Ray process: with several Ray instances on one machine, Ray's address
    # auto-discovery (used inside Ray Train) would otherwise refuse to guess which one is meant.
    export RAY_ADDRESS="$ADDRESS"
    local common=(--temp-dir "$TEMP_DIR" --num-cpus "$CPUS" --object-store-memory "$OBJECT_STORE" --disable-usage-stats)
    # shellcheck disable=SC2046  # node_ports is a list of flags
    "$RAY" start --head --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
        --include-dashboard true --ray-client-server-port "$CLIENT_PORT" "${common[@]}" $(node_ports 0)
    local i
    for ((i = 1; i <= workers; i++)); do
        # shellcheck disable=SC2046
        "$RAY" start --address "$ADDRESS" "${common[@]}" $(node_ports "$i")
    done

    local token_from="$token_file"
    [[ -n "${RAY_AUTH_TOKEN:-}" ]] && token_from="\$RAY_AUTH_TOKEN"
    cat <<EOF

dlray local cluster: head + $workers worker node(s), $CPUS CPUs each, token auth on.
  dashboard  $DASHBOARD   (asks for the token: \`ray get-auth-token\`)
  token      $token_from

Submit a job from the repository root:
  $(submit_line)

Stop it:  cluster/local.sh down
EOF
}

status() {
    find_ray
    local pids
    pids="$(cluster_pids)"
    if [[ -z "$pids" ]]; then
        echo "no dlray local cluster running (temp dir $TEMP_DIR)"
        exit 1
    fi
    echo "$(echo "$pids" | wc -l) processes from $TEMP_DIR; dashboard $DASHBOARD"
    "$RAY" status --address "$ADDRESS"
}

down() {
    local pids left waited=0
    pids="$(cluster_pids)"
    if [[ -z "$pids" ]]; then
        echo "no dlray local cluster running (temp dir $TEMP_DIR)"
        return 0
    fi
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    while left="$(cluster_pids)" && [[ -n "$left" && $waited -lt 30 ]]; do  # up to 15 s to exit cleanly, as `ray stop` allows
        sleep 0.5
        waited=$((waited + 1))
    done
    if [[ -n "$left" ]]; then
        echo "$(echo "$left" | wc -l) processes ignored SIGTERM for 15 s; killing them"
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
    fi
    echo "stopped the dlray local cluster ($(echo "$pids" | wc -l) processes); logs stay in $TEMP_DIR"
}

case "${1:-}" in
    up) shift; up "$@" ;;
    status) status ;;
    down) down ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
