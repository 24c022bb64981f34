//! Opening a clone's three stores for writing, for `serve` and `create`: the
//! one place that decides who may touch them and what counts as a new clone.
//!
//! Invariants (design rule 7, issue 12):
//! * Nothing is read for use or written before the stores are locked (OFD
//!   locks, [`crate::storage::lock`]): the source shared, the destination and
//!   the metadata exclusive. A clone in use by another process is refused with
//!   that process named.
//! * Two of the three paths naming one file (one inode, one block device) is
//!   refused, before anything is opened for writing and again on the open files.
//! * Metadata is new only when it is missing, empty or all zeroes; anything
//!   else must validate (`serve`) or is overwritten only with `create --force`.
//! * A metadata store that records hydrated regions is never served over a
//!   missing destination (its data would read as zeroes).
//! * Files this open created are removed again if the start is refused
//!   ([`Stores::keep`] marks success); files that existed are left unchanged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{CliError, Result};
use crate::metadata::format::{Layout, PartialSpec};
use crate::metadata::{self, Geometry, Loaded, MetadataError};
use crate::storage::nbd::{self, NbdConfig, NbdDevice, NbdUri};
use crate::storage::{is_all_zero, BlockDevice, FileDevice, FileId, LockKind, OpenOptions};

/// The paths of a clone's stores.
#[derive(Debug, Clone)]
pub struct StorePaths {
    /// The source, if given.
    pub source: Option<PathBuf>,
    /// The destination.
    pub dest: PathBuf,
    /// The metadata.
    pub metadata: PathBuf,
}

/// What the metadata file holds.
#[derive(Debug)]
pub enum MetadataState {
    /// Missing, empty or all zeroes (or `create --force`): to be formatted.
    New,
    /// A store that validated.
    Existing(Box<Loaded>),
}

/// The opened, locked stores.
#[derive(Debug)]
pub struct Stores {
    /// The source, opened read-only: a file or an NBD export.
    pub source: Option<Arc<dyn BlockDevice>>,
    /// The source's file identity (`None` for a network source).
    source_id: Option<FileId>,
    /// The destination.
    pub dest: Arc<FileDevice>,
    /// The metadata device.
    pub metadata: Arc<FileDevice>,
    /// What the metadata holds.
    pub state: MetadataState,
    /// The clone's geometry (stored, or for a new clone from the source).
    pub geometry: Geometry,
    /// The clone's table of partly written regions (stored, or for a new clone).
    pub partial: PartialSpec,
    /// Files this open created: removed on drop unless [`Stores::keep`] was called.
    created: Vec<PathBuf>,
}

/// How to open the stores.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Region size asked for (a new clone's, or checked against the stored one).
    pub region_size: Option<u64>,
    /// Slots of the table of partly written regions asked for (a new clone's, 0
    /// for none; or checked against the stored one); `None`: the default.
    pub partial_slots: Option<u64>,
    /// Open source and destination with O_DIRECT.
    pub direct: bool,
    /// Treat existing metadata as new (`create --force`).
    pub reformat: bool,
    /// How to use a network source.
    pub network: NetworkOptions,
}

/// How to use a source behind an NBD server (`serve --source-timeout`,
/// `--source-connections`).
#[derive(Debug, Clone, Copy)]
pub struct NetworkOptions {
    /// How long a source request may wait, reconnecting included.
    pub timeout: std::time::Duration,
    /// Connections when the server allows several.
    pub connections: usize,
}

impl Default for NetworkOptions {
    fn default() -> Self {
        NetworkOptions {
            timeout: nbd::DEFAULT_TIMEOUT,
            connections: nbd::DEFAULT_CONNECTIONS,
        }
    }
}

/// True when `p` names a network source (an NBD URI) rather than a file.
pub fn is_network_source(p: &Path) -> bool {
    p.to_str().is_some_and(nbd::is_nbd_uri)
}

