#!/usr/bin/env python3
"""Host half of `scripts/vm.sh bench`: turns the guest's BENCH lines into a table and JSON.

    vm-bench-report.py LOG OUT.json [--raw OUT.raw]

LOG is the guest console (anything that is not a BENCH*/BENCHINFO line is ignored).
Prints markdown tables (medians, min-max, ratios) and writes the same figures as JSON,
with the date and a description of the host (nproc, CPU model, QEMU version, TCG).

The ratios are taken per round (dd's wall time in round i over nvcopy's in round i, both
runs of the same guest boot, interleaved), then summarised: under TCG one boot can be 2x
faster than the next, so only ratios from the same boot mean anything.
"""

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys

TESTS = {
    "copy1to1": "%s copy, 1 source -> 1 destination",
    "copy1to3": "%s copy, 1 source -> 3 destinations (dd: three copies in a row)",
    "read": "%s sequential read (dd: of=/dev/null)",
    "file2nvme": "%s copy, a file on ext4 -> NVMe (nvcopy: io_uring O_DIRECT source)",
    "nvme2file": "%s copy, NVMe -> a file on ext4 (nvcopy: io_uring O_DIRECT destination)",
    "bdev2nvme": "%s copy, the kernel's block device of a drive -> NVMe",
    "copy2tcp": "%s copy, a drive -> an NVMe/TCP namespace, no digests (nvmet-tcp on 127.0.0.1; dd: through the kernel initiator, nvme-tcp)",
    "copy2tcp_digests": "%s copy, a drive -> an NVMe/TCP namespace, header and data digests (dd: nvme connect -g -G)",
}


