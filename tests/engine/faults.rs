//! Fault injection (issue 7): every kind of device error the engine can meet,
//! through the simulated devices (`SimDevice::set_fault`), through the real
//! vhost-user front, and through a real full filesystem (ENOSPC on a small tmpfs).
//!
//! What must hold (docs/design.md "Failure modes", shared design rule 6):
//! * the affected request fails (an error from the engine, IOERR from the front);
//! * a failed copy leaves its region unhydrated and the destination untouched
//!   where nothing was written;
//! * after a destination-flush or metadata error the metadata is `ro`: reads keep
//!   working, writes to hydrated regions keep working, writes that need hydration
//!   and every flush fail; status shows the mode and counts `commit_failures`;
//! * if the reload after the failure fails too, `fail`: every request fails;
//! * nothing acknowledged by an earlier successful flush is lost: a restart on
//!   healthy devices (the durable images) reads it back.
//!
//! Each test prints `faults injected: N` (operations that actually failed because
//! of an injected fault); docs/reliability.md gives the total.

use crate::support::sectors;
use crate::support::vu;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::support::sectors::{decode, image, write_data, GARBAGE, SECTOR, SOURCE};
use vhost_clone::control::{self, ControlServer};
use vhost_clone::disk::CloneDisk;
use vhost_clone::engine::hydrator::HydrationControl;
use vhost_clone::engine::{DestFlush, Engine, EngineConfig, EngineError};
use vhost_clone::metadata::format::PartialSpec;
use vhost_clone::metadata::{Geometry, Metadata, MetadataError, Mode};
use vhost_clone::storage::{Fault, FileDevice, OpenOptions, SimDevice};

const REGION: u64 = 8192;
const NR: u64 = 8;
const SIZE: u64 = REGION * NR;
const SPR: u64 = REGION / SECTOR as u64; // sectors per region

/// Faults that made an operation fail, over all the tests of this module.
static INJECTED: AtomicU64 = AtomicU64::new(0);

fn injected(n: u64) {
    INJECTED.fetch_add(n, Ordering::SeqCst);
}

struct Rig {
    geo: Geometry,
    src: Arc<SimDevice>,
    dst: Arc<SimDevice>,
    md: Arc<SimDevice>,
    eng: Arc<Engine>,
}

/// A version 1 store: every partial write into an unhydrated region copies it
/// (the tests below were written for those copies; `rig_with` for a table).
fn rig() -> Rig {
    rig_with(PartialSpec::none(&Geometry::new(SIZE, REGION).unwrap()))
}

fn rig_with(spec: PartialSpec) -> Rig {
    let geo = Geometry::new(SIZE, REGION).unwrap();
    let src = Arc::new(SimDevice::from_image(image(SOURCE, SIZE / 512)).into_read_only());
    let dst = Arc::new(SimDevice::from_image(image(GARBAGE, SIZE / 512)));
    let md = Arc::new(SimDevice::from_image(sectors::formatted_metadata_with(
        &geo, spec,
    )));
    let m = Arc::new(Metadata::open(md.clone(), Some(&geo)).unwrap());
    let eng =
        Arc::new(Engine::new(Some(src.clone()), dst.clone(), m, EngineConfig::default()).unwrap());
    Rig {
        geo,
        src,
        dst,
        md,
        eng,
    }
}

impl Rig {
    /// A fresh engine on healthy devices holding what survived a power cut that
    /// kept nothing unflushed (the durable images).
    fn restart(&self) -> Engine {
        let dst = Arc::new(SimDevice::from_image(self.dst.durable_image()));
        let md = Arc::new(SimDevice::from_image(self.md.durable_image()));
        let m = Metadata::open(md, Some(&self.geo)).expect("metadata reloads after the fault");
        Engine::new(
            Some(self.src.clone()),
            dst,
            Arc::new(m),
            EngineConfig::default(),
        )
        .unwrap()
    }
}

