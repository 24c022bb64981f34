// SPDX-License-Identifier: Apache-2.0

//! A clone whose destination is opened with O_DIRECT (`serve --direct`), behind the real
//! vhost-user-blk front: the guest is told the destination's logical block size (4 KiB,
//! VIRTIO_BLK_F_BLK_SIZE) and requests that are not whole blocks are refused, so no guest
//! write ever reaches the storage layer's read-modify-write of a partial block (which is
//! not atomic: two queues writing neighbouring 512-byte sectors of one block lost writes).
//!
//! Runs in the temporary directory, which must be on a file system that takes O_DIRECT
//! (tmpfs does not); the tests say so and skip otherwise.

use crate::support::sectors;
use std::sync::Arc;

use crate::support::vu::*;
use vhost_clone::disk::CloneDisk;
use vhost_clone::engine::{Engine, EngineConfig};
use vhost_clone::metadata::{Geometry, Metadata};
use vhost_clone::storage::{FileDevice, OpenOptions, SimDevice};

const REGION: u64 = 64 << 10;
const SIZE: u64 = 64 * REGION;

struct Rig {
    _dir: tempfile::TempDir,
    srv: Server,
}

/// A clone with a source in memory and the destination in a file of the temporary
/// directory, opened with O_DIRECT when `direct`. `None` when O_DIRECT is refused there.
fn rig(direct: bool) -> Option<Rig> {
    let dir = tempfile::tempdir().unwrap();
    let dest = match FileDevice::open(
        &dir.path().join("dest.img"),
        &OpenOptions {
            direct,
            create_size: Some(SIZE),
            ..Default::default()
        },
    ) {
        Ok(d) => d,
        Err(e) if direct => {
            eprintln!(
                "skipped: {} refuses O_DIRECT ({})",
                dir.path().display(),
                vhost_clone::error_chain(&e)
            );
            return None;
        }
        Err(e) => panic!("{e}"),
    };
    let src = Arc::new(
        SimDevice::from_image(sectors::image(sectors::SOURCE, SIZE / 512)).into_read_only(),
    );
    let geo = Geometry::new(SIZE, REGION).unwrap();
    let mdd = Arc::new(SimDevice::from_image(sectors::formatted_metadata(&geo)));
    let md = Arc::new(Metadata::open(mdd, Some(&geo)).unwrap());
    let eng =
        Arc::new(Engine::new(Some(src), Arc::new(dest), md, EngineConfig::default()).unwrap());
    let srv = Server::start(Arc::new(CloneDisk::new(eng, false)), opts(2));
    Some(Rig { _dir: dir, srv })
}

#[test]
fn direct_destination_advertises_its_block_size() {
    let Some(r) = rig(true) else { return };
    let mut g = Guest::start(&r.srv.path, 2);
    assert!(
        g.has(F_BLK_SIZE),
        "VIRTIO_BLK_F_BLK_SIZE not offered with an O_DIRECT destination"
    );
    let c = g.get_config(0, 60);
    assert_eq!(le32(&c, 20), 4096, "blk_size with an O_DIRECT destination");
    // min_io_size and opt_io_size are in logical blocks.
    assert_eq!(u16::from_le_bytes([c[26], c[27]]), 1, "min_io_size");
    assert_eq!(le32(&c, 28), (REGION / 4096) as u32, "opt_io_size");
    // discard_sector_alignment stays in 512-byte sectors.
    assert_eq!(le32(&c, 44), (REGION / 512) as u32, "discard alignment");
    drop(g);
    r.srv.stop();

    let r = rig(false).unwrap();
    let mut g = Guest::start(&r.srv.path, 2);
    assert!(
        !g.has(F_BLK_SIZE),
        "VIRTIO_BLK_F_BLK_SIZE offered with a buffered destination"
    );
    let c = g.get_config(0, 60);
    assert_eq!(le32(&c, 20), 512, "blk_size with a buffered destination");
    assert_eq!(le32(&c, 28), (REGION / 512) as u32, "opt_io_size");
    drop(g);
    r.srv.stop();
}

/// First sector of the area the concurrent writes use (region 2, hydrated first).
const AREA: u64 = 2 * REGION / 512;
/// 4 KiB blocks per round.
const BLOCKS: u64 = 8;

