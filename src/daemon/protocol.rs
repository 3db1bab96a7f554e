//! The daemon's socket protocol, version 1: line-oriented UTF-8, one request per connection.
//!
//! ```text
//! client: troops/1 deploy            (or push: a deploy a git push asked for; pull; status)
//! server: info waiting for another run to finish
//! server: out <a line of the run's output>
//! server: info still running (30s)      keepalive, at least every 30 s
//! server: done 0 <one-line summary>     exit status and summary end it
//! server: error <why>                   a refused or malformed request; then close
//! ```
//!
//! Written by hand: it is five line shapes, and a pusher's hook must speak it with nothing
//! but the binary. Pure: parsing and formatting only, no I/O.

pub const VERSION: &str = "troops/1";
/// Requests longer than this are refused without reading further.
pub const MAX_REQUEST: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Deploy,
    /// A deploy asked for by the post-receive hook after a push.
    Push,
    Pull,
    Status,
}

impl Request {
    pub fn name(self) -> &'static str {
        match self {
            Request::Deploy => "deploy",
            Request::Push => "push",
            Request::Pull => "pull",
            Request::Status => "status",
        }
    }

    pub fn encode(self) -> String {
        format!("{VERSION} {}\n", self.name())
    }

    pub fn parse(line: &str) -> Result<Request, String> {
        let line = line.trim_end_matches(['\n', '\r']);
        let (version, verb) = line
            .split_once(' ')
            .ok_or_else(|| format!("malformed request {line:?}: expected `{VERSION} VERB`"))?;
        if version != VERSION {
            return Err(format!(
                "unsupported protocol {version:?}: this daemon speaks {VERSION}"
            ));
        }
        match verb {
            "deploy" => Ok(Request::Deploy),
            "push" => Ok(Request::Push),
            "pull" => Ok(Request::Pull),
            "status" => Ok(Request::Status),
            other => Err(format!(
                "unknown request {other:?}: expected deploy, push, pull or status"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Out(String),
    Info(String),
    Done { code: u8, summary: String },
    Error(String),
}

/// Keep a reply on one line whatever the text holds.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

impl Reply {
    pub fn encode(&self) -> String {
        match self {
            Reply::Out(s) => format!("out {}\n", one_line(s)),
            Reply::Info(s) => format!("info {}\n", one_line(s)),
            Reply::Done { code, summary } => format!("done {code} {}\n", one_line(summary)),
            Reply::Error(s) => format!("error {}\n", one_line(s)),
        }
    }

    pub fn parse(line: &str) -> Result<Reply, String> {
        let line = line.trim_end_matches(['\n', '\r']);
        let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
        match kind {
            "out" => Ok(Reply::Out(rest.to_owned())),
            "info" => Ok(Reply::Info(rest.to_owned())),
            "error" => Ok(Reply::Error(rest.to_owned())),
            "done" => {
                let (code, summary) = rest.split_once(' ').unwrap_or((rest, ""));
                let code = code
                    .parse()
                    .map_err(|_| format!("malformed reply {line:?}"))?;
                Ok(Reply::Done {
                    code,
                    summary: summary.to_owned(),
                })
            }
            _ => Err(format!("malformed reply {line:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_say_why() {
        for r in [
            Request::Deploy,
            Request::Push,
            Request::Pull,
            Request::Status,
        ] {
            assert_eq!(Request::parse(&r.encode()), Ok(r));
        }
        assert!(Request::parse("deploy").unwrap_err().contains("malformed"));
        assert!(
            Request::parse("troops/2 deploy")
                .unwrap_err()
                .contains("unsupported protocol")
        );
        assert!(
            Request::parse("troops/1 rm -rf")
                .unwrap_err()
                .contains("unknown request")
        );
    }

    #[test]
    fn replies_round_trip_on_one_line() {
        for r in [
            Reply::Out("hello world".into()),
            Reply::Info("waiting".into()),
            Reply::Done {
                code: 1,
                summary: "run 3 failed: x".into(),
            },
            Reply::Error("no".into()),
        ] {
            assert_eq!(Reply::parse(&r.encode()), Ok(r));
        }
        assert_eq!(Reply::Out("a\nb".into()).encode(), "out a b\n");
        assert!(Reply::parse("done x y").is_err());
        assert!(Reply::parse("bogus").is_err());
    }
}
