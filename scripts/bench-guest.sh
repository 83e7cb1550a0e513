#!/bin/sh
# bench-guest.sh - the inside half of `scripts/vm.sh bench` (busybox sh in the guest).
#
# Four emulated drives: 0000:00:10.0 is the source (the host filled its first BENCH_MB
# MiB with random data before boot), 11, 12 and 13 are destinations. Each contender is
# timed as a whole process, start to exit, with /proc/uptime (10 ms steps; every timed
# command runs for seconds). nvcopy's own data-phase figures (--json `elapsed`,
# `rate_mb_s`) are recorded beside its wall time.
#
# Contenders run interleaved within one boot: in every round nvcopy runs each test on
# vfio-pci, then the drives go back to the kernel nvme driver and dd runs the same tests,
# then the drives go back to vfio-pci. Rebinding is never inside a timed span.
#
# Output: one machine-readable line per measurement, parsed by benches/vm-bench-report.py
# on the host:
#   BENCH test=<name> tool=<nvcopy|dd> run=<i> wall=<s> [elapsed=<s> rate=<MB/s>] bytes=<n> [key=val...]
#   BENCHINFO key=value...        facts about the guest
#   BENCHSKIP test=<name> reason=<words>
# Everything else is commentary for people.
#
# Environment (from vm.sh bench): BENCH_MB (1024), BENCH_RUNS (5), SWEEP_MB (256),
# SWEEP_CHUNKS ("4K ... 512K"), SWEEP_QDS ("1 ... 128"), SWEEP_PASSES (2), SWEEP=0 to skip
# the sweep, CORES_RUNS (3), STARTUP_RUNS (5), BENCH_ONLY=tcp for the NVMe/TCP comparison
# alone (tcp_bench below).
set -u

MB=${BENCH_MB:-1024}
RUNS=${BENCH_RUNS:-5}
SWEEP_MB=${SWEEP_MB:-256}
SWEEP_CHUNKS=${SWEEP_CHUNKS:-"4K 16K 64K 128K 256K 512K"}
SWEEP_QDS=${SWEEP_QDS:-"1 2 4 8 16 32 64 128"}
SWEEP=${SWEEP:-1}
SWEEP_PASSES=${SWEEP_PASSES:-2}
CORES_RUNS=${CORES_RUNS:-3}
STARTUP_RUNS=${STARTUP_RUNS:-5}

SRC=0000:00:10.0
D1=0000:00:11.0
D2=0000:00:12.0
D3=0000:00:13.0
ALL="$SRC $D1 $D2 $D3"
BYTES=$((MB * 1048576))

say() { echo "bench: $*"; }
fail() { say "FAIL: $*"; exit 1; }

now() { cut -d' ' -f1 /proc/uptime; }
# sub A B: B - A in seconds, 2 decimals
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
# A JSON number field from nvcopy's pretty-printed --json output (one field per line).
jfield() { sed -n "s/^ *\"$1\": *\([-0-9.eE+]*\),\{0,1\}$/\1/p" "$2" | head -n 1; }

# The kernel's block device of a controller's namespace 1 (setup.sh waits for it).
blockdev() { setup.sh blockdev "$1"; }

to_kernel() {
    # shellcheck disable=SC2086
    setup.sh reset $ALL >/dev/null || fail "setup.sh reset $ALL"
    B0=$(blockdev $SRC) || fail "no block device for $SRC"
    B1=$(blockdev $D1) || fail "no block device for $D1"
    B2=$(blockdev $D2) || fail "no block device for $D2"
    B3=$(blockdev $D3) || fail "no block device for $D3"
}
to_vfio() {
    # shellcheck disable=SC2086
    setup.sh bind $ALL >/dev/null || fail "setup.sh bind $ALL"
}

