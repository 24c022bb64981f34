//! The live region map: the in-core hydration bitmap, kept in memory that
//! outlives the daemon's process but not the machine.
//!
//! Design rule 7: a process death (kill -9, panic, OOM kill) is not a power
//! cut. The guest keeps running, the page cache and the disk's cache keep every
//! write the dead process completed, and every write the guest saw completed
//! must read back after a restart on the same boot. A write that hydrated a
//! region is acknowledged once its bit is set in core, long before a commit
//! records it; if that bit died with the process, the region would read from
//! the source again and background hydration would copy the source over the
//! guest's data.
//!
//! So the in-core map itself lives in a shared mapping of a file in a RAM file
//! system (`/dev/shm` by default, `serve --runtime-dir`): a store into it
//! reaches the file's page at once and survives the process, and the file is
//! gone after a reboot. Its header names the kernel's boot id, the clone's uuid
//! and geometry, and the destination's device and inode; a file that does not
//! match all of them is ignored (and replaced), so bits never cross a reboot,
//! another clone or another destination.
//!
//! This module owns that memory and its validation. What a restarted daemon
//! does with the bits it finds (flush the destination, then commit them) is
//! [`super::Metadata`]'s: see `Metadata::from_store`.
//!
//! The table of partly written regions (version 2 stores) follows the bitmap:
//! two words a slot, the region plus one (0: a free slot) and its written mask
//! (see [`super::partial`] for the order of the stores, which keeps a slot
//! meaningful whenever the process dies).
//!
//! Invariant: a bit is set here only by `Metadata::set_hydrated` (after the
//! region's data write completed) or when a store is opened (bits that were
//! already committed, or left by a dead process of the same boot); it is
//! never cleared, not even when a failed commit aborts its transaction (design
//! rule 6). A mask bit likewise, until its region's bit is set.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::Geometry;
use crate::storage::lock::{lock_or_wait, LockError, LockKind};

/// Default directory of live map files: a RAM file system that outlives a
/// process and not a reboot.
pub const DEFAULT_RUNTIME_DIR: &str = "/dev/shm";

/// Magic at the start of a live map file.
const MAGIC: [u8; 8] = *b"vhclive\0";
/// Version of the header below.
const VERSION: u32 = 1;
/// The header takes one page; the words follow it.
const HEADER_BYTES: usize = 4096;

/// Errors of the live map.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The runtime directory or the file in it could not be used.
    #[error("live region map {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file exists but is not ours to trust (owner, mode or type).
    #[error("live region map {path} is {why}; remove it or choose another --runtime-dir")]
    Untrusted {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// Who a live map belongs to: a file whose header says otherwise is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveIdentity {
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: [u8; 16],
    /// The clone's uuid.
    pub uuid: [u8; 16],
    /// Number of regions.
    pub nr_regions: u64,
    /// Region size in bytes.
    pub region_size: u64,
    /// Device and inode of the destination.
    pub dest: (u64, u64),
    /// Slots of the table of partly written regions (0 for a version 1 store,
    /// whose file is then the same as before the table existed).
    pub table_slots: u64,
}

impl LiveIdentity {
    /// The identity of a clone of `geo` with `uuid` on destination `dest` (device,
    /// inode), on this boot.
    pub fn current(
        uuid: [u8; 16],
        geo: &Geometry,
        table_slots: u64,
        dest: (u64, u64),
    ) -> io::Result<LiveIdentity> {
        Ok(LiveIdentity {
            boot_id: boot_id()?,
            uuid,
            nr_regions: geo.nr_regions(),
            region_size: geo.region_size(),
            dest,
            table_slots,
        })
    }

    fn encode(&self) -> [u8; 96] {
        let mut h = [0u8; 96];
        h[..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[16..32].copy_from_slice(&self.boot_id);
        h[32..48].copy_from_slice(&self.uuid);
        h[48..56].copy_from_slice(&self.nr_regions.to_le_bytes());
        h[56..64].copy_from_slice(&self.region_size.to_le_bytes());
        h[64..72].copy_from_slice(&self.dest.0.to_le_bytes());
        h[72..80].copy_from_slice(&self.dest.1.to_le_bytes());
        h[80..88].copy_from_slice(&self.table_slots.to_le_bytes());
        let crc = crc32c::crc32c(&h[..92]);
        h[92..96].copy_from_slice(&crc.to_le_bytes());
        h
    }
}

/// The kernel's boot id: changes at every boot.
pub fn boot_id() -> io::Result<[u8; 16]> {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    let u = uuid::Uuid::parse_str(s.trim())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(*u.as_bytes())
}

/// What [`LiveMap::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// No file: a fresh map (every bit clear).
    New,
    /// A file of this clone and this boot: its bits are kept.
    Kept,
    /// A file that does not belong to this clone on this boot: cleared.
    Replaced(String),
}

