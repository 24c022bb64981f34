//! Unit tests of the metadata store: format, commit, recovery, corruption, modes.

use super::*;
use crate::storage::{CrashLog, Fault, LogEvent, SimDevice};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const REGION: u64 = 4096;

fn geo(regions: u64) -> Geometry {
    Geometry::new(regions * REGION, REGION).unwrap()
}

fn md_dev(g: &Geometry) -> Arc<SimDevice> {
    Arc::new(SimDevice::new(Layout::new(g).required_size()))
}

#[test]
fn geometry_validation() {
    assert!(Geometry::new(1 << 20, 3000).is_err());
    assert!(Geometry::new(1 << 20, 2048).is_err());
    assert!(Geometry::new(1 << 20, 2 << 30).is_err());
    assert!(Geometry::new(1000, 4096).is_err());
    assert!(Geometry::new(0, 4096).is_err());
    assert!(Geometry::new((1u64 << 31) * 4096 + 4096, 4096).is_err());
    let g = Geometry::new(10 * 4096 + 512, 4096).unwrap();
    assert_eq!(g.nr_regions(), 11);
    assert_eq!(g.region_len(10), 512);
    assert_eq!(g.region_end(10), g.device_size());
    assert_eq!(g.region_of(4096 * 3 + 5), 3);
}

#[test]
fn format_open_roundtrip_and_blank_detection() {
    let g = geo(100);
    let dev = md_dev(&g);
    assert!(is_blank(dev.as_ref()).unwrap());
    assert!(matches!(
        Metadata::open(dev.clone(), None),
        Err(MetadataError::Blank)
    ));
    let (md, fresh) = Metadata::open_or_format(dev.clone(), g).unwrap();
    assert!(fresh);
    assert_eq!(md.hydrated_count(), 0);
    let (md2, fresh2) = Metadata::open_or_format(dev.clone(), g).unwrap();
    assert!(!fresh2);
    assert_eq!(md2.uuid(), md.uuid());
}

#[test]
fn commit_persists_bits_and_reopen_sees_them() {
    let g = geo(70_000); // three bitmap blocks
    let dev = md_dev(&g);
    let dest = SimDevice::new(4096);
    let md = Metadata::format(dev.clone(), g).unwrap();
    for r in [0u64, 5, 40_000, 69_999] {
        assert!(md.set_hydrated(r).unwrap());
    }
    assert!(!md.set_hydrated(5).unwrap());
    assert!(md.set_hydrated(70_000).is_err());
    let out = md.commit(&dest, false).unwrap();
    assert_eq!(
        out,
        CommitOutcome::Committed {
            seq: 2,
            regions: 4,
            blocks: 3
        }
    );
    assert_eq!(md.commit(&dest, false).unwrap(), CommitOutcome::Nothing);
    let md2 = Metadata::open(dev.clone(), Some(&g)).unwrap();
    assert_eq!(md2.hydrated_count(), 4);
    assert!(md2.is_hydrated(40_000) && md2.is_hydrated(69_999) && !md2.is_hydrated(1));
    assert_eq!(md2.next_unhydrated(0), Some(1));
    assert_eq!(md2.next_unhydrated(69_999), Some(1));
}

#[test]
fn commit_writes_only_changed_blocks() {
    let g = geo(200_000); // 7 bitmap blocks
    let dev = md_dev(&g);
    let dest = SimDevice::new(4096);
    let md = Metadata::format(dev.clone(), g).unwrap();
    let before = dev.write_count();
    md.set_hydrated(100_000).unwrap();
    md.commit(&dest, false).unwrap();
    // One journal block, one superblock, one in-place block.
    assert_eq!(dev.write_count() - before, 3);
}

#[test]
fn destination_is_flushed_before_any_metadata_write() {
    let g = geo(64);
    let log = CrashLog::new();
    let dev = Arc::new(SimDevice::new(Layout::new(&g).required_size()).with_log(log.clone(), 1));
    let dest = SimDevice::new(8192).with_log(log.clone(), 0);
    let md = Metadata::format(dev.clone(), g).unwrap();
    dest.write_at(&[1u8; 4096], 0).unwrap();
    md.set_hydrated(0).unwrap();
    let start = log.len();
    md.commit(&dest, false).unwrap();
    let ev = log.events();
    let first_md = ev[start..]
        .iter()
        .position(|e| matches!(e, LogEvent::Write { dev: 1, .. }))
        .unwrap();
    let dest_flush = ev[start..]
        .iter()
        .position(|e| matches!(e, LogEvent::Flush { dev: 0 }))
        .unwrap();
    assert!(dest_flush < first_md);
}

