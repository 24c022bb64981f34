use super::*;
use crate::virtio::config::MAX_DISCARD_SEGMENTS;
use proptest::prelude::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;

const MEM: u64 = 0x100_0000;
const SIZE: u64 = 1 << 20;

fn mem() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

fn limits() -> ParseLimits {
    ParseLimits {
        size: SIZE,
        read_only: false,
        discard: true,
        max_descriptors: MIN_DESCRIPTOR_LIMIT,
        block_size: 512,
    }
}

fn hdr(m: &GuestMemory, addr: u64, t: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&t.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(addr)).unwrap();
}

fn d(addr: u64, len: u32, write: bool) -> RawDescriptor {
    let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// Parse a single chain made of `descs` (linked in order by the mock).
fn parse(m: &GuestMemory, descs: &[RawDescriptor], l: &ParseLimits) -> ParsedChain {
    let vq = MockSplitQueue::new(m, 256);
    vq.build_desc_chain(descs).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let chain = q.iter(m).unwrap().next().unwrap();
    parse_chain(chain, l)
}

#[test]
fn read_ok() {
    let m = mem();
    hdr(&m, 0x10000, VIRTIO_BLK_T_IN, 2);
    let p = parse(
        &m,
        &[
            d(0x10000, 16, false),
            d(0x20000, 1024, true),
            d(0x30000, 1, true),
        ],
        &limits(),
    );
    assert_eq!(p.status, Some(GuestAddress(0x30000)));
    assert_eq!(
        p.request,
        Ok(BlkRequest::Read {
            offset: 1024,
            len: 1024,
            data: smallvec::smallvec![GuestSegment {
                addr: GuestAddress(0x20000),
                len: 1024
            }]
        })
    );
}

#[test]
fn status_shares_data_descriptor_and_header_spans_two() {
    let m = mem();
    hdr(&m, 0x10000, VIRTIO_BLK_T_IN, 0);
    let p = parse(
        &m,
        &[
            d(0x10000, 8, false),
            d(0x10008, 8, false),
            d(0x20000, 513, true),
        ],
        &limits(),
    );
    assert_eq!(p.status, Some(GuestAddress(0x20200)));
    assert!(matches!(p.request, Ok(BlkRequest::Read { len: 512, .. })));
}

#[test]
fn write_on_readonly_and_wrong_direction() {
    let m = mem();
    hdr(&m, 0x10000, VIRTIO_BLK_T_OUT, 0);
    let mut l = limits();
    l.read_only = true;
    let c = [
        d(0x10000, 16, false),
        d(0x20000, 512, false),
        d(0x30000, 1, true),
    ];
    assert_eq!(parse(&m, &c, &l).request, Err(RequestError::ReadOnly));
    let c = [
        d(0x10000, 16, false),
        d(0x20000, 512, true),
        d(0x30000, 1, true),
    ];
    assert_eq!(
        parse(&m, &c, &limits()).request,
        Err(RequestError::WrongDirection(VIRTIO_BLK_T_OUT))
    );
}

#[test]
fn ranges_are_checked() {
    assert_eq!(check_range(0, 512, 512), Ok(0));
    assert!(check_range(1, 512, 512).is_err());
    assert!(check_range(u64::MAX / 512, 1024, u64::MAX).is_err());
    assert!(check_range(u64::MAX, 0, u64::MAX).is_err());
    assert_eq!(check_range(0, 100, 512), Err(RequestError::Unaligned(100)));
}

#[test]
fn no_status_and_readonly_status() {
    let m = mem();
    hdr(&m, 0x10000, VIRTIO_BLK_T_IN, 0);
    let p = parse(
        &m,
        &[d(0x10000, 16, false), d(0x20000, 512, false)],
        &limits(),
    );
    assert_eq!(p.status, None);
    assert_eq!(p.request, Err(RequestError::NoStatus));
}

#[test]
fn status_outside_memory() {
    let m = mem();
    hdr(&m, 0x10000, VIRTIO_BLK_T_FLUSH, 0);
    let p = parse(&m, &[d(0x10000, 16, false), d(MEM, 1, true)], &limits());
    assert_eq!(p.status, None);
    let p = parse(
        &m,
        &[
            d(0x10000, 16, false),
            d(MEM - 512, 1024, true),
            d(0x30000, 1, true),
        ],
        &limits(),
    );
    assert_eq!(p.status, Some(GuestAddress(0x30000)));
    assert!(matches!(p.request, Err(RequestError::OutsideMemory { .. })));
}

#[test]
fn discard_segments() {
    let m = mem();
    hdr(&m, 0x10000, VIRTIO_BLK_T_DISCARD, 0);
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&8u64.to_le_bytes());
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    m.write_slice(&seg, GuestAddress(0x20000)).unwrap();
    let c = [
        d(0x10000, 16, false),
        d(0x20000, 16, false),
        d(0x30000, 1, true),
    ];
    assert_eq!(
        parse(&m, &c, &limits()).request,
        Ok(BlkRequest::Discard(vec![ByteRange {
            offset: 4096,
            len: 4096,
            unmap: false
        }]))
    );
    // unmap flag on discard: UNSUPP
    seg[12..16].copy_from_slice(&1u32.to_le_bytes());
    m.write_slice(&seg, GuestAddress(0x20000)).unwrap();
    let p = parse(&m, &c, &limits());
    assert_eq!(p.request, Err(RequestError::UnsupportedFlags(1)));
    assert_eq!(p.request.unwrap_err().status(), STATUS_UNSUPP);
    // too many segments
    let c = [
        d(0x10000, 16, false),
        d(0x20000, 16 * (MAX_DISCARD_SEGMENTS + 1), false),
        d(0x30000, 1, true),
    ];
    assert!(matches!(
        parse(&m, &c, &limits()).request,
        Err(RequestError::BadSegments(_))
    ));
}

