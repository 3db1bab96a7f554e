//! The EC2 instance metadata client, IMDSv2: a session token from `PUT /latest/api/token`,
//! then `GET /latest/user-data` with it. The only module that talks to IMDS; it owns the
//! timeouts, retries and the token.
//!
//! 401 means the token went stale: get a new one and ask again. 403 means IMDS is disabled
//! for this instance: stop asking. 404 means no user data. 5xx and timeouts are retried with
//! backoff (honouring `Retry-After`) until one overall deadline.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::blocking::Client;
use thiserror::Error;

const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
/// Six hours, as the AWS tools ask.
const TOKEN_TTL: &str = "21600";

#[derive(Debug, Error)]
pub enum ImdsError {
    #[error("EC2 IMDS at {url} unreachable within {}s: {last}", .deadline.as_secs())]
    Unreachable {
        url: String,
        deadline: Duration,
        last: String,
    },
    #[error("EC2 IMDS at {url} answered {status}")]
    Unexpected { url: String, status: StatusCode },
}

pub struct Imds {
    base: String,
    deadline: Duration,
}

enum Attempt<T> {
    Done(T),
    /// Try again, after at least this long.
    Retry(Duration, String),
}

impl Imds {
    /// `base` like `http://169.254.169.254`; the whole exchange ends within `deadline`.
    pub fn new(base: &str, deadline: Duration) -> Imds {
        Imds {
            base: base.trim_end_matches('/').to_owned(),
            deadline,
        }
    }

    fn client(timeout: Duration) -> Result<Client, String> {
        Client::builder()
            // A proxy from the environment must never see metadata requests.
            .no_proxy()
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .timeout(timeout)
            .build()
            .map_err(|e| e.to_string())
    }

    fn retry_after(resp: &reqwest::blocking::Response) -> Option<Duration> {
        let v = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)?
            .to_str()
            .ok()?;
        v.trim().parse::<u64>().ok().map(Duration::from_secs)
    }

    fn token(&self, client: &Client) -> Attempt<Result<Option<String>, ImdsError>> {
        let url = format!("{}/latest/api/token", self.base);
        match client.put(&url).header(TTL_HEADER, TOKEN_TTL).send() {
            Err(e) => Attempt::Retry(Duration::ZERO, format!("PUT {url}: {e}")),
            Ok(resp) => match resp.status() {
                StatusCode::OK => match resp.text() {
                    Ok(t) => Attempt::Done(Ok(Some(t.trim().to_owned()))),
                    Err(e) => Attempt::Retry(Duration::ZERO, format!("PUT {url}: {e}")),
                },
                // Disabled, or no IMDSv2 here: nothing to ask.
                StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => Attempt::Done(Ok(None)),
                s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => Attempt::Retry(
                    Self::retry_after(&resp).unwrap_or_default(),
                    format!("PUT {url}: {s}"),
                ),
                status => Attempt::Done(Err(ImdsError::Unexpected { url, status })),
            },
        }
    }

    /// The instance's user data; `Ok(None)` when it has none or IMDS is disabled.
    pub fn user_data(&self) -> Result<Option<Vec<u8>>, ImdsError> {
        let start = Instant::now();
        let url = format!("{}/latest/user-data", self.base);
        let mut token: Option<String> = None;
        let mut backoff = Duration::from_millis(100);
        let mut last = String::from("no answer");
        loop {
            let left = self.deadline.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(ImdsError::Unreachable {
                    url: self.base.clone(),
                    deadline: self.deadline,
                    last,
                });
            }
            let client = Self::client(left.min(Duration::from_secs(5))).map_err(|e| {
                ImdsError::Unreachable {
                    url: self.base.clone(),
                    deadline: self.deadline,
                    last: e,
                }
            })?;
            let attempt = match &token {
                None => match self.token(&client) {
                    Attempt::Done(Ok(Some(t))) => {
                        token = Some(t);
                        continue;
                    }
                    Attempt::Done(Ok(None)) => return Ok(None),
                    Attempt::Done(Err(e)) => return Err(e),
                    Attempt::Retry(after, why) => Attempt::<()>::Retry(after, why),
                },
                Some(t) => match client.get(&url).header(TOKEN_HEADER, t).send() {
                    Err(e) => Attempt::Retry(Duration::ZERO, format!("GET {url}: {e}")),
                    Ok(resp) => match resp.status() {
                        StatusCode::OK => match resp.bytes() {
                            Ok(b) => return Ok(Some(b.to_vec())),
                            Err(e) => Attempt::Retry(Duration::ZERO, format!("GET {url}: {e}")),
                        },
                        StatusCode::NOT_FOUND | StatusCode::FORBIDDEN => return Ok(None),
                        StatusCode::UNAUTHORIZED => {
                            // Stale or revoked: a fresh token, and ask again at once.
                            token = None;
                            continue;
                        }
                        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                            Attempt::Retry(
                                Self::retry_after(&resp).unwrap_or_default(),
                                format!("GET {url}: {s}"),
                            )
                        }
                        status => return Err(ImdsError::Unexpected { url, status }),
                    },
                },
            };
            if let Attempt::Retry(after, why) = attempt {
                last = why;
                let wait = after
                    .max(backoff)
                    .min(self.deadline.saturating_sub(start.elapsed()));
                std::thread::sleep(wait);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
