#!/usr/bin/env bash
# vm-trust-suite.sh - the VM suite for what `result: ok`, --map and signals promise
# (tests/vm_trust.rs): host images, and the one guest boot that runs the suite.
#
#   scripts/vm-trust-suite.sh prepare DIR          create the images in DIR
#   scripts/vm-trust-suite.sh run DIR [VMOPTS...]  boot the suite's layout on them
#
# The layout lives here only; tests/vm_trust.rs has the same table in its header.
#
#   slot  image / drive      size     notes
#   10.0  source.img         512 MiB  random data: source of the kill -9, SIGINT and flush copies
#   11.0  kill.img           512 MiB  sparse: destination of the kill -9 + resume copy
#   12.0  sigint.img         512 MiB  sparse: destination of the SIGINT + resume copy
#   13.0  bad-source.img      64 MiB  random data; reads of sector BAD_SECTOR fail (blkdebug)
#   14.0  bad-dest.img        64 MiB  sparse: destination of the --ignore-errors copy
#   15.0  (fresh, 2 ns)       64 MiB  flush destination A: namespace 2 only
#   16.0  (fresh, 3 ns)       64 MiB  flush destination B: namespace 3 only
#   17.0  scratch.img          4 MiB  zeroes: the guest writes its maps here (kernel driver)
#
# `run` traces every NVMe I/O command QEMU receives (pci_nvme_io_cmd) into DIR/trace.log;
# the host tests count the Flush commands there. The guest runs
# `/tests/nvcopy-vm_trust --ignored guest_ --test-threads=1`; VMOPTS go to vm.sh first
# (--no-build, --timeout ...). About 0.6 GiB is written here; the copies fill the sparse
# images to about 1.7 GiB in all.
set -u

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# 512-byte sector of bad-source.img whose reads fail: 19.5 MiB in, not chunk-aligned.
# tests/vm_trust.rs has the same number (BAD_SECTOR).
BAD_SECTOR=40000

die() { printf 'vm-trust-suite: error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '5,6p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

prepare() {
    local dir=$1 name
    mkdir -p "$dir" || die "cannot create $dir"
    rm -f "$dir"/*.img "$dir"/trace.log
    head -c 512M /dev/urandom >"$dir/source.img" || die "cannot write $dir/source.img"
    head -c 64M /dev/urandom >"$dir/bad-source.img" || die "cannot write $dir/bad-source.img"
    for name in kill sigint; do
        truncate -s 512M "$dir/$name.img" || die "cannot create $dir/$name.img"
    done
    truncate -s 64M "$dir/bad-dest.img" || die "cannot create $dir/bad-dest.img"
    truncate -s 4M "$dir/scratch.img" || die "cannot create $dir/scratch.img"
    echo "vm-trust-suite: images ready in $dir"
}

run() {
    local dir=$1 img
    shift
    for img in source kill sigint bad-source bad-dest scratch; do
        [[ -f $dir/$img.img ]] || die "$dir/$img.img is missing: run '$0 prepare $dir' first"
    done
    rm -f "$dir/trace.log"
    bash "$SCRIPT_DIR/vm.sh" run "$@" \
        --nvme "file=$dir/source.img" --nvme "file=$dir/kill.img" --nvme "file=$dir/sigint.img" \
        --nvme "file=$dir/bad-source.img,blkdebug=$BAD_SECTOR" --nvme "file=$dir/bad-dest.img" \
        --nvme size=64M,ns=2 --nvme size=64M,ns=3 --nvme "file=$dir/scratch.img" \
        --qemu-arg=-trace --qemu-arg=pci_nvme_io_cmd --qemu-arg=-D --qemu-arg="$dir/trace.log" \
        -- /tests/nvcopy-vm_trust --ignored guest_ --test-threads=1
}

# shellcheck source=scripts/vm/suite.sh
source "$SCRIPT_DIR/vm/suite.sh" || die "cannot read $SCRIPT_DIR/vm/suite.sh"
suite_main "$@"
