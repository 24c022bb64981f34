//! The metrics endpoint and the status identity, as a scraper and an operator
//! see them: `serve --metrics-address 127.0.0.1:0` driven by libblkio, scraped
//! over plain TCP, the exposition checked by a strict parser of the text
//! format; hostile HTTP peers; the new `status` fields and `status --dmsetup`.

use crate::support::daemon;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::support::daemon::{run, status_json, text, Client, Daemon};
use crate::support::wait_until;

const SIZE: usize = 8 << 20;
const REGION: u64 = 64 << 10;

type Files = daemon::CloneFiles;

fn files() -> Files {
    daemon::clone_files(SIZE as u64, |i| (i / 4096) as u8 ^ (i % 251) as u8)
}

fn serve(f: &Files, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--source",
        f.src.to_str().unwrap(),
        "--dest",
        f.dst.to_str().unwrap(),
        "--metrics-address",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Daemon::start(&args, &f.sock)
}

fn metrics_addr(f: &Files) -> SocketAddr {
    let s = status_json(&f.ctl);
    s["metrics_address"]
        .as_str()
        .expect("status shows the metrics address")
        .parse()
        .unwrap()
}

/// Sends `request` raw and returns the status code and the body.
fn http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a whole answer");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head}"));
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(len, body.len(), "Content-Length matches the body");
    (code, body.to_string())
}

/// A scrape: samples by `name{k="v",...}` (labels sorted, `le` included).
#[derive(Debug)]
struct Scrape {
    samples: BTreeMap<String, f64>,
    types: HashMap<String, String>,
}

impl Scrape {
    fn get(&self, key: &str) -> f64 {
        *self
            .samples
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key} in {:#?}", self.samples.keys()))
    }
}

fn scrape(addr: SocketAddr) -> Scrape {
    let (code, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(code, 200, "{body}");
    parse_exposition(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

/// A strict reader of the Prometheus text format 0.0.4 (what a scraper
/// checks, and the naming rules of prometheus.io/docs/practices/naming).
fn parse_exposition(text: &str) -> Result<Scrape, String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashMap<String, String> = HashMap::new();
    let mut samples = BTreeMap::new();
    let mut seen_family_samples: Vec<String> = Vec::new();
    if !text.ends_with('\n') {
        return Err("the exposition must end with a newline".into());
    }
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut p = rest.splitn(3, ' ');
            let (kind, name, arg) = (p.next(), p.next(), p.next());
            let (Some(kind), Some(name), Some(arg)) = (kind, name, arg) else {
                return Err(format!("bad comment line: {line}"));
            };
            if !valid_name(name) || !name.starts_with("vhost_clone_") {
                return Err(format!("bad metric name {name}"));
            }
            match kind {
                "HELP" => {
                    if helps.insert(name.into(), arg.into()).is_some() {
                        return Err(format!("second HELP for {name}"));
                    }
                }
                "TYPE" => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg) {
                        return Err(format!("bad type {arg}"));
                    }
                    if seen_family_samples.contains(&name.to_string()) {
                        return Err(format!("TYPE of {name} after its samples"));
                    }
                    if types.insert(name.into(), arg.into()).is_some() {
                        return Err(format!("second TYPE for {name}"));
                    }
                    if arg == "counter" && !name.ends_with("_total") {
                        return Err(format!("counter {name} does not end in _total"));
                    }
                }
                _ => return Err(format!("unknown comment {line}")),
            }
            continue;
        }
        if line.is_empty() {
            return Err("empty line".into());
        }
        // name{labels} value
        let (name_labels, value) = match line.rfind('}') {
            Some(i) => (&line[..=i], line[i + 1..].trim_start()),
            None => line.split_once(' ').ok_or(format!("no value: {line}"))?,
        };
        let (name, labels) = match name_labels.split_once('{') {
            Some((n, l)) => (
                n,
                parse_labels(l.strip_suffix('}').ok_or("unclosed labels")?)?,
            ),
            None => (name_labels, Vec::new()),
        };
        if !valid_name(name) {
            return Err(format!("bad sample name {name}"));
        }
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v
                .parse()
                .map_err(|_| format!("bad value '{v}' in {line}"))?,
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                let f = name.strip_suffix(s)?;
                (types.get(f).map(String::as_str) == Some("histogram")).then_some(f)
            })
            .unwrap_or(name);
        let ty = types
            .get(family)
            .ok_or(format!("sample {name} before (or without) its TYPE"))?;
        if !helps.contains_key(family) {
            return Err(format!("no HELP for {family}"));
        }
        if (ty == "counter" || ty == "histogram") && v < 0.0 {
            return Err(format!("negative {ty} {line}"));
        }
        if seen_family_samples.last().map(String::as_str) != Some(family) {
            if seen_family_samples.iter().any(|f| f == family) {
                return Err(format!("samples of {family} are not together"));
            }
            seen_family_samples.push(family.into());
        }
        let mut labels = labels;
        labels.sort();
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{name}{{{}}}", l.join(","))
        };
        if samples.insert(key.clone(), v).is_some() {
            return Err(format!("duplicate sample {key}"));
        }
    }
    // Histograms: cumulative buckets ending in +Inf == _count.
    for (fam, ty) in &types {
        if ty != "histogram" {
            continue;
        }
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter_map(|(k, v)| {
                let le = k
                    .strip_prefix(&format!("{fam}_bucket{{le=\""))?
                    .strip_suffix("\"}")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, *v))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
            return Err(format!("{fam} buckets are not cumulative"));
        }
        let inf = buckets
            .last()
            .filter(|b| b.0.is_infinite())
            .ok_or("no +Inf bucket")?;
        if Some(&inf.1) != samples.get(&format!("{fam}_count")) {
            return Err(format!("{fam}: +Inf bucket differs from _count"));
        }
    }
    Ok(Scrape { samples, types })
}