/// The tag of every sector of region `r` read through `eng`, asserting they agree.
fn region_tag(eng: &Engine, r: u64) -> u64 {
    let mut buf = vec![0u8; REGION as usize];
    eng.read_at(&mut buf, r * REGION).expect("read");
    let mut tag = None;
    for (i, s) in buf.chunks(SECTOR).enumerate() {
        let t = decode(s, r * SPR + i as u64).unwrap_or_else(|| panic!("garbage in region {r}"));
        assert!(tag.is_none() || tag == Some(t), "region {r} mixes tags");
        tag = Some(t);
    }
    tag.unwrap()
}

fn write_region(eng: &Engine, r: u64, tag: u64) -> Result<(), EngineError> {
    eng.write_at(&write_data(tag, r * SPR, SPR), r * REGION)
}

/// Writes 2 sectors in the middle of region `r` (needs a copy if unhydrated).
fn write_partial(eng: &Engine, r: u64, tag: u64) -> Result<(), EngineError> {
    let first = r * SPR + 4;
    eng.write_at(&write_data(tag, first, 2), first * 512)
}

fn status(eng: &Arc<Engine>) -> control::Status {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl");
    let ctl = HydrationControl::new(false, 1, 1, false);
    let sock = vhost_clone::socket::BoundSocket::bind(&path).unwrap();
    let srv = ControlServer::start(sock, eng.clone(), ctl, true, true).unwrap();
    let r = control::request(&path, &control::Request::Status).unwrap();
    drop(srv);
    r.status.unwrap()
}

fn report(test: &str, n: u64) {
    injected(n);
    eprintln!(
        "{test}: faults injected: {n} (faults tests total so far {})",
        INJECTED.load(Ordering::SeqCst)
    );
}

#[test]
fn destination_write_error_fails_the_request_and_hydrates_nothing() {
    let r = rig();
    let e = &r.eng;
    write_region(e, 0, 10).unwrap();
    e.flush().unwrap();
    let before = r.dst.current_image();
    r.dst.set_fault(Fault::Write, Some(libc::EIO));
    let mut n = 0;
    // Whole-region write of an unhydrated region, partial write (copy), write to a
    // hydrated region, write-zeroes, background copy: all fail.
    assert!(matches!(write_region(e, 1, 11), Err(EngineError::Dest(_))));
    assert!(matches!(write_partial(e, 2, 12), Err(EngineError::Dest(_))));
    assert!(matches!(write_region(e, 0, 13), Err(EngineError::Dest(_))));
    assert!(matches!(
        e.write_zeroes(3 * REGION, REGION),
        Err(EngineError::Dest(_))
    ));
    assert!(matches!(e.hydrate_region(4), Err(EngineError::Dest(_))));
    assert!(matches!(
        e.discard(5 * REGION, REGION),
        Err(EngineError::Dest(_))
    ));
    n += 6;
    for reg in 1..6 {
        assert!(
            !e.metadata().is_hydrated(reg),
            "region {reg} marked after a failed write"
        );
    }
    assert_eq!(
        r.dst.current_image(),
        before,
        "a failed write changed the destination"
    );
    // A write error is not a metadata error: still rw, reads fine, commits fine.
    assert_eq!(e.metadata().mode(), Mode::Rw);
    assert_eq!(region_tag(e, 0), 10);
    assert_eq!(region_tag(e, 1), SOURCE);
    assert_eq!(region_tag(e, 2), SOURCE);
    e.flush().unwrap();
    assert!(e.counters().errors >= 5); // guest requests (hydrate_region is not one)
                                       // Cleared: everything works again.
    r.dst.set_fault(Fault::Write, None);
    write_partial(e, 2, 12).unwrap();
    e.flush().unwrap();
    let e2 = r.restart();
    assert_eq!(region_tag(&e2, 0), 10);
    assert!(e2.metadata().is_hydrated(2) && !e2.metadata().is_hydrated(1));
    report("destination write", n);
}

