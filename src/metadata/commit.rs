//! The commit: the one place that writes the order of the module docs
//! ([`Metadata::commit`]), in steps: pre-commit ([`Metadata::pre_commit`]), the
//! destination flush, the changed blocks and their images, the journal record,
//! the new superblock, and the in-place checkpoint ([`Metadata::write_txn`]);
//! and what a failed step leaves ([`Metadata::abort_commit`]).
//!
//! Invariant: no metadata write happens before the destination flush of the
//! same commit returned (rule 1), and the superblock that makes a commit
//! current is written only after its journal record is durable. The table
//! blocks a commit writes are the table as it was at pre-commit, never a later
//! state: a mask bit set after pre-commit may cover data this commit's
//! destination flush does not.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::format::{
    encode_block, Superblock, BLOCK_SIZE, FLAG_HYDRATED, FLAG_WCE_SET, FLAG_WRITEBACK, KIND_BITMAP,
    KIND_JOURNAL, KIND_TABLE, WORDS_PER_BLOCK,
};
use super::{load, lock, CommitOutcome, DiskState, Metadata, MetadataError, Mode, Result, Txn};
use crate::storage::{BlockDevice, StorageError};

impl Metadata {
    /// Pre-commit: swaps out the current transaction's changes, and takes the
    /// images of the table blocks it changed (and of those whose in-place copy
    /// failed earlier) as the table is now, under the transaction lock that every
    /// change of the table holds.
    fn pre_commit(&self, disk: &mut DiskState) -> Txn {
        let mut t = lock(&self.txn);
        let fresh = std::mem::take(&mut disk.spare);
        let dirty = std::mem::replace(&mut t.dirty, fresh);
        let blocks = t.table_dirty.len();
        let table_dirty = std::mem::replace(
            &mut t.table_dirty,
            bitvec::vec::BitVec::repeat(false, blocks),
        );
        let bitmap_blocks = self.layout.bitmap_blocks;
        let mut table_images = Vec::new();
        let live = self.live.table();
        for b in 0..blocks as u64 {
            let index = bitmap_blocks + b;
            if table_dirty[b as usize] || disk.unsynced.contains(&index) {
                let a = (b as usize * WORDS_PER_BLOCK).min(live.len());
                let e = (a + WORDS_PER_BLOCK).min(live.len());
                let words = live[a..e]
                    .iter()
                    .map(|w| w.load(Ordering::Acquire))
                    .collect();
                table_images.push((index, words));
            }
        }
        Txn {
            dirty,
            count: std::mem::take(&mut t.count),
            wce: t.wce.take(),
            table_dirty,
            table_images,
        }
    }

    /// The two-phase commit. `dest` is the destination device; it is flushed
    /// before anything is written to metadata (rule 1, whatever `flush_dest`
    /// says). With `flush_dest`, it is flushed even when there is nothing to
    /// record: the engine decided that a guest flush needs it
    /// ([`crate::engine::Engine::commit`] is the one place that decides).
    pub fn commit(&self, dest: &dyn BlockDevice, flush_dest: bool) -> Result<CommitOutcome> {
        let mut disk = lock(&self.disk);
        match self.mode() {
            Mode::Rw => {}
            Mode::Ro => return Err(MetadataError::ReadOnly),
            Mode::Fail => return Err(MetadataError::Failed),
        }
        let started = Instant::now();
        let mut txn = self.pre_commit(&mut disk);
        if txn.count == 0 && txn.wce.is_none() && txn.table_images.is_empty() {
            disk.spare = txn.dirty;
            if flush_dest {
                if let Err(e) = dest.flush() {
                    self.abort_commit(&mut disk, "destination flush", None);
                    return Err(e.into());
                }
            }
            return Ok(CommitOutcome::Nothing);
        }
        let result = self.write_txn(&mut disk, dest, &txn);
        if let Err((step, _)) = &result {
            self.abort_commit(&mut disk, step, Some(&txn));
        }
        // Recycle the dirty set as the next spare (clearing only non-zero words).
        for w in txn.dirty.as_raw_mut_slice() {
            if *w != 0 {
                *w = 0;
            }
        }
        disk.spare = txn.dirty;
        let outcome = result.map_err(|(_, e)| e)?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.last_commit_us
            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(outcome)
    }