fn parse_labels(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (k, r) = rest.split_once("=\"").ok_or(format!("bad labels {s}"))?;
        if !valid_name(k) || k.starts_with("__") {
            return Err(format!("bad label name {k}"));
        }
        let mut v = String::new();
        let mut chars = r.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => v.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => v.push(c),
                    _ => return Err(format!("bad escape in {s}")),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => v.push(c),
                None => return Err(format!("unterminated label value in {s}")),
            }
        };
        out.push((k.to_string(), v));
        rest = &r[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Ok(out)
}

#[test]
fn a_scraper_sees_the_series_move_with_guest_io_and_hydration() {
    let f = files();
    let d = serve(&f, &["--no-hydration"]);
    let addr = metrics_addr(&f);
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");

    let s0 = scrape(addr);
    let regions = (SIZE as u64 / REGION) as f64;
    assert_eq!(s0.get("vhost_clone_regions"), regions);
    assert_eq!(s0.get("vhost_clone_hydrated_regions"), 0.0);
    assert_eq!(s0.get("vhost_clone_hydrating_regions"), 0.0);
    assert_eq!(s0.get("vhost_clone_source_attached"), 1.0);
    assert_eq!(s0.get("vhost_clone_hydration_enabled"), 0.0);
    assert_eq!(s0.get("vhost_clone_metadata_mode{mode=\"rw\"}"), 1.0);
    assert_eq!(s0.get("vhost_clone_metadata_mode{mode=\"ro\"}"), 0.0);
    assert_eq!(s0.get("vhost_clone_metadata_mode{mode=\"fail\"}"), 0.0);
    assert_eq!(s0.get("vhost_clone_hydration_rate_bytes_per_second"), 0.0);
    assert_eq!(
        s0.get("vhost_clone_hydration_rate_limit_bytes_per_second"),
        0.0
    );
    assert_eq!(s0.types["vhost_clone_commit_duration_seconds"], "histogram");
    assert_eq!(s0.get("vhost_clone_frontends"), 0.0);
    assert_eq!(s0.get("vhost_clone_migrating"), 0.0);
    assert_eq!(s0.get("vhost_clone_queue_handovers_total"), 0.0);
    let build = s0
        .samples
        .keys()
        .find(|k| k.starts_with("vhost_clone_build_info{"))
        .expect("build_info");
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && build.contains("commit=\""),
        "{build}"
    );

    let mut c = Client::connect(&f.sock);
    assert_eq!(c.write(4096, &[7u8; 4096]), 0); // one sub-block of region 0: no copy
    assert_eq!(c.write(REGION, &vec![8u8; REGION as usize]), 0); // region 1 whole
    assert_eq!(c.read(1 << 20, 8192).0, 0);
    assert_eq!(c.flush(), 0);
    assert_eq!(c.discard(2 << 20, REGION), 0); // region 32 whole
    assert_eq!(c.write_zeroes(3 << 20, 2 * REGION), 0); // regions 48, 49
    let s1 = scrape(addr);
    assert_eq!(
        s1.get("vhost_clone_frontends"),
        1.0,
        "the client is attached"
    );
    let delta = |k: &str| s1.get(k) - s0.get(k);
    let op = |m: &str, o: &str| delta(&format!("vhost_clone_{m}{{op=\"{o}\"}}"));
    assert_eq!(op("requests_total", "read"), 1.0);
    assert_eq!(op("requests_total", "write"), 2.0);
    assert_eq!(op("requests_total", "flush"), 1.0);
    assert_eq!(op("requests_total", "discard"), 1.0);
    assert_eq!(op("requests_total", "write_zeroes"), 1.0);
    assert_eq!(op("request_bytes_total", "read"), 8192.0);
    assert_eq!(op("request_bytes_total", "write"), (4096 + REGION) as f64);
    assert_eq!(op("request_bytes_total", "discard"), REGION as f64);
    assert_eq!(
        op("request_bytes_total", "write_zeroes"),
        (2 * REGION) as f64
    );
    for o in ["read", "write", "flush", "discard", "write_zeroes"] {
        assert_eq!(
            s1.get(&format!("vhost_clone_request_errors_total{{op=\"{o}\"}}")),
            0.0
        );
    }
    assert_eq!(
        delta("vhost_clone_region_hydrations_total{how=\"guest_write\"}"),
        0.0
    );
    assert_eq!(delta("vhost_clone_sub_block_writes_total"), 1.0);
    assert_eq!(s1.get("vhost_clone_partly_written_regions"), 1.0);
    assert_eq!(
        delta("vhost_clone_region_hydrations_total{how=\"no_copy\"}"),
        4.0
    );
    assert_eq!(delta("vhost_clone_hydrated_regions"), 4.0);
    assert_eq!(delta("vhost_clone_hydrated_bytes"), (4 * REGION) as f64);
    // The flush committed the new bits, and the commit was timed.
    assert!(delta("vhost_clone_commits_total") >= 1.0);
    assert!(delta("vhost_clone_commit_duration_seconds_count") >= 1.0);
    assert!(s1.get("vhost_clone_commit_duration_seconds_sum") > 0.0);
    assert_eq!(s1.get("vhost_clone_commit_failures_total"), 0.0);

    // Hydration: the daemon measures the rate itself, so a scrape after the
    // fact (within the 10 s window) sees it, as does the first `status`.
    let o = run(&["message", "-c", f.ctl.to_str().unwrap(), "enable-hydration"]);
    assert!(o.status.success(), "{}", text(&o));
    wait_until(Duration::from_secs(30), "hydration", || {
        scrape(addr).get("vhost_clone_hydrated_regions") == regions
    });
    // At least one sample after the end (samples are a second apart).
    std::thread::sleep(Duration::from_millis(1500));
    let s2 = scrape(addr);
    assert!(s2.get("vhost_clone_hydration_rate_bytes_per_second") > 0.0);
    assert_eq!(s2.get("vhost_clone_hydrated_bytes"), SIZE as f64);
    assert_eq!(s2.get("vhost_clone_partly_written_regions"), 0.0);
    assert!(s2.get("vhost_clone_region_hydrations_total{how=\"background\"}") > 0.0);
    assert!(s2.get("vhost_clone_hydration_source_read_bytes_total") > 0.0);
    let st = status_json(&f.ctl);
    assert!(st["hydration_rate"].as_f64().unwrap() > 0.0, "{st}");
    drop(c);
    assert!(d.terminate().success());
}

