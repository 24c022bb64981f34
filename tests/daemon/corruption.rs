//! Metadata corruption table (issue 7), through the binary.
//!
//! A clone is made with `vhost-clone create` (a sparse 160 MiB source with 4 KiB
//! regions, so the bitmap has two blocks), then committed work is done on the same
//! files through the library: commit 2 hydrates regions in both bitmap blocks,
//! commit 3 only in block 1. The store then holds superblock 3 in slot 1
//! (current), superblock 2 in slot 0 (older), a one-block journal record for
//! commit 3 (covering bitmap block 1), and bitmap block 0 in place.
//!
//! Every case corrupts a copy of that metadata file and requires:
//! * `vhost-clone check` exits 1 and prints a problem naming what is wrong;
//! * `vhost-clone serve` refuses to start (non-zero exit, an `error:` line naming it);
//! * neither of them changed the metadata file (never silently repaired).

use crate::support::daemon::{run, s, text, BIN};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_clone::engine::{Engine, EngineConfig};
use vhost_clone::metadata::format::{sb, Layout, BLOCK_SIZE, KIND_BITMAP, SUPERBLOCK_BYTES};

use vhost_clone::metadata::{Geometry, Metadata};
use vhost_clone::storage::{FileDevice, OpenOptions};

const RS: u64 = 4096;
const SIZE: u64 = 160 << 20; // 40960 regions: 2 bitmap blocks
const BS: usize = BLOCK_SIZE as usize;