# nvcopy_run TEST RUN EXTRA-KEYS CMD...: time one nvcopy process, print a BENCH line.
nvcopy_run() {
    nr_test=$1 nr_run=$2 nr_keys=$3
    shift 3
    t0=$(now)
    "$@" >/tmp/out.json 2>/tmp/err.txt
    nr_rc=$?
    t1=$(now)
    if [ $nr_rc -ne 0 ]; then
        say "nvcopy failed (exit $nr_rc): $*"
        cat /tmp/err.txt
        echo "BENCHERR test=$nr_test tool=nvcopy run=$nr_run rc=$nr_rc"
        return 1
    fi
    el=$(jfield elapsed /tmp/out.json)
    rate=$(jfield rate_mb_s /tmp/out.json)
    by=$(jfield bytes /tmp/out.json)
    [ -n "$by" ] || by=$(jfield bytes_total /tmp/out.json)
    echo "BENCH test=$nr_test tool=nvcopy run=$nr_run wall=$(sub "$t0" "$t1") elapsed=${el:-nan} rate=${rate:-nan} bytes=${by:-0}${nr_keys:+ $nr_keys}"
}

# dd_run TEST RUN BYTES CMD...: time a shell command line (one or more dd processes).
dd_run() {
    dr_test=$1 dr_run=$2 dr_bytes=$3
    shift 3
    t0=$(now)
    sh -c "$*" 2>/tmp/err.txt
    dr_rc=$?
    t1=$(now)
    if [ $dr_rc -ne 0 ]; then
        say "dd failed (exit $dr_rc): $*"
        cat /tmp/err.txt
        echo "BENCHERR test=$dr_test tool=dd run=$dr_run rc=$dr_rc"
        return 1
    fi
    echo "BENCH test=$dr_test tool=dd run=$dr_run wall=$(sub "$t0" "$t1") bytes=$dr_bytes"
}

echo "BENCHINFO guest_nproc=$(nproc) guest_kernel=$(uname -r) mb=$MB runs=$RUNS"

# busybox dd must do O_DIRECT, or the page cache would answer dd's reads: checked on the
# source's block device before the first dd round (O_DIRECT on /dev/zero is refused).
dd_checked=0
check_dd_direct() {
    [ $dd_checked = 1 ] && return 0
    dd if="$B0" of=/dev/null bs=4k count=1 iflag=direct 2>/tmp/err.txt ||
        { cat /tmp/err.txt; fail "busybox dd iflag=direct fails on $B0; a dd comparison without O_DIRECT would be meaningless"; }
    dd if="$B0" of="$B1" bs=4k count=1 iflag=direct oflag=direct 2>/tmp/err.txt ||
        { cat /tmp/err.txt; fail "busybox dd oflag=direct fails on $B1"; }
    echo "BENCHINFO dd=busybox dd_direct=yes"
    dd_checked=1
}

DD="dd bs=1M count=$MB iflag=direct"

# ---------------------------------------------------------------------------------------
# NVMe/TCP: the source drive to a namespace that nvmet-tcp exports on 127.0.0.1:4420 from
# $TCP_BACKING (on the kernel nvme driver throughout, and the same target for both
# sides), interleaved: nvcopy with its own userspace NVMe/TCP host, its source on
# vfio-pci; then the kernel's initiator (nvme-tcp, `nvme connect` from nvme-cli) and dd
# with O_DIRECT from the source's kernel block device to the connected namespace. dd is
# timed alone, the kernel's connect and disconnect each apart (test=tcp_connect,
# tcp_disconnect), all outside dd's span; nvcopy's wall time includes its own connect.
# ---------------------------------------------------------------------------------------
TCP_NQN=nqn.2026-12.io.nvcopy:bench
TCP_HOSTNQN=nqn.2026-12.io.nvcopy:bench-kernel-initiator
TCP_BACKING=$D3

