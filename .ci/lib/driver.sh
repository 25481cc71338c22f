# Shell helpers for the CI scripts that run the driver's debug binary on loopback and script CSI
# calls against it with `rds-csi ctl`. Sourced, never run. The caller sets:
#   ci_name  the script's name, for messages;
#   work     its temporary directory (each driver gets $work/NAME);
#   bin      the rds-csi binary;
#   pids     an array the started processes are appended to (the caller's trap kills them).

# cleanup: the EXIT trap. Stops the started processes, then unmounts and detaches what a failed
# node step left under $work (never deleting through a mount) and removes $work.
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2> /dev/null || true; done
    findmnt -rn -o TARGET | grep "^$work/" | sort -r | xargs -r umount 2> /dev/null || true
    losetup -nl -O NAME,BACK-FILE | awk -v w="$work/" 'index($2, w) == 1 {print $1}' \
        | xargs -r -n1 losetup -d 2> /dev/null || true
    if findmnt -rn -o TARGET | grep -q "^$work/"; then
        echo "$ci_name: mounts left under $work; not removing it" >&2
    else
        rm -rf "$work"
    fi
}

fail() {
    echo "$ci_name: $*" >&2
    exit 1
}

# wait_for FILE PATTERN PID WHAT: waits until FILE has a line matching PATTERN; fails when PID
# exits first or after 60 s.
wait_for() {
    local file=$1 pattern=$2 pid=$3 what=$4
    for _ in $(seq 600); do
        grep -q -- "$pattern" "$file" 2> /dev/null && return 0
        if ! kill -0 "$pid" 2> /dev/null; then
            cat "$file" >&2 || true
            fail "$what exited before logging '$pattern'"
        fi
        sleep 0.1
    done
    cat "$file" >&2 || true
    fail "$what did not log '$pattern' within 60 s"
}

# start_driver NAME ARGS...: starts the driver in $work/NAME (node id node-a, its CSI socket,
# volumes and node state there, metrics and debug listeners on free loopback ports), waits for
# its CSI socket and sets addr to its metrics address.
start_driver() {
    local name=$1 dir="$work/$1"
    shift
    mkdir -p "$dir"
    "$bin" --endpoint "unix://$dir/csi.sock" --file-root "$dir/volumes" \
        --node-state-dir "$dir/node-state" --kubelet-dir "$dir" --node-id node-a \
        --metrics-address 127.0.0.1:0 --debug-address 127.0.0.1:0 "$@" 2> "$dir/log" &
    pids+=($!)
    wait_for "$dir/log" "serving CSI" $! "the $name driver"
    addr=$(grep -o 'serving /metrics.*address=[0-9.:]*' "$dir/log" | sed 's/.*address=//')
    [[ -n $addr ]] || fail "the $name driver logged no metrics address"
}

# ctl NAME ARGS...: a ctl command against driver NAME that must succeed.
ctl() {
    local dir="$work/$1"
    shift
    "$bin" ctl --endpoint "unix://$dir/csi.sock" "$@" > /dev/null || fail "ctl $* failed"
}

# refused NAME CODE TEXT ARGS...: a ctl command that must fail with gRPC code CODE, its message
# containing TEXT.
refused() {
    local dir="$work/$1" code=$2 text=$3 out
    shift 3
    if out=$("$bin" ctl --endpoint "unix://$dir/csi.sock" "$@" 2>&1); then
        fail "ctl $* succeeded; expected $code"
    fi
    [[ $out == *"error: $code: "*"$text"* ]] || fail "ctl $*: expected $code ($text), got: $out"
}

scrape() { curl -fsS "http://$1/metrics"; }