enum Backing {
    /// Process memory, shared between handles (tests model a surviving map by
    /// handing a second handle to the "restarted" store).
    Heap(Arc<[AtomicU64]>),
    /// A shared mapping of a file.
    File {
        base: NonNull<libc::c_void>,
        len: usize,
        path: PathBuf,
        _file: File,
    },
}

/// The region map's memory: `count` atomic 64-bit words, bit `r % 64` of word
/// `r / 64` for region `r`, then `2 * slots` words of the table of partly
/// written regions.
pub struct LiveMap {
    words: NonNull<AtomicU64>,
    count: usize,
    slots: usize,
    backing: Backing,
}

// SAFETY: the map is a slice of atomics, valid for the life of `backing` (an Arc
// of atomics, or a shared mapping unmapped only in Drop); every access goes
// through atomic operations, so sharing and sending it between threads is sound.
unsafe impl Send for LiveMap {}
// SAFETY: as above.
unsafe impl Sync for LiveMap {}

impl std::fmt::Debug for LiveMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("LiveMap");
        d.field("words", &self.count).field("slots", &self.slots);
        if let Backing::File { path, .. } = &self.backing {
            d.field("path", path);
        }
        d.finish()
    }
}

fn words_for(nr_regions: u64) -> usize {
    nr_regions.div_ceil(64) as usize
}

impl LiveMap {
    /// A map in process memory: it dies with the process (offline tools, tests,
    /// `--runtime-dir none`).
    pub fn anonymous(nr_regions: u64, table_slots: u64) -> LiveMap {
        let count = words_for(nr_regions);
        let words: Arc<[AtomicU64]> = (0..count + 2 * table_slots as usize)
            .map(|_| AtomicU64::new(0))
            .collect();
        Self::from_heap(words, count)
    }

    /// `words`: the bitmap's `count` words, then the table's.
    fn from_heap(words: Arc<[AtomicU64]>, count: usize) -> LiveMap {
        let count = count.min(words.len());
        let slots = (words.len() - count) / 2;
        // An empty slice still has a dangling, well-aligned, non-null pointer.
        let ptr = NonNull::new(words.as_ptr() as *mut AtomicU64).unwrap_or(NonNull::dangling());
        LiveMap {
            words: ptr,
            count,
            slots,
            backing: Backing::Heap(words),
        }
    }

    /// Another handle on the same memory, as a restarted process finds it: for
    /// maps in process memory only (the crash suite's "process death").
    pub fn survivor(&self) -> Option<LiveMap> {
        match &self.backing {
            Backing::Heap(w) => Some(Self::from_heap(w.clone(), self.count)),
            Backing::File { .. } => None,
        }
    }

