#!/bin/sh
# setup.sh - hand NVMe controllers to vfio-pci for nvcopy, and back to the kernel.
#
# Written for plain POSIX sh on purpose: the same file runs on a developer host
# (bash/dash) and inside the test VM, whose only shell is busybox ash.  That is
# why there is no `local`, no arrays and no bash-only syntax below; function
# variables carry a short per-function prefix instead of `local` so helpers
# cannot clobber each other's state.
#
# Everything goes through sysfs, the way the kernel documents driver rebinding:
#   driver_override -> unbind from the current driver -> drivers_probe
# driver_override (rather than vfio-pci's new_id) binds exactly the functions we
# were asked for and not every controller with the same vendor:device pair.

set -u

PROG=${0##*/}
# NVCOPY_SETUP_SYSFS points the script at a fake sysfs tree, for its own tests only.
SYS=${NVCOPY_SETUP_SYSFS:-/sys}
PCI_DEVICES=$SYS/bus/pci/devices
NVME_CLASS=0x010802   # PCI class: mass storage / NVM / NVMe I/O controller
HUGEMNT=/dev/hugepages

usage() {
    cat <<EOF
Usage: $PROG COMMAND [OPTIONS] [BDF...]

Commands:
  status                 List every NVMe PCI function (class $NVME_CLASS): address,
                         vendor:device, driver, IOMMU group, /dev/vfio node and,
                         for kernel-bound ones, their block devices.
  bind [--force] BDF...|--all
                         Load vfio-pci and bind the given functions (--all: every
                         NVMe function) to it.  Refuses to take a controller away
                         from the kernel nvme driver while one of its namespaces or
                         partitions is mounted, used as swap, has holders
                         (dm/md...), is held open by a process or is an LVM
                         PV, a ZFS pool member or a device of a btrfs
                         filesystem, unless --force.
  reset BDF...|--all     Give the functions (--all: every NVMe function) back to
                         the kernel nvme driver.
                         A BDF that is not an NVMe function is refused unless
                         --force is given.  With no BDF and no --all, bind and
                         reset do nothing and say so.
  hugepages              Reserve HUGEMEM MiB of 2 MiB hugepages and mount hugetlbfs
                         at $HUGEMNT (without HUGEMEM: show the current state).
  list                   Print the NVMe function addresses, one per line.
  blockdev BDF           Wait (up to 20 s) for the kernel nvme driver to create the
                         block device of the function's namespace 1 and print its
                         path, e.g. /dev/nvme0n1 (after 'reset', names change).
  help                   Show this text.

BDF is a PCI address, 0000:00:10.0 or the short form 00:10.0.

Environment:
  HUGEMEM=MiB   also reserve hugepages during 'bind' (HUGEMEM/2 pages of 2 MiB,
                rounded up).
--force is only ever taken from the command line: a FORCE variable left in the
environment forces nothing.
EOF
}

msg() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

# Name of the driver a device is bound to, or empty.  readlink works in every
# shell we care about (coreutils and busybox); the link target's last component
# is the driver name.
dev_driver() {
    if [ -e "$PCI_DEVICES/$1/driver" ]; then
        dd_link=$(readlink "$PCI_DEVICES/$1/driver")
        printf '%s\n' "${dd_link##*/}"
    fi
}

# IOMMU group number of a device, or empty.  Without an IOMMU there is no
# group until vfio (in no-IOMMU mode) creates a fake one at bind time.
dev_group() {
    if [ -e "$PCI_DEVICES/$1/iommu_group" ]; then
        dg_link=$(readlink "$PCI_DEVICES/$1/iommu_group")
        printf '%s\n' "${dg_link##*/}"
    fi
}

# The /dev/vfio node for a group: /dev/vfio/N with an IOMMU,
# /dev/vfio/noiommu-N in vfio's unsafe no-IOMMU mode.
group_node() {
    if [ -n "$1" ] && [ -e "/dev/vfio/$1" ]; then
        printf '%s\n' "/dev/vfio/$1"
    elif [ -n "$1" ] && [ -e "/dev/vfio/noiommu-$1" ]; then
        printf '%s\n' "/dev/vfio/noiommu-$1"
    fi
}

# Every NVMe function, in address order (the glob expands sorted).
list_nvme() {
    for ln_dev in "$PCI_DEVICES"/*; do
        [ -r "$ln_dev/class" ] || continue
        if [ "$(cat "$ln_dev/class")" = "$NVME_CLASS" ]; then
            printf '%s\n' "${ln_dev##*/}"
        fi
    done
}