/// Shared checks of the read-only mode after a failed commit. Regions: 0 was
/// committed with tag 20 before the fault; 1 was written (tag 21) but its
/// commit failed.
fn assert_read_only_mode(r: &Rig, what: &str) -> u64 {
    let e = &r.eng;
    let m = e.metadata();
    assert_eq!(m.mode(), Mode::Ro, "{what}: mode after the failed commit");
    assert_eq!(m.stats().failures, 1, "{what}: commit failures counted");
    // No bit is dropped (design rule 7): region 1's write completed and reads
    // back; ro mode never commits its bit (a restart adopts it).
    assert!(
        m.is_hydrated(0) && m.is_hydrated(1),
        "{what}: bits after the failed commit"
    );
    assert_eq!(region_tag(e, 0), 20);
    let mut sec = [0u8; SECTOR];
    e.read_at(&mut sec, (SPR + 4) * 512).unwrap();
    assert_eq!(
        decode(&sec, SPR + 4),
        Some(21),
        "{what}: an acknowledged write was dropped"
    );
    assert_eq!(region_tag(e, 7), SOURCE);
    // Writes to hydrated regions work; writes needing hydration fail.
    write_region(e, 0, 22).unwrap();
    assert_eq!(region_tag(e, 0), 22);
    assert!(matches!(
        write_partial(e, 3, 23),
        Err(EngineError::Metadata(MetadataError::ReadOnly))
    ));
    assert!(matches!(
        write_region(e, 4, 24),
        Err(EngineError::Metadata(MetadataError::ReadOnly))
    ));
    assert!(e.hydrate_region(5).is_err());
    assert!(!m.is_hydrated(3) && !m.is_hydrated(4) && !m.is_hydrated(5));
    // Every flush fails, even with healthy devices (an ok flush would claim the
    // region-1 write durable, whose bit is not committed).
    r.dst.set_fault(Fault::Flush, None);
    r.md.set_fault(Fault::Write, None);
    r.md.set_fault(Fault::Flush, None);
    assert!(e.flush().is_err(), "{what}: a flush succeeded in ro mode");
    // Status tells.
    let s = status(&r.eng);
    assert_eq!(s.mode, "ro", "{what}: status mode");
    assert_eq!(s.commit_failures, 1, "{what}: status commit_failures");
    // Restart after a power cut on healthy devices: the committed state, region 0
    // as acknowledged; region 1 was never flushed.
    let e2 = r.restart();
    assert_eq!(e2.metadata().mode(), Mode::Rw);
    assert_eq!(region_tag(&e2, 0), 20, "{what}: acknowledged write lost");
    assert!(!e2.metadata().is_hydrated(1));
    assert_eq!(region_tag(&e2, 1), SOURCE);
    e2.flush().unwrap();
    1
}

/// Commits region 0 (tag 20), writes region 1 (tag 21) and arms `arm` before flushing.
fn fail_a_commit(arm: impl FnOnce(&Rig)) -> Rig {
    let r = rig();
    write_region(&r.eng, 0, 20).unwrap();
    r.eng.flush().unwrap();
    write_partial(&r.eng, 1, 21).unwrap();
    assert!(r.eng.metadata().is_hydrated(1));
    arm(&r);
    let err = r.eng.flush().expect_err("flush must fail");
    assert!(matches!(err, EngineError::Commit(_)), "{err:?}");
    r
}

#[test]
fn destination_flush_error_goes_read_only_and_keeps_flushed_data() {
    let r = fail_a_commit(|r| r.dst.set_fault(Fault::Flush, Some(libc::EIO)));
    let n = assert_read_only_mode(&r, "destination flush");
    report("destination flush", n + 1);
}

#[test]
fn metadata_write_error_goes_read_only_and_keeps_flushed_data() {
    let r = fail_a_commit(|r| r.md.set_fault(Fault::Write, Some(libc::EIO)));
    let n = assert_read_only_mode(&r, "metadata write");
    report("metadata write", n);
}

#[test]
fn metadata_flush_error_goes_read_only_and_keeps_flushed_data() {
    let r = fail_a_commit(|r| r.md.set_fault(Fault::Flush, Some(libc::EIO)));
    let n = assert_read_only_mode(&r, "metadata flush");
    report("metadata flush", n);
}

