#!/usr/bin/env bash
# vm.sh - run commands for nvcopy inside a throw-away QEMU guest with emulated
# NVMe controllers bound to vfio-pci.
#
#   scripts/vm.sh run   [OPTIONS] -- CMD [ARGS...]   exit status = CMD's status
#   scripts/vm.sh shell [OPTIONS]                    interactive busybox shell
#   scripts/vm.sh demo  [OPTIONS]                    1 GiB copy to two drives, checked by checksum
#   scripts/vm.sh help
#
# Why a VM at all: nvcopy drives NVMe controllers from userspace through VFIO,
# which needs an IOMMU (or vfio's no-IOMMU mode), root and devices nobody else
# uses.  The build/CI machines have none of that, so each run boots a stock
# Debian kernel under QEMU (TCG: KVM hangs on these machines) with emulated
# NVMe controllers and an emulated Intel IOMMU, runs one command, and reports
# the command's exit status back through QEMU's isa-debug-exit device.
#
# Host side, per run:
#   1. install the Debian packages this needs (only when missing);
#   2. fetch and unpack the Debian kernel once (cached in vm-work/kernel);
#   3. build the workspace statically (target/vm, not the normal target dir);
#   4. assemble an initramfs: a cached gzip'd base (busybox + kernel modules)
#      plus a per-run uncompressed payload (/init, binaries, tests, the command);
#   5. boot QEMU under `timeout`, map its exit code back to the command's.
#
# Files (this one is the entry point; the others are sourced, and define
# functions only):
#   scripts/vm.sh             globals, subcommand dispatch, `run`, `shell`, `demo`
#   scripts/vm/boot.sh        steps 1-5: packages, kernel, build, initramfs, options,
#                             NVMe controllers, vm_boot (the QEMU run)
#   scripts/vm/init.sh        the guest's /init (busybox sh), copied into each payload
#   scripts/vm/noiommu.sh     vfio.ko rebuilt with CONFIG_VFIO_NOIOMMU (--noiommu)
#   scripts/vm/bench.sh       the `bench` subcommand
#
# Reuse from other scripts (as the `demo` and `bench` subcommands do):
#   source scripts/vm.sh          # defines functions only, runs nothing
#   vm_boot [OPTIONS] -- CMD ...  # one full run; returns CMD's status
# vm_boot prepares the host only once per process (packages, kernel, cargo
# build), so calling it several times in a row costs one build.  See
# vm_cmd_demo below and scripts/vm/bench.sh for where new subcommands plug in.
#
# Environment:
#   NVCOPY_VM_NO_BUILD=1       skip the cargo build, reuse the last build's binaries
#   NVCOPY_VM_WORK=DIR         cache/work directory (default: <repo>/vm-work)
#   NVCOPY_VM_TARGET_DIR=DIR   cargo target dir for guest builds (default: <repo>/target/vm)
#   NVCOPY_VM_REFRESH_KERNEL=1 look up linux-image-amd64 again instead of reusing
#                              the cached kernel (after a Debian kernel update)
#   NVCOPY_VM_QEMU=PATH        QEMU binary (default: qemu-system-x86_64)

# ----------------------------------------------------------------------------
# Globals
# ----------------------------------------------------------------------------

VM_SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VM_REPO=$(cd "$VM_SCRIPT_DIR/.." && pwd)
VM_WORK=${NVCOPY_VM_WORK:-$VM_REPO/vm-work}
VM_TARGET_DIR=${NVCOPY_VM_TARGET_DIR:-$VM_REPO/target/vm}
VM_QEMU=${NVCOPY_VM_QEMU:-qemu-system-x86_64}
VM_RUST_TARGET=x86_64-unknown-linux-gnu

# Kernel modules the guest needs; their dependencies (vfio_virqfd, ...) are
# added from modules.dep.  nvme is loaded too so that a test can use the kernel
# driver to check the drives before/after nvcopy touched them.
VM_GUEST_MODULES=(vfio vfio_iommu_type1 vfio-pci vfio-pci-core irqbypass nvme nvme-core)

# Debian packages needed on the host (checked with dpkg-query, installed only
# when missing).
VM_HOST_PACKAGES=(qemu-system-x86 busybox-static cpio kmod xz-utils)

# Exit status for "the VM machinery failed" (as opposed to the command).
VM_EXIT_INFRA=125
# Guest physical PCI slot of the first --nvme controller; controller i is at
# slot 0x10+i.  q35 has its LPC/SATA/SMBus functions in slot 0x1f, so the
# range is 0x10..0x1e.
VM_NVME_FIRST_SLOT=16
VM_NVME_MAX=15

VM_APT_UPDATED=
VM_PREPARED=
VM_KV=
VM_KDIR=
VM_NOIOMMU_KO=
VM_RUN_DIRS=()

# The parts.  A missing one is fatal whether vm.sh runs or is sourced: nothing
# would work without it.
for VM_PART in boot noiommu bench; do
    # shellcheck source=/dev/null
    source "$VM_SCRIPT_DIR/vm/$VM_PART.sh" || {
        printf 'vm.sh: error: cannot read %s\n' "$VM_SCRIPT_DIR/vm/$VM_PART.sh" >&2
        exit 125
    }
done
unset VM_PART

# ----------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------

# A subcommand X is a function vm_cmd_X "$@" (dispatched automatically by
# vm_main); it calls vm_boot with its own --nvme layout and command, and may
# call vm_boot several times (the build happens once per process).  `bench`
# is in scripts/vm/bench.sh.

# The README's main job: three 1 GiB drives; the guest fills the first with random data
# through the kernel driver, nvcopy copies it to the other two, and the kernel driver reads
# all three back for checksums (scripts/demo-guest.sh). DEMO_MB changes the size copied.
vm_cmd_demo() {
    local mb=${DEMO_MB:-1024}
    local size=$(( (mb + 1023) / 1024 ))G
    vm_boot --timeout 1800 --nvme "size=$size" --nvme "size=$size" --nvme "size=$size" \
        --add "$VM_SCRIPT_DIR/demo-guest.sh:/bin/demo-guest.sh" --env "DEMO_MB=$mb" "$@" \
        -- sh /bin/demo-guest.sh
}

vm_cmd_run() { vm_boot "$@"; }
vm_cmd_shell() { vm_boot --shell "$@"; }

vm_main() {
    (($#)) || { vm_usage >&2; exit 2; }
    local sub=$1
    shift
    case $sub in
        help | -h | --help) vm_usage; return 0 ;;
    esac
    if [[ $sub =~ ^[a-z]+$ ]] && declare -F "vm_cmd_$sub" >/dev/null; then
        "vm_cmd_$sub" "$@"
        return
    fi
    vm_usage_error "unknown subcommand '$sub'"
}

# Run only when executed, not when sourced by another script.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -uo pipefail
    trap vm_cleanup_runs EXIT
    trap 'vm_cleanup_runs; exit 130' INT
    trap 'vm_cleanup_runs; exit 143' TERM
    vm_main "$@"
    exit $?
fi
