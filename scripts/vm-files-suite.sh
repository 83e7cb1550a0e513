#!/usr/bin/env bash
# vm-files-suite.sh - the VM suite for files and kernel block devices as endpoints
# (tests/vm_files.rs): host images, and the one guest boot that runs the suite.
#
#   scripts/vm-files-suite.sh prepare DIR          create the images in DIR
#   scripts/vm-files-suite.sh run DIR [VMOPTS...]  boot the suite's layout on them
#
# The layout lives here only; tests/vm_files.rs has the same table in its header.
#
#   slot  device      image        size     notes
#   10.0  NVMe, vfio  source.img    64 MiB  random: the source of every copy out of VFIO
#   11.0  NVMe, vfio  dest.img      64 MiB  sparse: 4 x 16 MiB, one per copy into VFIO
#   12.0  NVMe        kernel.img    64 MiB  random (+ .orig): left on the kernel nvme driver
#   13.0  NVMe, vfio  zoned.img     32 MiB  sparse; zoned (ZNS), 4 MiB zones: copied onto twice
#   08.0  virtio-blk  fs.img       128 MiB  ext4 made from DIR/fs (src.bin, out/); serial nvcopy-fs
#   09.0  virtio-blk  raw.img       64 MiB  random (+ .orig); serial nvcopy-raw
#   0a.0  virtio-blk  mounted.img   16 MiB  empty ext4 (+ .orig), mounted read-only: refused
#
# The guest runs `/tests/nvcopy-vm_files --ignored guest_ --test-threads=1 --nocapture`
# (so the devices' facts from --json land in the log); VMOPTS go to vm.sh first
# (--no-build, --timeout ...). The ext4, crc32c and virtio modules are put in the guest
# with --kmod. About 0.4 GiB is written here.
set -u

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { printf 'vm-files-suite: error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '5,6p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# mkfs.ext4 and debugfs (the host tests read the files back with it).
need_e2fsprogs() {
    command -v mkfs.ext4 >/dev/null && command -v debugfs >/dev/null && return 0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends e2fsprogs; } >&2 || die "installing e2fsprogs failed"
}

random_image() {
    head -c "$2" /dev/urandom >"$1" || die "cannot write $1"
    cp "$1" "${1%.img}.orig" || die "cannot copy $1"
}

prepare() {
    local dir=$1
    need_e2fsprogs
    mkdir -p "$dir" || die "cannot create $dir"
    rm -rf "$dir"/*.img "$dir"/*.orig "$dir/fs"
    head -c 64M /dev/urandom >"$dir/source.img" || die "cannot write $dir/source.img"
    truncate -s 64M "$dir/dest.img" || die "cannot create $dir/dest.img"
    truncate -s 32M "$dir/zoned.img" || die "cannot create $dir/zoned.img"
    random_image "$dir/kernel.img" 64M
    random_image "$dir/raw.img" 64M
    # The file system's initial contents stay in DIR/fs for the host tests.
    mkdir -p "$dir/fs/out" || die "cannot create $dir/fs"
    head -c 16M /dev/urandom >"$dir/fs/src.bin" || die "cannot write $dir/fs/src.bin"
    mkfs.ext4 -q -F -L nvcopy-fs -d "$dir/fs" "$dir/fs.img" 128M || die "mkfs.ext4 $dir/fs.img failed"
    mkfs.ext4 -q -F -L nvcopy-mounted "$dir/mounted.img" 16M || die "mkfs.ext4 $dir/mounted.img failed"
    cp "$dir/mounted.img" "$dir/mounted.orig" || die "cannot copy $dir/mounted.img"
    echo "vm-files-suite: images ready in $dir"
}

# -drive and -device arguments of virtio-blk disk $1 (image $2) at PCI slot $3.
virtio_disk() {
    VIRTIO+=(--qemu-arg=-drive --qemu-arg="file=$2,if=none,id=$1,format=raw,cache=none,aio=native"
        --qemu-arg=-device --qemu-arg="virtio-blk-pci,drive=$1,serial=nvcopy-$1,addr=$3")
}

run() {
    local dir=$1 img
    shift
    for img in source dest kernel zoned raw fs mounted; do
        [[ -f $dir/$img.img ]] || die "$dir/$img.img is missing: run '$0 prepare $dir' first"
    done
    VIRTIO=()
    virtio_disk fs "$dir/fs.img" 0x8
    virtio_disk raw "$dir/raw.img" 0x9
    virtio_disk mounted "$dir/mounted.img" 0xa
    bash "$SCRIPT_DIR/vm.sh" run "$@" \
        --nvme "file=$dir/source.img" --nvme "file=$dir/dest.img" --nvme "file=$dir/kernel.img" \
        --nvme "file=$dir/zoned.img,zoned=4M" \
        "${VIRTIO[@]}" --kmod ext4 --kmod crc32c_generic --kmod virtio_pci --kmod virtio_blk \
        -- /tests/nvcopy-vm_files --ignored guest_ --test-threads=1 --nocapture
}

# shellcheck source=scripts/vm/suite.sh
source "$SCRIPT_DIR/vm/suite.sh" || die "cannot read $SCRIPT_DIR/vm/suite.sh"
suite_main "$@"