#[test]
fn unknown_type_is_unsupp() {
    let m = mem();
    hdr(&m, 0x10000, 0x77, 0);
    let p = parse(&m, &[d(0x10000, 16, false), d(0x30000, 1, true)], &limits());
    assert_eq!(p.request.unwrap_err().status(), STATUS_UNSUPP);
}

#[test]
fn loop_is_truncated() {
    let m = mem();
    hdr(&m, 0x10000, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&m, 16);
    // Two descriptors pointing at each other.
    let t = vq.desc_table();
    let next = VRING_DESC_F_NEXT as u16;
    t.store(
        0,
        RawDescriptor::from(SplitDescriptor::new(0x10000, 16, next, 1)),
    )
    .unwrap();
    t.store(
        1,
        RawDescriptor::from(SplitDescriptor::new(
            0x20000,
            512,
            next | VRING_DESC_F_WRITE as u16,
            0,
        )),
    )
    .unwrap();
    vq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
    vq.avail().idx().store(1u16.to_le());
    let mut q: Queue = vq.create_queue().unwrap();
    let chain = q.iter(&m).unwrap().next().unwrap();
    let p = parse_chain(chain, &limits());
    assert_eq!(p.request, Err(RequestError::Truncated));
    // The status still has somewhere to go: the guest gets IOERR.
    assert!(p.status.is_some());
}

#[test]
fn indirect_outside_memory() {
    let m = mem();
    let c = [RawDescriptor::from(SplitDescriptor::new(
        MEM + 0x1000,
        64,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ))];
    let p = parse(&m, &c, &limits());
    assert_eq!(p.status, None);
    assert_eq!(p.request, Err(RequestError::EmptyChain));
}

