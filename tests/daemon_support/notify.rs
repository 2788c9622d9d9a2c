//! A fake service manager's end of `NOTIFY_SOCKET`: binds a datagram socket in its own
//! temporary directory and records every sd_notify message the daemon sends, in order.

use std::path::{Path, PathBuf};

use tokio::net::UnixDatagram;

use super::WAIT;

pub struct Notifications {
    socket: UnixDatagram,
    path: PathBuf,
    /// Every message received so far, for failure reports.
    pub seen: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Notifications {
    pub fn bind() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        Notifications {
            socket: UnixDatagram::bind(&path).expect("bind the notify socket"),
            path,
            seen: Vec::new(),
            _dir: dir,
        }
    }

    /// The value for the daemon's `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for a message with a line starting with `line` (after those already
    /// consumed); returns the whole message.
    pub async fn expect(&mut self, line: &str) -> String {
        let socket = &self.socket;
        let seen = &mut self.seen;
        let found = tokio::time::timeout(WAIT, async {
            let mut buf = vec![0u8; 4096];
            loop {
                let n = socket.recv(&mut buf).await.expect("recv");
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.push(text.clone());
                if text.lines().any(|l| l.starts_with(line)) {
                    return text;
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no {line} notification; got {:?}", self.seen))
    }
}