#[test]
fn concurrent_sub_block_writes_from_two_queues_are_not_lost() {
    let Some(r) = rig(true) else { return };
    let mut g = Guest::start(&r.srv.path, 2);
    // Hydrate the area (whole-region write) so the small writes go straight to the
    // destination.
    let tag0 = 7u64;
    assert_eq!(
        g.write(0, AREA, &sectors::write_data(tag0, AREA, REGION / 512)),
        S_OK
    );

    let rounds = 100u64;
    let (mut ok, mut refused, mut lost) = (0u64, 0u64, 0u64);
    let mut first_lost = None;
    for round in 0..rounds {
        // Queue q writes the sectors of parity q: 4 per block, every block, one kick each.
        let mut reqs = Vec::new();
        for q in 0..2usize {
            let tag = 1000 + round * 2 + q as u64;
            let mut heads = Vec::new();
            for b in 0..BLOCKS {
                for j in 0..4u64 {
                    let sector = AREA + b * 8 + 2 * j + q as u64;
                    let slot = b * 4 + j;
                    let data = sectors::write_data(tag, sector, 1);
                    let (head, status, _) = g.prepare(q, slot, VIRTIO_BLK_T_OUT, sector, &data, 0);
                    heads.push(head);
                    reqs.push((q, head, status, sector, tag));
                }
            }
            g.publish_many(q, &heads);
        }
        for q in 0..2usize {
            for _ in 0..BLOCKS * 4 {
                let (_, len) = g.wait_used(q);
                assert_eq!(len, 1);
            }
        }
        for &(_, _, status, sector, _) in &reqs {
            match g.read_mem(status, 1)[0] {
                S_OK => ok += 1,
                S_IOERR => refused += 1,
                st => panic!("sector {sector}: status {st}"),
            }
        }
        // Read the blocks back (whole blocks: allowed at any block size).
        let (st, data) = g.read(0, AREA, (BLOCKS * 4096) as u32);
        assert_eq!(st, S_OK);
        for &(_, _, status, sector, tag) in &reqs {
            if g.read_mem(status, 1)[0] != S_OK {
                continue;
            }
            let i = (sector - AREA) as usize;
            let got = sectors::decode(&data[i * 512..(i + 1) * 512], sector);
            if got != Some(tag) {
                lost += 1;
                first_lost.get_or_insert((round, sector, got));
            }
        }
    }
    eprintln!(
        "{} sub-block writes: {ok} completed OK, {refused} refused, {lost} lost",
        rounds * BLOCKS * 8
    );
    assert_eq!(
        lost, 0,
        "{lost} of {ok} sub-block writes that completed OK were lost; first: {first_lost:?} \
         (round, sector, tag found)"
    );
    // None can complete: they are not whole logical blocks, so they are refused before
    // they reach the destination.
    assert_eq!(ok, 0, "sub-block writes accepted with 4 KiB logical blocks");

    // Whole blocks from both queues, neighbours in the same region: all complete and stay.
    for round in 0..20u64 {
        let mut reqs = Vec::new();
        for q in 0..2usize {
            let tag = 5000 + round * 2 + q as u64;
            let mut heads = Vec::new();
            for b in (q as u64..BLOCKS).step_by(2) {
                let sector = AREA + b * 8;
                let data = sectors::write_data(tag, sector, 8);
                let (head, status, _) = g.prepare(q, b, VIRTIO_BLK_T_OUT, sector, &data, 0);
                heads.push(head);
                reqs.push((status, sector, tag));
            }
            g.publish_many(q, &heads);
        }
        for q in 0..2usize {
            for _ in 0..BLOCKS / 2 {
                g.wait_used(q);
            }
        }
        let (st, data) = g.read(1, AREA, (BLOCKS * 4096) as u32);
        assert_eq!(st, S_OK);
        for (status, sector, tag) in reqs {
            assert_eq!(g.read_mem(status, 1)[0], S_OK, "4 KiB write at {sector}");
            for s in sector..sector + 8 {
                let i = (s - AREA) as usize;
                assert_eq!(
                    sectors::decode(&data[i * 512..(i + 1) * 512], s),
                    Some(tag),
                    "round {round}: sector {s}"
                );
            }
        }
    }
    drop(g);
    r.srv.stop();
}
