//! Durable file writes shared by everything that must survive a power cut: the daemon's
//! `state.json` and `module.connstr`, and the emulator's registry.
//!
//! A write is: temp file in the same directory, write, fsync, rename over the target,
//! fsync the directory. Readers therefore see either the old or the new file, never a
//! torn one. This module never interprets what it writes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Where [`write_atomic`] stages `path`'s new content before the rename: a hidden sibling
/// named after the file and this process, so two processes never write the same one.
/// Public so tests can put an obstacle there (a directory) and make the write fail.
pub fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    Ok(path.with_file_name(tmp_name))
}

/// Atomically and durably replaces `path` with `bytes`, created with `mode` (e.g. 0o600).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = temp_path(path)?;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn write_atomic_replaces_content_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left behind"
        );
    }

    #[test]
    fn a_blocked_temp_path_fails_the_write_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"old", 0o600).unwrap();
        // A directory where the temp file goes: EISDIR, for root too.
        let tmp = temp_path(&p).unwrap();
        assert_eq!(tmp.parent(), Some(dir.path()));
        fs::create_dir(&tmp).unwrap();
        let err = write_atomic(&p, b"new", 0o600).expect_err("the write fails");
        assert_eq!(
            rustix::io::Errno::from_io_error(&err),
            Some(rustix::io::Errno::ISDIR),
            "{err}"
        );
        assert_eq!(fs::read(&p).unwrap(), b"old");
        fs::remove_dir(&tmp).unwrap();
        write_atomic(&p, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn write_atomic_into_missing_directory_fails_without_touching_anything() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing").join("f");
        assert!(write_atomic(&p, b"x", 0o600).is_err());
    }
}
