//! Fixed-newstyle negotiation: structured replies, the `base:allocation`
//! metadata context, then `NBD_OPT_GO` with block size information.
//!
//! Invariant: negotiation either ends in the transmission phase with a
//! validated [`Negotiated`], or fails with a [`HandshakeError`] naming what the
//! server did; every reply length is bounded before anything is read into
//! memory, and the caller's socket timeouts bound every wait.

use std::io::{self, Read, Write};

use super::proto::{self, ExportInfo, ProtocolError};

/// What negotiation agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The export's size, flags and block sizes.
    pub info: ExportInfo,
    /// Structured replies are on.
    pub structured: bool,
    /// The id of `base:allocation`, when the server offers block status.
    pub base_allocation: Option<u32>,
}

/// Why negotiation failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Reading or writing the socket failed (or timed out, or the server closed it).
    #[error("connection failed during negotiation")]
    Io(#[source] io::Error),
    /// The server broke the protocol.
    #[error("the server broke the NBD protocol during negotiation")]
    Protocol(#[source] ProtocolError),
    /// The server refused what we asked (no such export, TLS required, ...).
    #[error("{0}")]
    Refused(String),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

impl From<ProtocolError> for HandshakeError {
    fn from(e: ProtocolError) -> Self {
        HandshakeError::Protocol(e)
    }
}

fn read_u16<S: Read>(s: &mut S) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u64<S: Read>(s: &mut S) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Reads one option reply answering `opt`: its type and payload.
fn read_option_reply<S: Read>(s: &mut S, opt: u32) -> Result<(u32, Vec<u8>), HandshakeError> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    let r = proto::parse_option_reply(&h, opt)?;
    let mut payload = vec![0u8; r.len as usize];
    s.read_exact(&mut payload)?;
    Ok((r.kind, payload))
}

fn refused(kind: u32, opt: u32, export: &str, payload: &[u8]) -> HandshakeError {
    HandshakeError::Refused(proto::option_error_text(kind, opt, export, payload))
}

/// Negotiates `export` on a freshly connected stream.
pub fn negotiate<S: Read + Write>(s: &mut S, export: &str) -> Result<Negotiated, HandshakeError> {
    if read_u64(s)? != proto::NBD_MAGIC {
        return Err(ProtocolError("the peer is not an NBD server (no NBDMAGIC)".into()).into());
    }
    match read_u64(s)? {
        proto::IHAVEOPT => {}
        proto::OLDSTYLE_MAGIC => {
            return Err(HandshakeError::Refused(
                "the server speaks the old-style handshake, which has no export names; run it in newstyle mode".into(),
            ))
        }
        _ => return Err(ProtocolError("unknown handshake magic".into()).into()),
    }
    let flags = read_u16(s)?;
    if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::Refused(
            "the server does not speak fixed newstyle negotiation".into(),
        ));
    }
    let mut client = proto::CLIENT_FIXED_NEWSTYLE;
    if flags & proto::FLAG_NO_ZEROES != 0 {
        client |= proto::CLIENT_NO_ZEROES;
    }
    s.write_all(&client.to_be_bytes())?;

    // Structured replies: needed for holes in reads and for block status.
    s.write_all(&proto::encode_option(proto::OPT_STRUCTURED_REPLY, &[]))?;
    let (kind, _) = read_option_reply(s, proto::OPT_STRUCTURED_REPLY)?;
    let structured = match kind {
        proto::REP_ACK => true,
        k if k & proto::REP_FLAG_ERROR != 0 => false,
        k => {
            return Err(ProtocolError(format!("unexpected reply {k} to structured replies")).into())
        }
    };

    let mut base_allocation = None;
    if structured {
        s.write_all(&proto::encode_option(
            proto::OPT_SET_META_CONTEXT,
            &proto::meta_context_data(export),
        ))?;
        let mut replies = 0;
        loop {
            let (kind, payload) = read_option_reply(s, proto::OPT_SET_META_CONTEXT)?;
            match kind {
                proto::REP_ACK => break,
                proto::REP_META_CONTEXT => {
                    replies += 1;
                    if replies > 16 {
                        return Err(ProtocolError("too many meta context replies".into()).into());
                    }
                    let (id, name) = proto::parse_meta_context(&payload)?;
                    if name == proto::BASE_ALLOCATION {
                        base_allocation = Some(id);
                    }
                }
                proto::REP_ERR_UNKNOWN => {
                    return Err(refused(kind, proto::OPT_SET_META_CONTEXT, export, &payload))
                }
                // Block status is an optimisation: go on without it.
                k if k & proto::REP_FLAG_ERROR != 0 => break,
                k => {
                    return Err(
                        ProtocolError(format!("unexpected reply {k} to set-meta-context")).into(),
                    )
                }
            }
        }
    }

    s.write_all(&proto::encode_option(
        proto::OPT_GO,
        &proto::go_data(export),
    ))?;
    let mut info = ExportInfo {
        min_block: 1,
        pref_block: 4096,
        max_block: proto::MAX_READ,
        ..ExportInfo::default()
    };
    let mut have_export = false;
    let mut replies = 0;
    loop {
        let (kind, payload) = read_option_reply(s, proto::OPT_GO)?;
        match kind {
            proto::REP_ACK => break,
            proto::REP_INFO => {
                replies += 1;
                if replies > 64 {
                    return Err(ProtocolError("too many info replies".into()).into());
                }
                have_export |= proto::apply_info(&mut info, &payload)?;
            }
            k if k & proto::REP_FLAG_ERROR != 0 => {
                return Err(refused(k, proto::OPT_GO, export, &payload))
            }
            k => return Err(ProtocolError(format!("unexpected reply {k} to NBD_OPT_GO")).into()),
        }
    }
    if !have_export {
        return Err(ProtocolError("the server sent no export information".into()).into());
    }
    info.max_block = info.max_block.min(proto::MAX_READ);
    Ok(Negotiated {
        info,
        structured,
        base_allocation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A scripted server: reads come from `input`, writes are collected.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn reply(opt: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = proto::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn greeting() -> Vec<u8> {
        let mut v = proto::NBD_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&3u16.to_be_bytes());
        v
    }

    fn export_info(size: u64, flags: u16) -> Vec<u8> {
        let mut p = proto::INFO_EXPORT.to_be_bytes().to_vec();
        p.extend_from_slice(&size.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        p
    }

    fn good_server() -> Vec<u8> {
        let mut v = greeting();
        v.extend(reply(proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]));
        let mut ctx = 9u32.to_be_bytes().to_vec();
        ctx.extend_from_slice(b"base:allocation");
        v.extend(reply(
            proto::OPT_SET_META_CONTEXT,
            proto::REP_META_CONTEXT,
            &ctx,
        ));
        v.extend(reply(proto::OPT_SET_META_CONTEXT, proto::REP_ACK, &[]));
        v.extend(reply(
            proto::OPT_GO,
            proto::REP_INFO,
            &export_info(1 << 30, 0x103),
        ));
        v.extend(reply(proto::OPT_GO, proto::REP_ACK, &[]));
        v
    }

    fn run(input: Vec<u8>) -> Result<Negotiated, HandshakeError> {
        let mut s = Script {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        negotiate(&mut s, "golden")
    }

    #[test]
    fn a_good_server_negotiates_everything() {
        let n = run(good_server()).unwrap();
        assert_eq!(n.info.size, 1 << 30);
        assert!(n.info.multi_conn());
        assert!(n.structured);
        assert_eq!(n.base_allocation, Some(9));
    }

    #[test]
    fn refusals_name_the_reason() {
        let mut v = greeting();
        v.extend(reply(
            proto::OPT_STRUCTURED_REPLY,
            proto::REP_ERR_UNSUP,
            &[],
        ));
        v.extend(reply(
            proto::OPT_GO,
            proto::REP_ERR_UNKNOWN,
            b"no such export\n",
        ));
        let e = run(v).unwrap_err().to_string();
        assert!(
            e.contains("no export named 'golden'") && e.contains("no such export?"),
            "{e}"
        );

        let mut v = greeting();
        v.extend(reply(
            proto::OPT_STRUCTURED_REPLY,
            proto::REP_ERR_TLS_REQD,
            &[],
        ));
        v.extend(reply(proto::OPT_GO, proto::REP_ERR_TLS_REQD, &[]));
        assert!(run(v).unwrap_err().to_string().contains("TLS"));

        let mut v = proto::NBD_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&proto::OLDSTYLE_MAGIC.to_be_bytes());
        assert!(run(v).unwrap_err().to_string().contains("old-style"));
    }

    #[test]
    fn a_server_closing_anywhere_is_an_io_error() {
        let full = good_server();
        for cut in 0..full.len() {
            match run(full[..cut].to_vec()) {
                Err(HandshakeError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_oversized_reply_is_refused_before_reading_it() {
        let mut v = greeting();
        let mut r = reply(proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]);
        r[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        v.extend(r);
        assert!(matches!(run(v), Err(HandshakeError::Protocol(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, .. ProptestConfig::default() })]
        /// A good server's bytes with random corruption never panic.
        #[test]
        fn corrupted_servers_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut v = good_server();
            for (i, b) in &flips {
                let i = i.index(v.len());
                v[i] = *b;
            }
            v.extend(tail);
            let _ = run(v);
        }
    }
}