#[test]
fn flush_with_no_changes_flushes_destination_only_when_asked() {
    let g = geo(8);
    let md = Metadata::format(md_dev(&g), g).unwrap();
    let dest = SimDevice::new(4096);
    md.commit(&dest, false).unwrap();
    assert_eq!(dest.flush_count(), 0);
    md.commit(&dest, true).unwrap();
    assert_eq!(dest.flush_count(), 1);
}

#[test]
fn crash_at_every_point_of_many_commits_loads_old_or_new_state() {
    let g = geo(70_000);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let log = CrashLog::new();
    let size = Layout::new(&g).required_size();
    let dev = Arc::new(SimDevice::new(size).with_log(log.clone(), 1));
    let dest = SimDevice::new(4096);
    let md = Metadata::format(dev.clone(), g).unwrap();
    let initial = dev.durable_image();
    let base = log.len();
    // committed_at[i] = (log index after commit i completed, bits set by then)
    let mut states: Vec<(usize, Vec<u64>)> = vec![(base, vec![])];
    let mut set = vec![];
    for round in 0..12u64 {
        for k in 0..5u64 {
            let r = (round * 7919 + k * 104_729) % g.nr_regions();
            if md.set_hydrated(r).unwrap() {
                set.push(r);
            }
        }
        md.commit(&dest, false).unwrap();
        states.push((log.len(), set.clone()));
    }
    for point in base..=log.len() {
        for _ in 0..4 {
            let img = log.crash_image(1, &initial, point, &mut rng);
            let dev2: Arc<dyn BlockDevice> = Arc::new(SimDevice::from_image(img));
            let md2 =
                Metadata::open(dev2, Some(&g)).unwrap_or_else(|e| panic!("point {point}: {e}"));
            // Must equal the last state committed at or before `point`, or the one after it.
            let i = states.iter().rposition(|(at, _)| *at <= point).unwrap();
            let ok = |s: &Vec<u64>| {
                md2.hydrated_count() == s.len() as u64 && s.iter().all(|&r| md2.is_hydrated(r))
            };
            assert!(
                ok(&states[i].1) || states.get(i + 1).is_some_and(|s| ok(&s.1)),
                "crash at {point}: loaded a state that was never committed"
            );
        }
    }
}

#[test]
fn failed_destination_flush_aborts_and_goes_read_only() {
    let g = geo(64);
    let dev = md_dev(&g);
    let dest = SimDevice::new(4096);
    let md = Metadata::format(dev.clone(), g).unwrap();
    md.set_hydrated(1).unwrap();
    md.commit(&dest, false).unwrap();
    md.set_hydrated(2).unwrap();
    dest.set_fault(Fault::Flush, Some(libc::EIO));
    assert!(md.commit(&dest, false).is_err());
    assert_eq!(md.mode(), Mode::Ro);
    // No bit is dropped: region 2's data write completed (rule 7); ro mode
    // never commits it.
    assert!(md.is_hydrated(1) && md.is_hydrated(2));
    assert!(matches!(md.set_hydrated(3), Err(MetadataError::ReadOnly)));
    dest.set_fault(Fault::Flush, None);
    assert!(matches!(
        md.commit(&dest, true),
        Err(MetadataError::ReadOnly)
    ));
}

#[test]
fn failed_reload_goes_to_fail_mode() {
    let g = geo(64);
    let dev = md_dev(&g);
    let dest = SimDevice::new(4096);
    let md = Metadata::format(dev.clone(), g).unwrap();
    md.set_hydrated(1).unwrap();
    dev.set_fault(Fault::Write, Some(libc::EIO));
    dev.set_fault(Fault::Read, Some(libc::EIO));
    assert!(md.commit(&dest, false).is_err());
    assert_eq!(md.mode(), Mode::Fail);
    assert!(matches!(md.commit(&dest, true), Err(MetadataError::Failed)));
}