    /// Steps 2 to 5 of the commit order; on error, the step that failed.
    fn write_txn(
        &self,
        disk: &mut DiskState,
        dest: &dyn BlockDevice,
        txn: &Txn,
    ) -> std::result::Result<CommitOutcome, (&'static str, MetadataError)> {
        let io = |step: &'static str| move |e: StorageError| (step, MetadataError::from(e));
        // Step 2 (rule 1): the data of every region in this transaction is
        // durable before any metadata claims it.
        if !self.mutated_to_skip_dest_flush() {
            dest.flush().map_err(io("destination flush"))?;
        }
        let mut blocks = changed_blocks(disk, txn, self.layout.bitmap_blocks);
        let mut images: Vec<Vec<u64>> = blocks.iter().map(|&i| merged(disk, txn, i)).collect();
        for (index, words) in &txn.table_images {
            blocks.push(*index);
            images.push(words.clone());
        }
        let seq = disk.sb.seq + 1;
        // Step 3: the journal record, durable (which also makes the previous
        // commit's in-place writes durable).
        self.write_journal(seq, &blocks, &images)
            .map_err(io("journal write"))?;
        self.dev.flush().map_err(io("metadata flush"))?;
        // Step 4: the superblock (one sector: atomic); once durable, committed.
        let sb = next_superblock(
            &disk.sb,
            txn,
            seq,
            blocks.len() as u64,
            self.geo.nr_regions(),
        );
        self.dev
            .write_at(&sb.encode(), (seq % 2) * BLOCK_SIZE)
            .map_err(io("superblock write"))?;
        self.dev.flush().map_err(io("metadata flush"))?;
        if sb.flags & FLAG_HYDRATED != 0 && disk.sb.flags & FLAG_HYDRATED == 0 {
            tracing::info!("every region is hydrated; the source is no longer needed");
        }
        disk.sb = sb;
        {
            let raw = disk.committed.as_raw_mut_slice();
            for (&index, words) in blocks.iter().zip(&images) {
                if index >= self.layout.bitmap_blocks {
                    // A table block: the live table is newer, nothing to keep.
                    continue;
                }
                let a = index as usize * WORDS_PER_BLOCK;
                raw[a..a + words.len()].copy_from_slice(words);
            }
        }
        // Step 5.
        self.checkpoint_in_place(disk, seq, &blocks, &images);
        Ok(CommitOutcome::Committed {
            seq,
            regions: txn.count,
            blocks: blocks.len() as u64,
        })
    }

    /// Step 3: the images of `blocks` into the journal slot of commit `seq`.
    fn write_journal(
        &self,
        seq: u64,
        blocks: &[u64],
        images: &[Vec<u64>],
    ) -> std::result::Result<(), StorageError> {
        for (n, (&index, words)) in blocks.iter().zip(images).enumerate() {
            let b = encode_block(KIND_JOURNAL, index, seq, &self.uuid, words);
            self.dev
                .write_at(&b, self.layout.journal_offset(seq % 2, n as u64))?;
        }
        Ok(())
    }

    /// Step 5: the same blocks in place, made durable by the next commit's
    /// journal flush. A failed in-place write does not undo the commit, which is
    /// durable: the journal record covers the block until the next commit
    /// journals it again (`unsynced`).
    fn checkpoint_in_place(
        &self,
        disk: &mut DiskState,
        seq: u64,
        blocks: &[u64],
        images: &[Vec<u64>],
    ) {
        disk.unsynced.clear();
        for (&index, words) in blocks.iter().zip(images) {
            let kind = if index < self.layout.bitmap_blocks {
                KIND_BITMAP
            } else {
                KIND_TABLE
            };
            let enc = encode_block(kind, index, seq, &self.uuid, words);
            if let Err(e) = self.dev.write_at(&enc, self.layout.bitmap_offset(index)) {
                tracing::warn!(
                    block = index,
                    error = %crate::error_chain(&e),
                    "in-place bitmap write failed after a durable commit; the journal covers it until the next commit"
                );
                disk.unsynced.push(index);
            }
        }
    }

