#!/usr/bin/env bash
# callgrind-io.sh - instructions per I/O in the NVMe driver's own submit and completion
# path, without the software controller's work.
#
#   scripts/callgrind-io.sh            # N=100000 4 KiB read cycles
#   NVCOPY_IO_COUNT=20000 scripts/callgrind-io.sh
#   NVCOPY_IO_SHADOW=0 scripts/callgrind-io.sh   # controller without shadow doorbells
#
# What it runs: drivers/nvme/benches/io_count.rs (a harness-less bench target), which
# brings the real driver up against the in-process software controller (the
# nvcopy-nvme-sim crate, a dev-dependency) and does N cycles of: submit one 4 KiB Read
# (io_submit), ring the SQ doorbell (io_ring), reap the completion (io_complete). The
# queue pair has 1024 entries, the engine's default, so that the CQ head is reported as
# in a copy (once per half ring; a 2-entry ring would report it at every ring). Each phase is a never-inlined function.
#
# How the controller's work is left out: the software controller is synchronous and does
# everything inside the doorbell stores, i.e. inside
# `<nvcopy_nvme_sim::SimController as nvcopy_nvme::regs::Bar>::write32`. callgrind starts
# with collection off (--collect-atstart=no) and --toggle-collect flips it on entry and
# again on exit of each named function, so toggling on the three phases and on write32
# (which runs nested inside io_ring and io_complete) collects exactly the driver's
# instructions: SQE/PRP/tracker work, the fences, the doorbell call itself, the CQ phase
# poll and completion handling. A second run without the write32 toggle gives driver plus
# controller; the difference is printed as the controller's share, and as a check that
# the toggle matched anything at all.
#
# Instructions (Ir) are exact and do not depend on load, unlike times. They do depend on
# the compiler version and the code; the run prints rustc's version with the figure.
# The vDSO call behind Instant::now() (one per ring, which stamps the deadlines of the
# commands it hands over; at QD1 that is one per command) counts only its user-space
# instructions, about 28. The software controller offers Doorbell Buffer Config by
# default, so the ring and complete phases include the shadow doorbell write, the full
# fence and the EventIdx read; NVCOPY_IO_SHADOW=0 measures plain MMIO doorbells.
#
# Output: a table on stdout; the callgrind files stay in $CALLGRIND_DIR
# (default target/callgrind) for callgrind_annotate.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${NVCOPY_IO_COUNT:-100000}
OUT=${CALLGRIND_DIR:-$REPO/target/callgrind}

die() { printf 'callgrind-io.sh: error: %s\n' "$*" >&2; exit 1; }
log() { printf 'callgrind-io.sh: %s\n' "$*" >&2; }

[[ $N =~ ^[1-9][0-9]*$ ]] || die "NVCOPY_IO_COUNT must be a positive count, got '$N'"
if ! command -v valgrind >/dev/null || ! command -v callgrind_annotate >/dev/null; then
    ((EUID == 0)) || die "valgrind is not installed (apt-get install valgrind)"
    log "installing valgrind"
    apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >&2 ||
        die "apt-get install valgrind failed"
fi
command -v python3 >/dev/null || die "python3 is needed to read cargo's JSON"
mkdir -p "$OUT"

