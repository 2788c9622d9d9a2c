//! Disk trouble for the fault suite: the daemon's state directory on a small tmpfs that
//! can be remounted read-only or filled up (needs root, as in CI); without root, a
//! `chmod 0555` of the directory stands in for read-only and "full" is not tried.
#![allow(dead_code)]

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How the state directory can be made to fail.
pub enum Disk {
    /// A tmpfs mounted on the directory; unmounted on drop.
    Tmpfs { path: PathBuf },
    /// Permissions only (not root): read-only by `chmod`.
    Chmod { path: PathBuf },
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn run(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .status()
        .is_ok_and(|s| s.success())
}

impl Disk {
    /// Puts a `size_kib` tmpfs on `path` (empty directory) when root, else falls back to
    /// permissions; `None` when neither can fail the disk (root without mount rights).
    pub fn prepare(path: &Path, size_kib: u32) -> Option<Disk> {
        let p = path.to_str().expect("utf-8 path");
        if is_root() {
            let size = format!("size={size_kib}k,mode=0700");
            if run(&["mount", "-t", "tmpfs", "-o", &size, "tmpfs", p]) {
                return Some(Disk::Tmpfs {
                    path: path.to_owned(),
                });
            }
            return None;
        }
        Some(Disk::Chmod {
            path: path.to_owned(),
        })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Disk::Tmpfs { .. } => "tmpfs",
            Disk::Chmod { .. } => "chmod",
        }
    }

    pub fn can_fill(&self) -> bool {
        matches!(self, Disk::Tmpfs { .. })
    }

    pub fn read_only(&self, ro: bool) {
        match self {
            Disk::Tmpfs { path } => {
                let opt = if ro { "remount,ro" } else { "remount,rw" };
                assert!(
                    run(&["mount", "-o", opt, path.to_str().expect("utf-8")]),
                    "mount -o {opt}"
                );
            }
            Disk::Chmod { path } => {
                let mode = if ro { 0o555 } else { 0o700 };
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .expect("chmod state dir");
            }
        }
    }

    /// Fills the file system; returns the filler to remove when the disk "recovers".
    pub fn fill(&self) -> PathBuf {
        let Disk::Tmpfs { path } = self else {
            panic!("only a tmpfs can be filled");
        };
        let filler = path.join("filler");
        let mut f = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        match self {
            Disk::Tmpfs { path } => {
                run(&["umount", "-l", path.to_str().unwrap_or_default()]);
            }
            Disk::Chmod { path } => {
                let _ = std::fs::set_permissions(&*path, std::fs::Permissions::from_mode(0o700));
            }
        }
    }
}
