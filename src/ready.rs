//! Telling whoever started the daemon that the file system is mounted: the
//! `--background` parent through a pipe ("ok", or the startup error's text), and systemd
//! (`Type=notify`) through the datagram socket named by `NOTIFY_SOCKET`.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// What the parent reads from the pipe when the mount is up.
pub const MOUNTED: &[u8] = b"ok";

/// Whom to tell; each is told once.
#[derive(Debug)]
pub struct Ready {
    pipe: Option<File>,
    notify_socket: Option<OsString>,
}

impl Ready {
    /// `pipe`: the write end the `--background` parent waits on, if any.
    pub fn new(pipe: Option<OwnedFd>) -> Ready {
        Ready {
            pipe: pipe.map(File::from),
            notify_socket: std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()),
        }
    }

    /// The FUSE session is mounted.
    pub fn mounted(&mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            // Dropping the pipe closes it: the parent reads "ok" and then end-of-file.
            let _ = pipe.write_all(MOUNTED);
        }
        if let Some(socket) = self.notify_socket.take() {
            if let Err(e) = notify(&socket, "READY=1") {
                tracing::warn!(error = %e, socket = ?socket, "could not notify systemd (NOTIFY_SOCKET)");
            }
        }
    }

    /// Startup failed; a no-op once `mounted` was reported (the parent has gone).
    pub fn failed(&mut self, message: &str) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = pipe.write_all(message.as_bytes());
        }
    }
}

/// sd_notify(3): one datagram to a socket path, or to an abstract socket ('@' first).
fn notify(socket: &OsStr, state: &str) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(state.as_bytes(), socket)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifies_path_and_abstract_sockets() {
        let dir = crate::sync::tests::TempDir::new("ready");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("seguro-ready-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        notify(OsStr::new(&format!("@{name}")), "READY=1").unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
