#!/usr/bin/env python3
"""Host side of qemu-tests/fio-matrix.sh: extract the guest's fio results from
a serial log, check them, and write the report.

  report.py extract --serial F --run NAME --round N --backend B --group G
                    [--daemon F] [--alloc N] [--load0 L] [--load1 L] [--secs S] --out RESULTS
  report.py report --results RESULTS --meta META --out FILE.md

extract appends one JSON line per fio job to RESULTS and prints a summary.
It exits with status 1 when a number is implausible (fio error, no I/O, the
device counters saw less than fio claims, an fsync job whose fsyncs did not
reach the device as FLUSH requests).
"""
import argparse
import json
import statistics
import sys

READ_CASES = {"randread-4k-qd1", "randread-4k-qd32", "seqread-128k-qd8", "clone-randread-4k-qd32"}
CASES = [
    # name, group, what
    ("randread-4k-qd1", "hydrated", "4 KiB random read, 1 job, QD1"),
    ("randread-4k-qd32", "hydrated", "4 KiB random read, 2 jobs (one per vCPU/virtqueue) x QD16"),
    ("randwrite-4k-qd32", "hydrated", "4 KiB random write, 2 jobs x QD16"),
    ("seqread-128k-qd8", "hydrated", "128 KiB sequential read, 2 jobs x QD4, each on its own half"),
    ("seqwrite-128k-qd8", "hydrated", "128 KiB sequential write, 2 jobs x QD4, each on its own half"),
    ("flush-4k-qd1", "hydrated", "4 KiB random write + fsync (a FLUSH) after each, 1 job, QD1"),
    ("clone-randread-4k-qd32", "clone", "4 KiB random read of unhydrated regions / unallocated clusters, 2 jobs x QD16"),
    ("clone-randwrite-4k-qd32", "clone", "one 4 KiB write into each 64 KiB region, random order, 2 jobs x QD16"),
]
BACKENDS = ["vhost-clone", "qsd"]


def die(msg):
    print(f"report.py: {msg}", file=sys.stderr)
    sys.exit(1)


# ---- extract -----------------------------------------------------------------
def pct(lat, p):
    """a percentile (ns -> us) from fio's clat_ns/lat_ns block, or None"""
    v = (lat or {}).get("percentile", {}).get(f"{p:.6f}")
    return None if v is None else v / 1000.0


def parse_serial(path):
    stats, cache, json_lines, done = {}, None, {}, []
    with open(path, "rb") as fh:
        for raw in fh:
            line = raw.decode("utf-8", "replace").rstrip("\r\n").rstrip("\r")
            if line.startswith("VCFIO "):
                _, name, rest = (line.split(" ", 2) + [""])[:3]
                json_lines.setdefault(name, []).append(rest)
            elif line.startswith("VCTEST-EVENT: fio-stat "):
                f = line.split()[2:]
                name, nums = f[0], [int(x) for x in f[1:]]
                if len(nums) != 14:
                    die(f"{path}: bad fio-stat line: {line}")
                stats[name] = nums
            elif line.startswith("VCTEST-EVENT: fio-cache "):
                cache = line.split(" ", 2)[2]
            elif line.startswith("VCTEST-EVENT: fio-done "):
                done.append(line.split()[2])
    return stats, cache, json_lines, done


def fio_json(name, lines):
    # fio may put warnings ("fio: ...") before the JSON document
    text = "\n".join(l for l in lines if not l.startswith("fio: "))
    i = text.find("{")
    if i < 0:
        die(f"job {name}: no JSON in the serial log")
    try:
        return json.loads(text[i:])
    except json.JSONDecodeError as e:
        die(f"job {name}: bad JSON ({e}); a kernel message in the middle of the output?")


