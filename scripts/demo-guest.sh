#!/bin/sh
# demo-guest.sh - the inside half of `scripts/vm.sh demo` (busybox sh in the guest).
#
# Fills the source drive with random data through the kernel's nvme driver, hands the
# drives to vfio-pci, copies the source to both destinations with nvcopy, hands them back
# to the kernel and compares checksums read through the kernel driver: an independent
# reader of what nvcopy wrote. Prints throughput and PASS or FAIL.
set -u
MB=${DEMO_MB:-1024}
SRC=0000:00:10.0
DST1=0000:00:11.0
DST2=0000:00:12.0

fail() { echo "demo: $*"; echo "demo: FAIL"; exit 1; }

# The kernel's block device of a controller's namespace 1 (setup.sh waits for it).
blockdev() { setup.sh blockdev "$1"; }

# dd with O_DIRECT where this busybox supports it, so the page cache does not answer.
DIRECT_IN="iflag=direct"
DIRECT_OUT="oflag=direct"
dd if=/dev/zero of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null || { DIRECT_IN=""; DIRECT_OUT=""; }

sum_of() { dd if="$1" bs=1M count="$MB" $DIRECT_IN 2>/dev/null | sha256sum | cut -d' ' -f1; }

now() { cut -d' ' -f1 /proc/uptime; }

setup.sh reset "$SRC" >/dev/null || fail "could not hand $SRC to the kernel nvme driver"
src_dev=$(blockdev "$SRC") || fail "no block device appeared for $SRC"
echo "demo: filling $src_dev ($SRC) with $MB MiB of random data through the kernel driver"
dd if=/dev/urandom of="$src_dev" bs=1M count="$MB" $DIRECT_OUT 2>/dev/null || fail "filling the source failed"
want=$(sum_of "$src_dev")
echo "demo: source sha256 $want"
setup.sh bind "$SRC" >/dev/null || fail "could not bind $SRC to vfio-pci"

echo "demo: nvcopy copy --from $SRC+${MB}M --to $DST1 --to $DST2"
t0=$(now)
nvcopy copy --from "$SRC+${MB}M" --to "$DST1+${MB}M" --to "$DST2+${MB}M" || fail "nvcopy copy failed"
t1=$(now)
awk -v mb="$MB" -v a="$t0" -v b="$t1" 'BEGIN { printf "demo: nvcopy process: %.2f s wall, %.0f MB/s per destination\n", b - a, mb * 1.048576 / (b - a) }'

setup.sh reset "$DST1" "$DST2" >/dev/null || fail "could not hand the destinations back to the kernel"
status=0
for d in "$DST1" "$DST2"; do
    dev=$(blockdev "$d") || fail "no block device appeared for $d"
    got=$(sum_of "$dev")
    if [ "$got" = "$want" ]; then
        echo "demo: $d ($dev) sha256 matches"
    else
        echo "demo: $d ($dev) sha256 $got differs"
        status=1
    fi
done
[ $status -eq 0 ] || fail "a destination differs from the source"
echo "demo: PASS"