# Accept 0000:00:10.0 and the lspci-style short 00:10.0; echo the full form.
normalize_bdf() {
    nb=$(printf '%s' "$1" | tr 'A-F' 'a-f')
    case $nb in
        [0-9a-f][0-9a-f]:[0-9a-f][0-9a-f].[0-7]) nb=0000:$nb ;;
        [0-9a-f][0-9a-f][0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f].[0-7]) ;;
        *) die "'$1' is not a PCI address (expected 0000:00:10.0 or 00:10.0)" ;;
    esac
    [ -e "$PCI_DEVICES/$nb" ] || die "no PCI device $nb"
    printf '%s\n' "$nb"
}

# Turn the command line's BDFs (or, with none, every NVMe function) into a
# space-separated list of full addresses in $BDFS.  A named non-NVMe device is
# refused unless --force: a typo in an address must not take the host's network
# card or disk controller away from its driver.
collect_bdfs() {
    BDFS=
    if [ $# -eq 0 ]; then
        [ "$all" = 1 ] || {
            printf '%s: %s: name the functions (e.g. %s %s 0000:00:10.0), or give --all for every NVMe function; nothing was changed\n' \
                "$PROG" "$cmd" "$PROG" "$cmd" >&2
            exit 2
        }
        BDFS=$(list_nvme | tr '\n' ' ')
        [ -n "$BDFS" ] || die "no NVMe PCI functions (class $NVME_CLASS) found"
        return 0
    fi
    [ "$all" = 0 ] || die "give either BDFs or --all, not both"
    for cb_arg in "$@"; do
        cb_bdf=$(normalize_bdf "$cb_arg") || exit 1
        cb_class=$(cat "$PCI_DEVICES/$cb_bdf/class")
        if [ "$cb_class" != "$NVME_CLASS" ]; then
            [ "$force" = 1 ] || die "$cb_bdf is not an NVMe function (class $cb_class); use --force to handle it anyway"
            warn "$cb_bdf is not an NVMe function (class $cb_class); going ahead (--force)"
        fi
        BDFS="$BDFS $cb_bdf"
    done
}

# Block devices (whole namespaces, as in /sys/block) of a kernel-bound
# controller.  The namespaces are children of the controller device
# (.../BDF/nvme/nvmeX/).  With native NVMe multipath (Debian enables it) the
# child is a hidden per-path disk nvmeAcBnC and the visible disk is the head
# nvmeAnC, so strip the "cB" part to get the name in /sys/block.
nvme_blockdevs() {
    nbd_out=
    for nbd_ctrl in "$PCI_DEVICES/$1"/nvme/nvme*; do
        [ -d "$nbd_ctrl" ] || continue
        for nbd_ns in "$nbd_ctrl"/nvme*n*; do
            [ -e "$nbd_ns" ] || continue
            nbd_name=$(printf '%s\n' "${nbd_ns##*/}" | sed 's/c[0-9][0-9]*n/n/')
            [ -e "$SYS/block/$nbd_name" ] || continue
            case " $nbd_out " in *" $nbd_name "*) ;; *) nbd_out="$nbd_out $nbd_name" ;; esac
        done
    done
    printf '%s\n' "${nbd_out# }"
}

