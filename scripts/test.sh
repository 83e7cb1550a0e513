#!/usr/bin/env bash
# test.sh - nvcopy's full test suite, as CI runs it (.ci/run calls this).
#
#   scripts/test.sh            everything: fmt, clippy, host tests, the VM suites
#   NVCOPY_SKIP_VM=1 scripts/test.sh   host checks only (no QEMU), for quick iterations
#   NVCOPY_SKIP_FUZZ=1 scripts/test.sh   everything but the minute of fuzzing
#
# Run as root on a fresh Debian 12 machine: scripts/vm.sh installs QEMU, busybox and a
# guest kernel from Debian's packages, and cargo fetches the crates. The last line is
# "N passed, N failed", summed over every suite: libtest's own counts for the Rust
# tests (host and guest), plus one check each for fmt, clippy, the fuzz run and each VM
# boot.
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
LOGS=${NVCOPY_TEST_LOGS:-$REPO/target/test-logs}
mkdir -p "$LOGS"
PASSED=0
FAILED=0

log() { printf '\n== %s\n' "$*"; }

# Adds up libtest's "test result: ... N passed; M failed" lines from a log, and sets
# RESULTS to how many such lines there were, so a caller can tell "ran nothing" from
# "all passed". (Globals, not output: a $( ) subshell would lose the sums.)
count_results() {
    local file=$1 p f
    RESULTS=0
    while read -r p f; do
        PASSED=$((PASSED + p))
        FAILED=$((FAILED + f))
        RESULTS=$((RESULTS + 1))
    done < <(tr -d '\r' <"$file" | sed -n 's/.*test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p')
}

# One pass/fail check for a whole command (fmt, clippy).
check() {
    local name=$1
    shift
    log "$name"
    if "$@" >"$LOGS/$name.log" 2>&1; then
        PASSED=$((PASSED + 1))
        echo "ok: $name"
    else
        FAILED=$((FAILED + 1))
        echo "FAILED: $name"
        tail -n 40 "$LOGS/$name.log"
    fi
}

# Runs a Rust test command and counts libtest's results. A command that fails without
# reporting a failed test (a build error, a crashed VM) counts as one failure.
tests() {
    local name=$1
    shift
    log "$name"
    local before=$FAILED
    "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    count_results "$LOGS/$name.log"
    if [ "$rc" -ne 0 ] && [ "$FAILED" -eq "$before" ]; then
        FAILED=$((FAILED + 1))
        echo "FAILED: $name exited with status $rc"
    elif [ "$RESULTS" -eq 0 ]; then
        FAILED=$((FAILED + 1))
        echo "FAILED: $name ran no tests"
    fi
}

command -v ddrescuelog >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gddrescue; } >&2 || echo "warning: installing gddrescue failed; tests/mapfile_ddrescuelog.rs will fail" # ddrescuelog, for the host tests
# The NVMe/TCP PDU parsers under libFuzzer for a minute (fuzz/; the checks are
# nvcopy_tcp::fuzz::parse_any, which the host tests also run over a seeded corpus).
# cargo-fuzz is installed when missing (about a minute and a half); it passes -Z flags,
# which the stable toolchain takes under RUSTC_BOOTSTRAP=1. What the fuzzer adds to the
# corpus goes to the logs, not into fuzz/corpus; a crash leaves its input in
# fuzz/artifacts/pdu/ and the log says how to replay it. NVCOPY_SKIP_FUZZ=1 skips it.
fuzz_pdu() {
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --version =0.13.2 --locked || return 1
    cargo fuzz --version || return 1
    local grown=$LOGS/fuzz-corpus-pdu
    mkdir -p "$grown"
    (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run pdu "$grown" corpus/pdu -- -max_total_time="${NVCOPY_FUZZ_SECONDS:-60}")
}

check fmt cargo fmt --all -- --check
check clippy cargo clippy --workspace --all-targets --all-features -- -D warnings
tests host cargo test --workspace --all-features
if [ "${NVCOPY_SKIP_FUZZ:-0}" != 1 ]; then
    check fuzz-pdu fuzz_pdu
fi