# The kernel's block device for subsystem $1 (a multipath head, or a namespace of a
# controller without multipath): found by NQN, since the PCIe controllers are nvme0.. too.
tcp_blockdev() {
    tb_i=0
    while [ $tb_i -lt 150 ]; do
        for tb_d in /sys/class/nvme-subsystem/* /sys/class/nvme/*; do
            [ "$(cat "$tb_d/subsysnqn" 2>/dev/null)" = "$1" ] || continue
            for tb_n in "$tb_d"/nvme*n*; do
                tb_b=${tb_n##*/}
                case $tb_b in *c*) continue ;; esac
                [ -b "/dev/$tb_b" ] && { echo "/dev/$tb_b"; return 0; }
            done
        done
        sleep 0.2 2>/dev/null || sleep 1
        tb_i=$((tb_i + 1))
    done
    return 1
}

tcp_bench() {
    if ! command -v nvme >/dev/null || ! command -v nvmet-setup.sh >/dev/null; then
        say "skipping NVMe/TCP: the guest has no nvme-cli or nvmet-setup.sh (vm.sh bench adds them)"
        echo "BENCHSKIP test=copy2tcp reason=no-nvme-cli-or-nvmet-setup.sh"
        return 0
    fi
    setup.sh reset $TCP_BACKING >/dev/null || fail "setup.sh reset $TCP_BACKING"
    tcp_bdev=$(blockdev $TCP_BACKING) || fail "no block device for $TCP_BACKING"
    nvmet-setup.sh up "$tcp_bdev" $TCP_NQN || fail "nvmet-setup.sh up $tcp_bdev $TCP_NQN"
    tcp_url=nvme+tcp://127.0.0.1:4420/$TCP_NQN
    echo "BENCHINFO tcp_target=nvmet-tcp tcp_backing=$TCP_BACKING nvme_cli=$(nvme version 2>/dev/null | head -n 1 | tr ' ' '_')"
    r=1
    while [ "$r" -le "$RUNS" ]; do
        setup.sh bind $SRC >/dev/null || fail "setup.sh bind $SRC"
        # Digests off on both sides (the kernel initiator's default), then on on both
        # (nvcopy's default; nvme connect -g -G): each pair runs the same protocol.
        say "tcp round $r of $RUNS: nvcopy ($SRC -> $tcp_url), no digests"
        nvcopy_run copy2tcp "$r" "" nvcopy copy --from "$SRC+${MB}M" --to "$tcp_url" --json --tcp-digests none
        say "tcp round $r of $RUNS: nvcopy ($SRC -> $tcp_url), header and data digests"
        nvcopy_run copy2tcp_digests "$r" "" nvcopy copy --from "$SRC+${MB}M" --to "$tcp_url" --json
        setup.sh reset $SRC >/dev/null || fail "setup.sh reset $SRC"
        B0=$(blockdev $SRC) || fail "no block device for $SRC"
        for mode in plain digests; do
            flags="" test=copy2tcp ctest=tcp_connect dtest=tcp_disconnect
            if [ $mode = digests ]; then
                flags="-g -G" test=copy2tcp_digests ctest=tcp_connect_digests dtest=tcp_disconnect_digests
            fi
            t0=$(now)
            # shellcheck disable=SC2086 # $flags is two words or none
            nvme connect -t tcp -a 127.0.0.1 -s 4420 -n $TCP_NQN --hostnqn $TCP_HOSTNQN $flags >/tmp/err.txt 2>&1 ||
                { cat /tmp/err.txt; fail "nvme connect $flags to $TCP_NQN"; }
            tcp_dev=$(tcp_blockdev $TCP_NQN) || fail "no kernel block device for $TCP_NQN after nvme connect"
            t1=$(now)
            echo "BENCH test=$ctest tool=dd run=$r wall=$(sub "$t0" "$t1") bytes=0"
            say "tcp round $r of $RUNS: kernel initiator ($mode) + dd ($B0 -> $tcp_dev)"
            dd_run $test "$r" "$BYTES" "$DD if=$B0 of=$tcp_dev oflag=direct"
            t0=$(now)
            nvme disconnect -n $TCP_NQN >/tmp/err.txt 2>&1 || { cat /tmp/err.txt; fail "nvme disconnect -n $TCP_NQN"; }
            t1=$(now)
            echo "BENCH test=$dtest tool=dd run=$r wall=$(sub "$t0" "$t1") bytes=0"
        done
        r=$((r + 1))
    done
    nvmet-setup.sh down $TCP_NQN >/dev/null || fail "nvmet-setup.sh down $TCP_NQN"
    to_vfio
}