    /// A commit step failed: abort the transaction, reload the last committed
    /// state from disk, and go read-only (or fail, if the reload fails too).
    ///
    /// No bit set in core is dropped. The aborted transaction's bits (`aborted`)
    /// and those set while it ran were set after their data writes completed,
    /// and the guest may have seen those writes completed: dropping the bits
    /// would serve the source's data over them, and the live map (the same
    /// memory) would forget them, so a restart could not adopt them either
    /// (design rule 7). They go back into the current transaction, which read-only
    /// mode never commits; a restart adopts them after flushing the destination
    /// (rule 1). The mode switches under the transaction lock, so no bit is set
    /// after it.
    fn abort_commit(&self, disk: &mut DiskState, step: &str, aborted: Option<&Txn>) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(step, "metadata commit failed; aborting the transaction");
        let mut t = lock(&self.txn);
        self.set_mode(Mode::Ro);
        if let Some(a) = aborted {
            for (d, x) in t
                .dirty
                .as_raw_mut_slice()
                .iter_mut()
                .zip(a.dirty.as_raw_slice())
            {
                *d |= *x;
            }
            t.count += a.count;
            if t.wce.is_none() {
                t.wce = a.wce;
            }
            let table_dirty = t.table_dirty.clone() | a.table_dirty.clone();
            t.table_dirty = table_dirty;
        }
        match load(self.dev.as_ref(), Some(&self.geo)) {
            Ok(loaded) if loaded.superblock.uuid == self.uuid => {
                disk.sb = loaded.superblock;
                disk.committed = loaded.bits;
                disk.unsynced.clear();
            }
            Ok(_) => {
                tracing::error!("reloaded metadata has another uuid");
                self.set_mode(Mode::Fail);
            }
            Err(e) => {
                tracing::error!(error = %e, "reloading the committed metadata failed");
                self.set_mode(Mode::Fail);
            }
        }
    }
}

/// The bitmap blocks a commit writes: those with a dirty word (so a commit costs
/// O(changed blocks) plus a word scan), and those whose in-place copy failed
/// after an earlier commit (only the journal covers them, and this commit's
/// journal replaces that one). Table blocks are the pre-commit's
/// (`Txn::table_images`).
fn changed_blocks(disk: &DiskState, txn: &Txn, bitmap_blocks: u64) -> Vec<u64> {
    let mut blocks: Vec<u64> = Vec::new();
    for (wi, w) in txn.dirty.as_raw_slice().iter().enumerate() {
        let b = (wi / WORDS_PER_BLOCK) as u64;
        if *w != 0 && blocks.last() != Some(&b) {
            blocks.push(b);
        }
    }
    if !disk.unsynced.is_empty() {
        blocks.extend(disk.unsynced.iter().filter(|&&i| i < bitmap_blocks));
        blocks.sort_unstable();
        blocks.dedup();
    }
    blocks
}

/// The new image of bitmap block `index`: committed bits | this transaction's.
fn merged(disk: &DiskState, txn: &Txn, index: u64) -> Vec<u64> {
    let (committed, dirty) = (disk.committed.as_raw_slice(), txn.dirty.as_raw_slice());
    let a = (index as usize * WORDS_PER_BLOCK).min(committed.len());
    let b = (a + WORDS_PER_BLOCK).min(committed.len());
    committed[a..b]
        .iter()
        .zip(&dirty[a..b])
        .map(|(c, d)| c | d)
        .collect()
}

/// Step 4's superblock: commit `seq` with `journal_count` journal blocks. Dirty
/// bits are exactly the bits newly set since the last commit, so the hydrated
/// count grows by the transaction's count.
fn next_superblock(
    sb: &Superblock,
    txn: &Txn,
    seq: u64,
    journal_count: u64,
    nr_regions: u64,
) -> Superblock {
    let hydrated = sb.hydrated + txn.count;
    let mut flags = sb.flags & !FLAG_HYDRATED;
    if hydrated == nr_regions {
        flags |= FLAG_HYDRATED;
    }
    if let Some(wb) = txn.wce {
        flags |= FLAG_WCE_SET;
        if wb {
            flags |= FLAG_WRITEBACK;
        } else {
            flags &= !FLAG_WRITEBACK;
        }
    }
    Superblock {
        flags,
        seq,
        journal_count,
        hydrated,
        ..sb.clone()
    }
}
