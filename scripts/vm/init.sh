#!/bin/sh
# /init of the nvcopy test VM: scripts/vm.sh copies this file into each run's
# initramfs payload.  busybox sh; settings come from /etc/nvcopy-vm.conf and
# the command's environment from /etc/nvcopy-vm.env, both written by vm_boot
# (scripts/vm/boot.sh); the command itself is /cmd.
# PID 1 must never exit: every path ends in vm_exit or a forced power-off.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin:/tests HOME=/root TERM=linux
# Creates links only where no file exists, so nvcopy binaries are never shadowed.
/bin/busybox --install -s

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

. /etc/nvcopy-vm.conf

# Report STATUS to the host and stop.  The value written to port 0xf4
# (isa-debug-exit) makes QEMU exit with 2*V+1; V must stay below 128 for the
# host's 8-bit exit status to keep the mapping.  The same status goes to the
# second serial port (a file on the host) first: it proves that the guest,
# not QEMU itself, produced the odd exit code.
vm_exit() {
    ve=$1
    if [ "$ve" -gt 127 ]; then
        echo "vm: command exit status $ve reported as 127"
        ve=127
    fi
    sync
    # Changing a tty setting waits for the output to drain (TCSADRAIN); without
    # it the last lines of output can still sit in the UART when QEMU exits.
    stty -onlcr 2>/dev/null
    echo "NVCOPY-VM-STATUS $ve" >/dev/ttyS1 2>/dev/null
    printf "\\$(printf '%03o' "$ve")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    echo "vm: could not write the exit port; powering off"
    poweroff -f
}

# Setup failed: power off without a status; the host reports a VM failure
# (exit 125) instead of a status the command never returned.
vm_fail() {
    echo "vm: setup failed: $*"
    sync
    poweroff -f
    sleep 10
}

mkdir -p /dev/hugepages /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /dev/shm 2>/dev/null

# vfio first: in no-IOMMU mode the option has to be given when vfio loads.
if [ "$VM_NOIOMMU" = 1 ]; then
    modprobe vfio enable_unsafe_noiommu_mode=1 || vm_fail "modprobe vfio (no-IOMMU)"
fi
for m in vfio vfio_iommu_type1 vfio-pci; do
    modprobe "$m" || vm_fail "modprobe $m"
done

HUGEMEM=$VM_HUGEMEM setup.sh hugepages || vm_fail "hugepage reservation"

NVCOPY_DEVS=$(setup.sh list | sort | tr '\n' ' ')
NVCOPY_DEVS=${NVCOPY_DEVS% }
export NVCOPY_DEVS

# Bind before loading nvme: the kernel driver then never initializes the
# controllers that go to vfio-pci (driver_override keeps it off them), which
# saves boot time and leaves them as QEMU created them.
if [ "$VM_BIND" = 1 ] && [ -n "$NVCOPY_DEVS" ]; then
    setup.sh bind --all || vm_fail "setup.sh bind --all"
fi
modprobe nvme || vm_fail "modprobe nvme"
# Without binding, the kernel driver owns the controllers and creates the
# block devices asynchronously; `reset` waits until they exist, so that CMD
# can open /dev/nvmeXnY right away.
if [ "$VM_BIND" != 1 ] && [ -n "$NVCOPY_DEVS" ]; then
    setup.sh reset --all || vm_fail "setup.sh reset --all (--no-bind)"
fi
for m in $VM_KMODS; do
    modprobe "$m" || vm_fail "modprobe $m (--kmod)"
done

# --net ...,ip=ADDR/LEN: the one NIC (virtio_net, loaded above) gets a static address;
# the kernel names it (no udev), so take the first interface that is not loopback.
if [ -n "${VM_NET_IP:-}" ]; then
    ip link set lo up || vm_fail "ip link set lo up"
    nic= tries=0
    while [ -z "$nic" ] && [ "$tries" -lt 50 ]; do
        for n in /sys/class/net/*; do
            [ "${n##*/}" = lo ] || { nic=${n##*/}; break; }
        done
        [ -n "$nic" ] || { tries=$((tries + 1)); sleep 0.1; }
    done
    [ -n "$nic" ] || vm_fail "--net: no network interface after 5 s (are virtio_pci and virtio_net loaded?)"
    ip addr add "$VM_NET_IP" dev "$nic" || vm_fail "ip addr add $VM_NET_IP dev $nic"
    ip link set "$nic" up || vm_fail "ip link set $nic up"
    echo "vm: $nic $VM_NET_IP"
fi

[ -f /etc/nvcopy-vm.env ] && . /etc/nvcopy-vm.env
cd /tmp || vm_fail "cd /tmp"
echo "vm: NVCOPY_DEVS=$NVCOPY_DEVS"

if [ "$VM_SHELL" = 1 ]; then
    echo "vm: interactive shell; 'exit N' ends the VM with status N (Ctrl-A X kills QEMU)"
    # cttyhack gives the shell a real controlling tty, so Ctrl-C works.
    setsid cttyhack sh
    vm_exit $?
fi

# Plain \n line ends in the host's log: QEMU copies the console byte for byte.
stty -onlcr 2>/dev/null
sh /cmd </dev/null
vm_exit $?
