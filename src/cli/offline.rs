//! The offline tools: `create`, `check`, `dump`. None of them needs a VM.

use std::io::Write;

use serde::Serialize;

use super::stores::{MetadataState, StoreOptions, StorePaths, Stores};
use super::{error_chain, open_device, CheckArgs, CliError, CreateArgs, DumpArgs, Result};
use crate::metadata::{self, Geometry};

fn md_err(path: &std::path::Path) -> impl Fn(metadata::MetadataError) -> CliError + '_ {
    move |source| CliError::Metadata {
        path: path.display().to_string(),
        source,
    }
}

fn out() -> std::io::StdoutLock<'static> {
    std::io::stdout().lock()
}

/// `vhost-clone create`: formats metadata for a new clone. It takes the same
/// locks as `serve` (a running clone is refused) and, without `--force`,
/// refuses metadata that is not new (missing, empty or all zeroes).
pub fn create(a: &CreateArgs) -> Result<()> {
    let (Some(src_path), Some(dst_path)) = (&a.stores.source, &a.stores.dest) else {
        return Err(CliError::Usage("create needs --source and --dest".into()));
    };
    let md_path = a.stores.metadata_path()?;
    let already = |what: String| {
        CliError::Refused(format!(
            "{} already holds clone metadata ({what}); use --force to start the clone over",
            md_path.display()
        ))
    };
    let mut stores = Stores::open(
        &StorePaths {
            source: Some(src_path.clone()),
            dest: dst_path.clone(),
            metadata: md_path.clone(),
        },
        StoreOptions {
            region_size: Some(a.region_size),
            partial_slots: a.partial_regions,
            direct: false,
            reformat: a.force,
            network: Default::default(),
        },
    )
    .map_err(|e| match e {
        // An existing clone is refused whatever its region size.
        CliError::RegionSizeMismatch { stored, .. } => {
            already(format!("regions of {stored} bytes"))
        }
        e => e,
    })?;
    if let MetadataState::Existing(l) = &stores.state {
        return Err(already(format!(
            "clone {}, {} regions hydrated",
            uuid::Uuid::from_bytes(l.superblock.uuid),
            l.superblock.hydrated
        )));
    }
    stores.format_if_new()?;
    stores.keep();
    let MetadataState::Existing(l) = &stores.state else {
        unreachable!("format_if_new leaves an existing store");
    };
    writeln!(
        out(),
        "created clone {}: {} -> {} ({}), metadata {}",
        uuid::Uuid::from_bytes(l.superblock.uuid),
        src_path.display(),
        dst_path.display(),
        stores.geometry,
        md_path.display()
    )
    .map_err(CliError::Output)?;
    Ok(())
}

/// What `check` found about one data store.
#[derive(Debug, Serialize)]
struct StoreReport {
    path: String,
    size: Option<u64>,
}

/// The report of `check`.
#[derive(Debug, Serialize, Default)]
struct CheckReport {
    metadata: String,
    ok: bool,
    problems: Vec<String>,
    notes: Vec<String>,
    uuid: Option<String>,
    sequence: Option<u64>,
    device_size: Option<u64>,
    region_size: Option<u64>,
    regions: Option<u64>,
    hydrated: Option<u64>,
    complete: Option<bool>,
    /// Format version 2: the table of partly written regions.
    #[serde(skip_serializing_if = "Option::is_none")]
    partial: Option<PartialReport>,
    source: Option<StoreReport>,
    dest: Option<StoreReport>,
}

/// The table of partly written regions, in `check` and `dump`.
#[derive(Debug, Serialize)]
struct PartialReport {
    /// Slots of the table.
    slots: u64,
    /// Sub-block size in bytes (one bit of a written mask).
    sub_block: u64,
    /// Partly written regions in the committed state, with their written masks.
    regions: Vec<PartialRegion>,
}

#[derive(Debug, Serialize)]
struct PartialRegion {
    region: u64,
    written_mask: u64,
}

fn partial_report(l: &metadata::Loaded) -> Option<PartialReport> {
    let spec = l.superblock.partial;
    (spec.slots > 0).then(|| PartialReport {
        slots: spec.slots,
        sub_block: spec.sub_block,
        regions: l
            .partial_regions()
            .into_iter()
            .map(|(region, written_mask)| PartialRegion {
                region,
                written_mask,
            })
            .collect(),
    })
}

fn check_store(
    report: &mut CheckReport,
    what: &str,
    path: &std::path::Path,
    geo: Option<&Geometry>,
) -> StoreReport {
    let mut sr = StoreReport {
        path: path.display().to_string(),
        size: None,
    };
    match super::stores::open_source(path, false, Default::default(), None) {
        Ok((d, _)) => {
            sr.size = Some(d.size());
            if let Some(g) = geo {
                if d.size() < g.device_size() {
                    report.problems.push(format!(
                        "{what} {} has {} bytes, smaller than the clone's {}",
                        path.display(),
                        d.size(),
                        g.device_size()
                    ));
                } else if d.size() > g.device_size() && what == "source" {
                    // serve refuses it too: a clone's size is its source's at create.
                    report.problems.push(format!(
                        "source {} has {} bytes, larger than the clone's {}: is it the image the clone was made from?",
                        path.display(),
                        d.size(),
                        g.device_size()
                    ));
                } else if d.size() > g.device_size() {
                    report.notes.push(format!(
                        "{what} is {} bytes larger than the clone; the excess is not served",
                        d.size() - g.device_size()
                    ));
                }
            }
        }
        Err(e) => report.problems.push(format!("{what}: {}", error_chain(&e))),
    }
    sr
}