if [ "${BENCH_ONLY:-}" = tcp ]; then
    tcp_bench
    say "done"
    exit 0
fi
# ---------------------------------------------------------------------------------------
# Interleaved rounds: nvcopy (vfio-pci) then dd (kernel nvme), RUNS times.
# ---------------------------------------------------------------------------------------
to_vfio
r=1
while [ "$r" -le "$RUNS" ]; do
    say "round $r of $RUNS: nvcopy"
    nvcopy_run copy1to1 "$r" "" nvcopy copy --from "$SRC+${MB}M" --to "$D1+${MB}M" --json
    nvcopy_run copy1to3 "$r" "" nvcopy copy --from "$SRC+${MB}M" --to "$D1+${MB}M" --to "$D2+${MB}M" --to "$D3+${MB}M" --json
    nvcopy_run read "$r" "" nvcopy bench read --from "$SRC+${MB}M" --json
    to_kernel
    check_dd_direct
    say "round $r of $RUNS: dd ($B0 -> $B1 $B2 $B3)"
    dd_run copy1to1 "$r" "$BYTES" "$DD if=$B0 of=$B1 oflag=direct"
    dd_run copy1to3 "$r" "$BYTES" "$DD if=$B0 of=$B1 oflag=direct && $DD if=$B0 of=$B2 oflag=direct && $DD if=$B0 of=$B3 oflag=direct"
    dd_run read "$r" "$BYTES" "$DD if=$B0 of=/dev/null"
    to_vfio
    r=$((r + 1))
done

# ---------------------------------------------------------------------------------------
# Files and kernel block devices (io_uring endpoints), against dd with O_DIRECT on the
# same devices: a file on ext4 to NVMe, NVMe to a file, and the source's kernel block
# device to NVMe. The ext4 filesystem is on controller $FSCTL, which stays with the kernel
# nvme driver (vm.sh bench made it on the host); skipped when it is not there.
# ---------------------------------------------------------------------------------------
FSCTL=0000:00:14.0
if [ -e /sys/bus/pci/devices/$FSCTL ] && setup.sh reset $FSCTL >/dev/null; then
    BF=$(blockdev $FSCTL) || fail "no block device for $FSCTL"
    mkdir -p /mnt/fs && mount -t ext4 "$BF" /mnt/fs || fail "cannot mount $BF (ext4) at /mnt/fs"
    to_kernel
    say "files: $MB MiB of the source into /mnt/fs/src.img, and a destination file"
    $DD if="$B0" of=/mnt/fs/src.img oflag=direct 2>/dev/null || fail "cannot fill /mnt/fs/src.img"
    $DD if="$B0" of=/mnt/fs/dst.img oflag=direct 2>/dev/null || fail "cannot fill /mnt/fs/dst.img"
    sync
    r=1
    while [ "$r" -le "$RUNS" ]; do
        say "files round $r of $RUNS: nvcopy"
        to_vfio
        nvcopy_run file2nvme "$r" "" nvcopy copy --from /mnt/fs/src.img --to "$D1+${MB}M" --json
        nvcopy_run nvme2file "$r" "" nvcopy copy --from "$SRC+${MB}M" --to /mnt/fs/dst.img --json
        grep -q '"sqpoll": "true"' /tmp/out.json && echo "BENCHINFO file_sqpoll=yes"
        setup.sh reset $SRC >/dev/null || fail "setup.sh reset $SRC"
        B0=$(blockdev $SRC) || fail "no block device for $SRC"
        nvcopy_run bdev2nvme "$r" "" nvcopy copy --from "$B0+${MB}M" --to "$D1+${MB}M" --json
        to_kernel
        say "files round $r of $RUNS: dd"
        dd_run file2nvme "$r" "$BYTES" "$DD if=/mnt/fs/src.img of=$B1 oflag=direct"
        dd_run nvme2file "$r" "$BYTES" "$DD if=$B0 of=/mnt/fs/dst.img oflag=direct conv=notrunc"
        dd_run bdev2nvme "$r" "$BYTES" "$DD if=$B0 of=$B1 oflag=direct"
        r=$((r + 1))
    done
    umount /mnt/fs
    to_vfio
