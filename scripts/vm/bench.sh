# scripts/vm/bench.sh - `scripts/vm.sh bench`: nvcopy against dd in one guest boot.
# Sourced by scripts/vm.sh (defines functions only); the guest half is
# scripts/bench-guest.sh, the report benches/vm-bench-report.py.

# nvcopy against dd (O_DIRECT, kernel nvme driver) on four emulated drives in one guest
# boot: 1 -> 1, 1 -> 3, sequential read, a chunk x queue-depth sweep and 1 vs 2 reactors
# (scripts/bench-guest.sh). The host writes the source's random data before boot; the
# report (benches/vm-bench-report.py) prints medians, min-max and ratios and writes
# BENCH_OUT (benches/results/vm-bench.json), then benches/plot draws the sweep.
# The guest also exports one drive through nvmet-tcp and compares nvcopy's NVMe/TCP host
# with the kernel's initiator (nvme-cli, nvme-tcp) and dd on it; BENCH_ONLY=tcp runs that
# comparison alone (no doorbell boots, no sweep plot; BENCH_OUT defaults to
# benches/results/vm-bench-tcp.json).
# Environment: BENCH_MB BENCH_RUNS SWEEP SWEEP_MB SWEEP_CHUNKS SWEEP_QDS SWEEP_PASSES
# CORES_RUNS STARTUP_RUNS BENCH_ONLY (see bench-guest.sh), BENCH_OUT, BENCH_TIMEOUT (3600 s).
# Never fails on speed; exits with the guest script's status.
vm_cmd_bench() {
    local mb=${BENCH_MB:-1024} gib tmp log load rc=0 v only=${BENCH_ONLY:-}
    local out=${BENCH_OUT:-$VM_REPO/benches/results/vm-bench${only:+-$only}.json}
    [[ $mb =~ ^[1-9][0-9]*$ ]] || vm_usage_error "BENCH_MB wants MiB, got '$mb'"
    [[ -z $only || $only == tcp ]] || vm_usage_error "BENCH_ONLY wants tcp (or nothing, for the whole bench), got '$only'"
    gib=$(( (mb + 1023) / 1024 + 1 ))
    ((gib >= 2)) || gib=2
    local -a envs=(--env "BENCH_MB=$mb")
    for v in BENCH_RUNS SWEEP SWEEP_MB SWEEP_CHUNKS SWEEP_QDS SWEEP_PASSES CORES_RUNS STARTUP_RUNS BENCH_ONLY; do
        [[ -n ${!v:-} ]] && envs+=(--env "$v=${!v}")
    done
    mkdir -p "$VM_WORK"
    tmp=$(mktemp -d "$VM_WORK/bench.XXXXXX") || vm_die "cannot create a directory in $VM_WORK"
    # Random source data written on the host: far faster than /dev/urandom at TCG speed.
    vm_log "bench: writing $mb MiB of random data to the source image (${gib}G)"
    head -c "$((mb << 20))" /dev/urandom >"$tmp/src.img" && truncate -s "${gib}G" "$tmp/src.img" ||
        { rm -rf "$tmp"; vm_die "cannot write the source image in $tmp"; }
    # An ext4 filesystem for the file benchmarks (bench-guest.sh keeps its controller on
    # the kernel nvme driver): room for a source and a destination file.
    vm_install_packages e2fsprogs
    truncate -s "$((2 * gib + 1))G" "$tmp/fs.img" && mkfs.ext4 -q -F "$tmp/fs.img" ||
        { rm -rf "$tmp"; vm_die "cannot make the ext4 image in $tmp"; }
    log=$tmp/console.log
    # Other work on the host (builds, other VMs) slows TCG down: the report records the
    # load average before and after.
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    vm_boot --timeout "${BENCH_TIMEOUT:-3600}" --nvme "file=$tmp/src.img" \
        --nvme "size=${gib}G" --nvme "size=${gib}G" --nvme "size=${gib}G" --nvme "file=$tmp/fs.img" --kmod ext4 \
        --kmod nvmet --kmod nvmet-tcp --kmod crc32c_generic --kmod nvme-tcp --deb nvme-cli \
        --add "$VM_SCRIPT_DIR/nvmet-setup.sh:/bin/nvmet-setup.sh" \
        --add "$VM_SCRIPT_DIR/bench-guest.sh:/bin/bench-guest.sh" "${envs[@]}" "$@" \
        -- sh /bin/bench-guest.sh | tee "$log"
    rc=${PIPESTATUS[0]}
    ((rc != 0)) || [[ -n $only ]] || vm_bench_doorbells "$tmp" "$log" || rc=$?
    if grep -q '^BENCH ' "$log"; then
        BENCH_QEMU_VERSION=$("$VM_QEMU" --version | head -n 1) BENCH_LOAD_START=$load \
            python3 "$VM_REPO/benches/vm-bench-report.py" "$log" "$out" --raw "${out%.json}.raw" ||
            vm_log "bench: the report failed"
        if [[ -z $only ]] && command -v cargo >/dev/null; then
            cargo run --quiet --release --manifest-path "$VM_REPO/Cargo.toml" -p nvcopy-bench-plot -- \
                "$out" "$(dirname "$out")/sweep.png" || vm_log "bench: plotting the sweep failed"
        fi
    else
        vm_log "bench: the guest printed no results"
    fi
    rm -rf "$tmp"
    return "$rc"
}