/// Opens a source read-only: an NBD URI through our client, or a file with a
/// shared lock. Returns the device and, for a file, its identity. With
/// `known_size` (an existing clone's), an NBD server that cannot be reached
/// does not stop the start: see [`NbdDevice::connect_or_defer`].
pub fn open_source(
    p: &Path,
    direct: bool,
    network: NetworkOptions,
    known_size: Option<u64>,
) -> Result<(Arc<dyn BlockDevice>, Option<FileId>)> {
    if is_network_source(p) {
        let text = p.to_str().unwrap_or_default();
        let uri = NbdUri::parse(text).map_err(|e| CliError::Usage(e.to_string()))?;
        let cfg = NbdConfig {
            uri,
            timeout: network.timeout,
            connections: network.connections,
        };
        let dev = match known_size {
            Some(size) => NbdDevice::connect_or_defer(cfg, size),
            None => NbdDevice::connect(cfg),
        }
        .map_err(|e| CliError::Refused(format!("source: {}", crate::error_chain(&e))))?;
        return Ok((Arc::new(dev), None));
    }
    let f = open_locked(p, true, direct, None, LockKind::Shared)?;
    let id = f.id();
    Ok((Arc::new(f), Some(id)))
}

fn md_err(path: &Path) -> impl Fn(MetadataError) -> CliError + '_ {
    move |source| CliError::Metadata {
        path: path.display().to_string(),
        source,
    }
}

/// The identity of what `p` names: the file's, or for a path that does not
/// exist yet, its absolute, normalised form.
#[derive(Debug, PartialEq, Eq)]
enum Named {
    File(FileId),
    Missing(PathBuf),
}

fn named(p: &Path) -> Named {
    match std::fs::metadata(p) {
        Ok(m) => Named::File(FileId::of(&m)),
        Err(_) => {
            let parent = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let dir = std::fs::canonicalize(&parent).unwrap_or(parent);
            Named::Missing(dir.join(p.file_name().unwrap_or_default()))
        }
    }
}

