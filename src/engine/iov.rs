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

/// The part of the next buffer (`bl` bytes long) that `[start, start + len)`
/// covers, if any; moves the range past that buffer.
fn piece(bl: usize, start: &mut usize, len: &mut usize) -> Option<std::ops::Range<usize>> {
    if *start >= bl {
        *start -= bl;
        return None;
    }
    let take = (bl - *start).min(*len);
    let r = *start..*start + take;
    *start = 0;
    *len -= take;
    Some(r)
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
        if let Some(r) = piece(b.len(), &mut start, &mut len) {
            out.push(IoSliceMut::new(&mut b[r]));
        }
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
        if let Some(r) = piece(b.len(), &mut start, &mut len) {
            out.push(IoSlice::new(&b[r]));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sub-range of a list of buffers (an empty one among them) is the same
    /// bytes as the sub-range of their concatenation, for both list kinds.
    #[test]
    fn sub_lists_are_the_sub_ranges_of_the_concatenation() {
        let flat: Vec<u8> = (0..10).collect();
        let lens = [3usize, 0, 5, 2];
        for start in 0..=10 {
            for len in 0..=10 - start {
                let mut parts: Vec<Vec<u8>> = Vec::new();
                let mut at = 0;
                for l in lens {
                    parts.push(flat[at..at + l].to_vec());
                    at += l;
                }
                let want = &flat[start..start + len];
                let g: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
                let got: Vec<u8> = sub_iov(&g, start, len)
                    .iter()
                    .flat_map(|s| s.to_vec())
                    .collect();
                assert_eq!(got, want, "gather {start}+{len}");
                let mut dst = vec![0u8; len];
                copy_from_iov(&g, start, &mut dst);
                assert_eq!(dst, want, "copy {start}+{len}");
                let mut m: Vec<IoSliceMut<'_>> =
                    parts.iter_mut().map(|p| IoSliceMut::new(p)).collect();
                let got: Vec<u8> = sub_iov_mut(&mut m, start, len)
                    .iter()
                    .flat_map(|s| s.to_vec())
                    .collect();
                assert_eq!(got, want, "scatter {start}+{len}");
            }
        }
    }
}
