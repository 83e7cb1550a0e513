#!/usr/bin/env bash
# vm-tcp2-suite.sh - NVMe/TCP between two guests (tests/vm_tcp2.rs): host images, and
# the two guest boots that run the suite.
#
#   scripts/vm-tcp2-suite.sh prepare DIR          create the images in DIR
#   scripts/vm-tcp2-suite.sh run DIR [VMOPTS...]  boot both guests on them (VMOPTS go to both)
#
# The guests' virtio-net NICs are joined by a QEMU socket network on the host's loopback
# (scripts/vm.sh --net): the target's QEMU listens on 127.0.0.1:PORT, the nvcopy guest's
# QEMU connects to it. PORT is a free one picked at random (NVCOPY_TCP2_NET_PORT sets it).
#
#   guest   address       slot  device      image        size    notes
#   target  10.77.0.1/24  10.0  NVMe        target.img   64 MiB  sparse: on the kernel nvme driver,
#                                                                exported by nvmet-tcp on 10.77.0.1:4420
#                                                                (scripts/nvmet-setup.sh); the source at 0
#   nvcopy  10.77.0.2/24  10.0  NVMe, vfio  source.img   32 MiB  random: the source
#                         11.0  NVMe, vfio  back.img     32 MiB  sparse: the copy back from the target
#
# The target guest runs `/tests/nvcopy-vm_tcp2 --ignored target_` (export, then wait for
# "done" on 10.77.0.1:5555); once its QEMU listens, the nvcopy guest runs `--ignored guest_`
# (wait for the export, copy to it with --verify, copy back, send "done"). Each guest's
# console goes to stdout with a "target| " or "nvcopy| " prefix. Both QEMUs run under
# vm.sh's timeout (--timeout in VMOPTS, default 600 s); when one guest fails, the other is
# killed, and when one ends well the other gets NVCOPY_TCP2_GRACE seconds (120) to end too.
# The exit status is that of the guest that failed first (the other was then killed), so 0
# only if both passed. The workspace is built once, before the boots (unless NVCOPY_VM_NO_BUILD=1).
set -u

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { printf 'vm-tcp2-suite: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'vm-tcp2-suite: %s\n' "$*" >&2; }

usage() {
    sed -n '5,6p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

prepare() {
    local dir=$1
    mkdir -p "$dir" || die "cannot create $dir"
    rm -f "$dir"/*.img
    head -c 32M /dev/urandom >"$dir/source.img" || die "cannot write $dir/source.img"
    truncate -s 32M "$dir/back.img" || die "cannot create $dir/back.img"
    truncate -s 64M "$dir/target.img" || die "cannot create $dir/target.img"
    echo "vm-tcp2-suite: images ready in $dir"
}

# True if something listens on 127.0.0.1:$1 or 0.0.0.0:$1 (from /proc/net/tcp, so that
# no probe connection is made: QEMU would take it for the other guest).
listening() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p=":$hex" '$4 == "0A" && ($2 == "0100007F" p || $2 == "00000000" p) { f = 1 } END { exit !f }' /proc/net/tcp
}

# A TCP port in 20000..59999 that nothing listens on.
free_port() {
    local p i
    for ((i = 0; i < 50; i++)); do
        p=$((20000 + RANDOM % 40000))
        listening "$p" || { echo "$p"; return 0; }
    done
    return 1
}

# Whether process $1 is still running (not yet reaped by wait).
alive() { kill -0 "$1" 2>/dev/null; }

# Ends guest $2 (a setsid'd vm.sh, so its pid is its process group: vm.sh, timeout, QEMU).
stop() {
    local pid=$1 name=$2
    alive "$pid" || return 0
    say "stopping the $name guest"
    kill -TERM -- "-$pid" 2>/dev/null
    local i
    for ((i = 0; i < 20; i++)); do
        alive "$pid" || return 0
        sleep 0.5
    done
    kill -KILL -- "-$pid" 2>/dev/null
}

GUESTS=()
stop_all() {
    local g
    for g in "${GUESTS[@]}"; do stop "${g%%:*}" "${g#*:}"; done
}

run() {
    local dir=$1 img
    shift
    for img in source back target; do
        [[ -f $dir/$img.img ]] || die "$dir/$img.img is missing: run '$0 prepare $dir' first"
    done
    dir=$(realpath "$dir")
    local port=${NVCOPY_TCP2_NET_PORT:-}
    if [[ -z $port ]]; then
        port=$(free_port) || die "no free TCP port found on the host's loopback"
    fi
    [[ $port =~ ^[1-9][0-9]{0,4}$ ]] || die "NVCOPY_TCP2_NET_PORT=$port is not a port"
    local grace=${NVCOPY_TCP2_GRACE:-120} wait_secs=${NVCOPY_TCP2_WAIT_SECS:-480}

    # One build for both guests, before either boots: the nvcopy guest must not wait for a
    # build in the target's vm.sh. vm.sh defines functions only when sourced.
    local arg
    for arg in "$@"; do [[ $arg == --no-build ]] && export NVCOPY_VM_NO_BUILD=1; done
    if [[ -z ${NVCOPY_VM_NO_BUILD:-} ]]; then
        (
            set -uo pipefail
            # shellcheck source=scripts/vm.sh
            source "$SCRIPT_DIR/vm.sh" && vm_prepare
        ) || die "preparing the host and building failed"
        export NVCOPY_VM_NO_BUILD=1
    fi

    local t0=$SECONDS tpid hpid trc='' hrc='' tout hout tsed hsed
    # Killed itself (test.sh's timeout, Ctrl-C): take the guests down too; they are in
    # sessions of their own, so no signal to this script reaches them.
    GUESTS=()
    trap 'stop_all; exit 143' TERM
    trap 'stop_all; exit 130' INT
    say "socket network on 127.0.0.1:$port; starting the target guest"
    # Each guest's console and vm.sh messages through a prefixing sed, waited for at the end.
    exec {tout}> >(sed -u 's/^/target| /')
    tsed=$!
    setsid bash "$SCRIPT_DIR/vm.sh" run "$@" --no-bind --smp 1 --hugemem 0 \
        --net "socket-listen=$port,ip=10.77.0.1/24" \
        --nvme "file=$dir/target.img" \
        --kmod nvmet --kmod nvmet-tcp --kmod crc32c_generic \
        --add "$SCRIPT_DIR/nvmet-setup.sh:/bin/nvmet-setup.sh" \
        --env "NVCOPY_TCP2_WAIT_SECS=$wait_secs" \
        -- /tests/nvcopy-vm_tcp2 --ignored target_ --test-threads=1 --nocapture \
        </dev/null >&"$tout" 2>&1 &
    tpid=$!
    GUESTS+=("$tpid:target")
    exec {tout}>&-

    # The nvcopy guest's QEMU connects at start, so the target's must listen first.
    local i
    for ((i = 0; i < 240; i++)); do
        listening "$port" && break
        alive "$tpid" || break
        sleep 0.5
    done
    if ! listening "$port"; then
        stop "$tpid" target
        wait "$tpid"
        trc=$?
        wait "$tsed"
        die "the target guest's QEMU did not listen on 127.0.0.1:$port (target exit $trc)"
    fi
    say "target's QEMU listens after $((SECONDS - t0)) s; starting the nvcopy guest"
    exec {hout}> >(sed -u 's/^/nvcopy| /')
    hsed=$!
    setsid bash "$SCRIPT_DIR/vm.sh" run "$@" \
        --net "socket-connect=$port,ip=10.77.0.2/24" \
        --nvme "file=$dir/source.img" --nvme "file=$dir/back.img" \
        --env "NVCOPY_TCP2_WAIT_SECS=$wait_secs" \
        -- /tests/nvcopy-vm_tcp2 --ignored guest_ --test-threads=1 --nocapture \
        </dev/null >&"$hout" 2>&1 &
    hpid=$!
    GUESTS+=("$hpid:nvcopy")
    exec {hout}>&-

    # Until both ended: a failed guest takes the other down at once; a guest that passed
    # leaves the other `grace` seconds.
    local tdone='' hdone='' deadline='' first=0
    while [[ -z $tdone || -z $hdone ]]; do
        if [[ -z $tdone ]] && ! alive "$tpid"; then
            wait "$tpid"
            trc=$?
            tdone=$SECONDS
            say "target guest exited with status $trc after $((SECONDS - t0)) s"
            if ((trc != 0)); then
                ((first)) || first=$trc
                stop "$hpid" nvcopy
            else
                deadline=$((SECONDS + grace))
            fi
        fi
        if [[ -z $hdone ]] && ! alive "$hpid"; then
            wait "$hpid"
            hrc=$?
            hdone=$SECONDS
            say "nvcopy guest exited with status $hrc after $((SECONDS - t0)) s"
            if ((hrc != 0)); then
                ((first)) || first=$hrc
                stop "$tpid" target
            else
                deadline=$((SECONDS + grace))
            fi
        fi
        if [[ -n $deadline ]] && ((SECONDS > deadline)); then
            [[ -z $tdone ]] && { say "the target guest did not end within ${grace} s of the other"; stop "$tpid" target; }
            [[ -z $hdone ]] && { say "the nvcopy guest did not end within ${grace} s of the other"; stop "$hpid" nvcopy; }
            deadline=
        fi
        [[ -n $tdone && -n $hdone ]] || sleep 0.5
    done
    # The prefixing seds end when their guest's output closes.
    wait "$tsed" "$hsed"
    trap - TERM INT
    say "target exit $trc, nvcopy exit $hrc, $((SECONDS - t0)) s in all"
    return "$first"
}

# shellcheck source=scripts/vm/suite.sh
source "$SCRIPT_DIR/vm/suite.sh" || die "cannot read $SCRIPT_DIR/vm/suite.sh"
suite_main "$@"
