//! Hydration throughput against `cp --sparse=always`, on files on the real disk.
//!
//! Creates a dense source (pseudo-random data) and a sparse one (the same size,
//! 1/64 of it data in 1 MiB pieces), then per variant and round, alternating
//! the order: drops the page cache (when allowed), hydrates a fresh clone with
//! the engine's background-hydration step (`hydrate_batch`, the code the
//! hydrator thread runs) followed by a flush, and times
//! `cp --sparse=always SRC DST && sync DST`. Prints both rates and the ratio.
//!
//! `cargo bench --bench hydration -- [--dir /var/tmp] [--size 4G] [--rounds 2] [--batch 16] [--region 64K]`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use vhost_clone::engine::{Engine, EngineConfig, HydrateStep};
use vhost_clone::metadata::format::Layout;
use vhost_clone::metadata::{Geometry, Metadata};
use vhost_clone::storage::{BlockDevice, FileDevice, OpenOptions};

struct Args {
    dir: PathBuf,
    size: u64,
    rounds: u32,
    batch: u64,
    region: u64,
}

fn parse() -> Args {
    let mut a = Args {
        dir: "/var/tmp".into(),
        size: 4 << 30,
        rounds: 2,
        batch: 16,
        region: 64 << 10,
    };
    let v: Vec<String> = std::env::args()
        .skip(1)
        .filter(|s| s != "--bench")
        .collect();
    let mut i = 0;
    while i < v.len() {
        let val = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--dir" => a.dir = val.into(),
            "--size" => a.size = vhost_clone::cli::parse_size(&val).expect("size"),
            "--rounds" => a.rounds = val.parse().expect("rounds"),
            "--batch" => a.batch = val.parse().expect("batch"),
            "--region" => a.region = vhost_clone::cli::parse_size(&val).expect("region"),
            "--help" | "-h" => {
                println!(
                    "hydration [--dir D] [--size 4G] [--rounds N] [--batch REGIONS] [--region 64K]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

fn make_source(path: &Path, size: u64, sparse: bool) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == size) {
        return;
    }
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    let dev = FileDevice::open(path, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let chunks = size >> 20;
    for c in 0..chunks {
        if sparse && c % 64 != 7 {
            continue;
        }
        for w in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        dev.write_at(&buf, c << 20).unwrap();
    }
    dev.flush().unwrap();
}

fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

fn ours(a: &Args, src: &Path, work: &Path) -> (f64, u64) {
    let dst = work.join("clone.img");
    let meta = work.join("clone.img.meta");
    let _ = std::fs::remove_file(&dst);
    let _ = std::fs::remove_file(&meta);
    let t = Instant::now();
    let s = Arc::new(
        FileDevice::open(
            src,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let geo = Geometry::new(s.size(), a.region).unwrap();
    let d = Arc::new(
        FileDevice::open(
            &dst,
            &OpenOptions {
                create_size: Some(s.size()),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let m = Arc::new(
        FileDevice::open(
            &meta,
            &OpenOptions {
                create_size: Some(Layout::new(&geo).required_size()),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let md = Arc::new(Metadata::format(m, geo).unwrap());
    let eng = Engine::new(Some(s), d, md, EngineConfig::default()).unwrap();
    loop {
        match eng.hydrate_batch(a.batch, false).unwrap() {
            HydrateStep::Done => break,
            HydrateStep::Busy => unreachable!("nobody else holds regions"),
            HydrateStep::Hydrated { .. } => {}
        }
    }
    eng.flush().unwrap();
    assert!(eng.metadata().all_hydrated());
    (t.elapsed().as_secs_f64(), eng.hydration_bytes_read())
}

fn cp(src: &Path, work: &Path) -> f64 {
    let dst = work.join("cp.img");
    let _ = std::fs::remove_file(&dst);
    let t = Instant::now();
    let ok = Command::new("cp")
        .arg("--sparse=always")
        .arg(src)
        .arg(&dst)
        .status()
        .unwrap();
    assert!(ok.success());
    let ok = Command::new("sync").arg(&dst).status().unwrap();
    assert!(ok.success());
    t.elapsed().as_secs_f64()
}

fn main() {
    let a = parse();
    let work = a.dir.join("vhost-clone-hydration-bench");
    std::fs::create_dir_all(&work).unwrap();
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "hydration benchmark: {} MiB sources in {}, region {} KiB, batch {} regions, {} rounds, load {}",
        a.size >> 20,
        work.display(),
        a.region >> 10,
        a.batch,
        a.rounds,
        loadavg.trim()
    );
    let caches = drop_caches();
    if !caches {
        println!("note: cannot drop the page cache here; sources may be read from memory");
    }
    for (name, sparse) in [("dense", false), ("sparse", true)] {
        let src = work.join(format!("{name}-source.img"));
        make_source(&src, a.size, sparse);
        let mut best_ours: f64 = f64::MAX;
        let mut best_cp: f64 = f64::MAX;
        for round in 0..a.rounds {
            let order: [bool; 2] = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for us in order {
                drop_caches();
                if us {
                    let (secs, read) = ours(&a, &src, &work);
                    println!(
                        "  {name} round {round}: vhost-clone {secs:.2} s ({:.0} MiB/s), read {} MiB from the source",
                        (a.size >> 20) as f64 / secs,
                        read >> 20
                    );
                    best_ours = best_ours.min(secs);
                } else {
                    let secs = cp(&src, &work);
                    println!(
                        "  {name} round {round}: cp --sparse=always {secs:.2} s ({:.0} MiB/s)",
                        (a.size >> 20) as f64 / secs
                    );
                    best_cp = best_cp.min(secs);
                }
            }
        }
        println!(
            "{name}: vhost-clone {:.0} MiB/s, cp {:.0} MiB/s, ratio {:.2} (best of {} rounds each)",
            (a.size >> 20) as f64 / best_ours,
            (a.size >> 20) as f64 / best_cp,
            best_cp / best_ours,
            a.rounds
        );
    }
    let _ = std::fs::remove_file(work.join("clone.img"));
    let _ = std::fs::remove_file(work.join("cp.img"));
}