#[test]
fn write_cache_choice_is_persisted() {
    let g = geo(8);
    let dev = md_dev(&g);
    let dest = SimDevice::new(4096);
    let md = Metadata::format(dev.clone(), g).unwrap();
    assert_eq!(md.write_cache(), None);
    md.set_write_cache(false);
    assert!(md.changed());
    md.commit(&dest, false).unwrap();
    assert_eq!(
        Metadata::open(dev.clone(), None).unwrap().write_cache(),
        Some(false)
    );
}

/// A standby's look at a store another process commits to: the newest slot
/// that validates, the other one when a slot is torn, an error only when both
/// are bad (or the store is blank).
#[test]
fn peek_reads_the_newest_valid_superblock_slot() {
    let g = geo(100);
    let dev = md_dev(&g);
    assert!(matches!(
        peek_superblock(dev.as_ref()),
        Err(MetadataError::Blank)
    ));
    let dest = SimDevice::new(4096);
    let md = Metadata::format(dev.clone(), g).unwrap();
    md.set_hydrated(3).unwrap();
    md.set_write_cache(false);
    md.commit(&dest, false).unwrap(); // seq 2, slot 0
    md.set_hydrated(4).unwrap();
    md.commit(&dest, false).unwrap(); // seq 3, slot 1
    let sb = peek_superblock(dev.as_ref()).unwrap();
    assert_eq!((sb.seq, sb.hydrated, sb.geometry), (3, 2, g));
    assert_eq!(sb.write_cache(), Some(false));
    assert_eq!(sb.uuid, *md.uuid().as_bytes());
    let image = dev.current_image();
    let peek = |torn: &[u64]| {
        let mut img = image.clone();
        for slot in torn {
            img[(*slot * BLOCK_SIZE) as usize + 100] ^= 0xff;
        }
        peek_superblock(&SimDevice::from_image(img))
    };
    assert_eq!(peek(&[1]).unwrap().seq, 2);
    assert_eq!(peek(&[0]).unwrap().seq, 3);
    assert!(matches!(
        peek(&[0, 1]),
        Err(MetadataError::BadSuperblock { .. })
    ));
}

#[test]
fn corruption_is_detected_with_a_message() {
    let g = geo(70_000);
    let dev = md_dev(&g);
    let dest = SimDevice::new(4096);
    let md = Metadata::format(dev.clone(), g).unwrap();
    for r in 0..10 {
        md.set_hydrated(r * 1000).unwrap();
        md.commit(&dest, false).unwrap();
    }
    let good = dev.current_image();
    let open = |img: Vec<u8>| Metadata::open(Arc::new(SimDevice::from_image(img)), Some(&g));
    assert!(open(good.clone()).is_ok());
    // Every byte of both superblock sectors.
    for off in (0..512).chain(4096..4096 + 512) {
        let mut img = good.clone();
        img[off] ^= 0x01;
        assert!(
            open(img).is_err(),
            "superblock byte {off} flip not detected"
        );
    }
    // A bitmap block not covered by the journal.
    let layout = Layout::new(&g);
    let mut img = good.clone();
    img[layout.bitmap_offset(2) as usize + 100] ^= 0x40;
    let e = open(img).unwrap_err().to_string();
    assert!(
        e.contains("bitmap block 2") && e.contains("checksum"),
        "{e}"
    );
    // The current journal record.
    let mut img = good.clone();
    let seq = md.superblock().seq;
    img[layout.journal_offset(seq % 2, 0) as usize + 40] ^= 1;
    let e = open(img).unwrap_err().to_string();
    assert!(e.contains("journal block"), "{e}");
    // Truncated.
    let e = open(good[..8192].to_vec()).unwrap_err();
    assert!(matches!(e, MetadataError::TooSmall { .. }), "{e}");
    // Another clone's metadata (other uuid) spliced in.
    let other = md_dev(&g);
    Metadata::format(other.clone(), g).unwrap();
    let mut img = good.clone();
    let o = other.current_image();
    let a = layout.bitmap_offset(1) as usize;
    img[a..a + 4096].copy_from_slice(&o[a..a + 4096]);
    let e = open(img).unwrap_err().to_string();
    assert!(e.contains("another clone"), "{e}");
    // Geometry mismatch.
    let e = Metadata::open(
        Arc::new(SimDevice::from_image(good.clone())),
        Some(&geo(69_999)),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("device size mismatch"), "{e}");
    let g2 = Geometry::new(g.device_size(), 8192).unwrap();
    let e = Metadata::open(Arc::new(SimDevice::from_image(good)), Some(&g2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("region size mismatch"), "{e}");
}

/// A device that delegates to a [`SimDevice`], with hooks: `on_flush` runs at
/// each flush (and fails it when it returns true), `fail_write` fails writes
/// at the offsets it names.
struct Hooked {
    inner: SimDevice,
    on_flush: Box<dyn Fn() -> bool + Send + Sync>,
    fail_write: Box<dyn Fn(u64) -> bool + Send + Sync>,
}

impl std::fmt::Debug for Hooked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hooked")
    }
}

