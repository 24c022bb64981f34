//! The NBD wire format: constants, request encoding and the parsing of what a
//! server sends, as pure functions over byte slices.
//!
//! Invariant: nothing here trusts a length, offset, count or type that came from
//! the server. Every parser checks its input against the request it answers and
//! against fixed bounds before it is used, and answers a [`ProtocolError`]
//! instead of panicking or allocating what the peer asked for. The proptest in
//! this module feeds arbitrary bytes through every parser.
//!
//! Reference: the NBD protocol document (`doc/proto.md` of the NetworkBlockDevice
//! project), "fixed newstyle" negotiation, structured replies and block status.

use std::fmt;

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation follows (also the magic of option requests).
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The old-style handshake's second magic (not supported).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of an option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Server handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: no 124 zero bytes after the export info.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Option: abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: select an export and enter transmission, with info replies.
pub const OPT_GO: u32 = 7;
/// Option: structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: select metadata contexts (block status).
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: information about the export (`OPT_GO`).
pub const REP_INFO: u32 = 3;
/// Option reply: a metadata context id.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every option error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option error: the option is not supported.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Option error: TLS is required first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

/// Info type: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the flags field is valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: several connections see one consistent export.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Structured reply flag: last chunk of this reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload (only with DONE).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a hole (reads as zeroes) at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status extents.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit set in every error chunk type.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Chunk type: an error.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
/// Chunk type: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

/// `base:allocation` flag: the extent is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// The metadata context vhost-clone asks for.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Largest option reply payload we accept (names, descriptions, errors).
pub const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Largest error message we keep from a chunk or option error.
pub const MAX_MESSAGE: usize = 4096;
/// Largest payload of a read request the client sends (and so of a data chunk).
pub const MAX_READ: u32 = 32 << 20;
/// Largest block status payload we accept: 4 + 8 bytes per extent.
pub const MAX_STATUS_PAYLOAD: u32 = 4 + 8 * 65_536;
/// Size of a transmission request.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header (after its 4-byte magic).
pub const STRUCTURED_REST_LEN: usize = 16;

/// Something the server sent that the protocol does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(pub String);

fn bad<T>(msg: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(msg.into()))
}

/// Encodes a transmission request.
pub fn encode_request(cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&0u16.to_be_bytes());
    b[6..8].copy_from_slice(&cmd.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// Encodes an option request header plus its data.
pub fn encode_option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// The data of `NBD_OPT_GO` for `export`, asking for block size info.
pub fn go_data(export: &str) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d
}

/// The data of `NBD_OPT_SET_META_CONTEXT` for `export` asking for `base:allocation`.
pub fn meta_context_data(export: &str) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
    d
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Text from the peer, made safe to log: at most [`MAX_MESSAGE`] bytes, lossy
/// UTF-8, control characters replaced.
pub fn peer_text(b: &[u8]) -> String {
    let b = &b[..b.len().min(MAX_MESSAGE)];
    String::from_utf8_lossy(b)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply {
    /// The option it answers.
    pub opt: u32,
    /// Reply type.
    pub kind: u32,
    /// Payload length (at most [`MAX_OPTION_REPLY`]).
    pub len: u32,
}

/// Parses an option reply header (20 bytes) answering `expected_opt`.
pub fn parse_option_reply(b: &[u8; 20], expected_opt: u32) -> Result<OptionReply, ProtocolError> {
    if be64(&b[0..8]) != OPT_REPLY_MAGIC {
        return bad("option reply with a bad magic");
    }
    let opt = be32(&b[8..12]);
    if opt != expected_opt {
        return bad(format!(
            "option reply for option {opt} while option {expected_opt} was asked"
        ));
    }
    let len = be32(&b[16..20]);
    if len > MAX_OPTION_REPLY {
        return bad(format!("option reply of {len} bytes is too long"));
    }
    Ok(OptionReply {
        opt,
        kind: be32(&b[12..16]),
        len,
    })
}

/// What an option error reply means, for the operator.
pub fn option_error_text(kind: u32, opt: u32, export: &str, msg: &[u8]) -> String {
    let what = match kind {
        REP_ERR_UNKNOWN => format!("the server has no export named '{}'", peer_text(export.as_bytes())),
        REP_ERR_TLS_REQD => {
            "the server requires TLS, which vhost-clone does not speak (see docs/usage.md, network sources)".into()
        }
        REP_ERR_POLICY => "the server refused by policy".into(),
        REP_ERR_UNSUP => format!("the server does not support option {opt}"),
        k => format!("the server refused option {opt} (error {:#x})", k),
    };
    if msg.is_empty() {
        what
    } else {
        format!("{what}: {}", peer_text(msg))
    }
}

/// Export information gathered during `NBD_OPT_GO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Minimum block size (a power of two, 1 to 64 KiB).
    pub min_block: u32,
    /// Preferred block size.
    pub pref_block: u32,
    /// Largest request the server accepts.
    pub max_block: u32,
}

