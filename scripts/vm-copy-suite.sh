#!/usr/bin/env bash
# vm-copy-suite.sh - the copier's VM suite (tests/vm_copy.rs): host images, the one guest
# boot that runs the suite, and the drive layout both use.
#
#   scripts/vm-copy-suite.sh prepare DIR          create the images in DIR
#   scripts/vm-copy-suite.sh run DIR [VMOPTS...]  boot the suite's layout on them
#   scripts/vm-copy-suite.sh layout               print the layout: BDF IMAGE BYTES LBS MDTS
#
# The layout lives here only, in LAYOUT below: row i is the controller at guest PCI slot
# 0x10+i (0000:00:10.0, 0000:00:11.0, ...), one namespace backed by DIR/IMAGE. The DRIVES
# table of tests/vm_copy.rs mirrors it; its plain test `layout_matches_the_suite_script`
# compares the two through `layout`, and the guest test `guest_layout_matches_the_table`
# checks the booted controllers against DRIVES.
#
# `prepare` empties DIR of earlier images first. Data "random,orig" images also get a
# pristine copy, NAME.orig, that the host tests compare against after the guest exits.
# About 0.8 GiB is written there; the guest's copies fill the sparse images to about
# 2.7 GiB in all. `run` boots every drive file-backed, with the emulated VT-d IOMMU, and
# runs `/tests/nvcopy-vm_copy --ignored guest_ --test-threads=1`; VMOPTS go to vm.sh first
# (--no-build, --timeout ...).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FIRST_SLOT=16

# image            MiB  data         lbs   mdts  what the suite does with it
LAYOUT='
source.img         512  random       512   7     the source of every whole-drive copy
one.img            512  sparse       512   7     1 -> 1 copy
wide-4k.img        512  sparse       4096  7     1 -> 3 copy
wide-mdts1.img     512  sparse       512   1     1 -> 3 copy (8 KiB transfers)
sentinel.img        64  random,orig  512   7     never written: the bad-input tests aim here
regions-4k.img      64  random,orig  4096  7     copies into regions, zeroes
regions-512.img     64  random,orig  512   7     copies into regions, zeroes
wide-512.img       512  sparse       512   7     1 -> 3 copy
zero-whole.img       8  random       4096  7     zeroed whole
'

die() { printf 'vm-copy-suite: error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '5,7p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# Calls "$1" IMAGE MIB DATA LBS MDTS BDF for each row of LAYOUT, in slot order.
each_drive() {
    local fn=$1 image mib data lbs mdts _ slot=$FIRST_SLOT
    while read -r image mib data lbs mdts _; do
        [[ -n $image ]] || continue
        "$fn" "$image" "$mib" "$data" "$lbs" "$mdts" "$(printf '0000:00:%02x.0' "$slot")"
        slot=$((slot + 1))
    done <<<"$LAYOUT"
}

print_drive() {
    printf '%s %s %s %s %s\n' "$6" "$1" $(($2 << 20)) "$4" "$5"
}

prepare_drive() {
    local img=$PREPARE_DIR/$1 mib=$2 data=$3
    case $data in
        sparse) truncate -s "${mib}M" "$img" || die "cannot create $img" ;;
        random | random,orig)
            head -c "${mib}M" /dev/urandom >"$img" || die "cannot write $img"
            if [[ $data == random,orig ]]; then
                cp "$img" "${img%.img}.orig" || die "cannot copy $img"
            fi
            ;;
        *) die "LAYOUT: $1 has unknown data '$data'" ;;
    esac
}

layout() {
    each_drive print_drive
}

prepare() {
    PREPARE_DIR=$1
    mkdir -p "$PREPARE_DIR" || die "cannot create $PREPARE_DIR"
    rm -f "$PREPARE_DIR"/*.img "$PREPARE_DIR"/*.orig
    each_drive prepare_drive
    echo "vm-copy-suite: images ready in $PREPARE_DIR"
}

nvme_option() {
    local img=$RUN_DIR/$1
    [[ -f $img ]] || die "$img is missing: run '$0 prepare $RUN_DIR' first"
    RUN_NVME+=(--nvme "file=$img,lbs=$4,mdts=$5")
}

run() {
    RUN_DIR=$1
    RUN_NVME=()
    shift
    each_drive nvme_option
    bash "$SCRIPT_DIR/vm.sh" run "$@" "${RUN_NVME[@]}" \
        -- /tests/nvcopy-vm_copy --ignored guest_ --test-threads=1
}

# shellcheck source=scripts/vm/suite.sh
source "$SCRIPT_DIR/vm/suite.sh" || die "cannot read $SCRIPT_DIR/vm/suite.sh"
suite_main "$@"
