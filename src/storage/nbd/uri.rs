//! NBD URIs as the NBD URI standard (`doc/uri.md` of the NetworkBlockDevice
//! project) spells them: `nbd://HOST[:PORT]/[EXPORT]` and
//! `nbd+unix:///[EXPORT]?socket=PATH`.
//!
//! Invariant: a string that does not parse completely is refused with a message
//! that names the part that is wrong; nothing is guessed. `nbds` (TLS) and vsock
//! are recognised and refused with the reason.

use std::fmt;
use std::path::PathBuf;

/// Default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// TCP: host name or address, and port.
    Tcp {
        /// Host name, IPv4 or IPv6 address (without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket path.
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// The server.
    pub addr: NbdAddr,
    /// The export name (percent-decoded; empty: the server's default export).
    pub export: String,
}

/// An NBD URI that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad NBD URI '{uri}': {reason}")]
pub struct UriError {
    /// The URI as given.
    pub uri: String,
    /// What is wrong.
    pub reason: String,
}

/// True when `s` names an NBD URI rather than a file (it starts with an NBD
/// scheme and `://`). A file whose name looks like that can be given as `./nbd:...`.
pub fn is_nbd_uri(s: &str) -> bool {
    s.split_once("://").is_some_and(|(scheme, _)| {
        matches!(
            scheme.to_ascii_lowercase().as_str(),
            "nbd"
                | "nbds"
                | "nbd+unix"
                | "nbds+unix"
                | "nbd+tcp"
                | "nbds+tcp"
                | "nbd+vsock"
                | "nbds+vsock"
        )
    })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .ok_or("a '%' is not followed by two hex digits")?;
            let h = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a '%' is not followed by two hex digits")?;
            out.push(h);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the export name is not UTF-8".to_string())
}