impl BlockDevice for Hooked {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::storage::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> crate::storage::Result<()> {
        if (self.fail_write)(offset) {
            return Err(StorageError::Io {
                op: "write",
                offset,
                len: buf.len() as u64,
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> crate::storage::Result<()> {
        if (self.on_flush)() {
            return Err(StorageError::Io {
                op: "flush",
                offset: 0,
                len: 0,
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> crate::storage::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> crate::storage::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
}

/// A failing commit drops no bit set in core: neither the aborted
/// transaction's nor one set while it ran (a guest write completing meanwhile).
/// Their writes completed and may have been acknowledged.
#[test]
fn bits_set_during_a_failed_commit_are_kept() {
    let g = geo(64);
    let dev = md_dev(&g);
    let md = Arc::new(Metadata::format(dev.clone(), g).unwrap());
    md.set_hydrated(1).unwrap();
    md.commit(&SimDevice::new(4096), false).unwrap();
    md.set_hydrated(2).unwrap();
    let m2 = md.clone();
    let dest = Hooked {
        inner: SimDevice::new(4096),
        // A guest write to region 3 completes during the commit, whose
        // destination flush then fails.
        on_flush: Box::new(move || {
            m2.set_hydrated(3).unwrap();
            true
        }),
        fail_write: Box::new(|_| false),
    };
    assert!(md.commit(&dest, false).is_err());
    assert_eq!(md.mode(), Mode::Ro);
    assert!(md.is_hydrated(1), "committed bit kept");
    assert!(
        md.is_hydrated(2),
        "the aborted transaction's bit was dropped"
    );
    assert!(
        md.is_hydrated(3),
        "a bit of the next transaction was dropped"
    );
    assert_eq!(md.hydrated_count(), 3);
    assert!(
        md.changed(),
        "the uncommitted bits are still to be committed"
    );
    assert!(matches!(md.set_hydrated(4), Err(MetadataError::ReadOnly)));
}

/// Once a commit's superblock is durable, a failed in-place bitmap write does
/// not fail the commit: the journal covers the block, and the next commit
/// journals and rewrites it; a crash after that loses nothing.
#[test]
fn a_failed_in_place_write_after_a_durable_commit_is_not_a_failure() {
    let g = geo(70_000); // three bitmap blocks
    let layout = Layout::new(&g);
    let sim = SimDevice::new(layout.required_size());
    Metadata::format_store(&sim, g).unwrap();
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f2 = failing.clone();
    let bitmap0 = layout.bitmap_offset(0);
    let dev = Arc::new(Hooked {
        inner: sim,
        on_flush: Box::new(|| false),
        fail_write: Box::new(move |off| f2.load(Ordering::SeqCst) && off == bitmap0),
    });
    let md = Metadata::open(dev.clone(), None).unwrap();
    let dest = SimDevice::new(4096);
    md.set_hydrated(5).unwrap();
    let out = md.commit(&dest, true);
    assert!(out.is_ok(), "the commit is durable, yet it failed: {out:?}");
    assert_eq!(md.mode(), Mode::Rw);
    failing.store(false, Ordering::SeqCst);
    // The next commit touches another block only.
    md.set_hydrated(40_000).unwrap();
    md.commit(&dest, false).unwrap();
    let reopened = Metadata::open(
        Arc::new(SimDevice::from_image(dev.inner.durable_image())),
        None,
    )
    .unwrap();
    assert!(reopened.is_hydrated(5), "block 0's bit was lost");
    assert!(reopened.is_hydrated(40_000));
}

/// Bits a dead process left (adopted) stay in the live map when the commit that
/// should record them fails: the next start adopts them again (rule 7).
#[test]
fn a_failed_recovery_commit_keeps_the_adopted_bits_in_the_live_map() {
    let g = geo(64);
    let dev = md_dev(&g);
    let md = Metadata::format(dev.clone(), g).unwrap();
    md.set_hydrated(7).unwrap();
    let survivor = md.live_map().survivor().unwrap();
    drop(md);
    let loaded = load(dev.as_ref(), None).unwrap();
    let md = Metadata::from_loaded(dev.clone(), loaded, survivor).unwrap();
    assert_eq!(md.adopted(), 1);
    let left = md.live_map().survivor().unwrap();
    dev.set_fault(Fault::Write, Some(libc::EIO));
    assert!(md.commit(&SimDevice::new(4096), true).is_err());
    assert_eq!(md.mode(), Mode::Ro);
    assert_eq!(
        left.snapshot(),
        vec![1 << 7],
        "the live map forgot the adopted bit"
    );
    assert!(md.is_hydrated(7));
}

/// A version 2 geometry: 16 KiB regions of four 4 KiB sub-blocks.
fn partial_geo(regions: u64) -> (Geometry, PartialSpec) {
    let g = Geometry::new(regions * 16384, 16384).unwrap();
    (
        g,
        PartialSpec {
            slots: 600,
            sub_block: 4096,
        },
    )
}

/// The committed state a store holds: hydrated regions and partly written ones.
type State = (Vec<u64>, Vec<(u64, u64)>);

fn state_of(md: &Metadata, nr: u64) -> State {
    (
        (0..nr).filter(|&r| md.is_hydrated(r)).collect(),
        md.partial_regions(),
    )
}

#[test]
fn crash_at_every_point_of_commits_with_masks_loads_old_or_new_state() {
    let (g, spec) = partial_geo(5000);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let log = CrashLog::new();
    let size = Layout::with(&g, &spec).required_size();
    let dev = Arc::new(SimDevice::new(size).with_log(log.clone(), 1));
    let dest = SimDevice::new(4096);
    let md = Metadata::format_with(dev.clone(), g, spec).unwrap();
    let initial = dev.durable_image();
    let base = log.len();
    let nr = g.nr_regions();
    let mut states: Vec<(usize, State)> = vec![(base, state_of(&md, nr))];
    for round in 0..10u64 {
        for k in 0..40u64 {
            let r = (round * 7919 + k * 104_729) % nr;
            match k % 4 {
                // Whole regions, some of them partly written before.
                0 => {
                    md.set_hydrated(r).unwrap();
                }
                // Sub-blocks: new slots, more bits, and full masks (hydrated).
                _ => {
                    md.mark_written(r, 1 << (k % 4)).unwrap();
                    md.mark_written((r + 1) % nr, 0b0110).unwrap();
                }
            }
        }
        md.commit(&dest, false).unwrap();
        states.push((log.len(), state_of(&md, nr)));
    }
    assert!(md.partial_count() > 100, "{}", md.partial_count());
    for point in base..=log.len() {
        for _ in 0..3 {
            let img = log.crash_image(1, &initial, point, &mut rng);
            let dev2: Arc<dyn BlockDevice> = Arc::new(SimDevice::from_image(img));
            let md2 =
                Metadata::open(dev2, Some(&g)).unwrap_or_else(|e| panic!("point {point}: {e}"));
            let i = states.iter().rposition(|(at, _)| *at <= point).unwrap();
            let got = state_of(&md2, nr);
            assert!(
                got == states[i].1 || states.get(i + 1).is_some_and(|s| got == s.1),
                "crash at {point}: loaded a state that was never committed"
            );
        }
    }
}

#[test]
fn table_damage_is_refused_with_what_is_wrong() {
    let (g, spec) = partial_geo(64);
    let size = Layout::with(&g, &spec).required_size();
    let dev = Arc::new(SimDevice::new(size));
    let dest = SimDevice::new(4096);
    let md = Metadata::format_with(dev.clone(), g, spec).unwrap();
    md.mark_written(3, 0b0010).unwrap();
    md.mark_written(5, 0b0001).unwrap();
    md.set_hydrated(9).unwrap();
    md.commit(&dest, false).unwrap();
    // A second commit, so that the table block is read in place.
    md.set_hydrated(10).unwrap();
    md.commit(&dest, false).unwrap();
    drop(md);
    let layout = Layout::with(&g, &spec);
    let sb = load(dev.as_ref(), None).unwrap().superblock;
    let at = layout.bitmap_offset(layout.bitmap_blocks) as usize;
    let good = dev.durable_image();
    let slot_of = |img: &[u8], region: u64| {
        (0..254)
            .find(|e| {
                let o = at + 32 + 16 * e;
                u64::from_le_bytes(img[o..o + 8].try_into().unwrap()) == region + 1
            })
            .unwrap()
    };
    let s3 = slot_of(&good, 3);
    let s5 = slot_of(&good, 5);
    type Edit = Box<dyn Fn(&mut [u8])>;
    let put = |o: usize, v: u64| -> Edit {
        Box::new(move |b: &mut [u8]| b[o..o + 8].copy_from_slice(&v.to_le_bytes()))
    };
    let key = |e: usize| at + 32 + 16 * e;
    let cases: Vec<(&str, Edit)> = vec![
        ("past the last region", put(key(s3), 65)),
        ("which is hydrated", put(key(s3), 10)),
        ("as slot", put(key(s5), 4)),
        ("written mask 0x0", put(key(s3) + 8, 0)),
        ("written mask 0xf", put(key(s3) + 8, 0xf)),
        ("written mask 0x12", put(key(s3) + 8, 0x12)),
        ("free slot", put(key(253) + 8, 1)),
    ];
    for (want, edit) in cases {
        let mut img = good.clone();
        edit(&mut img);
        let crc = crc32c::crc32c(&img[at + 4..at + 4096]);
        img[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        let d2: Arc<dyn BlockDevice> = Arc::new(SimDevice::from_image(img));
        let e = load(d2.as_ref(), None).unwrap_err().to_string();
        assert!(
            e.contains("table block 0") && e.contains(want),
            "{want}: {e}"
        );
    }
    // A flipped bit without a new checksum.
    let mut img = good.clone();
    img[at + 40] ^= 1;
    let d2: Arc<dyn BlockDevice> = Arc::new(SimDevice::from_image(img));
    let e = load(d2.as_ref(), None).unwrap_err().to_string();
    assert!(e.contains("table block 0: checksum mismatch"), "{e}");
    assert_eq!(sb.partial, spec);
}

#[test]
fn a_full_table_takes_no_new_region_and_a_full_mask_hydrates() {
    let (g, _) = partial_geo(8);
    let spec = PartialSpec {
        slots: 2,
        sub_block: 4096,
    };
    let dev = Arc::new(SimDevice::new(Layout::with(&g, &spec).required_size()));
    let md = Metadata::format_with(dev, g, spec).unwrap();
    assert_eq!(md.mark_written(0, 0b0001).unwrap(), Marked::Partial(0b0001));
    assert_eq!(md.mark_written(1, 0b0010).unwrap(), Marked::Partial(0b0010));
    assert_eq!(md.mark_written(2, 0b0001).unwrap(), Marked::NoRoom);
    assert_eq!(md.written_mask(2), None);
    // A region with a slot still grows; bits past its sub-blocks are ignored.
    assert_eq!(
        md.mark_written(0, 0b1_0000_0100).unwrap(),
        Marked::Partial(0b0101)
    );
    // Full: hydrated, and its slot is free for the next region.
    assert_eq!(md.mark_written(1, 0b1101).unwrap(), Marked::Hydrated);
    assert!(md.is_hydrated(1) && md.written_mask(1).is_none());
    assert_eq!(md.mark_written(2, 0b0001).unwrap(), Marked::Partial(0b0001));
    assert_eq!(md.mark_written(1, 0b0001).unwrap(), Marked::Hydrated);
    assert_eq!(md.hydrated_count(), 1);
    assert!(matches!(
        md.mark_written(8, 1),
        Err(MetadataError::OutOfRange { .. })
    ));
}