#[test]
fn hostile_peers_neither_crash_nor_block_the_scrape() {
    let f = files();
    let mut d = serve(&f, &["--no-hydration"]);
    let addr = metrics_addr(&f);

    // More idle connections than the server keeps.
    let idle: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    // A slowloris: a header byte every 100 ms, never finishing.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ");
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            if s.write_all(b"a").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    std::thread::sleep(Duration::from_millis(200));

    // The scrape is answered at once regardless.
    let t = Instant::now();
    let s = scrape(addr);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "scrape took {:?}",
        t.elapsed()
    );
    assert_eq!(s.get("vhost_clone_source_attached"), 1.0);

    // Oversized, garbage, wrong method, wrong path.
    let big = vec![b'A'; 64 << 10];
    let (code, _) = http(addr, &big);
    assert_eq!(code, 431);
    let (code, _) = http(addr, b"\x00\xff\xfe garbage\r\n\r\n");
    assert_eq!(code, 400);
    let (code, _) = http(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(code, 405);
    let (code, _) = http(addr, b"GET /admin HTTP/1.0\r\n\r\n");
    assert_eq!(code, 404);
    let (code, _) = http(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n");
    assert_eq!(code, 200);

    // Idle connections are dropped after the request timeout (5 s).
    let mut one = idle.into_iter().last().unwrap();
    one.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    let mut b = [0u8; 16];
    let n = one.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "an idle connection got an answer");
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    slow.join().unwrap();
    assert!(d.0.try_wait().unwrap().is_none(), "the daemon died");
    scrape(addr);
    assert!(d.terminate().success());
}