    /// Opens (or creates) the live map of the clone `id` in `dir`: the file
    /// `vhost-clone-UUID-DEV-INO.live` (the destination's device and inode),
    /// mode 0600, locked exclusively while the map lives. A file left by a dead
    /// process of this clone on this boot keeps its bits; any other content is
    /// cleared.
    pub fn open(dir: &Path, id: &LiveIdentity) -> Result<(LiveMap, Found), LiveError> {
        // Named by clone and destination: a copy of a clone's metadata used with
        // another destination gets a map of its own.
        let path = dir.join(format!(
            "vhost-clone-{}-{:x}-{:x}.live",
            uuid::Uuid::from_bytes(id.uuid).hyphenated(),
            id.dest.0,
            id.dest.1
        ));
        let err = |source: io::Error| LiveError::Io {
            path: path.clone(),
            source,
        };
        let count = words_for(id.nr_regions);
        let slots = id.table_slots as usize;
        let len = HEADER_BYTES + (count + 2 * slots) * 8;
        let header = id.encode();
        let (mut file, created) = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => (f, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => (
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(err)?,
                false,
            ),
            Err(e) => return Err(err(e)),
        };
        // One owner: the map of a running daemon is never cleared under it.
        match lock_or_wait(&file, LockKind::Exclusive) {
            Ok(()) => {}
            Err(LockError::Held(holder)) => {
                return Err(LiveError::Untrusted {
                    path: path.clone(),
                    why: format!(
                        "in use by {}",
                        holder.unwrap_or_else(|| "another process".into())
                    ),
                })
            }
            Err(LockError::Io(e)) => return Err(err(e)),
        }
        let meta = file.metadata().map_err(err)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        let untrusted = |why: String| LiveError::Untrusted {
            path: path.clone(),
            why,
        };
        if !meta.file_type().is_file() {
            return Err(untrusted("not a regular file".into()));
        }
        if meta.uid() != euid {
            return Err(untrusted(format!(
                "owned by uid {} (this daemon runs as {euid})",
                meta.uid()
            )));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(untrusted(format!(
                "accessible to others (mode {:o})",
                meta.mode() & 0o777
            )));
        }
        let found = if created {
            Found::New
        } else {
            let mut old = [0u8; 96];
            // Read first, whatever the length: the log says what differs.
            let read = file.read_exact(&mut old).is_ok();
            let matches = read && meta.len() == len as u64 && old == header;
            if matches {
                Found::Kept
            } else {
                Found::Replaced(describe_mismatch(&old, id, meta.len(), len as u64))
            }
        };
        if found != Found::Kept {
            // Clear everything (a fresh map), then write the header.
            file.set_len(0).map_err(err)?;
            file.set_len(len as u64).map_err(err)?;
            file.write_all_at(&header, 0).map_err(err)?;
        }
        // Allocate every page now: a store into a hole of a full tmpfs would
        // raise SIGBUS inside set_hydrated; here it is an error at start-up.
        // (mode 0 only allocates: the file is already this long.)
        nix::fcntl::fallocate(
            &file,
            nix::fcntl::FallocateFlags::empty(),
            0,
            len as libc::off_t,
        )
        .map_err(|e| err(e.into()))?;
        // SAFETY: a new shared, read-write mapping of `len` bytes of an open file
        // of exactly that size; the kernel picks the address. Nothing else in
        // this process maps or truncates the file while the LiveMap lives.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::unix::io::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(err(io::Error::last_os_error()));
        }
        let base = NonNull::new(base).ok_or_else(|| err(io::ErrorKind::Other.into()))?;
        // SAFETY: the mapping is `len` bytes, page aligned; the words start at
        // HEADER_BYTES (a multiple of 8) and `count + 2 * slots` of them fit
        // before `len`.
        let words = unsafe { base.cast::<u8>().add(HEADER_BYTES).cast::<AtomicU64>() };
        Ok((
            LiveMap {
                words,
                count,
                slots,
                backing: Backing::File {
                    base,
                    len,
                    path,
                    _file: file,
                },
            },
            found,
        ))
    }

    /// The bitmap's words.
    pub fn words(&self) -> &[AtomicU64] {
        &self.all()[..self.count]
    }

    /// The table's words: slot `i` is words `2i` (region + 1, or 0 when free) and
    /// `2i + 1` (its written mask).
    pub fn table(&self) -> &[AtomicU64] {
        &self.all()[self.count..]
    }

    /// Slots of the table.
    pub fn table_slots(&self) -> u64 {
        self.slots as u64
    }

    fn all(&self) -> &[AtomicU64] {
        // SAFETY: `words` points to `count + 2 * slots` initialised AtomicU64 kept
        // alive by `backing` for the life of `self` (an Arc of atomics, or a
        // shared mapping of at least HEADER_BYTES + 8 * (count + 2 * slots) bytes
        // unmapped in Drop).
        unsafe { std::slice::from_raw_parts(self.words.as_ptr(), self.count + 2 * self.slots) }
    }

    /// The file behind the map, if any.
    pub fn path(&self) -> Option<&Path> {
        match &self.backing {
            Backing::File { path, .. } => Some(path),
            Backing::Heap(_) => None,
        }
    }

    /// Removes the file (after a clean stop, when every bit is committed). The
    /// mapping stays valid until the map is dropped.
    pub fn remove_file(&self) -> io::Result<()> {
        match &self.backing {
            Backing::File { path, .. } => std::fs::remove_file(path),
            Backing::Heap(_) => Ok(()),
        }
    }

    /// A snapshot of every word, the bitmap's then the table's (for tests and
    /// diagnostics).
    pub fn snapshot(&self) -> Vec<u64> {
        self.all()
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// A map in process memory holding a [`LiveMap::snapshot`] of a map of
    /// `nr_regions` (the crash suite rebuilds the map a dead process left).
    pub fn from_snapshot(words: &[u64], nr_regions: u64) -> LiveMap {
        Self::from_heap(
            words.iter().map(|&w| AtomicU64::new(w)).collect(),
            words_for(nr_regions),
        )
    }
}

impl Drop for LiveMap {
    fn drop(&mut self) {
        if let Backing::File { base, len, .. } = &self.backing {
            // SAFETY: `base`/`len` are exactly the mapping made in `open`, and no
            // reference into it outlives `self`.
            unsafe { libc::munmap(base.as_ptr(), *len) };
        }
    }
}