# Why a block device (disk or partition, by kernel name) must not be pulled
# away from the kernel; prints one reason per line, nothing if it is free.
# Mounts are matched both by name in /proc/mounts (what mount(8) shows) and by
# major:minor in mountinfo, which also catches mounts made through a symlink
# such as /dev/disk/by-uuid/...
blockdev_users() {
    bu_name=$1
    bu_dev=/dev/$bu_name
    bu_mm=
    [ -r "$SYS/class/block/$bu_name/dev" ] && bu_mm=$(cat "$SYS/class/block/$bu_name/dev")
    if [ -r /proc/mounts ]; then
        while read -r bu_src bu_mnt _; do
            [ "$bu_src" = "$bu_dev" ] && printf '%s is mounted on %s\n' "$bu_dev" "$bu_mnt"
        done </proc/mounts
    fi
    if [ -n "$bu_mm" ] && [ -r /proc/self/mountinfo ]; then
        # fields: id parent major:minor root mountpoint ...
        while read -r _ _ bu_devmm _ bu_mnt _; do
            if [ "$bu_devmm" = "$bu_mm" ] && ! grep -q "^$bu_dev $bu_mnt " /proc/mounts 2>/dev/null; then
                printf '%s is mounted on %s\n' "$bu_dev" "$bu_mnt"
            fi
        done </proc/self/mountinfo
    fi
    if [ -r /proc/swaps ]; then
        while read -r bu_src _; do
            [ "$bu_src" = Filename ] && continue
            if [ "$bu_src" = "$bu_dev" ] || [ "$(readlink -f "$bu_src" 2>/dev/null)" = "$bu_dev" ]; then
                printf '%s is in use as swap\n' "$bu_dev"
            fi
        done </proc/swaps
    fi
    bu_holders=
    for bu_h in "$SYS/class/block/$bu_name/holders"/*; do
        [ -e "$bu_h" ] && bu_holders="$bu_holders ${bu_h##*/}"
    done
    [ -n "$bu_holders" ] && printf '%s is held by%s (device-mapper/md/...)\n' "$bu_dev" "$bu_holders"
    open_holders "$bu_name"
    member_of "$bu_name"
    return 0
}

# Processes that have the block device open, one line each.  An fd's link names
# the device node the kernel opened (/dev/disk/by-* links resolved), and one
# `ls -l` over every /proc/PID/fd lists them all without a readlink per fd.
open_holders() {
    oh_dev=/dev/$1
    for oh_pid in $(ls -l /proc/[0-9]*/fd 2>/dev/null | awk -v dev="$oh_dev" '
        /^\/proc\/[0-9]+\/fd:$/ { split($0, p, "/"); pid = p[3]; next }
        $NF == dev && $(NF - 1) == "->" && !seen[pid]++ { print pid }'); do
        oh_comm=$(cat "/proc/$oh_pid/comm" 2>/dev/null) || continue
        printf '%s is held open by pid %s (%s): stop that process first\n' "$oh_dev" "$oh_pid" "$oh_comm"
    done
}

# A device that is part of a volume manager or a multi-device btrfs, by the
# signature blkid finds on it (util-linux and busybox blkid both print TYPE="...").
# Without blkid there is nothing to go on, and the other checks still apply.
member_of() {
    mo_dev=/dev/$1
    command -v blkid >/dev/null 2>&1 || return 0
    mo_type=$(blkid "$mo_dev" 2>/dev/null | sed -n 's/.* TYPE="\([^"]*\)".*/\1/p')
    case $mo_type in
        LVM2_member)
            printf '%s is an LVM physical volume: deactivate its volume group (vgchange -an VG) and take it out of LVM (vgreduce, pvremove) first\n' "$mo_dev" ;;
        zfs_member)
            printf '%s is a ZFS pool member: export the pool (zpool export POOL) first\n' "$mo_dev" ;;
        btrfs)
            # Only a filesystem of several devices: a single-device one is in
            # use only when mounted, which the mount checks see.
            for mo_fs in "$SYS"/fs/btrfs/*/devices/"$1"; do
                [ -e "$mo_fs" ] || continue
                mo_fs=${mo_fs%/devices/*}
                [ "$(ls "$mo_fs/devices" | wc -l)" -gt 1 ] || continue
                printf '%s is a device of btrfs filesystem %s: unmount it, or move its data off with btrfs device remove, first\n' "$mo_dev" "${mo_fs##*/}"
            done ;;
    esac
}

# All reasons a kernel-bound controller is busy: every namespace and each of
# its partitions (which appear as subdirectories nvmeXnYpZ of the disk).
controller_users() {
    for cu_disk in $(nvme_blockdevs "$1"); do
        blockdev_users "$cu_disk"
        for cu_part in "$SYS/block/$cu_disk/$cu_disk"p*; do
            [ -e "$cu_part/partition" ] || continue
            blockdev_users "${cu_part##*/}"
        done
    done
}

# --- hugepages ---------------------------------------------------------------