#[test]
fn requests_not_in_whole_logical_blocks_are_refused() {
    let m = mem();
    let l4k = ParseLimits {
        block_size: 4096,
        ..limits()
    };
    let (h, buf, s) = (0x10000u64, 0x20000u64, 0x30000u64);
    let rw = |t: u32, sector: u64, len: u32| {
        hdr(&m, h, t, sector);
        let data = d(buf, len, t == VIRTIO_BLK_T_IN);
        parse(&m, &[d(h, 16, false), data, d(s, 1, true)], &l4k)
    };
    for t in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        // Whole blocks pass.
        assert!(rw(t, 8, 8192).request.is_ok(), "type {t}");
        // Sector-aligned but not block-aligned offset or length: IOERR.
        for (sector, len) in [(1, 4096), (8, 512), (4, 4096), (8, 4096 + 512)] {
            let p = rw(t, sector, len);
            assert_eq!(
                p.request,
                Err(RequestError::Misaligned {
                    offset: sector * 512,
                    len: u64::from(len),
                    block: 4096
                }),
                "type {t}, sector {sector}, {len} bytes"
            );
            assert_eq!(p.request.unwrap_err().status(), STATUS_IOERR);
        }
        // With 512-byte blocks the same requests are fine.
        hdr(&m, h, t, 1);
        let data = d(buf, 512, t == VIRTIO_BLK_T_IN);
        let p = parse(&m, &[d(h, 16, false), data, d(s, 1, true)], &limits());
        assert!(p.request.is_ok());
    }
    // Discard and write-zeroes segments.
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        hdr(&m, h, t, 0);
        let c = [d(h, 16, false), d(buf, 32, false), d(s, 1, true)];
        let seg = |i: u64, sector: u64, n: u32| {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&sector.to_le_bytes());
            b[8..12].copy_from_slice(&n.to_le_bytes());
            m.write_slice(&b, GuestAddress(buf + 16 * i)).unwrap();
        };
        seg(0, 8, 16);
        seg(1, 64, 8);
        assert!(parse(&m, &c, &l4k).request.is_ok(), "type {t}");
        seg(1, 65, 8);
        assert_eq!(
            parse(&m, &c, &l4k).request,
            Err(RequestError::Misaligned {
                offset: 65 * 512,
                len: 4096,
                block: 4096
            })
        );
        seg(1, 64, 1);
        assert!(matches!(
            parse(&m, &c, &l4k).request,
            Err(RequestError::Misaligned { .. })
        ));
        assert!(parse(&m, &c, &limits()).request.is_ok());
    }
}

#[test]
fn overlapping_read_buffers_refused() {
    let m = mem();
    hdr(&m, 0x10000, VIRTIO_BLK_T_IN, 0);
    let p = parse(
        &m,
        &[
            d(0x10000, 16, false),
            d(0x20000, 1024, true),
            d(0x20200, 512, true),
            d(0x30000, 1, true),
        ],
        &limits(),
    );
    let Ok(BlkRequest::Read { data, .. }) = p.request else {
        panic!("{:?}", p.request)
    };
    assert_eq!(
        guest_io_slices_mut(&m, &data).err(),
        Some(RequestError::OverlappingBuffers)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn random_chains_never_panic(
        raw in proptest::collection::vec(
            (0u64..(MEM + 0x2000), 0u32..0x3000, 0u16..8, 0u16..20), 1..24),
        head_type in 0u32..16,
        sector in prop_oneof![Just(0u64), any::<u64>(), 0u64..4096],
        avail_heads in proptest::collection::vec(0u16..20, 1..4),
    ) {
        let m = mem();
        hdr(&m, 0x10000, head_type, sector);
        let vq = MockSplitQueue::new(&m, 16);
        let t = vq.desc_table();
        for (i, (addr, len, flags, next)) in raw.iter().enumerate().take(16) {
            t.store(i as u16, RawDescriptor::from(SplitDescriptor::new(*addr, *len, *flags, *next)))
                .unwrap();
        }
        for (i, h) in avail_heads.iter().enumerate() {
            vq.avail().ring().ref_at(i).unwrap().store(h.to_le());
        }
        vq.avail().idx().store((avail_heads.len() as u16).to_le());
        let mut q: Queue = vq.create_queue().unwrap();
        while let Some(chain) = q.pop_descriptor_chain(&m) {
            let p = parse_chain(chain, &limits());
            if let Ok(req) = &p.request {
                match req {
                    BlkRequest::Read { data, .. } | BlkRequest::GetId { data } => {
                        let _ = guest_io_slices_mut(&m, data);
                    }
                    BlkRequest::Write { data, .. } => {
                        let _ = guest_io_slices(&m, data);
                    }
                    _ => {}
                }
            }
        }
    }
}
