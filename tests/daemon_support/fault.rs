//! Faults on the daemon's state directory that need no privileges and hold for root too
//! (root ignores file modes, so `chmod` proves nothing in CI): the directory swapped for a
//! regular file (every write under it fails with ENOTDIR), and a directory where
//! `state.json`'s temporary file goes (its creation fails with EISDIR). Both are undone
//! by `restore`/`unblock`, or on drop so a failing test leaves nothing behind.

use std::path::{Path, PathBuf};

/// The state directory moved aside and a regular file put in its place.
pub struct StateDirSwapped {
    dir: PathBuf,
    parked: PathBuf,
}

impl StateDirSwapped {
    pub fn swap(dir: &Path) -> StateDirSwapped {
        let mut parked = dir.as_os_str().to_owned();
        parked.push(".parked");
        let parked = PathBuf::from(parked);
        std::fs::rename(dir, &parked).expect("state dir moved aside");
        std::fs::write(dir, b"not a directory (fault)\n").expect("file in its place");
        StateDirSwapped {
            dir: dir.to_owned(),
            parked,
        }
    }

    /// Where `state.json` is while the directory is swapped out.
    pub fn parked_state_file(&self) -> PathBuf {
        self.parked.join("state.json")
    }

    /// Undoes the swap (as dropping does).
    pub fn restore(self) {}
}

impl Drop for StateDirSwapped {
    fn drop(&mut self) {
        let put_back =
            std::fs::remove_file(&self.dir).and_then(|()| std::fs::rename(&self.parked, &self.dir));
        if let Err(e) = put_back {
            assert!(std::thread::panicking(), "state dir not put back: {e}");
        }
    }
}

/// A directory where the atomic write of `state.json` creates its temporary file.
pub struct TempPathBlocked {
    path: PathBuf,
}

impl TempPathBlocked {
    pub fn block(state_file: &Path) -> TempPathBlocked {
        let path = edgetwin::store::temp_path(state_file).expect("a file path");
        std::fs::create_dir(&path).expect("obstacle created");
        TempPathBlocked { path }
    }

    /// Removes the obstacle (as dropping does).
    pub fn unblock(self) {}
}

impl Drop for TempPathBlocked {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.path) {
            assert!(std::thread::panicking(), "obstacle not removed: {e}");
        }
    }
}
