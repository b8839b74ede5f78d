//! Zero-initialised storage for bitmap words.
//!
//! Big guests have big bitmaps (16 TiB of 4 KiB pages: 512 MiB of words), so large storage is
//! an anonymous private mapping: the kernel hands out zero pages lazily and nothing is touched
//! or zeroed up front. Small storage, and every build whose atomics are not plain `u64`s
//! (loom, shuttle) or that cannot map memory (Miri), uses a boxed slice.

use std::io;
use std::ptr::NonNull;

use memmap2::{MmapMut, MmapOptions};

use crate::sync::{AtomicU64, PLAIN_ATOMICS};

/// Storage this large or larger is mapped rather than allocated.
const MAP_THRESHOLD_BYTES: usize = 1 << 16;

/// A fixed-length, zero-initialised slice of atomic words.
pub(crate) struct Words {
    repr: Repr,
}

enum Repr {
    Boxed(Box<[AtomicU64]>),
    Mapped {
        ptr: NonNull<AtomicU64>,
        len: usize,
        // Owns the mapping `ptr` points into; dropped (unmapped) with `Words`.
        _map: MmapMut,
    },
}

// SAFETY: the mapped words are only ever accessed as `AtomicU64`s through `&self`, exactly as a
// `Box<[AtomicU64]>` would be, and the mapping lives as long as `Words`.
unsafe impl Send for Repr {}
// SAFETY: as above: shared access goes through atomics only.
unsafe impl Sync for Repr {}

impl Words {
    /// `len` zeroed words.
    pub(crate) fn zeroed(len: usize) -> io::Result<Self> {
        let bytes = len.checked_mul(8).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                "bitmap size overflows the address space",
            )
        })?;
        if PLAIN_ATOMICS && bytes >= MAP_THRESHOLD_BYTES {
            let mut map = MmapOptions::new().len(bytes).map_anon()?;
            // Mappings are page aligned, so the cast is aligned for `AtomicU64`; the pointer is
            // taken from `&mut` so writes through it are permitted.
            let ptr = NonNull::new(map.as_mut_ptr().cast::<AtomicU64>())
                .ok_or_else(|| io::Error::other("anonymous mapping returned null"))?;
            return Ok(Self {
                repr: Repr::Mapped {
                    ptr,
                    len,
                    _map: map,
                },
            });
        }
        Ok(Self {
            repr: Repr::Boxed((0..len).map(|_| AtomicU64::new(0)).collect()),
        })
    }

    /// The words.
    #[inline]
    pub(crate) fn get(&self) -> &[AtomicU64] {
        match &self.repr {
            Repr::Boxed(b) => b,
            // SAFETY: `ptr` points to `len` zero-initialised, 8-aligned words owned by `_map`,
            // which outlives the borrow of `self`; an all-zero `AtomicU64` is a valid value and
            // `AtomicU64` has the size and alignment of `u64` in the builds that map storage.
            Repr::Mapped { ptr, len, .. } => unsafe {
                std::slice::from_raw_parts(ptr.as_ptr(), *len)
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::Ordering;

    #[test]
    fn small_and_large_storage_start_zeroed_and_hold_writes() {
        for len in [0usize, 3, 1 << 14] {
            let w = Words::zeroed(len).unwrap();
            assert_eq!(w.get().len(), len);
            assert!(w.get().iter().all(|x| x.load(Ordering::Relaxed) == 0));
            if let Some(last) = w.get().last() {
                last.store(7, Ordering::Relaxed);
                assert_eq!(last.load(Ordering::Relaxed), 7);
            }
        }
    }
}
