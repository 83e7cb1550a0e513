#!/usr/bin/env bash
# callgrind-copier.sh - the copier's own instructions per chunk, beside the driver's.
#
#   scripts/callgrind-copier.sh              # 4096 chunks of 4 KiB, 1 -> 1
#   NVCOPY_CHUNKS=1024 scripts/callgrind-copier.sh
#
# Runs benches/copier_count.rs (one reactor, the synchronous software controller) under
# callgrind, collecting only inside the reactor loop (nvcopy::reactor::Reactor::run) and
# not inside the controller's doorbell handling (SimController's Bar::write32), so what is
# counted is the reactor thread's own work: the driver's submit and completion code, and
# the copier around it (chunk pulls, page handling, bookkeeping, callbacks). The driver's
# share is the inclusive count of IoQpair::submit_read, IoQpair::submit_write and
# QueuePair::poll; the copier's is the rest. A chunk of a 1 -> 1 copy is one Read and one
# Write, so the driver's share per chunk is two I/Os' worth.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${CALLGRIND_DIR:-$REPO/target/callgrind}
N=${NVCOPY_CHUNKS:-4096}
mkdir -p "$OUT"
die() { printf 'callgrind-copier.sh: %s\n' "$*" >&2; exit 1; }
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
BIN=$(cargo bench --manifest-path "$REPO/Cargo.toml" -p nvcopy --bench copier_count --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="copier_count": print(m["executable"])' | tail -n 1)
[[ -n $BIN && -x $BIN ]] || die "building the copier_count bench failed"
F=$OUT/copier.callgrind
rm -f "$F" "$F.annotate"
NVCOPY_CHUNKS=$N valgrind --tool=callgrind --collect-atstart=no \
    --toggle-collect='nvcopy::reactor::Reactor::run*' \
    --toggle-collect='<nvcopy_nvme_sim::SimController as nvcopy_nvme::regs::Bar>::write32*' \
    --callgrind-out-file="$F" "$BIN" >"$OUT/copier.stdout" 2>"$OUT/copier.stderr" || { cat "$OUT/copier.stderr" >&2; die "valgrind failed"; }
grep -q "chunks=$N " "$OUT/copier.stdout" || die "the copier_count run did not finish its copy"
callgrind_annotate --inclusive=yes --threshold=100 "$F" >"$F.annotate" 2>/dev/null || die "callgrind_annotate failed"
python3 - "$N" "$F.annotate" <<'PY'
import re, sys
n, path = int(sys.argv[1]), sys.argv[2]
best = {}
pats = {"total": None, "submit_read": r"nvcopy_nvme::io::IoQpair::submit_read",
        "submit_write": r"nvcopy_nvme::io::IoQpair::submit_write", "poll": r"nvcopy_nvme::queue::QueuePair::poll"}
for line in open(path, errors="replace"):
    m = re.match(r"\s*([0-9,]+)\s+(\([^)]*\)\s+)?(.*)$", line)
    if not m:
        continue
    v, name = int(m.group(1).replace(",", "")), m.group(3)
    if "PROGRAM TOTALS" in name:
        best["total"] = v
    for k, p in pats.items():
        if p and re.search(p, name):
            best[k] = max(best.get(k, 0), v)
missing = [k for k in pats if best.get(k, 0) == 0]
if missing:
    sys.exit("callgrind-copier.sh: nothing collected for %s; check the symbol names with callgrind_annotate" % missing)
drv = best["submit_read"] + best["submit_write"] + best["poll"]
tot = best["total"]
print("Reactor instructions per chunk, 1 -> 1 copy of %d chunks of 4 KiB (callgrind Ir, controller's work left out)" % n)
print()
print("| part | Ir per chunk |")
print("|---|---|")
print("| driver: submit Read + submit Write + completions (2 I/Os) | %.1f |" % (drv / n))
print("| copier: everything else in the reactor loop | %.1f |" % ((tot - drv) / n))
print("| reactor total | %.1f |" % (tot / n))
print()
print("copier overhead over the raw driver: %.0f%%" % (100.0 * (tot - drv) / drv))
PY