# Reserve HUGEMEM MiB as 2 MiB pages.  /proc/sys/vm/nr_hugepages counts pages of
# the *default* size, which is 2 MiB on x86-64 unless the kernel was booted with
# default_hugepagesz=1G; in that case use the per-size sysfs knob instead so
# that we never reserve 1 GiB pages by mistake.
hugepages() {
    hp_knob=/proc/sys/vm/nr_hugepages
    hp_default=$(sed -n 's/^Hugepagesize: *\([0-9]*\) kB/\1/p' /proc/meminfo 2>/dev/null)
    if [ "${hp_default:-2048}" != 2048 ]; then
        hp_knob=$SYS/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
        [ -e "$hp_knob" ] || die "the kernel has no 2 MiB hugepages"
    fi

    if [ -z "${HUGEMEM:-}" ]; then
        msg "hugepages: $(cat "$hp_knob") x 2 MiB reserved (set HUGEMEM=MiB to change)"
        return 0
    fi
    case $HUGEMEM in
        ''|*[!0-9]*) die "HUGEMEM must be a number of MiB, got '$HUGEMEM'" ;;
    esac
    hp_want=$(( (HUGEMEM + 1) / 2 ))

    # Hugepages are only usable through a hugetlbfs mount; make sure there is
    # one at the conventional place before reserving.
    if ! grep -q "^[^ ]* $HUGEMNT hugetlbfs " /proc/mounts 2>/dev/null; then
        mkdir -p "$HUGEMNT" || die "cannot create $HUGEMNT"
        mount -t hugetlbfs -o pagesize=2M nodev "$HUGEMNT" ||
            die "cannot mount hugetlbfs at $HUGEMNT"
        msg "mounted hugetlbfs at $HUGEMNT"
    fi

    # The kernel silently reserves fewer pages when memory is fragmented or
    # short, so read the value back instead of trusting the write.
    echo "$hp_want" >"$hp_knob" 2>/dev/null || die "cannot write $hp_knob"
    hp_got=$(cat "$hp_knob")
    if [ "$hp_got" -lt "$hp_want" ]; then
        die "asked for $hp_want hugepages of 2 MiB (HUGEMEM=$HUGEMEM MiB) but the kernel reserved only $hp_got ($((hp_got * 2)) MiB)"
    fi
    msg "hugepages: $hp_got x 2 MiB reserved ($((hp_got * 2)) MiB), hugetlbfs at $HUGEMNT"
}

# --- commands ----------------------------------------------------------------

cmd_list() {
    list_nvme
}

cmd_status() {
    st_found=0
    printf '%-13s %-10s %-9s %-6s %-20s %s\n' BDF VEN:DEV DRIVER GROUP VFIO-NODE BLOCK-DEVICES
    for st_bdf in $(list_nvme); do
        st_found=1
        st_d=$PCI_DEVICES/$st_bdf
        st_vd="$(sed 's/^0x//' "$st_d/vendor"):$(sed 's/^0x//' "$st_d/device")"
        st_drv=$(dev_driver "$st_bdf")
        st_grp=$(dev_group "$st_bdf")
        st_node=-
        st_blk=-
        if [ "$st_drv" = vfio-pci ]; then
            st_node=$(group_node "$st_grp")
            [ -n "$st_node" ] || st_node="(missing)"
        elif [ -n "$st_drv" ]; then
            st_blk=$(nvme_blockdevs "$st_bdf")
            [ -n "$st_blk" ] || st_blk=-
        fi
        printf '%-13s %-10s %-9s %-6s %-20s %s\n' "$st_bdf" "$st_vd" \
            "${st_drv:-none}" "${st_grp:-none}" "$st_node" "$st_blk"
    done
    [ "$st_found" = 1 ] || msg "no NVMe PCI functions (class $NVME_CLASS) found"
    if [ -r "$SYS/module/vfio/parameters/enable_unsafe_noiommu_mode" ]; then
        msg "vfio enable_unsafe_noiommu_mode=$(cat "$SYS/module/vfio/parameters/enable_unsafe_noiommu_mode")"
    fi
    st_hp=$(sed -n 's/^HugePages_Total: *//p' /proc/meminfo 2>/dev/null)
    st_hf=$(sed -n 's/^HugePages_Free: *//p' /proc/meminfo 2>/dev/null)
    st_mnt=$(grep ' hugetlbfs ' /proc/mounts 2>/dev/null | cut -d' ' -f2 | tr '\n' ' ')
    st_mnt=${st_mnt% }
    msg "hugepages (default size): ${st_hp:-0} total, ${st_hf:-0} free; hugetlbfs mounted at: ${st_mnt:-nowhere}"
}

