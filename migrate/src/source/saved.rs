//! Sessions saved for a later source (`--listen --ram-dir DIR`), as a VMM keeps guest RAM in
//! a file (QEMU's `memory-backend-file,share=on` on `/dev/shm`) so that it outlives the
//! process.
//!
//! With a RAM directory, each session's guest RAM is a shared mapping of `DIR/TOKEN.ram`
//! (the two RAM blocks one after the other). At the switch-over the guest stops at the
//! source for good, so from then on that file *is* the source's half of the VM; the session
//! writes `DIR/TOKEN.session` beside it (the hello, which says everything the source needs
//! to serve the rest, the token and the boot id; written to a temporary name and renamed).
//! Both files are removed when the session ends, except when it ends because its destination
//! did not come back in time (or the process is killed): then a later resume with that token,
//! to this source or to a new one started on the same directory, takes the session over from
//! the files (`NewSession::Takeover`): the received bitmap rebuilds the scheduler ("dirty =
//! not received") and postcopy goes on, with a new token (the new source session's counters
//! start there).
//!
//! A tmpfs (`/dev/shm`) survives the process, not the host; on a disk the page cache holds
//! the RAM and the file is written back as the kernel sees fit.

use std::path::{Path, PathBuf};

use crate::wire::Hello;

/// The state file's magic.
const MAGIC: &[u8; 8] = b"PHSAVE01";

/// A saved session: its token, what its destination asked for, and its files.
#[derive(Debug)]
pub struct Saved {
    /// The token its destination resumes it with.
    pub token: u64,
    /// The session's hello (the guest, the mode, the link, the hooks).
    pub hello: Hello,
    /// Guest RAM as it was at the switch-over.
    pub ram: PathBuf,
    /// This file.
    pub state: PathBuf,
}

/// The RAM file and the state file of session `token` in `dir`.
pub fn paths(dir: &Path, token: u64) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{token:016x}.ram")),
        dir.join(format!("{token:016x}.session")),
    )
}

impl Saved {
    /// Writes the state file of session `token` (RAM already in its file) in `dir`.
    pub fn write(dir: &Path, token: u64, hello: &Hello) -> Result<Self, String> {
        let (ram, state) = paths(dir, token);
        let mut b = Vec::with_capacity(16 + Hello::LEN);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&token.to_le_bytes());
        b.extend_from_slice(&hello.encode());
        let tmp = state.with_extension("session.tmp");
        std::fs::write(&tmp, &b)
            .and_then(|_| std::fs::rename(&tmp, &state))
            .map_err(|e| format!("saving the session in {}: {e}", state.display()))?;
        Ok(Self {
            token,
            hello: hello.clone(),
            ram,
            state,
        })
    }

    /// Reads a state file.
    fn read(state: &Path) -> Result<Self, String> {
        let b = std::fs::read(state).map_err(|e| e.to_string())?;
        if b.len() != 16 + Hello::LEN || &b[..8] != MAGIC {
            return Err("not a saved session of this version".into());
        }
        let token = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        let hello =
            Hello::decode(b[16..].try_into().expect("a hello")).map_err(|e| e.to_string())?;
        let (ram, expected) = paths(state.parent().unwrap_or(Path::new(".")), token);
        if expected.file_name() != state.file_name() {
            return Err(format!("its token {token:016x} is not its name"));
        }
        let len = std::fs::metadata(&ram)
            .map_err(|e| format!("its RAM file {}: {e}", ram.display()))?
            .len();
        if len != hello.guest.layout.mem() {
            return Err(format!(
                "its RAM file holds {len} bytes, the guest has {}",
                hello.guest.layout.mem()
            ));
        }
        Ok(Self {
            token,
            hello,
            ram,
            state: state.to_path_buf(),
        })
    }

    /// The sessions saved in `dir`, and a line for each file that is not one.
    pub fn scan(dir: &Path) -> Result<(Vec<Self>, Vec<String>), String> {
        let mut found = Vec::new();
        let mut bad = Vec::new();
        let entries =
            std::fs::read_dir(dir).map_err(|e| format!("--ram-dir {}: {e}", dir.display()))?;
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "session") {
                match Self::read(&p) {
                    Ok(s) => found.push(s),
                    Err(why) => bad.push(format!("{}: {why}", p.display())),
                }
            }
        }
        found.sort_by_key(|s| s.token);
        Ok((found, bad))
    }

    /// Removes both files (the session is over).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.state);
        let _ = std::fs::remove_file(&self.ram);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::layout::HostPageSize;
    use crate::options::{GuestKind, GuestSpec, MigrationMode, RunConfig, Workload};

    #[test]
    fn a_saved_session_reads_back_and_a_damaged_one_says_why() {
        let dir = std::env::temp_dir().join(format!("saved-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = RunConfig::new(
            GuestSpec::new(GuestKind::Thread, 16 << 20, HostPageSize::Small, 1).unwrap(),
        );
        let h = Hello::new(&cfg, MigrationMode::PreemptHint, Workload::Kv);
        let (ram, _) = paths(&dir, 0xabc);
        std::fs::File::create(&ram)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        Saved::write(&dir, 0xabc, &h).unwrap();
        std::fs::write(dir.join("0000000000000001.session"), b"junk").unwrap();
        let (found, bad) = Saved::scan(&dir).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].token, &found[0].hello), (0xabc, &h));
        assert_eq!(bad.len(), 1);
        assert!(bad[0].contains("not a saved session"), "{bad:?}");
        std::fs::File::create(&ram).unwrap().set_len(4096).unwrap();
        let (found, bad) = Saved::scan(&dir).unwrap();
        assert!(found.is_empty());
        assert!(
            bad.iter().any(|b| b.contains("holds 4096 bytes")),
            "{bad:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