impl NbdUri {
    /// Parses `s`.
    pub fn parse(s: &str) -> Result<NbdUri, UriError> {
        let err = |reason: &str| UriError {
            uri: s.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| err("expected SCHEME://..."))?;
        let scheme = scheme.to_ascii_lowercase();
        match scheme.as_str() {
            "nbd" | "nbd+tcp" | "nbd+unix" => {}
            "nbds" | "nbds+tcp" | "nbds+unix" | "nbds+vsock" => {
                return Err(err(
                    "TLS (nbds) is not supported; reach a TLS server through a local tunnel (stunnel, ssh -L) and use nbd+unix:// or nbd://localhost",
                ))
            }
            "nbd+vsock" => return Err(err("vsock transport is not supported")),
            _ => return Err(err("the scheme must be nbd:// or nbd+unix://")),
        }
        if rest.contains('#') {
            return Err(err("a fragment (#...) is not allowed"));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).map_err(|r| err(&r))?;
        if export.len() > 4096 {
            return Err(err("the export name is longer than 4096 bytes"));
        }
        let mut socket = None;
        for kv in query.unwrap_or("").split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "socket" => {
                    if socket.is_some() {
                        return Err(err("socket= is given twice"));
                    }
                    socket = Some(percent_decode(v).map_err(|r| err(&r))?);
                }
                _ => {
                    return Err(err(&format!(
                        "unsupported query parameter '{k}' (only socket= for nbd+unix)"
                    )))
                }
            }
        }
        let addr = if scheme == "nbd+unix" {
            if !authority.is_empty() {
                return Err(err(
                    "nbd+unix:// takes no host: write nbd+unix:///EXPORT?socket=PATH",
                ));
            }
            match socket {
                Some(p) if !p.is_empty() => NbdAddr::Unix(PathBuf::from(p)),
                _ => return Err(err("nbd+unix:// needs ?socket=PATH")),
            }
        } else {
            if socket.is_some() {
                return Err(err("socket= is only for nbd+unix://"));
            }
            if authority.contains('@') {
                return Err(err("user names are not supported"));
            }
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let (h, after) = v6
                    .split_once(']')
                    .ok_or_else(|| err("an IPv6 address lacks its ']'"))?;
                let port = match after {
                    "" => None,
                    p => Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| err("junk after the IPv6 address"))?,
                    ),
                };
                (h.to_string(), port)
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p)),
                    None => (authority.to_string(), None),
                }
            };
            if host.is_empty() {
                return Err(err("nbd:// needs a host: nbd://HOST[:PORT]/EXPORT"));
            }
            let port = match port {
                None | Some("") => DEFAULT_PORT,
                Some(p) => p
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| err("the port must be a number from 1 to 65535"))?,
            };
            NbdAddr::Tcp { host, port }
        };
        Ok(NbdUri { addr, export })
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let enc: String = self
            .export
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        match &self.addr {
            NbdAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{enc}")
            }
            NbdAddr::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{enc}"),
            NbdAddr::Unix(p) => write!(f, "nbd+unix:///{enc}?socket={}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(h: &str, p: u16, e: &str) -> NbdUri {
        NbdUri {
            addr: NbdAddr::Tcp {
                host: h.into(),
                port: p,
            },
            export: e.into(),
        }
    }

    #[test]
    fn the_standard_forms_parse() {
        assert_eq!(
            NbdUri::parse("nbd://example.com").unwrap(),
            tcp("example.com", 10809, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://example.com/").unwrap(),
            tcp("example.com", 10809, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://10.0.0.1:1234/disk").unwrap(),
            tcp("10.0.0.1", 1234, "disk")
        );
        assert_eq!(
            NbdUri::parse("NBD://[::1]:99/a%20b/c").unwrap(),
            tcp("::1", 99, "a b/c")
        );
        assert_eq!(
            NbdUri::parse("nbd://[fe80::1]/x").unwrap(),
            tcp("fe80::1", 10809, "x")
        );
        assert_eq!(
            NbdUri::parse("nbd+unix:///golden?socket=/run/q%20n.sock").unwrap(),
            NbdUri {
                addr: NbdAddr::Unix("/run/q n.sock".into()),
                export: "golden".into()
            }
        );
        assert_eq!(NbdUri::parse("nbd+unix://?socket=/s").unwrap().export, "");
        let u = NbdUri::parse("nbd://[::1]:99/a%20b").unwrap();
        assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
    }

    #[test]
    fn wrong_uris_are_refused_with_the_reason() {
        for (s, want) in [
            ("nbd+unix:///x", "socket=PATH"),
            ("nbd+unix://host/x?socket=/s", "takes no host"),
            ("nbd://h:0/x", "port"),
            ("nbd://h:99999/x", "port"),
            ("nbd://h:x/x", "port"),
            ("nbd:///x", "needs a host"),
            ("nbds://h/x", "TLS"),
            ("nbds+unix:///x?socket=/s", "TLS"),
            ("nbd+vsock://3/x", "vsock"),
            ("nbd://h/x?tls-certificates=/x", "unsupported query"),
            ("nbd://h/x?socket=/s", "only for nbd+unix"),
            ("nbd://u@h/x", "user"),
            ("nbd://h/%zz", "hex"),
            ("nbd://h/%ff", "UTF-8"),
            ("nbd://[::1/x", "]"),
            ("nbd://h/x#f", "fragment"),
            ("nbd+unix:///?socket=/a&socket=/b", "twice"),
        ] {
            let e = NbdUri::parse(s).unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn uris_are_told_from_paths() {
        assert!(is_nbd_uri("nbd://h/x"));
        assert!(is_nbd_uri("nbd+unix:///x?socket=/s"));
        assert!(is_nbd_uri("NBDS://h"));
        assert!(!is_nbd_uri("/var/lib/nbd://x"));
        assert!(!is_nbd_uri("./nbd://x"));
        assert!(!is_nbd_uri("golden.img"));
        assert!(!is_nbd_uri("http://x"));
    }
}
