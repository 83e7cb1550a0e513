#!/usr/bin/env bash
# vm-copy-suite.sh - host images for the copier's VM suite (tests/vm_copy.rs).
#
#   scripts/vm-copy-suite.sh prepare DIR
#
# Creates, in DIR (emptied of earlier images first), the file-backed drives that
# scripts/test.sh boots for the "vm-copy" suite; the table in tests/vm_copy.rs says which
# controller gets which file:
#
#   source.img       512 MiB of random data    the source of every whole-drive copy
#   one.img          512 MiB, sparse           1 -> 1 copy
#   wide-4k.img      512 MiB, sparse           1 -> 3 copy (4096-byte LBAs)
#   wide-mdts1.img   512 MiB, sparse           1 -> 3 copy (mdts=1)
#   wide-512.img     512 MiB, sparse           1 -> 3 copy
#   sentinel.img      64 MiB of random data    never written: the bad-input tests aim here
#   regions-4k.img    64 MiB of random data    copies into regions, zeroes (4096-byte LBAs)
#   regions-512.img   64 MiB of random data    copies into regions, zeroes (512-byte LBAs)
#   zero-whole.img     8 MiB of random data    zeroed whole (4096-byte LBAs)
#
# Each pre-filled small image gets a pristine copy, NAME.orig, that the host tests compare
# against after the guest exits. About 0.8 GiB is written here; the guest's copies fill
# the sparse images to about 2.7 GiB in all.
set -euo pipefail

usage() {
    sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

prepare() {
    local dir=$1 name
    mkdir -p "$dir"
    rm -f "$dir"/*.img "$dir"/*.orig
    head -c 512M /dev/urandom >"$dir/source.img"
    for name in one wide-4k wide-mdts1 wide-512; do
        truncate -s 512M "$dir/$name.img"
    done
    for name in sentinel regions-4k regions-512; do
        head -c 64M /dev/urandom >"$dir/$name.img"
        cp "$dir/$name.img" "$dir/$name.orig"
    done
    head -c 8M /dev/urandom >"$dir/zero-whole.img"
    echo "vm-copy-suite: images ready in $dir"
}

case ${1:-} in
    prepare)
        (($# == 2)) || usage
        prepare "$2"
        ;;
    *) usage ;;
esac
