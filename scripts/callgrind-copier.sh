#!/usr/bin/env bash
# callgrind-copier.sh - the copier's own instructions per chunk, beside the endpoint's.
#
#   scripts/callgrind-copier.sh              # 4096 chunks of 4 KiB, 1 -> 1
#   NVCOPY_CHUNKS=1024 scripts/callgrind-copier.sh
#
# What runs: benches/copier_count.rs, one engine with one reactor copying N chunks of
# 4 KiB from namespace 1 to namespace 2 of the synchronous software controller
# (nvcopy-nvme-sim, which does a command's work inside the doorbell store, so completions
# wait at the next poll), under valgrind --tool=callgrind.
#
# What is counted (Ir, exact instruction counts, not times):
# - Collection starts off (--collect-atstart=no). --toggle-collect flips it on entry and
#   again on exit of each named function, so toggling on nvcopy::reactor::Reactor::run
#   collects the reactor thread's loop and nothing before or after it (bring-up, the main
#   thread's planning and waiting).
# - Toggled off again, nested inside the loop:
#   - `<nvcopy_nvme_sim::SimController as nvcopy_nvme::regs::Bar>::write32`: the software
#     controller's own work (it runs commands inside the doorbell store). The driver's
#     call into it is counted, what the device model does is not.
#   - `nvcopy::reactor::Reactor::check_health`: deadlines, reset controllers, CSTS.CFS.
#     It runs once per millisecond of wall time, so its share per chunk depends on how
#     fast the reactor runs, and valgrind runs it some 50 times slower than the hardware
#     would: counted here it would be a figure of the machine and its load, not of the code.
#   Outside Reactor::run, write32's toggle turns collection *on* during bring-up (admin
#   commands); that is why the total below is Reactor::run's inclusive count, not the
#   program's.
# - "total": Reactor::run's inclusive count: everything the loop does per chunk.
# - "endpoint": the inclusive count of the NVMe endpoint's methods the loop calls, i.e.
#   everything behind the `dyn Endpoint` call boundary (src/endpoint/nvme.rs's
#   NvmeEndpoint::{submit, poll, ring, outstanding}: Command -> SQE, Done from a CQE, and
#   the driver nvcopy-nvme they call, whose hot path is inlined into them, so the two
#   cannot be told apart by function). A chunk of a 1 -> 1 copy is one Read and one Write.
#   For the driver alone per I/O see scripts/callgrind-io.sh.
# - "copier": total minus endpoint: the reactor (inbox, chunk claims, pages, the chunk
#   state machine, settling completions, the job's counters, the retry heap, the clock
#   read per pass).
# rustc's version is printed with the figures: they depend on the compiler and the code.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${CALLGRIND_DIR:-$REPO/target/callgrind}
N=${NVCOPY_CHUNKS:-4096}
die() { printf 'callgrind-copier.sh: %s\n' "$*" >&2; exit 1; }
[[ $N =~ ^[1-9][0-9]*$ ]] || die "NVCOPY_CHUNKS must be a positive count, got '$N'"
if ! command -v valgrind >/dev/null || ! command -v callgrind_annotate >/dev/null; then
    ((EUID == 0)) || die "valgrind is not installed (apt-get install valgrind)"
    apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >&2 ||
        die "apt-get install valgrind failed"
fi
mkdir -p "$OUT"
BIN=$(cargo bench --manifest-path "$REPO/Cargo.toml" -p nvcopy --bench copier_count --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    if not l.startswith("{"):
        continue
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="copier_count": print(m["executable"])' | tail -n 1) || true
[[ -n $BIN && -x $BIN ]] || die "building the copier_count bench failed; run: cargo bench -p nvcopy --bench copier_count --no-run"
F=$OUT/copier.callgrind
rm -f "$F" "$F.annotate"
# Patterns as callgrind shows demangled Rust names; * also matches a legacy ::h<hash>.
NVCOPY_CHUNKS=$N valgrind --tool=callgrind --collect-atstart=no \
    --toggle-collect='nvcopy::reactor::Reactor::run*' \
    --toggle-collect='nvcopy::reactor::Reactor::check_health*' \
    --toggle-collect='<nvcopy_nvme_sim::SimController as nvcopy_nvme::regs::Bar>::write32*' \
    --callgrind-out-file="$F" "$BIN" >"$OUT/copier.stdout" 2>"$OUT/copier.stderr" || { cat "$OUT/copier.stderr" >&2; die "valgrind failed"; }
grep -q "chunks=$N " "$OUT/copier.stdout" || die "the copier_count run did not finish its copy"
callgrind_annotate --inclusive=yes --threshold=100 "$F" >"$F.annotate" 2>/dev/null || die "callgrind_annotate failed"
python3 - "$N" "$F.annotate" "$(rustc --version)" <<'PY'
import re, sys
n, path, rustc = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ep = r"<nvcopy::endpoint::nvme::NvmeEndpoint as nvcopy::endpoint::Endpoint>::"
pats = {"total": r"nvcopy::reactor::Reactor::run\b",
        "submit": ep + r"submit\b", "poll": ep + r"poll\b", "ring": ep + r"ring\b",
        "outstanding": ep + r"outstanding\b"}
# A function shows up on several lines (one per source file its inlined code came from,
# plus the whole function): its largest figure is its inclusive count.
best = {}
for line in open(path, errors="replace"):
    m = re.match(r"\s*([0-9,]+)\s+(\([^)]*\)\s+)?(.*)$", line)
    if not m:
        continue
    v, name = int(m.group(1).replace(",", "")), m.group(3)
    for k, p in pats.items():
        if re.search(p, name):
            best[k] = max(best.get(k, 0), v)
missing = [k for k in ("total", "submit", "poll", "ring") if best.get(k, 0) == 0]
if missing:
    sys.exit("callgrind-copier.sh: nothing collected for %s; check the symbol names with callgrind_annotate --inclusive=yes" % missing)
tot = best["total"]
parts = [(k, best.get(k, 0)) for k in ("submit", "poll", "ring", "outstanding")]
ep_total = sum(v for _, v in parts)
print("Reactor instructions per chunk, 1 -> 1 copy of %d chunks of 4 KiB" % n)
print("(callgrind Ir; the software controller's work and the per-millisecond health check left out; %s)" % rustc)
print()
print("| part | Ir per chunk |")
print("|---|---|")
for k, v in parts:
    print("| endpoint: NvmeEndpoint::%s | %.1f |" % (k, v / n))
print("| **endpoint + driver** (behind `dyn Endpoint`, 2 I/Os) | **%.1f** |" % (ep_total / n))
print("| **copier** (the rest of the reactor loop) | **%.1f** |" % ((tot - ep_total) / n))
print("| reactor total | %.1f |" % (tot / n))
PY