#[test]
fn destination_flush_error_with_nothing_to_commit_still_fails_the_flush() {
    // A guest flush with no new bits must still flush the destination (rule 2),
    // and a failure of that flush must reach the guest and degrade the mode.
    let r = rig();
    write_region(&r.eng, 0, 30).unwrap();
    r.eng.flush().unwrap();
    write_region(&r.eng, 0, 31).unwrap(); // hydrated: no new bit
    r.dst.set_fault(Fault::Flush, Some(libc::EIO));
    assert!(r.eng.flush().is_err());
    assert_eq!(r.eng.metadata().mode(), Mode::Ro);
    report("destination flush, empty commit", 1);
}

#[test]
fn periodic_commit_failure_degrades_too() {
    let r = rig();
    write_region(&r.eng, 0, 20).unwrap();
    r.eng.flush().unwrap();
    write_partial(&r.eng, 1, 21).unwrap();
    r.md.set_fault(Fault::Write, Some(libc::ENOSPC));
    // The periodic committer's path (no guest flush).
    assert!(r.eng.commit(DestFlush::IfRecording).is_err());
    let n = assert_read_only_mode(&r, "periodic commit");
    report("periodic commit", n);
}

#[test]
fn failed_reload_goes_to_fail_mode_and_every_request_fails() {
    let r = rig();
    write_region(&r.eng, 0, 40).unwrap();
    r.eng.flush().unwrap();
    write_partial(&r.eng, 1, 41).unwrap();
    // The metadata device dies: writes and reads fail, so the reload fails too.
    r.md.set_fault(Fault::Write, Some(libc::EIO));
    r.md.set_fault(Fault::Read, Some(libc::EIO));
    assert!(r.eng.flush().is_err());
    let e = &r.eng;
    assert_eq!(e.metadata().mode(), Mode::Fail);
    let mut buf = vec![0u8; 512];
    assert!(e.read_at(&mut buf, 0).is_err(), "read in fail mode");
    assert!(
        e.read_at(&mut buf, 7 * REGION).is_err(),
        "read in fail mode"
    );
    assert!(write_region(e, 0, 42).is_err());
    assert!(e.discard(0, REGION).is_err());
    assert!(e.write_zeroes(0, 512).is_err());
    assert!(e.flush().is_err());
    assert!(e.hydrate_region(6).is_err());
    // Fail mode is never left, even with the device healthy again.
    r.md.set_fault(Fault::Write, None);
    r.md.set_fault(Fault::Read, None);
    assert!(e.read_at(&mut buf, 0).is_err());
    assert!(e.flush().is_err());
    assert_eq!(status(&r.eng).mode, "fail");
    // A restart on healthy devices recovers the last committed state.
    let e2 = r.restart();
    assert_eq!(region_tag(&e2, 0), 40);
    assert_eq!(region_tag(&e2, 1), SOURCE);
    report("metadata device dead", 2);
}

#[test]
fn source_read_error_during_a_guest_read() {
    let r = rig();
    let e = &r.eng;
    write_region(e, 0, 50).unwrap();
    r.src.set_fault(Fault::Read, Some(libc::EIO));
    let mut buf = vec![0u8; 2 * REGION as usize];
    // Unhydrated: fails. Mixed hydrated/unhydrated: fails. Hydrated: works.
    assert!(matches!(
        e.read_at(&mut buf[..512], REGION),
        Err(EngineError::Source(_))
    ));
    assert!(matches!(
        e.read_at(&mut buf, 0),
        Err(EngineError::Source(_))
    ));
    assert_eq!(region_tag(e, 0), 50);
    // Reads never copy, so nothing changed and the mode is rw.
    assert!(!e.metadata().is_hydrated(1));
    assert_eq!(e.metadata().mode(), Mode::Rw);
    e.flush().unwrap();
    r.src.set_fault(Fault::Read, None);
    assert_eq!(region_tag(e, 1), SOURCE);
    report("source read (guest read)", 2);
}