def size_label(mb):
    return "%d GiB" % (mb // 1024) if mb % 1024 == 0 else "%d MiB" % mb


def parse(path):
    recs, info, skips, errs = [], {}, [], []
    line_re = re.compile(r"^(BENCH|BENCHINFO|BENCHSKIP|BENCHERR) (.*)$")
    with open(path, errors="replace") as f:
        for raw in f:
            m = line_re.match(raw.strip().replace("\r", ""))
            if not m:
                continue
            kv = dict(p.split("=", 1) for p in m.group(2).split() if "=" in p)
            kind = m.group(1)
            if kind == "BENCH":
                recs.append(kv)
            elif kind == "BENCHINFO":
                info.update(kv)
            elif kind == "BENCHSKIP":
                skips.append(kv)
            else:
                errs.append(kv)
    return recs, info, skips, errs


def num(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if x != x else x  # NaN -> None


def summary(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {
        "median": round(statistics.median(xs), 4),
        "min": round(min(xs), 4),
        "max": round(max(xs), 4),
        "n": len(xs),
        "values": [round(x, 4) for x in xs],
    }


def fmt(s, unit="", prec=2):
    if not s:
        return "-"
    p = "%%.%df" % prec
    return (p % s["median"]) + unit + " (" + (p % s["min"]) + "-" + (p % s["max"]) + ")"


def tool_stats(rs):
    """Figures for one contender's runs of one test."""
    out = {"runs": len(rs)}
    walls = [num(r.get("wall")) for r in rs]
    out["wall_s"] = summary(walls)
    out["wall_mb_s"] = summary(
        [num(r.get("bytes")) / w / 1e6 if w and num(r.get("bytes")) else None for r, w in zip(rs, walls)]
    )
    if any("elapsed" in r for r in rs):
        els = [num(r.get("elapsed")) for r in rs]
        out["data_phase_s"] = summary(els)
        out["data_phase_mb_s"] = summary([num(r.get("rate")) for r in rs])
        out["startup_and_teardown_s"] = summary(
            [w - e if w is not None and e is not None else None for w, e in zip(walls, els)]
        )
    return out


def host_machine():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    qemu = os.environ.get("BENCH_QEMU_VERSION", "")
    if not qemu:
        try:
            qemu = subprocess.run(
                [os.environ.get("NVCOPY_VM_QEMU", "qemu-system-x86_64"), "--version"],
                capture_output=True, text=True, check=False,
            ).stdout.splitlines()[0]
        except (OSError, IndexError):
            qemu = "unknown"
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 1048576, 1)
    except (OSError, ValueError, IndexError):
        pass
    rev = os.environ.get("BENCH_SOURCE", "")
    try:
        rev = rev or subprocess.run(
            ["git", "-C", os.path.dirname(os.path.abspath(__file__)), "describe", "--always", "--dirty"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()
    except OSError:
        rev = ""
    try:
        with open("/proc/loadavg") as f:
            load_end = " ".join(f.read().split()[:3])
    except OSError:
        load_end = "unknown"
    return {
        "host_loadavg_at_start": os.environ.get("BENCH_LOAD_START", "unknown"),
        "host_loadavg_at_end": load_end,
        "nvcopy_source": rev or "unknown",
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "mem_gib": mem,
        "host_kernel": platform.release(),
        "qemu": qemu,
        "accel": "TCG (no KVM), -accel tcg,thread=multi -cpu max",
        "guest": "q35, 2 vCPUs, 2 GiB, emulated intel-iommu (VT-d), 4 emulated NVMe (QEMU nvme, 512-byte LBAs, MDTS 512 KiB)",
    }


def main():
    args = sys.argv[1:]
    raw_out = None
    if "--raw" in args:
        i = args.index("--raw")
        raw_out = args[i + 1]
        del args[i : i + 2]
    if len(args) != 2:
        sys.exit(__doc__)
    log, out = args
    recs, info, skips, errs = parse(log)
    if not recs:
        sys.exit("vm-bench-report: no BENCH lines in %s" % log)

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": host_machine(),
        "guest_info": info,
        "note": "wall = whole process, start to exit (guest /proc/uptime, 10 ms steps); data phase = nvcopy --json elapsed (first I/O to last completion); MB/s = 10^6 bytes per second per destination; ratio = dd wall / nvcopy wall in the same round (>1: nvcopy faster)",
        "comparisons": [],
        "errors": errs,
        "skipped": skips,
    }
    print("\n## nvcopy vs dd (one guest boot, interleaved; median (min-max) over rounds)\n")
    print("| test | nvcopy wall s | nvcopy MB/s (wall) | nvcopy MB/s (data phase) | dd wall s | dd MB/s | dd/nvcopy wall |")
    print("|---|---|---|---|---|---|---|")
    mb = int(info.get("mb", "1024"))
    for test, desc in TESTS.items():
        desc = desc % size_label(mb)
        by_tool = {t: [r for r in recs if r.get("test") == test and r.get("tool") == t] for t in ("nvcopy", "dd")}
        if not by_tool["nvcopy"] and not by_tool["dd"]:
            continue
        c = {"test": test, "description": desc}
        for t, rs in by_tool.items():
            c[t] = tool_stats(rs)
        nv = {r.get("run"): num(r.get("wall")) for r in by_tool["nvcopy"]}
        dd = {r.get("run"): num(r.get("wall")) for r in by_tool["dd"]}
        c["ratio_dd_wall_over_nvcopy_wall"] = summary(
            [dd[k] / nv[k] for k in nv if k in dd and nv[k] and dd[k] is not None]
        )
        result["comparisons"].append(c)
        n, d = c["nvcopy"], c["dd"]
        print("| %s | %s | %s | %s | %s | %s | %s |" % (
            desc, fmt(n["wall_s"]), fmt(n["wall_mb_s"], prec=0), fmt(n.get("data_phase_mb_s"), prec=0),
            fmt(d["wall_s"]), fmt(d["wall_mb_s"], prec=0), fmt(c["ratio_dd_wall_over_nvcopy_wall"], "x")))

    # NVMe/TCP: the kernel initiator's nvme connect (until the block device is there) and
    # nvme disconnect are timed apart from dd; nvcopy's wall time holds its own connect.
    kc = {r.get("run"): num(r.get("wall")) for r in recs if r.get("test") == "tcp_connect"}
    kd = {r.get("run"): num(r.get("wall")) for r in recs if r.get("test") == "tcp_disconnect"}
    if kc:
        nv = {r.get("run"): num(r.get("wall")) for r in recs if r.get("test") == "copy2tcp" and r.get("tool") == "nvcopy"}
        dd = {r.get("run"): num(r.get("wall")) for r in recs if r.get("test") == "copy2tcp" and r.get("tool") == "dd"}
        incl = summary([(dd[k] + kc[k] + (kd.get(k) or 0)) / nv[k]
                        for k in nv if nv[k] and dd.get(k) is not None and kc.get(k) is not None])
        result["tcp_kernel_initiator"] = {
            "connect_s": summary(list(kc.values())),
            "disconnect_s": summary(list(kd.values())),
            "ratio_connect_dd_disconnect_over_nvcopy_wall": incl,
        }
        print("\nNVMe/TCP, kernel initiator outside dd's timed span: nvme connect (to the block device) %s s, "
              "nvme disconnect %s s; (connect + dd + disconnect) / nvcopy wall, per round: %s"
              % (fmt(result["tcp_kernel_initiator"]["connect_s"]), fmt(result["tcp_kernel_initiator"]["disconnect_s"]),
                 fmt(incl, "x")))

    st = [r for r in recs if r.get("tool") == "nvcopy" and r.get("test") in TESTS and not r.get("test", "").startswith("copy2tcp")]
    startup = summary([num(r["wall"]) - num(r["elapsed"]) for r in st
                       if num(r.get("wall")) is not None and num(r.get("elapsed")) is not None])
    result["nvcopy_outside_data_phase_s"] = startup
    if startup:
        print("\nnvcopy process time outside the data phase (exec, VFIO open, controller bring-up, "
              "queue setup, teardown; wall - elapsed over all %d runs above): %s s" % (startup["n"], fmt(startup)))

    fixed = {}
    for test, label in (("startup_exec", "nvcopy --version (exec only)"),
                        ("startup_identify", "nvcopy identify (exec, VFIO, controller bring-up, Identify)"),
                        ("copy4k", "copy of one 4 KiB chunk, whole process")):
        for tool in ("nvcopy", "dd"):
            rs = [r for r in recs if r.get("test") == test and r.get("tool") == tool]
            if rs:
                st = tool_stats(rs)
                st.pop("wall_mb_s", None)  # a rate means nothing for a fixed cost
                fixed["%s/%s" % (test, tool)] = dict(st, label=label, tool=tool)
    result["fixed_costs"] = fixed
    if fixed:
        print("\n## Fixed costs per process (wall s, median (min-max))\n")
        print("| what | tool | wall s |")
        print("|---|---|---|")
        for k, v in fixed.items():
            print("| %s | %s | %s |" % (v["label"], v["tool"], fmt(v["wall_s"])))

    cores = {}
    for c in ("1", "2"):
        rs = [r for r in recs if r.get("test") == "cores" + c]
        if rs:
            cores["cores" + c] = tool_stats(rs)
    if cores:
        r1 = {r.get("run"): num(r.get("elapsed")) for r in recs if r.get("test") == "cores1"}
        r2 = {r.get("run"): num(r.get("elapsed")) for r in recs if r.get("test") == "cores2"}
        cores["speedup_2_over_1_data_phase"] = summary([r1[k] / r2[k] for k in r1 if k in r2 and r1[k] and r2[k]])
        print("\n## 1 against 2 reactors (%s, 1 -> 1)\n" % size_label(mb))
        print("| reactors | wall s | MB/s (data phase) |")
        print("|---|---|---|")
        for c in ("1", "2"):
            s = cores.get("cores" + c)
            if s:
                print("| %s | %s | %s |" % (c, fmt(s["wall_s"]), fmt(s.get("data_phase_mb_s"), prec=0)))
        print("\nspeed-up of 2 reactors over 1 (data phase, per round; <1: slower): %s" % fmt(cores["speedup_2_over_1_data_phase"], "x"))
    else:
        cores["skipped"] = next((s.get("reason") for s in skips if s.get("test") == "cores"), "not run")
        print("\n1 against 2 reactors: skipped (%s)" % cores["skipped"])
    result["cores"] = cores

    sweep = []
    points = {}
    for r in recs:
        if r.get("test") == "sweep":
            points.setdefault((int(r["chunk"]), int(r["qd"])), []).append(r)
    for (chunk, qd), rs in sorted(points.items()):
        rate = summary([num(r.get("rate")) for r in rs])
        sweep.append({
            "chunk_bytes": chunk,
            "qd": qd,
            "bytes": int(float(rs[0].get("bytes", 0))),
            "rate_mb_s": rate["median"] if rate else None,
            "rate_mb_s_min": rate["min"] if rate else None,
            "rate_mb_s_max": rate["max"] if rate else None,
            "passes": len(rs),
            "data_phase_s": summary([num(r.get("elapsed")) for r in rs]),
            "wall_s": summary([num(r.get("wall")) for r in rs]),
        })
    result["sweep"] = sweep
    if sweep:
        chunks = sorted({p["chunk_bytes"] for p in sweep})
        qds = sorted({p["qd"] for p in sweep})
        at = {(p["chunk_bytes"], p["qd"]): p for p in sweep}
        print("\n## Sweep: nvcopy 1 -> 1, data-phase MB/s by chunk size (rows) and queue depth (columns), median of %d pass(es)\n" % max(p["passes"] for p in sweep))
        print("| chunk | " + " | ".join("QD%d" % q for q in qds) + " |")
        print("|---|" + "---|" * len(qds))
        for c in chunks:
            cells = []
            for q in qds:
                p = at.get((c, q))
                cells.append("%.0f" % p["rate_mb_s"] if p and p["rate_mb_s"] is not None else "-")
            print("| %dK | %s |" % (c // 1024, " | ".join(cells)))
        best = max((p for p in sweep if p["rate_mb_s"] is not None), key=lambda p: p["rate_mb_s"], default=None)
        if best:
            print("\nbest point: chunk %dK, QD%d, %.0f MB/s" % (best["chunk_bytes"] // 1024, best["qd"], best["rate_mb_s"]))
    doorbells = {}
    for r in recs:
        if r.get("test") == "doorbells":
            doorbells[r.get("mode")] = {k: num(r.get(k)) for k in ("mmio_sq", "mmio_cq", "commands", "per_command")}
    result["doorbells"] = doorbells
    if doorbells:
        print("\n## Doorbell MMIO writes per I/O command (QEMU trace, %s MiB 1 -> 1 copy)\n" % (
            int(num(next(r for r in recs if r.get("test") == "doorbells").get("bytes")) or 0) >> 20))
        print("| doorbells | SQ tail writes | CQ head writes | I/O commands | writes per command |")
        print("|---|---|---|---|---|")
        for mode, d in doorbells.items():
            print("| %s | %d | %d | %d | %.4f |" % (mode, d["mmio_sq"], d["mmio_cq"], d["commands"], d["per_command"]))

    # Issue 9's goals, each from this boot.
    comp = {c["test"]: c for c in result["comparisons"]}
    def med(x):
        return x["median"] if x else None
    def ratio(test, key):
        c = comp.get(test)
        if not c:
            return None
        n, d = c["nvcopy"].get(key), c["dd"].get(key)
        return med(d) / med(n) if med(n) and med(d) else None
    def data_ratio(test):
        c = comp.get(test)
        if not c:
            return None
        n, d = c["nvcopy"].get("data_phase_mb_s"), c["dd"].get("wall_mb_s")
        return med(n) / med(d) if med(n) and med(d) else None
    c4 = fixed.get("copy4k/nvcopy")
    goals = [
        (size_label(mb) + " 1->1 copy, whole process: dd wall / nvcopy wall", ratio("copy1to1", "wall_s"), ">=", 2.5),
        (size_label(mb) + " 1->1 copy, data phase: nvcopy data-phase MB/s / dd MB/s", data_ratio("copy1to1"), ">=", 3.5),
        ("doorbell MMIO writes per command (shadow doorbells)", (doorbells.get("shadow") or {}).get("per_command"), "<", 0.05),
        ("4 KiB copy between two controllers, whole process, s", med(c4["wall_s"]) if c4 else None, "<=", 0.25),
        ("sequential read, whole process: dd wall / nvcopy wall", ratio("read", "wall_s"), ">=", 1.5),
        ("1->3 fan-out: nvcopy wall / three dd copies' wall", (1 / ratio("copy1to3", "wall_s")) if ratio("copy1to3", "wall_s") else None, "<=", 0.3),
    ]
    result["goals"] = []
    if all(v is None for _, v, _, _ in goals):
        goals = []  # a run of one part alone (BENCH_ONLY) measures none of them
    else:
        print("\n## Goals (issue 9), this boot\n")
        print("| goal | measured | target | met |")
        print("|---|---|---|---|")
    for name, v, op, target in goals:
        met = None if v is None else {">=": v >= target, "<": v < target, "<=": v <= target}[op]
        result["goals"].append({"goal": name, "measured": v, "op": op, "target": target, "met": met})
        print("| %s | %s | %s %s | %s |" % (name, "-" if v is None else "%.3f" % v, op, target,
                                          "-" if met is None else ("yes" if met else "NO")))
    if errs:
        print("\nfailed runs: %s" % errs)

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    if raw_out:
        with open(log, errors="replace") as f, open(raw_out, "w") as g:
            for line in f:
                line = line.strip().replace("\r", "")
                if line.startswith("BENCH"):
                    g.write(line + "\n")
    print("\nwrote %s" % out)


if __name__ == "__main__":
    main()