# Write a sysfs attribute, turning the shell's cryptic redirection failure into
# a message that says which file and why it matters.
sysfs_write() {
    if ! printf '%s\n' "$2" >"$1" 2>/dev/null; then
        return 1
    fi
}

cmd_bind() {
    collect_bdfs "$@"

    # Without vfio-pci there is nothing to bind to.  modprobe may be missing or
    # fail on a kernel with vfio-pci built in, so judge by the sysfs driver dir.
    modprobe vfio-pci 2>/dev/null
    [ -d "$SYS/bus/pci/drivers/vfio-pci" ] ||
        die "vfio-pci driver not available (modprobe vfio-pci failed)"

    [ -n "${HUGEMEM:-}" ] && hugepages

    # First check every device, then change any: a refusal must not leave half
    # of the requested devices rebound.
    bd_busy=0
    for bd_bdf in $BDFS; do
        [ "$(dev_driver "$bd_bdf")" = nvme ] || continue
        bd_users=$(controller_users "$bd_bdf")
        [ -n "$bd_users" ] || continue
        if [ "$force" = 1 ]; then
            printf '%s\n' "$bd_users" | while read -r bd_line; do
                warn "$bd_bdf: $bd_line; unbinding anyway (--force)"
            done
        else
            printf '%s\n' "$bd_users" | while read -r bd_line; do
                printf '%s: error: refusing to unbind %s from nvme: %s\n' "$PROG" "$bd_bdf" "$bd_line" >&2
            done
            bd_busy=1
        fi
    done
    [ "$bd_busy" = 0 ] || die "devices in use; free them as said above (unmount, swapoff, remove holders, stop processes, take them out of LVM/ZFS/btrfs), or use --force (data loss risk)"

    bd_fail=0
    for bd_bdf in $BDFS; do
        bd_d=$PCI_DEVICES/$bd_bdf
        bd_old=$(dev_driver "$bd_bdf")
        [ -e "$bd_d/driver_override" ] || die "$bd_bdf: kernel lacks driver_override"
        sysfs_write "$bd_d/driver_override" vfio-pci || die "$bd_bdf: cannot write driver_override"
        if [ "$bd_old" != vfio-pci ]; then
            if [ -n "$bd_old" ]; then
                sysfs_write "$bd_d/driver/unbind" "$bd_bdf" ||
                    die "$bd_bdf: cannot unbind from $bd_old"
            fi
            # drivers_probe reports an error when no driver takes the device;
            # the check below gives the real diagnosis.
            sysfs_write "$SYS/bus/pci/drivers_probe" "$bd_bdf" || true
        fi

        bd_new=$(dev_driver "$bd_bdf")
        if [ "$bd_new" != vfio-pci ]; then
            bd_fail=1
            bd_why=
            if [ -z "$(dev_group "$bd_bdf")" ]; then
                bd_why=" (it has no IOMMU group: boot with the IOMMU on, e.g. intel_iommu=on, or load vfio with enable_unsafe_noiommu_mode=1)"
            fi
            printf '%s: error: %s: not bound to vfio-pci, driver is now %s%s\n' \
                "$PROG" "$bd_bdf" "${bd_new:-none}" "$bd_why" >&2
            continue
        fi

        # devtmpfs creates the node at once, udev on a host may lag a little.
        bd_grp=$(dev_group "$bd_bdf")
        bd_node=$(group_node "$bd_grp")
        bd_i=0
        while [ -z "$bd_node" ] && [ "$bd_i" -lt 50 ]; do
            sleep 0.1 2>/dev/null || sleep 1
            bd_i=$((bd_i + 1))
            bd_node=$(group_node "$bd_grp")
        done
        if [ -z "$bd_node" ]; then
            bd_fail=1
            printf '%s: error: %s: bound to vfio-pci but no /dev/vfio node for group %s\n' \
                "$PROG" "$bd_bdf" "${bd_grp:-none}" >&2
            continue
        fi
        if [ "$bd_old" = vfio-pci ]; then
            msg "$bd_bdf: already bound to vfio-pci, group ${bd_grp}: $bd_node"
        else
            msg "$bd_bdf: ${bd_old:-none} -> vfio-pci, group ${bd_grp}: $bd_node"
        fi
    done
    [ "$bd_fail" = 0 ] || exit 1
}