/// Sub-block writes (a version 2 store: 8 KiB regions of two 4 KiB
/// sub-blocks): a failed source read of an edge sub-block or a failed
/// destination write sets no mask bit and leaves the region as it was; read-only
/// mode refuses them like copies.
#[test]
fn failed_sub_block_writes_set_no_mask_bit() {
    let spec = PartialSpec {
        slots: 4,
        sub_block: 4096,
    };
    let r = rig_with(spec);
    let e = &r.eng;
    let m = e.metadata();
    let sub = |reg: u64, tag: u64| {
        // The region's first sub-block, whole: no source read.
        e.write_at(&write_data(tag, reg * SPR, 8), reg * REGION)
    };
    let mut n = 0;
    // Part of a sub-block: its other sectors are read from the source.
    r.src.set_fault(Fault::Read, Some(libc::EIO));
    assert!(matches!(
        write_partial(e, 2, 30),
        Err(EngineError::Source(_))
    ));
    n += 1;
    r.src.set_fault(Fault::Read, None);
    r.dst.set_fault(Fault::Write, Some(libc::EIO));
    assert!(matches!(sub(3, 31), Err(EngineError::Dest(_))));
    assert!(matches!(write_partial(e, 3, 32), Err(EngineError::Dest(_))));
    n += 2;
    r.dst.set_fault(Fault::Write, None);
    assert_eq!((m.written_mask(2), m.written_mask(3)), (None, None));
    assert_eq!((region_tag(e, 2), region_tag(e, 3)), (SOURCE, SOURCE));
    assert_eq!(m.partial_count(), 0);
    // Healthy again: a sub-block, then a failed commit and read-only mode.
    sub(3, 33).unwrap();
    assert_eq!(m.written_mask(3), Some(0b01));
    e.flush().unwrap();
    write_partial(e, 4, 34).unwrap();
    r.md.set_fault(Fault::Write, Some(libc::EIO));
    assert!(e.flush().is_err());
    n += 1;
    assert_eq!(m.mode(), Mode::Ro);
    // The uncommitted mask is kept (its write completed), nothing new is taken.
    assert_eq!(m.written_mask(4), Some(0b01));
    assert!(matches!(
        sub(5, 35),
        Err(EngineError::Metadata(MetadataError::ReadOnly))
    ));
    assert_eq!(m.written_mask(5), None);
    // A power cut: the committed mask of region 3 survives, region 4's did not.
    r.md.set_fault(Fault::Write, None);
    let e2 = r.restart();
    assert_eq!(e2.metadata().written_mask(3), Some(0b01));
    assert_eq!(e2.metadata().written_mask(4), None);
    let mut sec = [0u8; SECTOR];
    e2.read_at(&mut sec, 3 * REGION + 512).unwrap();
    assert_eq!(decode(&sec, 3 * SPR + 1), Some(33));
    e2.read_at(&mut sec, 3 * REGION + 4096).unwrap();
    assert_eq!(decode(&sec, 3 * SPR + 8), Some(SOURCE));
    report("sub-block writes", n);
}

#[test]
fn source_read_error_during_hydration_leaves_the_region_unhydrated() {
    let r = rig();
    let e = &r.eng;
    r.src.set_fault(Fault::Read, Some(libc::EIO));
    let writes = r.dst.write_count();
    // Guest-triggered copy (partial write), background single region, background batch.
    assert!(matches!(
        write_partial(e, 2, 60),
        Err(EngineError::Source(_))
    ));
    assert!(matches!(e.hydrate_region(3), Err(EngineError::Source(_))));
    assert!(matches!(
        e.hydrate_batch(4, false),
        Err(EngineError::Source(_))
    ));
    assert!(e.hydrate_next().is_err());
    assert_eq!(
        r.dst.write_count(),
        writes,
        "a failed copy wrote the destination"
    );
    assert_eq!(e.metadata().hydrated_count(), 0);
    assert_eq!(
        e.regions_in_flight(),
        0,
        "a failed copy left a region locked"
    );
    // A whole-region write needs no source: it still works.
    write_region(e, 5, 61).unwrap();
    assert_eq!(e.metadata().mode(), Mode::Rw);
    e.flush().unwrap();
    // Healed: the copies succeed and the data is the source's plus the write.
    r.src.set_fault(Fault::Read, None);
    write_partial(e, 2, 60).unwrap();
    while e.hydrate_next().unwrap().is_some() {}
    e.flush().unwrap();
    let e2 = r.restart();
    assert!(e2.metadata().all_hydrated());
    assert_eq!(region_tag(&e2, 5), 61);
    assert_eq!(region_tag(&e2, 3), SOURCE);
    let mut s = vec![0u8; 512];
    e2.read_at(&mut s, (2 * SPR + 4) * 512).unwrap();
    assert_eq!(decode(&s, 2 * SPR + 4), Some(60));
    e2.read_at(&mut s, 2 * SPR * 512).unwrap();
    assert_eq!(decode(&s, 2 * SPR), Some(SOURCE));
    report("source read (hydration)", 4);
}

