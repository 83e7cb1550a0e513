#!/bin/sh
# nvmet-setup.sh - inside a test guest: export a block device as an NVMe/TCP namespace
# through the Linux target (nvmet, nvmet-tcp), configured by configfs.
#
#   nvmet-setup.sh up DEVICE NQN [ADDR [PORT]]   subsystem NQN (allow_any_host) with
#                                                namespace 1 = DEVICE, on a TCP port
#                                                (default 127.0.0.1:4420)
#   nvmet-setup.sh down NQN                      remove the port and the subsystem
#   nvmet-setup.sh port-off NQN                  unlink NQN from the port: nvmet ends its
#                                                controllers' connections and, with no
#                                                subsystem left, stops listening
#   nvmet-setup.sh port-on NQN                   link it again (listening again)
#
# Boot the guest with `--kmod nvmet --kmod nvmet-tcp` (scripts/vm.sh), and leave the
# backing controller on the kernel nvme driver (`setup.sh reset BDF`). busybox sh.
set -u

die() { echo "nvmet-setup: error: $*" >&2; exit 1; }

CFG=/sys/kernel/config
NVMET=$CFG/nvmet
# One port for the whole guest; its id is arbitrary.
PORT_ID=1

prepare() {
    modprobe nvmet 2>/dev/null
    modprobe nvmet-tcp 2>/dev/null
    if [ ! -d "$NVMET" ]; then
        grep -q " $CFG configfs" /proc/mounts || mount -t configfs none "$CFG" ||
            die "cannot mount configfs on $CFG"
    fi
    [ -d "$NVMET" ] || die "$NVMET is missing: is the nvmet module loaded?"
    # The guest boots with no network; loopback is enough for a target on 127.0.0.1.
    ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up 2>/dev/null ||
        die "cannot bring up the loopback interface"
}

up() {
    dev=$1 nqn=$2 addr=${3:-127.0.0.1} port=${4:-4420}
    [ -b "$dev" ] || die "$dev is not a block device"
    prepare
    s=$NVMET/subsystems/$nqn
    mkdir "$s" || die "cannot create subsystem $nqn"
    echo 1 >"$s/attr_allow_any_host" || die "allow_any_host"
    mkdir "$s/namespaces/1" || die "cannot create namespace 1"
    printf '%s' "$dev" >"$s/namespaces/1/device_path" || die "device_path $dev"
    echo 1 >"$s/namespaces/1/enable" || die "cannot enable namespace 1 on $dev"
    p=$NVMET/ports/$PORT_ID
    if [ ! -d "$p" ]; then
        mkdir "$p" || die "cannot create port $PORT_ID"
        echo tcp >"$p/addr_trtype" && echo ipv4 >"$p/addr_adrfam" &&
            echo "$addr" >"$p/addr_traddr" && echo "$port" >"$p/addr_trsvcid" ||
            die "cannot set port $PORT_ID to tcp $addr:$port"
    fi
    ln -s "$s" "$p/subsystems/$nqn" || die "cannot enable port $addr:$port"
    echo "nvmet-setup: $nqn namespace 1 = $dev on tcp $addr:$port"
}

down() {
    nqn=$1 p=$NVMET/ports/$PORT_ID s=$NVMET/subsystems/$1
    rm -f "$p/subsystems/$nqn"
    rmdir "$p" 2>/dev/null
    if [ -d "$s" ]; then
        echo 0 >"$s/namespaces/1/enable" 2>/dev/null
        rmdir "$s/namespaces/1" 2>/dev/null
        rmdir "$s" || die "cannot remove subsystem $nqn"
    fi
    echo "nvmet-setup: $nqn removed"
}

port_off() {
    l=$NVMET/ports/$PORT_ID/subsystems/$1
    [ -L "$l" ] || die "$1 is not on port $PORT_ID"
    rm "$l" || die "cannot unlink $1 from port $PORT_ID"
    echo "nvmet-setup: $1 taken off port $PORT_ID"
}

port_on() {
    s=$NVMET/subsystems/$1 p=$NVMET/ports/$PORT_ID
    [ -d "$s" ] && [ -d "$p" ] || die "no subsystem $1 or port $PORT_ID: run 'up' first"
    ln -s "$s" "$p/subsystems/$1" || die "cannot link $1 to port $PORT_ID"
    echo "nvmet-setup: $1 on port $PORT_ID again"
}

case ${1:-} in
    up) [ $# -ge 3 ] || die "usage: $0 up DEVICE NQN [ADDR [PORT]]"; shift; up "$@" ;;
    down) [ $# -eq 2 ] || die "usage: $0 down NQN"; down "$2" ;;
    port-off) [ $# -eq 2 ] || die "usage: $0 port-off NQN"; port_off "$2" ;;
    port-on) [ $# -eq 2 ] || die "usage: $0 port-on NQN"; port_on "$2" ;;
    *) sed -n '5,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