/// `vhost-clone check`: validates the metadata and its agreement with the data stores.
pub fn check(a: &CheckArgs) -> Result<()> {
    let md_path = a.stores.metadata_path()?;
    let mut r = CheckReport {
        metadata: md_path.display().to_string(),
        ..Default::default()
    };
    let mut geo = None;
    match open_device(&md_path, true) {
        Err(e) => r.problems.push(format!("metadata: {}", error_chain(&e))),
        Ok(dev) => match metadata::load(dev.as_ref(), None) {
            Err(e) => r.problems.push(format!(
                "metadata {}: {}",
                md_path.display(),
                error_chain(&e)
            )),
            Ok(l) => {
                let sb = &l.superblock;
                geo = Some(sb.geometry);
                r.uuid = Some(uuid::Uuid::from_bytes(sb.uuid).to_string());
                r.sequence = Some(sb.seq);
                r.device_size = Some(sb.geometry.device_size());
                r.region_size = Some(sb.geometry.region_size());
                r.regions = Some(sb.geometry.nr_regions());
                r.hydrated = Some(sb.hydrated);
                r.complete = Some(sb.hydrated == sb.geometry.nr_regions());
                r.partial = partial_report(&l);
                r.notes.extend(l.notes);
            }
        },
    }
    if let Some(p) = &a.stores.source {
        r.source = Some(check_store(&mut r, "source", p, geo.as_ref()));
    } else if r.complete == Some(false) {
        r.notes.push(
            "no --source given: the clone is not complete, so serving it needs the source".into(),
        );
    }
    if let Some(p) = &a.stores.dest {
        r.dest = Some(check_store(&mut r, "destination", p, geo.as_ref()));
    }
    r.ok = r.problems.is_empty();
    let mut o = out();
    if a.json {
        serde_json::to_writer_pretty(&mut o, &r).map_err(|e| CliError::Output(e.into()))?;
        writeln!(o).map_err(CliError::Output)?;
    } else {
        if let (Some(u), Some(g)) = (&r.uuid, &geo) {
            writeln!(o, "clone {u}: {g}").map_err(CliError::Output)?;
            writeln!(
                o,
                "hydrated {} of {} regions{}, commit sequence {}",
                r.hydrated.unwrap_or(0),
                g.nr_regions(),
                if r.complete == Some(true) {
                    " (complete)"
                } else {
                    ""
                },
                r.sequence.unwrap_or(0)
            )
            .map_err(CliError::Output)?;
            if let Some(p) = &r.partial {
                writeln!(
                    o,
                    "partly written: {} regions (table of {} slots, sub-blocks of {} bytes)",
                    p.regions.len(),
                    p.slots,
                    p.sub_block
                )
                .map_err(CliError::Output)?;
            }
        }
        for n in &r.notes {
            writeln!(o, "note: {n}").map_err(CliError::Output)?;
        }
        for p in &r.problems {
            writeln!(o, "problem: {p}").map_err(CliError::Output)?;
        }
        writeln!(o, "{}", if r.ok { "check: OK" } else { "check: FAILED" })
            .map_err(CliError::Output)?;
    }
    if r.ok {
        Ok(())
    } else {
        Err(CliError::CheckFailed)
    }
}

/// The output of `dump --json`.
#[derive(Debug, Serialize)]
struct Dump {
    uuid: String,
    device_size: u64,
    region_size: u64,
    regions: u64,
    hydrated: u64,
    complete: bool,
    /// Inclusive `[first, last]` region ranges that are hydrated.
    hydrated_ranges: Vec<[u64; 2]>,
    /// Format version 2: the table of partly written regions.
    #[serde(skip_serializing_if = "Option::is_none")]
    partial: Option<PartialReport>,
}

/// `vhost-clone dump`: shows the hydration state.
pub fn dump(a: &DumpArgs) -> Result<()> {
    let md_path = a.stores.metadata_path()?;
    let dev = open_device(&md_path, true)?;
    let l = metadata::load(dev.as_ref(), None).map_err(md_err(&md_path))?;
    let g = l.superblock.geometry;
    let d = Dump {
        uuid: uuid::Uuid::from_bytes(l.superblock.uuid).to_string(),
        device_size: g.device_size(),
        region_size: g.region_size(),
        regions: g.nr_regions(),
        hydrated: l.superblock.hydrated,
        complete: l.superblock.hydrated == g.nr_regions(),
        hydrated_ranges: l
            .hydrated_runs()
            .into_iter()
            .map(|(f, n)| [f, f + n - 1])
            .collect(),
        partial: partial_report(&l),
    };
    let mut o = out();
    if a.json {
        serde_json::to_writer_pretty(&mut o, &d).map_err(|e| CliError::Output(e.into()))?;
        writeln!(o).map_err(CliError::Output)?;
        return Ok(());
    }
    let pct = 100.0 * d.hydrated as f64 / d.regions as f64;
    writeln!(o, "clone {}: {g}", d.uuid).map_err(CliError::Output)?;
    writeln!(
        o,
        "hydrated: {}/{} regions ({pct:.1}%)",
        d.hydrated, d.regions
    )
    .map_err(CliError::Output)?;
    for [f, l] in &d.hydrated_ranges {
        let (bs, be) = (g.region_start(*f), g.region_end(*l));
        writeln!(o, "  regions {f}-{l}  bytes {bs}-{}", be - 1).map_err(CliError::Output)?;
    }
    if let Some(p) = &d.partial {
        writeln!(
            o,
            "partly written: {} regions (sub-blocks of {} bytes)",
            p.regions.len(),
            p.sub_block
        )
        .map_err(CliError::Output)?;
        for e in &p.regions {
            writeln!(
                o,
                "  region {}  written sub-blocks {:#x}",
                e.region, e.written_mask
            )
            .map_err(CliError::Output)?;
        }
    }
    Ok(())
}
