# scripts/vm/bench.sh - `scripts/vm.sh bench`: nvcopy against dd in one guest boot.
# Sourced by scripts/vm.sh (defines functions only); the guest half is
# scripts/bench-guest.sh, the report benches/vm-bench-report.py.

# nvcopy against dd (O_DIRECT, kernel nvme driver) on four emulated drives in one guest
# boot: 1 -> 1, 1 -> 3, sequential read, a chunk x queue-depth sweep and 1 vs 2 reactors
# (scripts/bench-guest.sh). The host writes the source's random data before boot; the
# report (benches/vm-bench-report.py) prints medians, min-max and ratios and writes
# BENCH_OUT (benches/results/vm-bench.json), then benches/plot draws the sweep.
# Environment: BENCH_MB BENCH_RUNS SWEEP SWEEP_MB SWEEP_CHUNKS SWEEP_QDS SWEEP_PASSES
# CORES_RUNS STARTUP_RUNS (see bench-guest.sh), BENCH_OUT, BENCH_TIMEOUT (3600 s).
# Never fails on speed; exits with the guest script's status.
vm_cmd_bench() {
    local mb=${BENCH_MB:-1024} gib tmp log load rc=0 v
    local out=${BENCH_OUT:-$VM_REPO/benches/results/vm-bench.json}
    [[ $mb =~ ^[1-9][0-9]*$ ]] || vm_usage_error "BENCH_MB wants MiB, got '$mb'"
    gib=$(( (mb + 1023) / 1024 + 1 ))
    ((gib >= 2)) || gib=2
    local -a envs=(--env "BENCH_MB=$mb")
    for v in BENCH_RUNS SWEEP SWEEP_MB SWEEP_CHUNKS SWEEP_QDS SWEEP_PASSES CORES_RUNS STARTUP_RUNS; do
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
        --add "$VM_SCRIPT_DIR/bench-guest.sh:/bin/bench-guest.sh" "${envs[@]}" "$@" \
        -- sh /bin/bench-guest.sh | tee "$log"
    rc=${PIPESTATUS[0]}
    if grep -q '^BENCH ' "$log"; then
        BENCH_QEMU_VERSION=$("$VM_QEMU" --version | head -n 1) BENCH_LOAD_START=$load \
            python3 "$VM_REPO/benches/vm-bench-report.py" "$log" "$out" --raw "${out%.json}.raw" ||
            vm_log "bench: the report failed"
        if command -v cargo >/dev/null; then
            cargo run --quiet --release --manifest-path "$VM_REPO/Cargo.toml" -p nvcopy-bench-plot -- \
                "$out" "$(dirname "$out")/sweep.png" || vm_log "bench: plotting the sweep failed"
        fi
    else
        vm_log "bench: the guest printed no results"
    fi
    rm -rf "$tmp"
    return "$rc"
}
