//! Disk trouble that needs root, for the fault suite: the daemon's state directory on a
//! small tmpfs that can be remounted read-only or filled up. Root ignores file modes, so
//! nothing short of a mount makes a directory read-only for it. Without root or without
//! mount rights [`Tmpfs::mount`] fails the test and says why; it never skips.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a directory; unmounted on drop.
pub struct Tmpfs {
    path: PathBuf,
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

/// Runs a command; `Err` carries what it said when it failed.
fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Tmpfs {
    /// Mounts a `size_kib` tmpfs on `path` (an empty directory).
    pub fn mount(path: &Path, size_kib: u32) -> Tmpfs {
        assert!(
            is_root(),
            "this test needs root: it mounts a tmpfs on the state directory \
             (run it as root, as scripts/test in CI does)"
        );
        let p = path.to_str().expect("utf-8 path");
        let options = format!("size={size_kib}k,mode=0700");
        if let Err(e) = run(&["mount", "-t", "tmpfs", "-o", &options, "tmpfs", p]) {
            panic!("root without mount rights cannot run this test: {e}");
        }
        Tmpfs {
            path: path.to_owned(),
        }
    }

    pub fn read_only(&self, ro: bool) {
        let opt = if ro { "remount,ro" } else { "remount,rw" };
        if let Err(e) = run(&["mount", "-o", opt, self.path.to_str().expect("utf-8")]) {
            panic!("{e}");
        }
    }

    /// Fills the file system; returns the filler to remove when the disk "recovers".
    pub fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run(&["umount", "-l", self.path.to_str().unwrap_or_default()]);
    }
}