impl ExportInfo {
    /// True when the server says several connections are safe.
    pub fn multi_conn(&self) -> bool {
        self.flags & TFLAG_CAN_MULTI_CONN != 0
    }
}

/// Applies one `NBD_REP_INFO` payload to `info`; returns true when it was the
/// export info (size and flags).
pub fn apply_info(info: &mut ExportInfo, payload: &[u8]) -> Result<bool, ProtocolError> {
    if payload.len() < 2 {
        return bad("info reply without a type");
    }
    match be16(payload) {
        INFO_EXPORT => {
            if payload.len() != 12 {
                return bad(format!(
                    "export info of {} bytes (12 expected)",
                    payload.len()
                ));
            }
            info.size = be64(&payload[2..10]);
            info.flags = be16(&payload[10..12]);
            if info.size > i64::MAX as u64 {
                return bad(format!("export size {} is absurd", info.size));
            }
            Ok(true)
        }
        INFO_BLOCK_SIZE => {
            if payload.len() != 14 {
                return bad(format!(
                    "block size info of {} bytes (14 expected)",
                    payload.len()
                ));
            }
            let (min, pref, max) = (
                be32(&payload[2..6]),
                be32(&payload[6..10]),
                be32(&payload[10..14]),
            );
            if !min.is_power_of_two() || min > 64 << 10 {
                return bad(format!(
                    "minimum block size {min} is not a power of two up to 64 KiB"
                ));
            }
            if !pref.is_power_of_two() || pref < min.max(512) {
                return bad(format!("preferred block size {pref} is invalid"));
            }
            if max < pref || max % min != 0 {
                return bad(format!("maximum block size {max} is invalid"));
            }
            info.min_block = min;
            info.pref_block = pref;
            info.max_block = max;
            Ok(false)
        }
        // Name, description and types from later protocol versions: not needed.
        _ => Ok(false),
    }
}

/// Parses an `NBD_REP_META_CONTEXT` payload: the id and the context's name.
pub fn parse_meta_context(payload: &[u8]) -> Result<(u32, String), ProtocolError> {
    if payload.len() < 4 {
        return bad("meta context reply without an id");
    }
    Ok((be32(payload), peer_text(&payload[4..])))
}

/// A transmission reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: an errno-like error (0 is success); a successful read's
    /// data follows.
    Simple {
        /// The request's cookie.
        cookie: u64,
        /// NBD error (0: success).
        error: u32,
    },
    /// One chunk of a structured reply; `len` payload bytes follow.
    Chunk {
        /// The request's cookie.
        cookie: u64,
        /// Chunk flags ([`REPLY_FLAG_DONE`]).
        flags: u16,
        /// Chunk type.
        kind: u16,
        /// Payload length.
        len: u32,
    },
}

impl ReplyHeader {
    /// The cookie of the request this answers.
    pub fn cookie(&self) -> u64 {
        match self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => *cookie,
        }
    }
}

/// Parses the 4-byte magic and the rest of a reply header. `rest` must hold
/// 12 bytes for a simple reply and 16 for a structured chunk; the caller reads
/// the magic first and then [`rest_len`] more bytes.
pub fn parse_reply_header(
    magic: u32,
    rest: &[u8],
    structured: bool,
) -> Result<ReplyHeader, ProtocolError> {
    match magic {
        SIMPLE_REPLY_MAGIC if rest.len() == 12 => Ok(ReplyHeader::Simple {
            error: be32(&rest[0..4]),
            cookie: be64(&rest[4..12]),
        }),
        STRUCTURED_REPLY_MAGIC if !structured => {
            bad("structured reply chunk although structured replies were not negotiated")
        }
        STRUCTURED_REPLY_MAGIC if rest.len() == STRUCTURED_REST_LEN => Ok(ReplyHeader::Chunk {
            flags: be16(&rest[0..2]),
            kind: be16(&rest[2..4]),
            cookie: be64(&rest[4..12]),
            len: be32(&rest[12..16]),
        }),
        SIMPLE_REPLY_MAGIC | STRUCTURED_REPLY_MAGIC => bad("reply header of the wrong length"),
        m => bad(format!("reply with a bad magic {m:#010x}")),
    }
}

/// How many header bytes follow a reply magic (`None`: not a reply magic).
pub fn rest_len(magic: u32) -> Option<usize> {
    match magic {
        SIMPLE_REPLY_MAGIC => Some(12),
        STRUCTURED_REPLY_MAGIC => Some(STRUCTURED_REST_LEN),
        _ => None,
    }
}