#[test]
fn enospc_on_the_simulated_destination() {
    let r = rig();
    let e = &r.eng;
    write_region(e, 0, 70).unwrap();
    e.flush().unwrap();
    r.dst.set_fault(Fault::Write, Some(libc::ENOSPC));
    let err = write_partial(e, 1, 71).unwrap_err();
    let io: std::io::Error = err.into();
    let chain = vhost_clone::error_chain(&io);
    assert!(chain.contains("No space left"), "{chain}");
    assert!(e.hydrate_region(2).is_err());
    assert!(!e.metadata().is_hydrated(1) && !e.metadata().is_hydrated(2));
    e.flush().unwrap();
    let e2 = r.restart();
    assert_eq!(region_tag(&e2, 0), 70);
    assert_eq!(region_tag(&e2, 1), SOURCE);
    report("ENOSPC (simulated)", 2);
}

/// A tmpfs mounted for one test, unmounted on drop.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount(bytes: u64) -> Option<SmallFs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn enospc_on_a_real_full_filesystem() {
    // A 1 MiB clone whose destination lives on a 256 KiB tmpfs: the guest fills it.
    const BIG: u64 = 1 << 20;
    const RS: u64 = 64 << 10;
    let Some(fs) = SmallFs::mount(256 << 10) else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let src_path = work.path().join("src.img");
    let src_img = image(SOURCE, BIG / 512);
    std::fs::write(&src_path, &src_img).unwrap();
    let dst_path = fs.0.path().join("dst.img");
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let src = Arc::new(FileDevice::open(&src_path, &ro).unwrap());
    let open_dst = || {
        Arc::new(
            FileDevice::open(
                &dst_path,
                &OpenOptions {
                    create_size: Some(BIG),
                    ..Default::default()
                },
            )
            .unwrap(),
        )
    };
    let geo = Geometry::new(BIG, RS).unwrap();
    let md_path = work.path().join("md");
    std::fs::write(&md_path, sectors::formatted_metadata(&geo)).unwrap();
    let open_md = || {
        let d = Arc::new(FileDevice::open(&md_path, &OpenOptions::default()).unwrap());
        Metadata::open(d, Some(&geo)).unwrap()
    };
    let e = Engine::new(
        Some(src.clone()),
        open_dst(),
        Arc::new(open_md()),
        EngineConfig::default(),
    )
    .unwrap();
    let mut acked = Vec::new();
    let mut failed = None;
    for reg in 0..geo.nr_regions() {
        let first = reg * RS / 512;
        match e.write_at(&write_data(100 + reg, first, RS / 512), reg * RS) {
            Ok(()) => {
                e.flush().unwrap();
                acked.push(reg);
            }
            Err(err) => {
                let io: std::io::Error = err.into();
                assert_eq!(
                    io.get_ref()
                        .and_then(|x| x.downcast_ref::<EngineError>())
                        .and_then(|x| match x {
                            EngineError::Dest(s) => s.raw_os_error(),
                            _ => None,
                        }),
                    Some(libc::ENOSPC),
                    "{io}"
                );
                failed = Some(reg);
                break;
            }
        }
    }
    let failed = failed.expect("the small filesystem never filled up");
    assert!(!acked.is_empty());
    assert!(!e.metadata().is_hydrated(failed));
    // Still usable: reads of everything, flush of what was done.
    assert_eq!(e.metadata().mode(), Mode::Rw);
    e.flush().unwrap();
    let mut buf = vec![0u8; 512];
    e.read_at(&mut buf, failed * RS).unwrap();
    assert_eq!(decode(&buf, failed * RS / 512), Some(SOURCE));
    drop(e);
    // Restart: every acknowledged write is there, the failed region is the source's.
    let e2 = Engine::new(
        Some(src),
        open_dst(),
        Arc::new(open_md()),
        EngineConfig::default(),
    )
    .unwrap();
    for &reg in &acked {
        let mut b = vec![0u8; RS as usize];
        e2.read_at(&mut b, reg * RS).unwrap();
        assert_eq!(
            b,
            write_data(100 + reg, reg * RS / 512, RS / 512),
            "region {reg}"
        );
    }
    e2.read_at(&mut buf, failed * RS).unwrap();
    assert_eq!(decode(&buf, failed * RS / 512), Some(SOURCE));
    eprintln!(
        "ENOSPC after {} acknowledged 64 KiB regions on a 256 KiB tmpfs",
        acked.len()
    );
    drop(e2);
    drop(fs);
    report("ENOSPC (tmpfs)", 1);
}