# Build the bench target (profile "bench" = release with the workspace's debug info, so
# the functions keep their names) and find its executable.
log "building the io_count bench target"
BIN=$(cargo bench --manifest-path "$REPO/Cargo.toml" -p nvcopy-nvme \
    --bench io_count --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "io_count":
        print(m["executable"])
') || true
[[ -n $BIN && -x $BIN ]] || die "building the io_count bench failed; run: cargo bench -p nvcopy-nvme --bench io_count --no-run"

# Symbol patterns as callgrind shows them (demangled Rust paths; * matches anything, so
# the legacy mangling's ::h<hash> suffix and the v0 scheme's forms both match).
SUBMIT='io_count::io_submit*'
RING='io_count::io_ring*'
COMPLETE='io_count::io_complete*'
SIM='<nvcopy_nvme_sim::SimController as nvcopy_nvme::regs::Bar>::write32*'

run() { # run NAME EXTRA-ARGS...: one callgrind run, prints the output file
    local name=$1 f=$OUT/$1.callgrind
    shift
    rm -f "$f" "$f.annotate" # a stale annotation would report an earlier run
    NVCOPY_IO_COUNT=$N valgrind --tool=callgrind --collect-atstart=no \
        --toggle-collect="$SUBMIT" --toggle-collect="$RING" --toggle-collect="$COMPLETE" "$@" \
        --callgrind-out-file="$f" "$BIN" >"$OUT/$name.stdout" 2>"$OUT/$name.stderr" ||
        { cat "$OUT/$name.stderr" >&2; die "valgrind run '$name' failed"; }
    grep -q "cycles=$N " "$OUT/$name.stdout" || die "the io_count run '$name' did not report $N cycles"
    printf '%s\n' "$f"
}

# Inclusive Ir of a function, from callgrind_annotate. A function shows up on several
# lines (one per source file its inlined code came from, plus the whole function), so the
# largest figure is the function's inclusive cost. "TOTAL" gives every collected
# instruction.
ir_of() { # ir_of FILE PATTERN
    local txt=$1.annotate
    [[ -s $txt ]] || callgrind_annotate --inclusive=yes --threshold=100 "$1" >"$txt" 2>/dev/null ||
        die "callgrind_annotate $1 failed"
    python3 - "$2" "$txt" <<'PY'
import re, sys
pat, path = sys.argv[1], sys.argv[2]
best = 0
for line in open(path, errors="replace"):
    m = re.match(r"\s*([0-9,]+)\s+(\([^)]*\)\s+)?(.*)$", line)
    if not m:
        continue
    n, name = int(m.group(1).replace(",", "")), m.group(3)
    if pat == "TOTAL":
        if "PROGRAM TOTALS" in name:
            best = n
            break
    elif re.search(pat, name):
        best = max(best, n)
print(best)
PY
}

log "callgrind, $N cycles: driver only (controller toggled off inside write32)"
DRV=$(run driver --toggle-collect="$SIM")
log "callgrind, $N cycles: driver plus controller"
ALL=$(run driver+sim)

sub=$(ir_of "$DRV" 'io_count::io_submit')
ring=$(ir_of "$DRV" 'io_count::io_ring')
comp=$(ir_of "$DRV" 'io_count::io_complete')
drv_total=$(ir_of "$DRV" TOTAL)
all_total=$(ir_of "$ALL" TOTAL)
for v in sub ring comp drv_total all_total; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "could not read the $v count from callgrind_annotate"
done
((sub > 0 && ring > 0 && comp > 0)) ||
    die "a phase collected nothing (submit=$sub ring=$ring complete=$comp): the function names no longer match '$SUBMIT' '$RING' '$COMPLETE'; check with: callgrind_annotate --inclusive=yes $ALL"
((all_total > drv_total)) ||
    die "excluding '$SIM' removed nothing: the software controller's write32 was not matched; check the name with: callgrind_annotate --inclusive=yes $ALL | grep write32"

python3 - "$N" "$sub" "$ring" "$comp" "$drv_total" "$all_total" "$(rustc --version)" <<'PY'
import sys
n, sub, ring, comp, drv, allt = (int(x) for x in sys.argv[1:7])
rustc = sys.argv[7]
print("Instructions per 4 KiB read I/O, NVMe driver against the software controller")
print("(%d cycles of submit + ring + poll at QD1, callgrind Ir, %s)" % (n, rustc))
print()
print("| phase | Ir per I/O |")
print("|---|---|")
print("| submit (IoQpair::submit_read: checks, PRPs, tracker, SQE write) | %.1f |" % (sub / n))
print("| ring (release fence, SQ tail doorbell call) | %.1f |" % (ring / n))
print("| complete (IoQpair::poll: phase tag, acquire fence, CQE, tracker, CQ head doorbell call) | %.1f |" % (comp / n))
print("| **driver total** | **%.1f** |" % (drv / n))
print()
print("software controller's own work per I/O (left out above): %.1f Ir" % ((allt - drv) / n))
print("driver + controller per I/O: %.1f Ir" % (allt / n))
PY
log "callgrind files: $DRV $ALL (callgrind_annotate --inclusive=yes FILE)"
