//! Asking the daemon: connect, send one request, hand each reply to the caller as it comes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::protocol::{Reply, Request};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("no troops daemon listens on {0}")]
    NotListening(PathBuf),
    #[error(
        "{path}: permission denied (only root and members of the admin group may ask the daemon)"
    )]
    Denied { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the daemon refused: {0}")]
    Refused(String),
    #[error("the daemon hung up before the run ended")]
    HungUp,
    #[error("{0}")]
    Protocol(String),
}

/// Send `request` and pass every `out`/`info` reply to `on_reply`; returns the `done` reply's
/// exit status and summary.
pub fn request(
    socket: &Path,
    request: Request,
    mut on_reply: impl FnMut(&Reply),
) -> Result<(u8, String), ClientError> {
    let io = |source: std::io::Error| ClientError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotListening(socket.to_owned())
        }
        std::io::ErrorKind::PermissionDenied => ClientError::Denied {
            path: socket.to_owned(),
        },
        _ => io(e),
    })?;
    stream.write_all(request.encode().as_bytes()).map_err(io)?;
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let line = line.map_err(io)?;
        match Reply::parse(&line).map_err(ClientError::Protocol)? {
            Reply::Done { code, summary } => return Ok((code, summary)),
            Reply::Error(why) => return Err(ClientError::Refused(why)),
            reply => on_reply(&reply),
        }
    }
    Err(ClientError::HungUp)
}
