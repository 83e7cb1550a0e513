#!/usr/bin/env bash
# vm-tcp-suite.sh - the VM suite for NVMe/TCP (tests/vm_tcp.rs): host images, and the
# one guest boot that runs the suite.
#
#   scripts/vm-tcp-suite.sh prepare DIR          create the images in DIR
#   scripts/vm-tcp-suite.sh run DIR [VMOPTS...]  boot the suite's layout on them
#
#   slot  device      image        size     notes
#   10.0  NVMe, vfio  source.img    32 MiB  random: the source
#   11.0  NVMe, vfio  dest.img      96 MiB  sparse: the fan-out copy at 0, the copy back from TCP at 32 MiB,
#                                           at 64 MiB nvcopy's copy of what the kernel initiator wrote
#   12.0  NVMe        tcp.img       64 MiB  sparse: on the kernel nvme driver, exported by nvmet-tcp
#                                           on 127.0.0.1:4420 (scripts/nvmet-setup.sh); the source
#                                           at 0, at 32 MiB a pattern the kernel initiator wrote
#
# The guest runs `/tests/nvcopy-vm_tcp --ignored guest_ --test-threads=1 --nocapture`, with
# the kernel's NVMe/TCP initiator (nvme-tcp) and Debian's nvme-cli (--deb) for the cross-check.
set -u

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { printf 'vm-tcp-suite: error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '5,6p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

prepare() {
    local dir=$1
    mkdir -p "$dir" || die "cannot create $dir"
    rm -f "$dir"/*.img
    head -c 32M /dev/urandom >"$dir/source.img" || die "cannot write $dir/source.img"
    truncate -s 96M "$dir/dest.img" || die "cannot create $dir/dest.img"
    truncate -s 64M "$dir/tcp.img" || die "cannot create $dir/tcp.img"
    echo "vm-tcp-suite: images ready in $dir"
}

run() {
    local dir=$1 img
    shift
    for img in source dest tcp; do
        [[ -f $dir/$img.img ]] || die "$dir/$img.img is missing: run '$0 prepare $dir' first"
    done
    bash "$SCRIPT_DIR/vm.sh" run "$@" \
        --nvme "file=$dir/source.img" --nvme "file=$dir/dest.img" --nvme "file=$dir/tcp.img" \
        --kmod nvmet --kmod nvmet-tcp --kmod crc32c_generic --kmod nvme-tcp --deb nvme-cli \
        --add "$SCRIPT_DIR/nvmet-setup.sh:/bin/nvmet-setup.sh" \
        -- /tests/nvcopy-vm_tcp --ignored guest_ --test-threads=1 --nocapture
}

# shellcheck source=scripts/vm/suite.sh
source "$SCRIPT_DIR/vm/suite.sh" || die "cannot read $SCRIPT_DIR/vm/suite.sh"
suite_main "$@"