/// Refuses two roles naming one file.
fn check_distinct(roles: &[(&'static str, &Path, Named)]) -> Result<()> {
    for (i, (a, pa, na)) in roles.iter().enumerate() {
        for (b, pb, nb) in &roles[i + 1..] {
            if na == nb {
                return Err(CliError::Usage(format!(
                    "--{a} {} and --{b} {} name the same file; a clone needs three different files",
                    pa.display(),
                    pb.display()
                )));
            }
        }
    }
    Ok(())
}

/// Refuses a source that does not fit the clone of geometry `stored` (of the
/// metadata at `mdp`): the same checks `load` makes with an expected geometry.
fn check_source_fits(src: &dyn BlockDevice, stored: &Geometry, mdp: &Path) -> Result<()> {
    let size = src.size() - src.size() % 512;
    let want = Geometry::new(size, stored.region_size()).map_err(md_err(mdp))?;
    metadata::check_geometry(stored, &want).map_err(md_err(mdp))
}

/// Refuses two of `paths`' roles naming one file.
fn check_paths(paths: &StorePaths) -> Result<()> {
    let mut roles = vec![
        ("dest", paths.dest.as_path(), named(&paths.dest)),
        ("metadata", paths.metadata.as_path(), named(&paths.metadata)),
    ];
    if let Some(s) = paths.source.as_ref().filter(|s| !is_network_source(s)) {
        roles.insert(0, ("source", s.as_path(), named(s)));
    }
    check_distinct(&roles)
}

fn open_locked(
    path: &Path,
    read_only: bool,
    direct: bool,
    create_size: Option<u64>,
    lock: LockKind,
) -> Result<FileDevice> {
    Ok(FileDevice::open(
        path,
        &OpenOptions {
            read_only,
            direct,
            create_size,
            lock: Some(lock),
        },
    )?)
}

impl Stores {
    /// Opens and locks the stores. The only writes it makes are to files it
    /// creates (the destination at the clone's size, an empty metadata file).
    pub fn open(paths: &StorePaths, opts: StoreOptions) -> Result<Stores> {
        check_paths(paths)?;

        let mut created = Vec::new();
        let md_exists = paths.metadata.exists();
        let dest_exists = paths.dest.exists();
        let md = if md_exists {
            Some(open_locked(
                &paths.metadata,
                false,
                false,
                None,
                LockKind::Exclusive,
            )?)
        } else {
            None
        };
        let dest = if dest_exists {
            Some(open_locked(
                &paths.dest,
                false,
                opts.direct,
                None,
                LockKind::Exclusive,
            )?)
        } else {
            None
        };

        // What the metadata holds, and the geometry.
        let mdp = &paths.metadata;
        let state = match &md {
            Some(dev) if !opts.reformat && dev.size() > 0 => {
                if is_all_zero(dev)? {
                    MetadataState::New
                } else {
                    let loaded = metadata::load(dev, None).map_err(md_err(mdp))?;
                    MetadataState::Existing(Box::new(loaded))
                }
            }
            _ => MetadataState::New,
        };
        // The source: a network source of an existing clone may be down right
        // now; the clone's size is known, so the daemon can start and serve
        // what is hydrated while it reconnects.
        let known_size = match &state {
            MetadataState::Existing(l) => Some(l.superblock.geometry.device_size()),
            MetadataState::New => None,
        };
        let (source, source_id) = match &paths.source {
            Some(p) => {
                let (d, id) = open_source(p, opts.direct, opts.network, known_size)?;
                (Some(d), id)
            }
            None => (None, None),
        };
        let geometry = match &state {
            MetadataState::New => {
                let Some(src) = &source else {
                    return Err(CliError::Usage(format!(
                        "{} is a new clone: --source is needed to create it",
                        mdp.display()
                    )));
                };
                Geometry::new(
                    src.size(),
                    opts.region_size
                        .unwrap_or(crate::metadata::DEFAULT_REGION_SIZE),
                )
                .map_err(md_err(mdp))?
            }
            MetadataState::Existing(l) => {
                let stored = l.superblock.geometry;
                let table = l.superblock.partial.slots;
                if let Some(given) = opts.partial_slots.filter(|n| *n != table) {
                    return Err(CliError::Usage(format!(
                        "metadata {}: its table of partly written regions has {table} slots, but --partial-regions {given} was given (the table is chosen when the clone is created; leave the option out)",
                        mdp.display()
                    )));
                }
                // An option the clone contradicts: fixed on the command line (exit 2).
                if let Some(given) = opts.region_size.filter(|r| *r != stored.region_size()) {
                    return Err(CliError::RegionSizeMismatch {
                        path: mdp.display().to_string(),
                        stored: stored.region_size(),
                        given,
                    });
                }
                if let Some(src) = &source {
                    check_source_fits(src.as_ref(), &stored, mdp)?;
                }
                stored
            }
        };
        let partial = match &state {
            MetadataState::Existing(l) => l.superblock.partial,
            MetadataState::New => new_table(&geometry, opts.partial_slots)?,
        };
        if let (MetadataState::Existing(l), None) = (&state, &dest) {
            // Partly written regions hold the guest's data on the destination too.
            let partial = l.partial_regions().len();
            if l.superblock.hydrated > 0 || partial > 0 {
                return Err(CliError::Refused(format!(
                    "{} records {} hydrated and {partial} partly written regions, but the destination {} is missing: the clone's data is gone (vhost-clone create --force starts over)",
                    mdp.display(),
                    l.superblock.hydrated,
                    paths.dest.display()
                )));
            }
        }
        // O_DIRECT writes of less than a 4 KiB block are read-modify-writes of
        // the block, which would rewrite a neighbouring sub-block the guest may
        // be writing at the same time: refused (format never makes them).
        if opts.direct && partial.slots > 0 && partial.sub_block < 4096 {
            return Err(CliError::Refused(format!(
                "{}: sub-blocks of {} bytes cannot be served with --direct (at least 4096)",
                mdp.display(),
                partial.sub_block
            )));
        }

        // Create what is missing (tracked, so a refused start removes it).
        let mut stores_created = |p: &Path| created.push(p.to_path_buf());
        let dest = match dest {
            Some(d) => d,
            None => {
                let d = open_locked(
                    &paths.dest,
                    false,
                    opts.direct,
                    Some(geometry.device_size()),
                    LockKind::Exclusive,
                )?;
                if d.created() {
                    stores_created(&paths.dest);
                }
                d
            }
        };
        let md = match md {
            Some(m) => m,
            None => {
                let m = open_locked(&paths.metadata, false, false, Some(0), LockKind::Exclusive)?;
                if m.created() {
                    stores_created(&paths.metadata);
                }
                m
            }
        };
        let stores = Stores {
            source,
            source_id,
            dest: Arc::new(dest),
            metadata: Arc::new(md),
            state,
            geometry,
            partial,
            created,
        };
        // Again on the open files: a path may have been swapped meanwhile.
        let mut ids = vec![
            ("dest", stores.dest.id()),
            ("metadata", stores.metadata.id()),
        ];
        if let Some(id) = stores.source_id {
            ids.push(("source", id));
        }
        for (i, (a, x)) in ids.iter().enumerate() {
            if let Some((b, _)) = ids[i + 1..].iter().find(|(_, y)| y == x) {
                return Err(CliError::Usage(format!(
                    "--{a} and --{b} name the same file; a clone needs three different files"
                )));
            }
        }
        if stores.dest.size() < geometry.device_size() {
            return Err(CliError::Refused(format!(
                "the destination {} has {} bytes, smaller than the clone's {}",
                paths.dest.display(),
                stores.dest.size(),
                geometry.device_size()
            )));
        }
        Ok(stores)
    }

    /// What a standby (`serve --standby`) checks before it may lock the stores, so
    /// that the takeover after a migration is not the first to refuse them: three
    /// different files, and a file source that fits the clone's `geometry` (opened
    /// read-only, with the shared lock the serving daemon holds too, and closed
    /// again). A network source is checked at the takeover.
    pub fn check_standby(paths: &StorePaths, geometry: &Geometry, direct: bool) -> Result<()> {
        check_paths(paths)?;
        if let Some(p) = paths.source.as_ref().filter(|p| !is_network_source(p)) {
            let src = open_locked(p, true, direct, None, LockKind::Shared)?;
            check_source_fits(&src, geometry, &paths.metadata)?;
        }
        Ok(())
    }

    /// Formats the metadata if it is new (growing a small regular file to the
    /// layout's size first). Returns true when it formatted.
    pub fn format_if_new(&mut self) -> Result<bool> {
        if !matches!(self.state, MetadataState::New) {
            return Ok(false);
        }
        let path = self.metadata.path().to_path_buf();
        let need = Layout::with(&self.geometry, &self.partial).required_size();
        if self.metadata.size() < need {
            let dev = Arc::get_mut(&mut self.metadata).ok_or_else(|| {
                CliError::Refused("the metadata device is shared while formatting".into())
            })?;
            dev.grow(need)?;
        }
        metadata::Metadata::format_store_with(self.metadata.as_ref(), self.geometry, self.partial)
            .map_err(md_err(&path))?;
        let loaded =
            metadata::load(self.metadata.as_ref(), Some(&self.geometry)).map_err(md_err(&path))?;
        self.state = MetadataState::Existing(Box::new(loaded));
        Ok(true)
    }

    /// The start succeeded: keep the files this open created.
    pub fn keep(&mut self) {
        self.created.clear();
    }
}

/// The table of partly written regions of a new clone of `geo`: the default,
/// none (`Some(0)`), or `Some(n)` slots of the default sub-block size.
fn new_table(geo: &Geometry, slots: Option<u64>) -> Result<PartialSpec> {
    let default = PartialSpec::default_for(geo);
    let spec = match slots {
        None => return Ok(default),
        Some(0) => return Ok(PartialSpec::none(geo)),
        Some(_) if default.slots == 0 => {
            return Err(CliError::Usage(format!(
                "--partial-regions: regions of {} bytes have one sub-block and no table (use a region size of 8K or more)",
                geo.region_size()
            )))
        }
        Some(n) => PartialSpec {
            slots: n,
            sub_block: default.sub_block,
        },
    };
    spec.validate(geo)
        .map_err(|e| CliError::Usage(format!("--partial-regions: {e}")))?;
    Ok(spec)
}

impl Drop for Stores {
    fn drop(&mut self) {
        for p in &self.created {
            let _ = std::fs::remove_file(p);
        }
    }
}
