//! A test's scratch folder, shared by both crates' tests: removed when the test passes, kept
//! (and its path printed) when it fails, so a failure can be looked at and a passing run
//! leaves nothing behind. Snapshots of hundreds of MiB add up over runs on a shared disk.

// Each test binary uses the part it needs.
#![allow(dead_code)]

use std::ops::Deref;
use std::path::{Path, PathBuf};

/// A folder `<base>/<prefix>-<pid>-<name>`, emptied on creation.
pub struct Scratch(PathBuf);

impl Scratch {
    /// Under the system's temporary directory (`TMPDIR`).
    pub fn new(prefix: &str, name: &str) -> Self {
        Self::under(&std::env::temp_dir(), prefix, name)
    }

    /// For files of about `bytes` in all: under `/dev/shm` (memory, not disk) where it is a
    /// writable folder with twice that free, else under the temporary directory. A test that
    /// writes a guest's memory file should not fail because a shared disk is nearly full.
    pub fn for_bytes(prefix: &str, name: &str, bytes: u64) -> Self {
        let shm = Path::new("/dev/shm");
        match rustix::fs::statvfs(shm) {
            Ok(s) if s.f_bavail.saturating_mul(s.f_frsize) >= 2 * bytes => {
                Self::under(shm, prefix, name)
            }
            _ => Self::new(prefix, name),
        }
    }

    fn under(base: &Path, prefix: &str, name: &str) -> Self {
        let d = base.join(format!("{prefix}-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
        Self(d)
    }
}

impl Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for a look: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