else
    echo "BENCHSKIP test=files reason=no-ext4-controller-at-$FSCTL"
fi

# ---------------------------------------------------------------------------------------
# Fixed costs: a process that does (almost) nothing, to split nvcopy's wall time into
# start-up and data phase. nvcopy: exec alone (--version), exec + VFIO + controller
# bring-up + Identify (identify), and a whole copy of one 4 KiB chunk; dd: the same 4 KiB
# copy through the kernel driver.
# ---------------------------------------------------------------------------------------
r=1
while [ "$r" -le "$STARTUP_RUNS" ]; do
    nvcopy_run startup_exec "$r" "" nvcopy --version
    nvcopy_run startup_identify "$r" "" nvcopy identify "$SRC" --json
    nvcopy_run copy4k "$r" "" nvcopy copy --from "$SRC+4K" --to "$D1+4K" --json
    r=$((r + 1))
done
to_kernel
r=1
while [ "$r" -le "$STARTUP_RUNS" ]; do
    dd_run copy4k "$r" 4096 "dd if=$B0 of=$B1 bs=4k count=1 iflag=direct oflag=direct"
    r=$((r + 1))
done
to_vfio

# ---------------------------------------------------------------------------------------
# 1 against 2 reactors, interleaved, if this nvcopy has --cores.
# ---------------------------------------------------------------------------------------
if nvcopy copy --help 2>/dev/null | grep -q -- '--cores'; then
    r=1
    while [ "$r" -le "$CORES_RUNS" ]; do
        for c in 1 2; do
            say "cores $c, run $r of $CORES_RUNS"
            nvcopy_run "cores$c" "$r" "cores=$c" nvcopy copy --from "$SRC+${MB}M" --to "$D1+${MB}M" --cores "$c" --json
        done
        r=$((r + 1))
    done
else
    say "skipping 1 vs 2 reactors: this nvcopy has no --cores option yet ('nvcopy copy --help' does not list it)"
    echo "BENCHSKIP test=cores reason=nvcopy-copy-has-no---cores-option"
fi

# ---------------------------------------------------------------------------------------
# Sweep: chunk size x queue depth, nvcopy 1 -> 1. Small chunks move fewer bytes (at most
# 16384 chunks per point) so that 4 KiB at QD1 does not take minutes; rates compare.
# ---------------------------------------------------------------------------------------
rev() { rv=""; for x in $*; do rv="$x $rv"; done; echo $rv; }
if [ "$SWEEP" = 1 ]; then
    pass=1
    qds=$SWEEP_QDS chunks=$SWEEP_CHUNKS
    while [ "$pass" -le "$SWEEP_PASSES" ]; do
        say "sweep pass $pass of $SWEEP_PASSES"
        for qd in $qds; do
            for ch in $chunks; do
                kib=${ch%K}
                pt_mb=$((kib * 16384 / 1024))
                [ "$pt_mb" -gt "$SWEEP_MB" ] && pt_mb=$SWEEP_MB
                [ "$pt_mb" -lt 1 ] && pt_mb=1
                nvcopy_run sweep "$pass" "chunk=$((kib * 1024)) qd=$qd" nvcopy copy --from "$SRC+${pt_mb}M" --to "$D1+${pt_mb}M" --chunk "$ch" --qd "$qd" --json
            done
        done
        # Every other pass in the opposite order, so that a drift in speed over the boot
        # does not land on the same points each time.
        qds=$(rev $qds) chunks=$(rev $chunks)
        pass=$((pass + 1))
    done
fi

tcp_bench

say "done"
