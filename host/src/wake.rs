//! Waking idle daemons when a job is dispatched or cancelled.
//!
//! On PostgreSQL, daemons LISTEN on a channel that dispatch NOTIFYs.
//! SQLite has no LISTEN/NOTIFY, so each daemon binds a Unix datagram socket in
//! a folder beside the database file (`jobhost.db.wake/`), and every process that
//! commits a dispatch sends one byte to every socket there. A datagram is only a hint:
//! a daemon that misses one still finds the job at its next poll. A socket
//! whose daemon has died refuses the datagram and is removed by the sender.

use std::io::ErrorKind;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixDatagram as StdUnixDatagram;
use std::path::{Path, PathBuf};

use tokio::net::UnixDatagram;

/// Reason a daemon is woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// New or released jobs may be due.
    Dispatched,
    /// A job was cancelled; its daemon should stop it now.
    Cancelled,
    /// `jobhost reload`: read jobs.toml and the libraries again.
    Reload,
}

impl Wake {
    fn byte(self) -> u8 {
        match self {
            Self::Dispatched => b'd',
            Self::Cancelled => b'c',
            Self::Reload => b'r',
        }
    }

    fn rank(self) -> u8 {
        match self {
            Self::Dispatched => 0,
            Self::Cancelled => 1,
            Self::Reload => 2,
        }
    }

    fn from_byte(byte: u8) -> Self {
        match byte {
            b'c' => Self::Cancelled,
            b'r' => Self::Reload,
            _ => Self::Dispatched,
        }
    }
}

/// Maximum socket path length Linux accepts (`sun_path` is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Returns the folder of wake-up sockets for the database at `database`.
pub fn folder_for(database: &Path) -> PathBuf {
    let mut folder = database.as_os_str().to_owned();
    folder.push(".wake");
    PathBuf::from(folder)
}

/// A daemon's source of wake-ups, whatever the backend.
pub enum WakeSubscription {
    Socket(WakeListener),
    Postgres(sqlx::postgres::PgListener),
}

impl WakeSubscription {
    /// Waits for the next wake-up.
    ///
    /// A PostgreSQL listener whose connection was lost reconnects on the next
    /// call. Notifications sent meanwhile are lost, so the loss itself is
    /// returned as a [`Wake::Dispatched`], and the daemon looks for due jobs.
    pub async fn recv(&mut self) -> Result<Wake, String> {
        match self {
            Self::Socket(listener) => listener.recv().await.map_err(|error| error.to_string()),
            Self::Postgres(listener) => match listener.try_recv().await {
                Ok(Some(notification)) => Ok(Wake::from_byte(notification.payload().bytes().next().unwrap_or(b'd'))),
                Ok(None) => {
                    tracing::warn!(target: "jobhost::daemon", "lost the LISTEN connection; reconnecting and looking for due jobs");
                    Ok(Wake::Dispatched)
                }
                Err(error) => Err(error.to_string()),
            },
        }
    }

    /// True if a failed `recv` is worth calling again: a PostgreSQL listener
    /// reconnects, a socket does not come back.
    pub fn recovers(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }
}

/// A daemon's wake-up socket; the file is removed on drop.
pub struct WakeListener {
    socket: UnixDatagram,
    path: PathBuf,
}

impl WakeListener {
    /// Binds a new socket in the wake-up folder of `database`.
    pub fn bind(database: &Path) -> std::io::Result<Self> {
        let folder = folder_for(database);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&folder)?;
        let path = folder.join(format!("{}-{:08x}.sock", std::process::id(), rand::random::<u32>()));
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(std::io::Error::new(
                ErrorKind::InvalidInput,
                format!("socket path {} is longer than {MAX_SOCKET_PATH} bytes", path.display()),
            ));
        }
        let socket = UnixDatagram::bind(&path)?;
        Ok(Self { socket, path })
    }

    /// Waits for the next wake-up, then drains any that queued behind it.
    pub async fn recv(&self) -> std::io::Result<Wake> {
        let mut buffer = [0u8; 64];
        let received = self.socket.recv(&mut buffer).await?;
        let mut wake = Wake::from_byte(buffer[..received].first().copied().unwrap_or(b'd'));
        // Of several queued wake-ups, the one that requests more wins: a
        // reload or a cancel also makes the daemon look for due jobs.
        while let Ok(received) = self.socket.try_recv(&mut buffer) {
            let next = Wake::from_byte(buffer[..received].first().copied().unwrap_or(b'd'));
            if next.rank() > wake.rank() {
                wake = next;
            }
        }
        Ok(wake)
    }
}

impl Drop for WakeListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends `wake` to every daemon listening beside `database`, ignoring
/// errors, because a daemon that misses the datagram finds the work at its
/// next poll.
pub fn notify(database: &Path, wake: Wake) {
    let Ok(entries) = std::fs::read_dir(folder_for(database)) else {
        return;
    };
    let Ok(sender) = StdUnixDatagram::unbound() else {
        return;
    };
    let _ = sender.set_nonblocking(true);
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|extension| extension != "sock") {
            continue;
        }
        match sender.send_to(&[wake.byte()], &path) {
            Ok(_) => {}
            // The daemon is gone; remove its socket so that no sender tries it again.
            Err(error) if error.kind() == ErrorKind::ConnectionRefused => {
                let _ = std::fs::remove_file(&path);
            }
            // A full queue means the daemon has wake-ups waiting already.
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notify_reaches_listener_and_removes_stale_socket() {
        let folder = tempfile::tempdir().unwrap();
        let database = folder.path().join("jobs.db");
        let listener = WakeListener::bind(&database).unwrap();

        let stale = folder_for(&database).join("1-dead.sock");
        drop(StdUnixDatagram::bind(&stale).unwrap());
        assert!(stale.exists());

        notify(&database, Wake::Cancelled);
        assert_eq!(listener.recv().await.unwrap(), Wake::Cancelled);
        assert!(!stale.exists(), "a socket nobody listens on should be removed");
    }
}