cmd_reset() {
    collect_bdfs "$@"
    modprobe nvme 2>/dev/null
    [ -d "$SYS/bus/pci/drivers/nvme" ] ||
        die "nvme driver not available (modprobe nvme failed)"

    rs_fail=0
    for rs_bdf in $BDFS; do
        rs_d=$PCI_DEVICES/$rs_bdf
        rs_old=$(dev_driver "$rs_bdf")
        # An empty write clears driver_override, so normal id matching (and
        # with it the nvme driver) applies again.
        [ -e "$rs_d/driver_override" ] && { sysfs_write "$rs_d/driver_override" "" ||
            die "$rs_bdf: cannot clear driver_override"; }
        if [ "$rs_old" != nvme ]; then
            if [ -n "$rs_old" ]; then
                sysfs_write "$rs_d/driver/unbind" "$rs_bdf" ||
                    die "$rs_bdf: cannot unbind from $rs_old (is it still open by a process?)"
            fi
            sysfs_write "$SYS/bus/pci/drivers_probe" "$rs_bdf" || true
        fi
        rs_new=$(dev_driver "$rs_bdf")
        if [ "$rs_new" != nvme ]; then
            rs_fail=1
            printf '%s: error: %s: not bound to nvme, driver is now %s\n' "$PROG" "$rs_bdf" "${rs_new:-none}" >&2
            continue
        fi
        # The nvme driver brings the controller up and scans namespaces
        # asynchronously after probe returns.  Wait (bounded) for the block
        # devices so that a script can use /dev/nvmeXnY right after reset.
        rs_i=0
        rs_blk=$(nvme_blockdevs "$rs_bdf")
        while [ -z "$rs_blk" ] && [ "$rs_i" -lt 100 ]; do
            sleep 0.1 2>/dev/null || sleep 1
            rs_i=$((rs_i + 1))
            rs_blk=$(nvme_blockdevs "$rs_bdf")
        done
        # Namespaces of one controller show up one by one; give stragglers a
        # moment once the first has appeared.
        if [ -n "$rs_blk" ]; then
            sleep 0.3 2>/dev/null || sleep 1
            rs_blk=$(nvme_blockdevs "$rs_bdf")
        fi
        if [ "$rs_old" = nvme ]; then
            msg "$rs_bdf: already bound to nvme, block devices: ${rs_blk:-none yet}"
        else
            msg "$rs_bdf: ${rs_old:-none} -> nvme, block devices: ${rs_blk:-none yet}"
        fi
    done
    [ "$rs_fail" = 0 ] || exit 1
}

# The kernel's block device for namespace 1 of one function, once the nvme driver has
# created it: after a rebind the names (nvme0n1, nvme1n1...) follow probe order.
cmd_blockdev() {
    [ $# -eq 1 ] || die "blockdev takes exactly one BDF"
    bd_bdf=$(normalize_bdf "$1") || exit 2
    bd_try=0
    while [ $bd_try -lt 200 ]; do
        for bd_name in $(nvme_blockdevs "$bd_bdf"); do
            case $bd_name in
                *n1) [ -b "/dev/$bd_name" ] && { printf '/dev/%s\n' "$bd_name"; return 0; } ;;
            esac
        done
        sleep 0.1
        bd_try=$((bd_try + 1))
    done
    die "$bd_bdf: no block device appeared; is it on the kernel nvme driver? (setup.sh reset $bd_bdf)"
}

# --- main --------------------------------------------------------------------

force=0
all=0
[ $# -gt 0 ] || { usage >&2; exit 2; }
cmd=$1
shift

# Options may appear anywhere after the command; everything else is a BDF.
args=
for a in "$@"; do
    case $a in
        -f|--force) force=1 ;;
        --all) all=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) printf '%s: unknown option %s\n' "$PROG" "$a" >&2; usage >&2; exit 2 ;;
        *) args="$args $a" ;;
    esac
done
# BDFs contain no whitespace or glob characters, so word splitting is safe here.
# shellcheck disable=SC2086
set -- $args

case $cmd in
    status) cmd_status ;;
    list) cmd_list ;;
    bind) cmd_bind "$@" ;;
    reset) cmd_reset "$@" ;;
    hugepages) hugepages ;;
    blockdev) cmd_blockdev "$@" ;;
    help|-h|--help) usage ;;
    *) printf '%s: unknown command %s\n' "$PROG" "$cmd" >&2; usage >&2; exit 2 ;;
esac