#[test]
fn bad_metrics_addresses_are_refused_at_start() {
    let f = files();
    let (src, dst) = (f.src.to_str().unwrap(), f.dst.to_str().unwrap());
    // Not IP:PORT: a usage error.
    for bad in ["localhost", "127.0.0.1", "127.0.0.1:http", "[::1]"] {
        let o = run(&[
            "serve",
            "--source",
            src,
            "--dest",
            dst,
            "--metrics-address",
            bad,
        ]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", text(&o));
        assert!(text(&o).contains("IP:PORT"), "{}", text(&o));
    }
    // In use: a start-up failure, and nothing left behind.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let o = run(&[
        "serve",
        "--source",
        src,
        "--dest",
        dst,
        "--metrics-address",
        &port,
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("cannot listen for metrics on") && text(&o).contains("in use"),
        "{}",
        text(&o)
    );
    assert!(!f.dst.exists() && !f.sock.exists() && !f.ctl.exists());
    // Not an address of this machine.
    let o = run(&[
        "serve",
        "--source",
        src,
        "--dest",
        dst,
        "--metrics-address",
        "192.0.2.1:9850",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let _ = f.dir.path();
}

#[test]
fn status_tells_who_and_where_and_has_a_dmsetup_line() {
    let f = files();
    let d = serve(
        &f,
        &[
            "--no-hydration",
            "--hydration-threshold",
            "7",
            "--hydration-rate",
            "3MiB/s",
        ],
    );
    let s = status_json(&f.ctl);
    assert_eq!(s["pid"].as_u64(), Some(u64::from(d.pid())));
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    let commit = s["commit"].as_str().unwrap();
    assert!(!commit.is_empty(), "{s}");
    // RFC 3339 UTC, to the second.
    let started = s["started_at"].as_str().unwrap();
    assert!(
        started.len() == 20 && started.ends_with('Z') && started.as_bytes()[10] == b'T',
        "{started}"
    );
    assert_eq!(s["source"], f.src.to_str().unwrap());
    assert_eq!(s["dest"], f.dst.to_str().unwrap());
    assert_eq!(s["metadata"], format!("{}.meta", f.dst.display()));
    assert_eq!(s["socket"], f.sock.to_str().unwrap());
    assert_eq!(s["control_socket"], f.ctl.to_str().unwrap());
    assert!(s["metrics_address"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    // The fields scripts already read are still there.
    for k in [
        "uuid",
        "hydrated_regions",
        "regions",
        "mode",
        "commits",
        "io",
        "hydration_rate",
    ] {
        assert!(s.get(k).is_some(), "{k} missing: {s}");
    }

    let ctl = f.ctl.to_str().unwrap();
    let o = run(&["status", "-c", ctl]);
    assert!(o.status.success());
    let plain = text(&o);
    assert!(plain.contains(&format!("pid {}", d.pid())), "{plain}");
    // The rate limit, as given and as changed at run time, in all three views.
    let limit_metric = "vhost_clone_hydration_rate_limit_bytes_per_second";
    assert_eq!(s["hydration_rate_limit"].as_u64(), Some(3 << 20), "{s}");
    assert!(plain.contains("rate limit 3 MiB/s;"), "{plain}");
    assert_eq!(scrape(metrics_addr(&f)).get(limit_metric), (3 << 20) as f64);
    let o = run(&["message", "-c", ctl, "hydration_rate", "1536k"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        status_json(&f.ctl)["hydration_rate_limit"].as_u64(),
        Some(1536 << 10)
    );
    assert_eq!(
        scrape(metrics_addr(&f)).get(limit_metric),
        (1536 << 10) as f64
    );
    assert!(text(&run(&["status", "-c", ctl])).contains("rate limit 1536 KiB/s;"));
    let o = run(&["message", "-c", ctl, "hydration-rate", "0"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        status_json(&f.ctl)["hydration_rate_limit"].as_u64(),
        Some(0)
    );
    assert_eq!(scrape(metrics_addr(&f)).get(limit_metric), 0.0);
    assert!(text(&run(&["status", "-c", ctl])).contains("rate limit unlimited;"));
    assert!(plain.contains(&format!("(commit {commit})")), "{plain}");
    assert!(plain.contains("metrics: http://127.0.0.1:"), "{plain}");

    let o = run(&["status", "-c", ctl, "--dmsetup"]);
    assert!(o.status.success(), "{}", text(&o));
    let line = String::from_utf8(o.stdout).unwrap();
    let fields: Vec<&str> = line.trim_end().split(' ').collect();
    let regions = SIZE as u64 / REGION;
    let used_total: Vec<u64> = fields[4].split('/').map(|x| x.parse().unwrap()).collect();
    assert!(
        used_total[0] >= 3 && used_total[0] <= used_total[1],
        "{line}"
    );
    assert_eq!(
        [&fields[..4], &fields[5..]].concat(),
        [
            "0".to_string(),
            (SIZE / 512).to_string(),
            "clone".into(),
            "8".into(),
            (REGION / 512).to_string(),
            format!("0/{regions}"),
            "0".into(),
            "1".into(),
            "no_hydration".into(),
            "4".into(),
            "hydration_threshold".into(),
            "7".into(),
            "hydration_batch_size".into(),
            "16".into(),
            "rw".into(),
        ],
        "{line}"
    );
    assert_eq!(line.lines().count(), 1);
    let o = run(&["status", "-c", ctl, "--dmsetup", "--json"]);
    assert_eq!(o.status.code(), Some(2));
    // --version names the commit too.
    let o = run(&["--version"]);
    assert!(
        text(&o).contains(&format!("(commit {commit})")),
        "{}",
        text(&o)
    );
    assert!(d.terminate().success());
}