fn sparse(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

struct Clone {
    dir: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    md: Vec<u8>,
}

/// `create`, then commits through the library.
fn make_clone() -> Clone {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("golden.img");
    sparse(&src, SIZE);
    let dst = dir.path().join("clone.img");
    let o = run(&[
        "create",
        "--source",
        s(&src),
        "--dest",
        s(&dst),
        "--region-size",
        "4K",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let md_path = dir.path().join("clone.img.meta");
    {
        let ro = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let rw = OpenOptions::default();
        let srcd = Arc::new(FileDevice::open(&src, &ro).unwrap());
        let dstd = Arc::new(FileDevice::open(&dst, &rw).unwrap());
        let mdd = Arc::new(FileDevice::open(&md_path, &rw).unwrap());
        let geo = Geometry::new(SIZE, RS).unwrap();
        let md = Metadata::open(mdd, Some(&geo)).unwrap();
        let e = Engine::new(Some(srcd), dstd, Arc::new(md), EngineConfig::default()).unwrap();
        for r in [0u64, 7, 33_000] {
            e.write_at(&[0xa5; 512], r * RS + 512).unwrap();
        }
        e.flush().unwrap();
        e.write_at(&[0x5a; 4096], 35_000 * RS).unwrap();
        e.flush().unwrap();
        assert_eq!(e.metadata().superblock().seq, 3);
        assert_eq!(e.metadata().superblock().journal_count, 1);
    }
    let o = run(&["check", "--source", s(&src), "--dest", s(&dst)]);
    assert!(
        o.status.success(),
        "the pristine clone must check OK: {}",
        text(&o)
    );
    let md = std::fs::read(&md_path).unwrap();
    Clone { dir, src, dst, md }
}

fn layout() -> Layout {
    Layout::new(&Geometry::new(SIZE, RS).unwrap())
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Recomputes the crc of the superblock in `slot`.
fn fix_sb_crc(md: &mut [u8], slot: usize) {
    let o = slot * BS;
    let crc = crc32c::crc32c(&md[o..o + sb::CRC]);
    md[o + sb::CRC..o + sb::CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Recomputes the crc of the 4 KiB block at byte offset `off`.
fn fix_block_crc(md: &mut [u8], off: usize) {
    let crc = crc32c::crc32c(&md[off + 4..off + BS]);
    md[off..off + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Runs check and serve on the corrupted `md` and asserts both refuse with `want`.
fn refused(c: &Clone, name: &str, md: &[u8], want: &[&str]) {
    refused2(c, name, md, want, want)
}

/// As [`refused`], with different expected words for check and serve.
fn refused2(c: &Clone, name: &str, md: &[u8], want: &[&str], want_serve: &[&str]) {
    let p = c.dir.path().join("case.meta");
    std::fs::write(&p, md).unwrap();
    let o = run(&[
        "check",
        "--source",
        s(&c.src),
        "--dest",
        s(&c.dst),
        "--metadata",
        s(&p),
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{name}: check must exit 1: {t}");
    for w in want {
        assert!(t.contains(w), "{name}: check does not say '{w}': {t}");
    }
    assert!(t.contains("problem:"), "{name}: {t}");
    assert_eq!(
        std::fs::read(&p).unwrap(),
        md,
        "{name}: check changed the metadata"
    );
    let t = serve_refuses(c, name, &p, &[]);
    for w in want_serve {
        assert!(t.contains(w), "{name}: serve does not say '{w}': {t}");
    }
    assert_eq!(
        std::fs::read(&p).unwrap(),
        md,
        "{name}: serve changed the metadata"
    );
}

/// Starts `serve` on metadata `p`; it must exit non-zero within 20 s with an
/// `error:` line. Returns its output.
fn serve_refuses(c: &Clone, name: &str, p: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "--source",
        s(&c.src),
        "--dest",
        s(&c.dst),
        "--metadata",
        s(p),
    ];
    args.extend_from_slice(extra);
    serve_with(c, name, &args)
}

/// `serve ARGS --socket-path DIR/case.sock --no-hydration` must refuse to start.
fn serve_with(c: &Clone, name: &str, args: &[&str]) -> String {
    let sock = c.dir.path().join("case.sock");
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .args(["--socket-path", s(&sock), "--no-hydration"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name}: serve started on corrupt metadata");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    assert!(!status.success(), "{name}: serve exited 0: {t}");
    assert!(
        t.contains("error:"),
        "{name}: serve gave no error line: {t}"
    );
    assert!(!sock.exists(), "{name}: serve created its socket");
    t
}

struct Field {
    name: &'static str,
    at: usize,
}

const FIELDS: &[Field] = &[
    Field {
        name: "magic",
        at: sb::MAGIC,
    },
    Field {
        name: "version",
        at: sb::VERSION,
    },
    Field {
        name: "flags",
        at: sb::FLAGS,
    },
    Field {
        name: "uuid",
        at: sb::UUID + 5,
    },
    Field {
        name: "sequence",
        at: sb::SEQ,
    },
    Field {
        name: "region size",
        at: sb::REGION_SIZE + 1,
    },
    Field {
        name: "device size",
        at: sb::DEVICE_SIZE + 2,
    },
    Field {
        name: "region count",
        at: sb::NR_REGIONS,
    },
    Field {
        name: "bitmap start",
        at: sb::BITMAP_START,
    },
    Field {
        name: "bitmap blocks",
        at: sb::BITMAP_BLOCKS,
    },
    Field {
        name: "journal start",
        at: sb::JOURNAL_START,
    },
    Field {
        name: "journal count",
        at: sb::JOURNAL_COUNT,
    },
    Field {
        name: "hydrated",
        at: sb::HYDRATED,
    },
    Field {
        name: "created",
        at: sb::CREATED + 3,
    },
    Field {
        name: "reserved",
        at: sb::RESERVED + 100,
    },
    Field {
        name: "checksum",
        at: sb::CRC + 1,
    },
];

#[test]
fn byte_flips_in_every_superblock_field_of_both_slots() {
    let c = make_clone();
    let mut n = 0;
    for slot in [1usize, 0] {
        let role = if slot == 1 { "current" } else { "older" };
        for f in FIELDS {
            let mut md = c.md.clone();
            md[slot * BS + f.at] ^= 0x40;
            let name = format!("{role} slot {slot}, {} byte flipped", f.name);
            let why = if f.name == "magic" {
                "bad magic"
            } else {
                "checksum mismatch"
            };
            refused(&c, &name, &md, &[&format!("superblock slot {slot}"), why]);
            n += 1;
        }
    }
    eprintln!("superblock byte flips refused: {n}");
}

#[test]
fn edited_superblock_fields_with_valid_checksums() {
    // The checksum recomputed after the edit: the field checks themselves must catch it.
    let c = make_clone();
    let l = layout();
    type Edit = fn(&mut [u8]);
    let cases: Vec<(&str, usize, Edit, &[&str])> = vec![
        (
            "magic",
            1,
            |b| b[0] = b'X',
            &["superblock slot 1", "bad magic"],
        ),
        (
            "version 3",
            1,
            |b| b[sb::VERSION] = 3,
            &["superblock slot 1", "unsupported format version 3"],
        ),
        (
            // A version 1 store (4 KiB regions) called version 2: no table.
            "version 2",
            1,
            |b| b[sb::VERSION] = 2,
            &["superblock slot 1", "version 2 with no table slots"],
        ),
        (
            "unknown flag",
            1,
            |b| b[sb::FLAGS] |= 0x80,
            &["superblock slot 1", "unknown flags 0x80"],
        ),
        (
            "reserved byte",
            1,
            |b| b[sb::RESERVED + 7] = 1,
            &["superblock slot 1", "reserved bytes are not zero"],
        ),
        (
            "sequence parity",
            1,
            |b| put_u64(b, sb::SEQ, 4),
            &[
                "superblock slot 1",
                "sequence number 4 does not belong in slot 1",
            ],
        ),
        (
            "sequence gap",
            1,
            |b| put_u64(b, sb::SEQ, 5),
            &["sequence numbers 2 and 5 are not consecutive"],
        ),
        (
            "older sequence gap",
            0,
            |b| put_u64(b, sb::SEQ, 0),
            &["sequence numbers 0 and 3 are not consecutive"],
        ),
        (
            "region size",
            1,
            |b| put_u64(b, sb::REGION_SIZE, 8192),
            &["superblock slot 1", "region count 40960 does not match"],
        ),
        (
            "region size not a power of two",
            1,
            |b| put_u64(b, sb::REGION_SIZE, 5000),
            &["superblock slot 1", "invalid geometry"],
        ),
        (
            "device size",
            1,
            |b| put_u64(b, sb::DEVICE_SIZE, SIZE + 4096),
            &["superblock slot 1", "region count 40960 does not match"],
        ),
        (
            "device size unaligned",
            0,
            |b| put_u64(b, sb::DEVICE_SIZE, SIZE - 100),
            &["superblock slot 0", "invalid geometry"],
        ),
        (
            "region count",
            1,
            |b| put_u64(b, sb::NR_REGIONS, 40961),
            &["superblock slot 1", "region count 40961"],
        ),
        (
            "bitmap start",
            1,
            |b| put_u64(b, sb::BITMAP_START, 3),
            &["superblock slot 1", "bitmap start is 3, expected 2"],
        ),
        (
            "bitmap blocks",
            0,
            |b| put_u64(b, sb::BITMAP_BLOCKS, 9),
            &["superblock slot 0", "bitmap block count is 9, expected 2"],
        ),
        (
            "journal start",
            1,
            |b| put_u64(b, sb::JOURNAL_START, 5),
            &["superblock slot 1", "journal start is 5, expected 4"],
        ),
        (
            "journal count too big",
            1,
            |b| put_u64(b, sb::JOURNAL_COUNT, 99),
            &["superblock slot 1", "journal count 99 exceeds"],
        ),
        (
            "journal count names an unwritten block",
            1,
            |b| put_u64(b, sb::JOURNAL_COUNT, 2),
            &["journal block 1 of commit 3", "checksum mismatch"],
        ),
        (
            "hydrated count",
            1,
            |b| put_u64(b, sb::HYDRATED, 3),
            &["the bitmap has 4 hydrated regions but the superblock records 3"],
        ),
        (
            "hydrated past the region count",
            1,
            |b| put_u64(b, sb::HYDRATED, 50_000),
            &["hydrated count 50000 exceeds region count 40960"],
        ),
        (
            "complete flag",
            1,
            |b| b[sb::FLAGS] |= 1,
            &["hydration-complete flag is true but 4 of 40960"],
        ),
        (
            "uuid of the current slot",
            1,
            |b| b[sb::UUID] ^= 1,
            &["the two superblock slots carry different uuids"],
        ),
        (
            "uuid of the older slot",
            0,
            |b| b[sb::UUID + 15] ^= 1,
            &["the two superblock slots carry different uuids"],
        ),
    ];
    assert_eq!(l.journal_start(), 4);
    for (name, slot, edit, want) in &cases {
        let mut md = c.md.clone();
        edit(&mut md[slot * BS..slot * BS + SUPERBLOCK_BYTES]);
        fix_sb_crc(&mut md, *slot);
        refused(&c, name, &md, want);
    }
    // Both slots describing one other geometry (consistent with each other).
    let mut md = c.md.clone();
    for slot in 0..2 {
        put_u64(&mut md[slot * BS..], sb::REGION_SIZE, 8192);
        put_u64(&mut md[slot * BS..], sb::NR_REGIONS, 20480);
        put_u64(&mut md[slot * BS..], sb::BITMAP_BLOCKS, 1);
        put_u64(&mut md[slot * BS..], sb::JOURNAL_START, 3);
        fix_sb_crc(&mut md, slot);
    }
    refused(
        &c,
        "both slots with another region size",
        &md,
        &["superblock slot 0: journal count 2 exceeds the 1 bitmap and table blocks"],
    );
    eprintln!("edited superblock fields refused: {}", cases.len() + 1);
}

#[test]
fn lost_superblocks() {
    let c = make_clone();
    let mut md = c.md.clone();
    md[BS..BS + SUPERBLOCK_BYTES].fill(0);
    refused(
        &c,
        "current slot zeroed",
        &md,
        &["slot 1 is blank, but the other slot has sequence number 2"],
    );
    let mut md = c.md.clone();
    md[..SUPERBLOCK_BYTES].fill(0);
    refused(
        &c,
        "older slot zeroed",
        &md,
        &["slot 0 is blank, but the other slot has sequence number 3"],
    );
    // The older superblock copied over the current one (a rollback attempt).
    let mut md = c.md.clone();
    let old = md[..SUPERBLOCK_BYTES].to_vec();
    md[BS..BS + SUPERBLOCK_BYTES].copy_from_slice(&old);
    refused(
        &c,
        "older superblock copied into the current slot",
        &md,
        &[
            "superblock slot 1",
            "sequence number 2 does not belong in slot 1",
        ],
    );
}

#[test]
fn bitmap_and_journal_block_damage() {
    let c = make_clone();
    let l = layout();
    let bm0 = l.bitmap_offset(0) as usize;
    let jr = l.journal_offset(1, 0) as usize; // commit 3's record (slot 1)
                                              // Raw byte flips anywhere in the in-place block 0 and in the journal record.
    for (blk, off, what) in [
        (bm0, 0, "bitmap block 0"),
        (jr, 0, "journal block 0 of commit 3"),
    ] {
        for at in [0usize, 2, 5, 9, 17, 25, 32, 40, 1000, 4095] {
            let mut md = c.md.clone();
            md[blk + off + at] ^= 0x08;
            refused(
                &c,
                &format!("{what}, byte {at} flipped"),
                &md,
                &[what, "checksum mismatch"],
            );
        }
    }
    // Edits with the block checksum recomputed.
    type Edit = fn(&mut [u8]);
    let cases: Vec<(usize, &str, Edit, &[&str])> = vec![
        (
            bm0,
            "bitmap kind",
            |b| b[4] ^= 1,
            &["bitmap block 0", "wrong block kind"],
        ),
        (
            bm0,
            "bitmap index",
            |b| put_u64(b, 8, 1),
            &["bitmap block 0", "is labelled as block 1"],
        ),
        (
            bm0,
            "bitmap newer than the superblock",
            |b| put_u64(b, 16, 4),
            &["bitmap block 0", "newer than the superblock's 3"],
        ),
        (
            bm0,
            "bitmap uuid tag",
            |b| b[24] ^= 1,
            &["bitmap block 0", "belongs to another clone"],
        ),
        (
            bm0,
            "bitmap extra bit",
            |b| b[32 + 200] |= 0x10,
            &["the bitmap has 5 hydrated regions but the superblock records 4"],
        ),
        (
            bm0,
            "bitmap lost bit",
            |b| b[32] &= !1,
            &["the bitmap has 3 hydrated regions but the superblock records 4"],
        ),
        (
            jr,
            "journal kind (a BMAP block in the journal)",
            |b| b[4..8].copy_from_slice(&KIND_BITMAP.to_le_bytes()),
            &["journal block 0 of commit 3", "wrong block kind"],
        ),
        (
            jr,
            "journal sequence",
            |b| put_u64(b, 16, 2),
            &[
                "journal block 0 of commit 3",
                "has sequence number 2, expected 3",
            ],
        ),
        (
            jr,
            "journal index",
            |b| put_u64(b, 8, 7),
            &[
                "journal block 0 of commit 3",
                "names block 7 of 2 (bitmap and table)",
            ],
        ),
        (
            jr,
            "journal uuid tag",
            |b| b[30] ^= 1,
            &["journal block 0 of commit 3", "belongs to another clone"],
        ),
        (
            jr,
            "journal bit past the last region",
            |b| b[BS - 1] |= 0x80,
            &["past the last region"],
        ),
    ];
    for (blk, name, edit, want) in &cases {
        let mut md = c.md.clone();
        edit(&mut md[*blk..*blk + BS]);
        fix_block_crc(&mut md, *blk);
        refused(&c, name, &md, want);
    }
    // The in-place copy of block 1 is covered by commit 3's journal record: a torn
    // or damaged copy there is what a crash may leave, and is legitimately ignored.
    let mut md = c.md.clone();
    md[l.bitmap_offset(1) as usize + 100] ^= 0xff;
    let p = c.dir.path().join("covered.meta");
    std::fs::write(&p, &md).unwrap();
    let o = run(&["check", "--metadata", s(&p)]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn truncated_metadata() {
    let c = make_clone();
    let need = layout().required_size();
    for len in [need as usize - 1, 3 * BS, 2 * BS, 1000] {
        refused(
            &c,
            &format!("truncated to {len} bytes"),
            &c.md[..len],
            &["has", "bytes but this geometry needs"],
        );
    }
    // Empty / all-zero metadata is a new clone by design (serve formats it), but
    // check refuses it.
    let p = c.dir.path().join("empty.meta");
    std::fs::write(&p, b"").unwrap();
    let o = run(&["check", "--metadata", s(&p)]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("blank"), "{}", text(&o));
}

#[test]
fn another_clones_metadata() {
    let c = make_clone();
    // Another clone of another (larger) source.
    let other_src = c.dir.path().join("other.img");
    sparse(&other_src, SIZE + (1 << 20));
    let other_dst = c.dir.path().join("other-clone.img");
    let o = run(&[
        "create",
        "--source",
        s(&other_src),
        "--dest",
        s(&other_dst),
        "--region-size",
        "4K",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let other = std::fs::read(c.dir.path().join("other-clone.img.meta")).unwrap();
    refused2(
        &c,
        "another clone's metadata (larger source)",
        &other,
        &["source", "smaller than the clone's"],
        &["device size mismatch"],
    );
    // Another clone of a same-sized source: its superblock or bitmap blocks mixed in.
    let twin_dst = c.dir.path().join("twin.img");
    let o = run(&[
        "create",
        "--source",
        s(&c.src),
        "--dest",
        s(&twin_dst),
        "--region-size",
        "4K",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let twin = std::fs::read(c.dir.path().join("twin.img.meta")).unwrap();
    let l = layout();
    let mut md = c.md.clone();
    md[BS..2 * BS].copy_from_slice(&twin[BS..2 * BS]);
    refused(&c, "another clone's superblock", &md, &["superblock"]);
    let mut md = c.md.clone();
    let b0 = l.bitmap_offset(0) as usize;
    md[b0..b0 + BS].copy_from_slice(&twin[b0..b0 + BS]);
    refused(
        &c,
        "another clone's bitmap block",
        &md,
        &["bitmap block 0", "belongs to another clone"],
    );
}

#[test]
fn wrong_source_destination_and_region_sizes() {
    let c = make_clone();
    let md_path = c.dir.path().join("clone.img.meta");
    // Source smaller than the clone.
    let small = c.dir.path().join("small.img");
    sparse(&small, SIZE - 4096);
    let o = run(&["check", "--source", s(&small), "--dest", s(&c.dst)]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("source") && text(&o).contains("smaller than the clone's"),
        "{}",
        text(&o)
    );
    let t = serve_with(
        &c,
        "small source",
        &["--source", s(&small), "--dest", s(&c.dst)],
    );
    assert!(t.contains("device size mismatch"), "{t}");
    // Source larger than the clone: check and serve both refuse it.
    let big = c.dir.path().join("big.img");
    sparse(&big, SIZE + (1 << 20));
    let o = run(&["check", "--source", s(&big), "--dest", s(&c.dst)]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("larger than the clone's"), "{}", text(&o));
    let t = serve_with(
        &c,
        "big source",
        &["--source", s(&big), "--dest", s(&c.dst)],
    );
    assert!(t.contains("device size mismatch"), "{t}");
    // Destination smaller than the clone.
    let short_dst = c.dir.path().join("short.img");
    sparse(&short_dst, SIZE - (1 << 20));
    let o = run(&[
        "check",
        "--source",
        s(&c.src),
        "--dest",
        s(&short_dst),
        "--metadata",
        s(&md_path),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("destination") && text(&o).contains("smaller than the clone's"),
        "{}",
        text(&o)
    );
    let t = serve_with(
        &c,
        "short destination",
        &[
            "--source",
            s(&c.src),
            "--dest",
            s(&short_dst),
            "--metadata",
            s(&md_path),
        ],
    );
    assert!(t.contains("smaller than the clone's"), "{t}");
    assert_eq!(
        std::fs::metadata(&short_dst).unwrap().len(),
        SIZE - (1 << 20),
        "serve resized the destination"
    );
    // Region size mismatch.
    let t = serve_refuses(
        &c,
        "region size mismatch",
        &md_path,
        &["--region-size", "64K"],
    );
    assert!(
        t.contains("region size mismatch: the metadata says 4096, but 65536 was given"),
        "{t}"
    );
    // None of this touched the real metadata.
    assert_eq!(std::fs::read(&md_path).unwrap(), c.md);
}