#[test]
fn faults_reach_the_guest_as_ioerr_through_the_front() {
    let r = rig();
    let srv = vu::Server::start(Arc::new(CloneDisk::new(r.eng.clone(), false)), vu::opts(1));
    let mut g = vu::Guest::start(&srv.path, 1);
    let d0 = write_data(80, 0, SPR);
    assert_eq!(g.write(0, 0, &d0), vu::S_OK);
    assert_eq!(g.flush(0), vu::S_OK);
    let mut n = 0;
    // Destination write error.
    r.dst.set_fault(Fault::Write, Some(libc::EIO));
    assert_eq!(g.write(0, SPR, &write_data(81, SPR, SPR)), vu::S_IOERR);
    r.dst.set_fault(Fault::Write, None);
    n += 1;
    // Source read error on a guest read of an unhydrated region; hydrated still read.
    r.src.set_fault(Fault::Read, Some(libc::EIO));
    assert_eq!(g.read(0, 2 * SPR, 512).0, vu::S_IOERR);
    assert_eq!(g.write(0, 2 * SPR + 1, &[7u8; 512]), vu::S_IOERR);
    let (st, data) = g.read(0, 0, REGION as u32);
    assert_eq!((st, data), (vu::S_OK, d0.clone()));
    r.src.set_fault(Fault::Read, None);
    n += 2;
    // A region written, then a failing flush: IOERR, read-only from then on.
    assert_eq!(g.write(0, 3 * SPR + 2, &[9u8; 1024]), vu::S_OK);
    r.dst.set_fault(Fault::Flush, Some(libc::EIO));
    assert_eq!(g.flush(0), vu::S_IOERR);
    r.dst.set_fault(Fault::Flush, None);
    n += 1;
    assert_eq!(g.flush(0), vu::S_IOERR, "flush in ro mode");
    assert_eq!(
        g.write(0, 4 * SPR, &[1u8; 512]),
        vu::S_IOERR,
        "hydrating write in ro"
    );
    assert_eq!(
        g.write(0, 0, &d0),
        vu::S_OK,
        "write to a hydrated region in ro"
    );
    assert_eq!(g.read(0, 5 * SPR, 512).0, vu::S_OK);
    assert_eq!(r.eng.metadata().mode(), Mode::Ro);
    let s = status(&r.eng);
    assert_eq!((s.mode.as_str(), s.commit_failures), ("ro", 1));
    assert!(s.io.errors >= 5, "{:?}", s.io);
    drop(g);
    srv.stop();
    let e2 = r.restart();
    assert_eq!(region_tag(&e2, 0), 80);
    assert_eq!(region_tag(&e2, 3), SOURCE);
    report("through the front", n);
}