def cmd_extract(a):
    stats, cache, json_lines, done = parse_serial(a.serial)
    daemon = None
    if a.daemon:
        try:
            with open(a.daemon) as fh:
                daemon = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            daemon = {"error": str(e)}
    jobs = [j for j in (a.jobs or "").split(",") if j]
    want = [c for c, g, _ in CASES if g == a.group and (not jobs or c in jobs)]
    if done != want:
        die(f"{a.run}: jobs done {done}, expected {want}")
    rows, bad = [], []
    for name in want:
        d = fio_json(name, json_lines.get(name, []))
        job = d["jobs"][0]
        rd = name in READ_CASES
        io = job["read" if rd else "write"]
        other = job["write" if rd else "read"]
        s = stats[name]
        b, e = s[0:5], s[5:10]
        dev = {k: e[i] - b[i] for i, k in enumerate(["rd_ios", "rd_sect", "wr_ios", "wr_sect", "flush_ios"])}
        vq = [s[12] - s[10], s[13] - s[11]]
        row = {
            "run": a.run, "round": a.round, "backend": a.backend, "group": a.group, "case": name,
            "iops": io["iops"], "mibs": io["bw_bytes"] / 1048576.0,
            "p50_us": pct(io.get("clat_ns"), 50), "p99_us": pct(io.get("clat_ns"), 99),
            "mean_us": io.get("clat_ns", {}).get("mean", 0) / 1000.0,
            "ios": io["total_ios"], "bytes": io["io_bytes"], "runtime_ms": io["runtime"],
            "other_ios": other["total_ios"], "error": job.get("error", 0),
            "dev": dev, "vq_irqs": vq, "cache": cache,
            "load0": a.load0, "load1": a.load1, "run_secs": a.secs, "daemon_cpu_s": a.cpu,
        }
        sync = job.get("sync") or {}
        if name == "flush-4k-qd1":
            row["fsyncs"] = sync.get("total_ios", 0)
            row["fsync_p50_us"] = pct(sync.get("lat_ns"), 50)
            row["fsync_p99_us"] = pct(sync.get("lat_ns"), 99)
        # plausibility: fio did I/O and the device saw at least as much
        # (the device counters include the warm-up, fio's numbers do not)
        dev_bytes = (dev["rd_sect"] if rd else dev["wr_sect"]) * 512
        if row["error"]:
            bad.append(f"{name}: fio error {row['error']}")
        if not row["iops"] > 0 or not row["ios"] > 0 or not row["bytes"] > 0:
            bad.append(f"{name}: no I/O (iops {row['iops']}, ios {row['ios']})")
        if dev_bytes < row["bytes"]:
            bad.append(f"{name}: the device counted {dev_bytes} bytes, fio {row['bytes']}")
        if row["other_ios"]:
            bad.append(f"{name}: {row['other_ios']} I/Os in the wrong direction")
        if name.endswith("-qd32") and min(vq) <= 0:
            bad.append(f"{name}: not both virtqueues used (interrupts +{vq[0]}/+{vq[1]})")
        if name == "flush-4k-qd1":
            # fio's counts start after the warm-up: an fsync may fall either side
            if row["fsyncs"] < row["ios"] - 1:
                bad.append(f"{name}: {row['fsyncs']} fsyncs for {row['ios']} writes")
            if dev["flush_ios"] < row["ios"]:
                bad.append(f"{name}: the device got {dev['flush_ios']} flushes for {row['ios']} fsynced writes")
        elif dev["flush_ios"] > 5:
            bad.append(f"{name}: {dev['flush_ios']} flushes in a job without fsync")
        rows.append(row)
    # daemon-side counters, per boot (they also count the guest's boot-time I/O)
    checks = []
    flush_row = next((r for r in rows if r["case"] == "flush-4k-qd1"), None)
    cw_row = next((r for r in rows if r["case"] == "clone-randwrite-4k-qd32"), None)
    if daemon and a.backend == "vhost-clone" and "io" in daemon:
        io = daemon["io"]
        checks.append(f"daemon counters: reads {io['reads']}, writes {io['writes']}, flushes {io['flushes']}, "
                      f"guest hydrations {io['guest_hydrations']}, background hydrations {io['background_hydrations']}")
        if flush_row and io["flushes"] < flush_row["dev"]["flush_ios"]:
            bad.append(f"daemon counted {io['flushes']} flushes, the guest sent {flush_row['dev']['flush_ios']}")
        if io.get("errors"):
            bad.append(f"daemon counted {io['errors']} I/O errors")
    if a.alloc is not None and cw_row:
        # one write per region: exactly that many regions/clusters allocated;
        # more would mean that the reads hydrated/allocated something
        w = cw_row["dev"]["wr_ios"]
        checks.append(f"regions/clusters allocated after the run: {a.alloc} (guest wrote {w} regions)")
        if a.alloc != w:
            bad.append(f"{a.alloc} regions/clusters allocated, the guest wrote {w} distinct regions")
    for r in rows:
        r["checks"] = checks
    with open(a.out, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    for r in rows:
        extra = ""
        if r["case"] == "flush-4k-qd1":
            extra = f", fsyncs {r['fsyncs']}, device flushes {r['dev']['flush_ios']}"
        print(f"  {r['case']:<24} {r['backend']:<12} {r['iops']:>9.0f} IOPS {r['mibs']:>8.1f} MiB/s "
              f"p50 {fmt(r['p50_us'])} p99 {fmt(r['p99_us'])} us  (ios {r['ios']}, vq +{r['vq_irqs'][0]}/+{r['vq_irqs'][1]}{extra})")
    for c in checks:
        print(f"  {c}")
    if bad:
        for b in bad:
            print(f"  IMPLAUSIBLE: {b}")
        sys.exit(1)


def fmt(v, nd=0):
    if v is None:
        return "-"
    return f"{v:,.{nd}f}".replace(",", " ")


# ---- report ------------------------------------------------------------------
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def cmd_report(a):
    rows = []
    with open(a.results) as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
    meta = []
    with open(a.meta) as fh:
        for line in fh:
            k, _, v = line.rstrip("\n").partition("\t")
            meta.append((k, v))
    md = dict(meta)
    by = {}
    for r in rows:
        by.setdefault((r["case"], r["backend"]), {})[r["round"]] = r
    rounds = sorted({r["round"] for r in rows})

    out = []
    out.append(f"# Guest fio matrix: vhost-clone vs qemu-storage-daemon ({md.get('date', '')})")
    out.append("")
    out.append("**For parity only.** fio runs inside a TCG guest (QEMU `-accel tcg`, 2 vCPUs), whose")
    out.append("emulated CPU is the bottleneck (roughly 30k IOPS at best, whoever serves the disk).")
    out.append("These numbers compare the two daemons as a guest sees them (is vhost-clone at parity?);")
    out.append("they say little about a daemon's own speed: for that see `docs/benchmarks.md` (`vcbench`).")
    out.append("")
    out.append("## Machine and run")
    out.append("")
    out.append("| | |")
    out.append("|---|---|")
    for k, v in meta:
        if k.startswith("_"):
            continue
        out.append(f"| {k} | {v} |")
    out.append("")
    out.append("## Results (median over rounds)")
    out.append("")
    out.append("IOPS, MiB/s and completion latency (fio `clat`, in the guest) are medians over the rounds;")
    out.append("the ratio is vhost-clone / QSD IOPS of the same round, median over rounds (> 1: vhost-clone ahead).")
    out.append("")
    table = []
    table.append("| case | backend | IOPS | MiB/s | p50 (us) | p99 (us) | vhost-clone / QSD | IOPS per round "
                 "| guest interrupts per request |")
    table.append("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for case, group, _ in CASES:
        ratios = []
        for rd in rounds:
            v, q = by.get((case, "vhost-clone"), {}).get(rd), by.get((case, "qsd"), {}).get(rd)
            if v and q and q["iops"] > 0:
                ratios.append(v["iops"] / q["iops"])
        for b in BACKENDS:
            runs = by.get((case, b), {})
            if not runs:
                continue
            rs = [runs[x] for x in sorted(runs)]
            label = b
            if group == "clone":
                label = "vhost-clone, unhydrated" if b == "vhost-clone" else "qsd, qcow2 overlay"
            ratio = ""
            if b == "vhost-clone" and ratios:
                ratio = f"**{med(ratios):.2f}**"
                if len(ratios) > 1:
                    ratio += f" ({', '.join(f'{x:.2f}' for x in ratios)})"
            table.append(
                f"| {case} | {label} | {fmt(med([r['iops'] for r in rs]))} | {fmt(med([r['mibs'] for r in rs]), 1)} "
                f"| {fmt(med([r['p50_us'] for r in rs]))} | {fmt(med([r['p99_us'] for r in rs]))} | {ratio} "
                f"| {', '.join(fmt(r['iops']) for r in rs)} "
                f"| {med([sum(r['vq_irqs']) / r['ios'] for r in rs if r['ios']]):.2f} |")
    out.extend(table)
    out.append("")
    cw = sorted((r for r in rows if r["case"] == "clone-randwrite-4k-qd32"),
                key=lambda r: (BACKENDS.index(r["backend"]), r["round"]))
    if cw:
        out.append("clone-randwrite-4k-qd32 is not time-based: it ends when every region has had its one write")
        out.append("(or after the run time). Measured time and writes per run: "
                   + "; ".join(f"{r['backend']} round {r['round']}: {r['runtime_ms'] / 1000:.1f} s, {r['ios']} writes"
                               for r in cw) + ".")
        out.append("")
    # flush job details
    fl = [r for r in rows if r["case"] == "flush-4k-qd1"]
    if fl:
        out.append("### flush-4k-qd1: the fsyncs")
        out.append("")
        out.append("IOPS above counts writes; each write is followed by an fsync of `/dev/vda`, which the guest")
        out.append("sends as a FLUSH request (write-back cache mode, see Method). Latencies above are of the writes;")
        out.append("the fsyncs' own latency:")
        out.append("")
        out.append("| backend | round | writes | fsyncs (fio) | FLUSH requests (guest block layer) | fsync p50 (us) | fsync p99 (us) |")
        out.append("|---|---|---:|---:|---:|---:|---:|")
        for r in sorted(fl, key=lambda r: (BACKENDS.index(r["backend"]), r["round"])):
            out.append(f"| {r['backend']} | {r['round']} | {r['ios']} | {r['fsyncs']} | {r['dev']['flush_ios']} "
                       f"| {fmt(r['fsync_p50_us'])} | {fmt(r['fsync_p99_us'])} |")
        out.append("")
    uh = [(by.get(("clone-randread-4k-qd32", "vhost-clone"), {}).get(rd),
           by.get(("randread-4k-qd32", "vhost-clone"), {}).get(rd)) for rd in rounds]
    uh = [u["iops"] / h["iops"] for u, h in uh if u and h and h["iops"] > 0]
    if uh:
        out.append(f"vhost-clone, unhydrated / hydrated 4k random read QD32 (same round): "
                   f"median {med(uh):.2f} ({', '.join(f'{x:.2f}' for x in uh)}).")
        out.append("")
    out.append("## Checks (per run)")
    out.append("")
    out.append("Every number above passed these checks when it was extracted (the script stops otherwise):")
    out.append("fio reported no error and non-zero I/O; the guest's block-layer counters (`/sys/block/vda/stat`)")
    out.append("saw at least as many bytes as fio counted, in the right direction only; QD32 jobs completed")
    out.append("requests on both virtqueues (`/proc/interrupts`); the fsync job sent at least one FLUSH per write")
    out.append("and the other jobs none; for vhost-clone, the daemon's own flush counter (`status --json`) is at")
    out.append("least the guest's (QSD has no such counter: `query-blockstats` does not count what its vhost-user-blk")
    out.append("export serves); for the clone pair, the number of hydrated and partly written regions (`vhost-clone dump`) or allocated qcow2")
    out.append("clusters (`qemu-img check`) after the run equals the number of regions the guest wrote,")
    out.append("so the reads hydrated/allocated nothing.")
    out.append("")
    out.append("Daemon CPU is the daemon process's user + system time over the whole run (boot included).")
    out.append("")
    out.append("| run | backend | wall s | daemon CPU s | load avg before -> after | guest write cache | daemon-side |")
    out.append("|---|---|---:|---:|---|---|---|")
    seen = set()
    for r in rows:
        if r["run"] in seen:
            continue
        seen.add(r["run"])
        out.append(f"| {r['run']} | {r['backend']} | {r['run_secs']} | {r.get('daemon_cpu_s', '')} | {r['load0']} -> {r['load1']} "
                   f"| {r['cache']} | {'; '.join(r['checks'])} |")
    out.append("")
    out.append("## Method")
    out.append("")
    out.append(md_method(md).rstrip("\n"))
    text = "\n".join(out) + "\n"
    with open(a.out, "w") as fh:
        fh.write(text)
    print("\n".join(table))
    if uh:
        print(f"vhost-clone unhydrated/hydrated randread QD32: {med(uh):.2f}")


def md_method(md):
    cases = "\n".join(f"  - `{c}` ({g}): {w}." for c, g, w in CASES)
    return f"""- Command: `{md.get('command', '')}`. Script: `qemu-tests/fio-matrix.sh` (guest side
  `qemu-tests/fio-matrix/guest.sh`, parsing and this report `qemu-tests/fio-matrix/report.py`).
- Guest: the qemu-tests guest (`lib.sh` `boot`): QEMU `-M pc -accel tcg -cpu max -smp 2 -m 1G`,
  memfd shared memory, `vhost-user-blk-pci,num-queues=2`, Linux `virtio_blk`, static fio in the
  initramfs with `ioengine=io_uring` (the static fio has no libaio), `direct=1` on `/dev/vda`,
  `--output-format=json`. The JSON is printed on the serial console as `VCFIO <job>` lines, with
  the block-layer counters before/after each job as a `VCTEST-EVENT: fio-stat` line, and parsed on the host.
- Timed jobs: {md.get('_ramp', '?')} s warm-up (`ramp_time`, not measured) then {md.get('_runtime', '?')} s measured
  (`time_based`). Random jobs use `norandommap`. "QDn" is the total in flight: QD32 = 2 jobs x
  iodepth 16, one job pinned to each vCPU (so each virtqueue carries half); QD8 = 2 x 4; QD1 = 1 job.
- Cases:
{cases}
- Backends, alternated: in odd rounds vhost-clone runs first, in even rounds QSD, for each group
  (first the hydrated group, then the clone group). Each run is a fresh daemon and a fresh guest
  boot that runs all the group's jobs in the order above.
  - Hydrated group: one {md.get('_size', '?')} source of random data in /dev/shm, cloned once by vhost-clone's
    own background hydration (`serve --region-size 64K`, until `status` says complete).
    vhost-clone serves it with `serve --source SRC --dest DEST --metadata META --num-queues 2`
    (defaults otherwise: periodic commit every 1 s); QSD exports the same destination file as
    raw: `driver=file,cache.direct=off,aio={md.get('_qsd_aio', 'threads')},discard=unmap` + `driver=raw`,
    `--export type=vhost-user-blk,num-queues=2,writable=on` (the harness's QSD settings).
    Both write into the same file, one after the other.
  - Clone group: every run gets a fresh, empty clone of the same source. vhost-clone:
    `serve --source SRC --dest CLONE --no-hydration --region-size 64K --num-queues 2` (background
    hydration off, so every region stays unhydrated until the guest writes it). QSD:
    `qemu-img create -f qcow2 -b SRC -F raw -o cluster_size=64k OVL` served as
    `driver=qcow2` over a `file` node, the backing file a read-only `raw`/`file` node, same cache
    and aio settings (as `lib.sh` does for `--backend qsd`).
- Write cache / flushes: QSD offers a write-through cache to the guest (vhost-clone: write-back), and fio's `fsync=1` on a block
  device only becomes a FLUSH request when the device has a write-back cache. So at the start of every
  boot, on both backends, the guest writes "write back" to `/sys/block/vda/cache_type` (virtio_blk's
  attribute; it writes the device's CONFIG_WCE, and `queue/write_cache` follows), and checks that
  `queue/write_cache` reads "write back". Only the fsync job sends flushes; the guest counts them
  (field 16 of `/sys/block/vda/stat`) and the host checks one per write.
- Ratio: vhost-clone IOPS / QSD IOPS in the same round; median of the per-round ratios.
  Everything else: median over rounds. With 2 rounds the median is the mean.
- Caveat: the host has {md.get('_nproc', '?')} cores for 2 vCPU threads, QEMU's I/O thread and the daemon, and the
  machine may be shared (see the load averages); the guest's CPU is the limit in most cases.
"""


def main():
    p = argparse.ArgumentParser()
    sp = p.add_subparsers(dest="cmd", required=True)
    e = sp.add_parser("extract")
    e.add_argument("--serial", required=True)
    e.add_argument("--run", required=True)
    e.add_argument("--round", type=int, required=True)
    e.add_argument("--backend", required=True, choices=BACKENDS)
    e.add_argument("--jobs", help="only these jobs ran (comma separated; default: all of the group)")
    e.add_argument("--group", required=True, choices=["hydrated", "clone"])
    e.add_argument("--daemon")
    e.add_argument("--alloc", type=int)
    e.add_argument("--load0", default="")
    e.add_argument("--load1", default="")
    e.add_argument("--secs", type=int, default=0)
    e.add_argument("--cpu", default="")
    e.add_argument("--out", required=True)
    r = sp.add_parser("report")
    r.add_argument("--results", required=True)
    r.add_argument("--meta", required=True)
    r.add_argument("--out", required=True)
    a = p.parse_args()
    {"extract": cmd_extract, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
