//! Scatter-gather helpers of the engine: sub-ranges of a request's buffer
//! lists, and a per-thread scratch buffer for region copies.
use std::io::{IoSlice, IoSliceMut};

/// Runs `f` on a per-thread scratch buffer of `len` bytes whose contents are
/// unspecified. Buffers up to 1 MiB are kept and reused, so that a partial write
/// to an unhydrated region does not allocate (and zero) a region buffer each time.
pub(super) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    const KEEP: usize = 1 << 20;
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    if len > KEEP {
        return f(&mut vec![0u8; len]);
    }
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0);
            }
            f(&mut v[..len])
        }
        // Not re-entered today; stay correct if it ever is.
        Err(_) => f(&mut vec![0u8; len]),
    })
}

/// The byte range `[start, start + len)` of a scatter list, as a new list.
pub(super) fn sub_iov_mut<'b>(
    bufs: &'b mut [IoSliceMut<'_>],
    mut start: usize,
    mut len: usize,
) -> Vec<IoSliceMut<'b>> {
    let mut out = Vec::new();
    for b in bufs.iter_mut() {
        if len == 0 {
            break;
        }
        let bl = b.len();
        if start >= bl {
            start -= bl;
            continue;
        }
        let take = (bl - start).min(len);
        out.push(IoSliceMut::new(&mut b[start..start + take]));
        start = 0;
        len -= take;
    }
    out
}

/// The byte range `[start, start + len)` of a gather list, as a new list.
pub(super) fn sub_iov<'b>(
    bufs: &'b [IoSlice<'_>],
    mut start: usize,
    mut len: usize,
) -> Vec<IoSlice<'b>> {
    let mut out = Vec::new();
    for b in bufs {
        if len == 0 {
            break;
        }
        let bl = b.len();
        if start >= bl {
            start -= bl;
            continue;
        }
        let take = (bl - start).min(len);
        out.push(IoSlice::new(&b[start..start + take]));
        start = 0;
        len -= take;
    }
    out
}

/// Copies `dst.len()` bytes starting at byte `start` of a gather list into `dst`.
pub(super) fn copy_from_iov(bufs: &[IoSlice<'_>], start: usize, dst: &mut [u8]) {
    let mut done = 0;
    for s in sub_iov(bufs, start, dst.len()) {
        dst[done..done + s.len()].copy_from_slice(&s);
        done += s.len();
    }
}