if [ "${NVCOPY_SKIP_VM:-0}" != 1 ]; then
    VMWORK=${NVCOPY_VM_WORK:-$REPO/vm-work}
    mkdir -p "$VMWORK"
    IMAGE=$VMWORK/file-backed.img
    rm -f "$IMAGE"
    truncate -s 64M "$IMAGE"
    # The layout tests/vm.rs expects: 512 B, 2 x 4 KiB, mdts=1, and a file-backed 4 KiB drive.
    tests vm-iommu timeout -k 10 1500 bash scripts/vm.sh run --timeout 1200 \
        --nvme size=64M --nvme size=64M,lbs=4096,ns=2 --nvme size=64M,mdts=1 \
        --nvme "file=$IMAGE,lbs=4096" \
        -- /tests/nvcopy-vm --ignored guest_ --skip guest_noiommu --test-threads=1
    tests vm-host-image env NVCOPY_HOST_IMAGE="$IMAGE" cargo test --test vm -- --ignored host_
    export NVCOPY_VM_NO_BUILD=1
    tests vm-noiommu timeout -k 10 1500 bash scripts/vm.sh run --timeout 1200 --noiommu \
        --nvme size=64M \
        -- env NVCOPY_NOIOMMU=1 /tests/nvcopy-vm --ignored guest_noiommu --test-threads=1
    # The copier end to end (tests/vm_copy.rs; the layout is in scripts/vm-copy-suite.sh):
    # whole-drive and region copies, zeroes and the bad-input cases that need a device,
    # through the CLI, then the host compares the image files byte for byte.
    COPYIMG=$VMWORK/copy-images
    check vm-copy-images bash scripts/vm-copy-suite.sh prepare "$COPYIMG"
    tests vm-copy timeout -k 10 1500 bash scripts/vm-copy-suite.sh run "$COPYIMG" --timeout 1200
    tests vm-copy-host env NVCOPY_COPY_IMAGES="$COPYIMG" cargo test --test vm_copy -- --ignored host_
    # What `result: ok`, --map and signals promise (tests/vm_trust.rs; the layout is in
    # scripts/vm-trust-suite.sh): kill -9 and SIGINT mid-copy, then a resume from the map;
    # a blkdebug read error as a `-` area ddrescuelog sees; a Flush to every destination,
    # counted in QEMU's trace. The host then checks the images, maps and trace.
    TRUSTIMG=$VMWORK/trust-images
    check vm-trust-images bash scripts/vm-trust-suite.sh prepare "$TRUSTIMG"
    tests vm-trust timeout -k 10 900 bash scripts/vm-trust-suite.sh run "$TRUSTIMG" --timeout 600
    tests vm-trust-host env NVCOPY_TRUST_IMAGES="$TRUSTIMG" cargo test --test vm_trust -- --ignored host_
    # Files and kernel block devices next to VFIO drives (tests/vm_files.rs; the layout is
    # in scripts/vm-files-suite.sh): a namespace on the kernel nvme driver, a virtio-blk
    # disk and a file on a mounted ext4 as sources and destinations, a fan-out to a drive
    # and a file, mounted devices refused. The host checks the images, the ext4 one with
    # e2fsck and debugfs.
    FILESIMG=$VMWORK/files-images
    check vm-files-images bash scripts/vm-files-suite.sh prepare "$FILESIMG"
    tests vm-files timeout -k 10 900 bash scripts/vm-files-suite.sh run "$FILESIMG" --timeout 600
    tests vm-files-host env NVCOPY_FILES_IMAGES="$FILESIMG" cargo test --test vm_files -- --ignored host_
    # NVMe/TCP (tests/vm_tcp.rs; the layout is in scripts/vm-tcp-suite.sh): nvmet-tcp in
    # the guest exports a drive on the kernel driver; a VFIO drive fans out to it and to a
    # second VFIO drive, the TCP namespace is copied back, a wrong NQN and a refused port
    # fail. The host checks the images byte for byte.
    TCPIMG=$VMWORK/tcp-images
    check vm-tcp-images bash scripts/vm-tcp-suite.sh prepare "$TCPIMG"
    tests vm-tcp timeout -k 10 900 bash scripts/vm-tcp-suite.sh run "$TCPIMG" --timeout 600
    tests vm-tcp-host env NVCOPY_TCP_IMAGES="$TCPIMG" cargo test --test vm_tcp -- --ignored host_
    # NVMe/TCP between two guests joined by a QEMU socket network on the host's loopback
    # (tests/vm_tcp2.rs; the layout is in scripts/vm-tcp2-suite.sh): nvmet-tcp in one guest,
    # nvcopy in the other copies a VFIO drive to it over virtio-net and back. The libtest
    # lines of both guests are counted; the host checks the images byte for byte.
    TCP2IMG=$VMWORK/tcp2-images
    check vm-tcp2-images bash scripts/vm-tcp2-suite.sh prepare "$TCP2IMG"
    tests vm-tcp2 timeout -k 10 900 bash scripts/vm-tcp2-suite.sh run "$TCP2IMG" --timeout 600
    tests vm-tcp2-host env NVCOPY_TCP2_IMAGES="$TCP2IMG" cargo test --test vm_tcp2 -- --ignored host_
fi

echo
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