/// Maps an NBD error number to an errno.
pub fn errno_of(error: u32) -> i32 {
    match error {
        1 => libc::EPERM,
        5 => libc::EIO,
        12 => libc::ENOMEM,
        22 => libc::EINVAL,
        28 => libc::ENOSPC,
        75 => libc::EOVERFLOW,
        95 => libc::EOPNOTSUPP,
        108 => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

/// An error chunk's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkError {
    /// errno.
    pub errno: i32,
    /// The server's message (sanitized).
    pub message: String,
}

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = std::io::Error::from_raw_os_error(self.errno);
        if self.message.is_empty() {
            write!(f, "the server answered: {e}")
        } else {
            write!(f, "the server answered: {e} ({})", self.message)
        }
    }
}

/// Parses the payload of an error chunk (`REPLY_TYPE_ERROR*`, or an unknown type
/// with the error bit), checking an error offset lies within the request.
pub fn parse_error_chunk(
    kind: u16,
    payload: &[u8],
    req_offset: u64,
    req_len: u32,
) -> Result<ChunkError, ProtocolError> {
    if payload.len() < 6 {
        return bad("error chunk shorter than 6 bytes");
    }
    let error = be32(&payload[0..4]);
    if error == 0 {
        return bad("error chunk with error 0");
    }
    let mlen = be16(&payload[4..6]) as usize;
    let rest = &payload[6..];
    if mlen > rest.len() {
        return bad("error chunk message longer than the chunk");
    }
    if kind == REPLY_TYPE_ERROR_OFFSET {
        if rest.len() != mlen + 8 {
            return bad("error-offset chunk of the wrong length");
        }
        let off = be64(&rest[mlen..]);
        if off < req_offset || off >= req_offset + req_len as u64 {
            return bad("error offset outside the request");
        }
    } else if kind == REPLY_TYPE_ERROR && rest.len() != mlen {
        return bad("error chunk of the wrong length");
    }
    Ok(ChunkError {
        errno: errno_of(error),
        message: peer_text(&rest[..mlen]),
    })
}

/// Which bytes of a read reply have arrived: chunks may come in any order but
/// must not overlap and must lie within the request.
#[derive(Debug, Default)]
pub struct Coverage {
    /// Disjoint `(start, end)` ranges relative to the request, unsorted.
    ranges: Vec<(u32, u32)>,
    covered: u64,
}

impl Coverage {
    /// Records `[offset, offset + len)` (absolute) of a request at `req_offset` of
    /// `req_len` bytes; returns the start relative to the request.
    pub fn add(
        &mut self,
        req_offset: u64,
        req_len: u32,
        offset: u64,
        len: u64,
    ) -> Result<usize, ProtocolError> {
        if len == 0 {
            return bad("empty data chunk");
        }
        let end = offset.checked_add(len);
        let req_end = req_offset + req_len as u64;
        match end {
            Some(end) if offset >= req_offset && end <= req_end => {}
            _ => return bad("data chunk outside the request"),
        }
        let (s, e) = (
            (offset - req_offset) as u32,
            (offset - req_offset + len) as u32,
        );
        if self.ranges.iter().any(|&(a, b)| s < b && a < e) {
            return bad("data chunks overlap");
        }
        // A read has at most MAX_READ bytes, so a well-behaved server needs
        // few chunks; bound the list all the same.
        if self.ranges.len() >= 65_536 {
            return bad("too many data chunks in one reply");
        }
        self.ranges.push((s, e));
        self.covered += len;
        Ok(s as usize)
    }

    /// True when every byte of a request of `req_len` bytes arrived.
    pub fn complete(&self, req_len: u32) -> bool {
        self.covered == req_len as u64
    }
}

/// Parses an `OFFSET_HOLE` payload: the absolute offset and length.
pub fn parse_hole(payload: &[u8]) -> Result<(u64, u64), ProtocolError> {
    if payload.len() != 12 {
        return bad("hole chunk of the wrong length");
    }
    Ok((be64(&payload[0..8]), be32(&payload[8..12]) as u64))
}

