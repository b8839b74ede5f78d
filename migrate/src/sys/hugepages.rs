//! Reserving 2 MiB hugetlb pages for `--host-page 2M`, and giving them back.
//!
//! [`HugePages::reserve`] raises `/proc/sys/vm/nr_hugepages` by what is missing from the free
//! pool, checks the kernel could find them, and restores the old value when dropped. A pool
//! that is already big enough is left alone. Failures are clear errors (not root, not enough
//! contiguous memory), never a `SIGBUS` later.

use std::fs;

const NR: &str = "/proc/sys/vm/nr_hugepages";

/// A reservation of huge pages; dropping it gives them back.
#[derive(Debug)]
pub struct HugePages {
    original: u64,
    raised: bool,
    /// Pages the harness asked for.
    pub pages: u64,
}

fn free_pages() -> Result<u64, String> {
    let info =
        fs::read_to_string("/proc/meminfo").map_err(|e| format!("reading /proc/meminfo: {e}"))?;
    info.lines()
        .find(|l| l.starts_with("HugePages_Free:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no HugePages_Free in /proc/meminfo".into())
}

fn read_nr() -> Result<u64, String> {
    fs::read_to_string(NR)
        .map_err(|e| format!("reading {NR}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("{NR}: {e}"))
}

fn write_nr(n: u64) -> Result<(), String> {
    fs::write(NR, n.to_string()).map_err(|e| {
        format!("writing {NR}: {e} (reserving huge pages needs root; or reserve them beforehand)")
    })
}

impl HugePages {
    /// Makes sure `pages` 2 MiB pages are free, raising the pool if needed.
    pub fn reserve(pages: u64) -> Result<Self, String> {
        let original = read_nr()?;
        let free = free_pages()?;
        if free >= pages {
            return Ok(Self {
                original,
                raised: false,
                pages,
            });
        }
        write_nr(original + (pages - free))?;
        let got = free_pages()?;
        if got < pages {
            let _ = write_nr(original);
            return Err(format!(
                "asked the kernel for {pages} free 2 MiB huge pages, it found {got} \
                 (not enough contiguous free memory; try a smaller --mem)"
            ));
        }
        Ok(Self {
            original,
            raised: true,
            pages,
        })
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if self.raised {
            let _ = write_nr(self.original);
        }
    }
}