# Doorbell MMIO writes per command, from the device's side: QEMU's own trace events
# (pci_nvme_mmio_doorbell_sq/cq for every doorbell register write, pci_nvme_io_cmd for
# every I/O command) over one DB_MB MiB 1 -> 1 copy at the default chunk and depth, once
# with shadow doorbells (the default) and once with --no-shadow-doorbells, each in a boot
# of its own so that the two traces cannot mix. Each MMIO write is a trap into the
# hypervisor under emulation. Appends BENCH lines (test=doorbells) to $2 for the report;
# the admin queue (qid 0) is left out: it always rings by MMIO.
vm_bench_doorbells() {
    local tmp=$1 log=$2 mb=${DB_MB:-256} mode trace sq cq cmds rc=0
    head -c "$((mb << 20))" "$tmp/src.img" >"$tmp/db-src.img" && truncate -s "$((mb << 20))" "$tmp/db-dst.img" ||
        { vm_log "bench: cannot make the doorbell images"; return 1; }
    for mode in shadow mmio; do
        trace=$tmp/doorbells-$mode.log
        local -a extra=()
        [[ $mode == mmio ]] && extra=(--no-shadow-doorbells)
        vm_log "bench: doorbell writes per command, $mode doorbells ($mb MiB copy, QEMU trace)"
        vm_boot --no-build --timeout 900 --nvme "file=$tmp/db-src.img" --nvme "file=$tmp/db-dst.img" \
            --qemu-arg=-trace --qemu-arg=pci_nvme_mmio_doorbell_sq \
            --qemu-arg=-trace --qemu-arg=pci_nvme_mmio_doorbell_cq \
            --qemu-arg=-trace --qemu-arg=pci_nvme_io_cmd --qemu-arg=-D --qemu-arg="$trace" \
            -- nvcopy copy --from "0000:00:10.0+${mb}M" --to "0000:00:11.0+${mb}M" "${extra[@]}" >/dev/null || rc=$?
        ((rc == 0)) || { vm_log "bench: the $mode doorbell run failed ($rc)"; return "$rc"; }
        sq=$(grep -c 'pci_nvme_mmio_doorbell_sq sqid [1-9]' "$trace" || true)
        cq=$(grep -c 'pci_nvme_mmio_doorbell_cq cqid [1-9]' "$trace" || true)
        cmds=$(grep -c 'pci_nvme_io_cmd' "$trace" || true)
        ((cmds > 0)) || { vm_log "bench: no I/O commands in $trace"; return 1; }
        printf 'BENCH test=doorbells tool=nvcopy run=1 wall=0 bytes=%s mode=%s mmio_sq=%s mmio_cq=%s commands=%s per_command=%s\n' \
            "$((mb << 20))" "$mode" "$sq" "$cq" "$cmds" "$(awk -v a="$sq" -v b="$cq" -v c="$cmds" 'BEGIN { printf "%.4f", (a + b) / c }')" |
            tee -a "$log"
    done
}