/// Parses a block status payload for a request at `req_offset` of `req_len`
/// bytes: the data extents as absolute `(start, end, is_data)` runs, covering a
/// prefix of the request (at least one byte).
pub fn parse_block_status(
    payload: &[u8],
    context: u32,
    req_offset: u64,
    req_len: u32,
) -> Result<Vec<(u64, u64, bool)>, ProtocolError> {
    if payload.len() < 12 || (payload.len() - 4) % 8 != 0 {
        return bad("block status chunk of the wrong length");
    }
    if be32(&payload[0..4]) != context {
        return bad("block status for a context that was not negotiated");
    }
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = req_offset;
    let end = req_offset + req_len as u64;
    for e in payload[4..].chunks_exact(8) {
        let len = be32(&e[0..4]) as u64;
        let flags = be32(&e[4..8]);
        if len == 0 {
            return bad("block status extent of length 0");
        }
        if pos >= end {
            // Past the request: a server may describe more than asked; ignore.
            break;
        }
        let stop = (pos + len).min(end);
        let data = flags & STATE_ZERO == 0;
        match out.last_mut() {
            Some(last) if last.2 == data => last.1 = stop,
            _ => out.push((pos, stop, data)),
        }
        pos = stop;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_layout_matches_the_spec() {
        let r = encode_request(CMD_READ, 0x0102_0304_0506_0708, 4096, 512);
        assert_eq!(&r[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&r[6..8], &[0, 0]);
        assert_eq!(&r[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(be64(&r[16..24]), 4096);
        assert_eq!(be32(&r[24..28]), 512);
    }

    #[test]
    fn block_status_merges_runs_and_clamps_to_the_request() {
        let mut p = 7u32.to_be_bytes().to_vec();
        for (len, flags) in [
            (4096u32, 0u32),
            (4096, 0),
            (8192, STATE_HOLE | STATE_ZERO),
            (4096, STATE_HOLE),
            (1 << 20, 0),
        ] {
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
        }
        let v = parse_block_status(&p, 7, 1000, 20_000).unwrap();
        // A hole without the zero flag may hold data.
        assert_eq!(
            v,
            vec![
                (1000, 9192, true),
                (9192, 17384, false),
                (17384, 21000, true)
            ]
        );
        assert!(parse_block_status(&p, 8, 0, 100).is_err());
        assert!(parse_block_status(&p[..10], 7, 0, 100).is_err());
    }

    #[test]
    fn coverage_refuses_overlap_and_outside_chunks() {
        let mut c = Coverage::default();
        assert_eq!(c.add(100, 50, 120, 30).unwrap(), 20);
        assert!(c.add(100, 50, 110, 11).is_err());
        assert!(c.add(100, 50, 90, 5).is_err());
        assert!(c.add(100, 50, 140, 20).is_err());
        assert!(c.add(100, 50, u64::MAX, 2).is_err());
        assert!(!c.complete(50));
        c.add(100, 50, 100, 20).unwrap();
        assert!(c.complete(50));
    }

    #[test]
    fn block_size_info_is_checked() {
        let mut i = ExportInfo::default();
        let p = |min: u32, pref: u32, max: u32| {
            let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            for x in [min, pref, max] {
                v.extend_from_slice(&x.to_be_bytes());
            }
            v
        };
        apply_info(&mut i, &p(1, 4096, 32 << 20)).unwrap();
        assert_eq!(
            (i.min_block, i.pref_block, i.max_block),
            (1, 4096, 32 << 20)
        );
        for (a, b, c) in [
            (3, 4096, 8192),
            (1 << 20, 1 << 20, 1 << 20),
            (512, 4096, 1000),
            (1, 4096, 0),
        ] {
            assert!(apply_info(&mut i, &p(a, b, c)).is_err(), "{a} {b} {c}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]
        /// Arbitrary server bytes never panic any parser.
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), off in any::<u64>(), len in any::<u32>(), kind in any::<u16>(), magic in any::<u32>(), structured in any::<bool>()) {
            let mut hdr = [0u8; 20];
            let n = bytes.len().min(20);
            hdr[..n].copy_from_slice(&bytes[..n]);
            let _ = parse_option_reply(&hdr, OPT_GO);
            let mut info = ExportInfo::default();
            let _ = apply_info(&mut info, &bytes);
            let _ = parse_meta_context(&bytes);
            let _ = parse_reply_header(magic, &bytes[..bytes.len().min(16)], structured);
            let _ = parse_error_chunk(kind, &bytes, off, len);
            let _ = parse_hole(&bytes);
            let _ = parse_block_status(&bytes, 0, off.min(u64::MAX - u32::MAX as u64), len);
            let mut c = Coverage::default();
            let req = off.min(u64::MAX / 2);
            let _ = c.add(req, len, req.wrapping_add(bytes.len() as u64), len as u64);
            let _ = option_error_text(REP_FLAG_ERROR | kind as u32, 7, "x", &bytes);
        }

        /// Block status results always lie within the request and in order.
        #[test]
        fn block_status_stays_in_the_request(exts in proptest::collection::vec((1u32..1 << 20, any::<u32>()), 1..40), off in 0u64..1 << 40, len in 1u32..1 << 24) {
            let mut p = 3u32.to_be_bytes().to_vec();
            for (l, f) in &exts {
                p.extend_from_slice(&l.to_be_bytes());
                p.extend_from_slice(&f.to_be_bytes());
            }
            let v = parse_block_status(&p, 3, off, len).unwrap();
            let mut pos = off;
            for (a, b, _) in v {
                prop_assert_eq!(a, pos);
                prop_assert!(b > a && b <= off + len as u64);
                pos = b;
            }
        }
    }
}