/// Why an existing file's header does not fit (for the log).
fn describe_mismatch(old: &[u8; 96], id: &LiveIdentity, have: u64, want: u64) -> String {
    if old[..8] != MAGIC {
        return "it is not a live region map".into();
    }
    if old[16..32] != id.boot_id {
        return "it was written before the last reboot".into();
    }
    if old[48..56] != id.nr_regions.to_le_bytes()[..]
        || old[56..64] != id.region_size.to_le_bytes()[..]
    {
        return "it describes another geometry".into();
    }
    if old[64..80] != [id.dest.0.to_le_bytes(), id.dest.1.to_le_bytes()].concat()[..] {
        return "it belongs to another destination file".into();
    }
    if old[80..88] != id.table_slots.to_le_bytes()[..] {
        return "it has another table of partly written regions".into();
    }
    if have != want {
        return format!("it has {have} bytes, expected {want}");
    }
    "its header is damaged".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(dest: (u64, u64)) -> LiveIdentity {
        let g = Geometry::new(130 * 4096, 4096).unwrap();
        LiveIdentity::current([7; 16], &g, 0, dest).unwrap()
    }

    #[test]
    fn a_file_of_the_same_clone_and_boot_keeps_its_bits() {
        let dir = tempfile::tempdir().unwrap();
        let (m, found) = LiveMap::open(dir.path(), &id((1, 2))).unwrap();
        assert_eq!(found, Found::New);
        assert_eq!(m.words().len(), 3);
        m.words()[2].fetch_or(1 << 1, Ordering::AcqRel);
        let path = m.path().unwrap().to_path_buf();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(m);
        let (m, found) = LiveMap::open(dir.path(), &id((1, 2))).unwrap();
        assert_eq!(found, Found::Kept);
        assert_eq!(m.snapshot(), vec![0, 0, 2]);
        // Another destination (a copy of the metadata): a map of its own.
        drop(m);
        let (m, found) = LiveMap::open(dir.path(), &id((1, 3))).unwrap();
        assert_eq!(found, Found::New);
        assert_eq!(m.snapshot(), vec![0, 0, 0]);
    }

    #[test]
    fn the_table_follows_the_bitmap_and_its_size_is_part_of_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let mut with_table = id((1, 2));
        with_table.table_slots = 3;
        let (m, _) = LiveMap::open(dir.path(), &with_table).unwrap();
        assert_eq!((m.words().len(), m.table().len()), (3, 6));
        m.table()[5].store(0xf0, Ordering::Release);
        m.words()[0].store(1, Ordering::Release);
        drop(m);
        let (m, found) = LiveMap::open(dir.path(), &with_table).unwrap();
        assert_eq!(found, Found::Kept);
        assert_eq!(m.snapshot(), vec![1, 0, 0, 0, 0, 0, 0, 0, 0xf0]);
        drop(m);
        // A version 1 store's map has no table: another identity.
        let (m, found) = LiveMap::open(dir.path(), &id((1, 2))).unwrap();
        assert!(
            matches!(found, Found::Replaced(ref w) if w.contains("table")),
            "{found:?}"
        );
        assert_eq!(m.snapshot(), vec![0, 0, 0]);
    }

    #[test]
    fn another_boot_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut other = id((1, 2));
        other.boot_id[0] ^= 0xff;
        let (m, _) = LiveMap::open(dir.path(), &other).unwrap();
        m.words()[0].fetch_or(1, Ordering::AcqRel);
        drop(m);
        let (m, found) = LiveMap::open(dir.path(), &id((1, 2))).unwrap();
        assert!(
            matches!(found, Found::Replaced(ref w) if w.contains("reboot")),
            "{found:?}"
        );
        assert_eq!(m.snapshot(), vec![0, 0, 0]);
    }

    #[test]
    fn files_others_can_write_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (m, _) = LiveMap::open(dir.path(), &id((1, 2))).unwrap();
        let path = m.path().unwrap().to_path_buf();
        drop(m);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = LiveMap::open(dir.path(), &id((1, 2))).unwrap_err();
        assert!(e.to_string().contains("accessible to others"), "{e}");
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &path).unwrap();
        assert!(LiveMap::open(dir.path(), &id((1, 2))).is_err());
    }

    #[test]
    fn a_map_in_use_is_refused_not_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let (m, _) = LiveMap::open(dir.path(), &id((1, 2))).unwrap();
        m.words()[0].fetch_or(1, Ordering::AcqRel);
        let e = LiveMap::open(dir.path(), &id((1, 2))).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        assert_eq!(m.snapshot(), vec![1, 0, 0]);
    }

    #[test]
    fn survivors_share_memory() {
        let m = LiveMap::anonymous(100, 1);
        let s = m.survivor().unwrap();
        m.words()[1].fetch_or(4, Ordering::AcqRel);
        m.table()[1].store(9, Ordering::Release);
        drop(m);
        assert_eq!(s.snapshot(), vec![0, 4, 0, 9]);
        assert_eq!(s.words().len(), 2);
        assert_eq!(s.table().len(), 2);
    }
}
