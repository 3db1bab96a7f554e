//! The EC2 instance metadata client, IMDSv2: a session token from `PUT /latest/api/token`,
//! then `GET /latest/user-data` with it. The only module that talks to IMDS; it owns the
//! timeouts, retries and the token.
//!
//! It behaves as the AWS SDKs do: every retry (a 401 included) waits a growing backoff, a
//! token is asked for a few times per run at most, and there is no fallback to IMDSv1: an
//! instance whose owner turned tokens off or blocked them says so instead of being asked
//! without one. 404 means no user data; 5xx, 429 and timeouts are retried (honouring
//! `Retry-After`) until one overall deadline, with a status line every 10 s meanwhile.

use std::io::Read;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::blocking::{Client, Response};
use thiserror::Error;

const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
/// Six hours, as the AWS tools ask.
const TOKEN_TTL: &str = "21600";
/// Fresh tokens per run: one that is refused at once, again and again, will not be accepted
/// on the next try either (a clock or a policy is wrong).
const MAX_TOKENS: u32 = 3;
/// IMDS is on the instance's own link: an answer takes milliseconds, as the SDKs assume
/// with their 1 s timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const STATUS_EVERY: Duration = Duration::from_secs(10);
/// The most user data read (as for gzip-expanded user data).
const MAX_USER_DATA: u64 = 16 << 20;

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
    #[error("EC2 IMDS at {url} answered the token request with an empty token")]
    EmptyToken { url: String },
    #[error(
        "EC2 IMDS at {url} refused {tokens} fresh tokens in a row (HTTP 401 on GET /latest/user-data)"
    )]
    TokenRefused { url: String, tokens: u32 },
    #[error("EC2 IMDS at {url}: the user data is larger than {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error(
        "EC2 IMDS at {url}: IMDSv2 token request timed out: hop limit too low for this network namespace? (GETs are answered, PUT /latest/api/token is not; raise the instance's http-put-response-hop-limit)"
    )]
    HopLimit { url: String },
}

/// What the instance said about its user data.
#[derive(Debug, PartialEq, Eq)]
pub enum UserData {
    Found(Vec<u8>),
    /// 404: the instance has none.
    Absent,
    /// IMDS will not hand it over; why, in words.
    Refused(String),
}

pub struct Imds {
    base: String,
    deadline: Duration,
}

/// One exchange's outcome, for the loop in `user_data`.
enum Step {
    Token(String),
    Done(Result<UserData, ImdsError>),
    /// Try again after at least this long, for this reason.
    Retry(Duration, String),
}

/// What went wrong with a request, in a few words: the innermost cause ("connection
/// refused"), not reqwest's "error sending request for url".
fn cause(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    let mut inner: &dyn std::error::Error = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    let text = inner.to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |c| {
        c.to_lowercase().chain(chars).collect::<String>()
    })
}

fn retry_after(resp: &Response) -> Duration {
    resp.headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or_default()
}

impl Imds {
    /// `base` like `http://169.254.169.254`; the whole exchange ends within `deadline`.
    pub fn new(base: &str, deadline: Duration) -> Imds {
        Imds {
            base: base.trim_end_matches('/').to_owned(),
            deadline,
        }
    }

    fn token(&self, client: &Client, timeout: Duration) -> Step {
        let url = format!("{}/latest/api/token", self.base);
        let resp = match client
            .put(&url)
            .header(TTL_HEADER, TOKEN_TTL)
            .timeout(timeout)
            .send()
        {
            Ok(r) => r,
            Err(e) => return Step::Retry(Duration::ZERO, format!("PUT {url}: {}", cause(&e))),
        };
        match resp.status() {
            StatusCode::OK => match resp.text() {
                Ok(t) if t.trim().is_empty() => Step::Done(Err(ImdsError::EmptyToken {
                    url: self.base.clone(),
                })),
                Ok(t) => Step::Token(t.trim().to_owned()),
                Err(e) => Step::Retry(Duration::ZERO, format!("PUT {url}: {}", cause(&e))),
            },
            s @ (StatusCode::FORBIDDEN | StatusCode::METHOD_NOT_ALLOWED) => {
                Step::Done(Ok(UserData::Refused(format!(
                    "IMDSv2 is disabled or blocked: HTTP {} on PUT /latest/api/token; troops does not fall back to IMDSv1",
                    s.as_u16()
                ))))
            }
            StatusCode::NOT_FOUND => Step::Done(Ok(UserData::Refused(
                "no IMDSv2 token service: HTTP 404 on PUT /latest/api/token".into(),
            ))),
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => Step::Retry(
                retry_after(&resp),
                format!("PUT {url}: HTTP {}", s.as_u16()),
            ),
            status => Step::Done(Err(ImdsError::Unexpected { url, status })),
        }
    }

    fn get(&self, client: &Client, token: &str, timeout: Duration) -> Step {
        let url = format!("{}/latest/user-data", self.base);
        let resp = match client
            .get(&url)
            .header(TOKEN_HEADER, token)
            .timeout(timeout)
            .send()
        {
            Ok(r) => r,
            Err(e) => return Step::Retry(Duration::ZERO, format!("GET {url}: {}", cause(&e))),
        };
        match resp.status() {
            StatusCode::OK => {
                // EC2 caps user data at 16 KiB: a body a thousand times that is not it.
                let mut body = Vec::new();
                match resp.take(MAX_USER_DATA + 1).read_to_end(&mut body) {
                    Ok(_) if body.len() as u64 > MAX_USER_DATA => {
                        Step::Done(Err(ImdsError::TooLarge {
                            url,
                            limit: MAX_USER_DATA,
                        }))
                    }
                    Ok(_) => Step::Done(Ok(UserData::Found(body))),
                    Err(e) => Step::Retry(Duration::ZERO, format!("GET {url}: {e}")),
                }
            }
            StatusCode::NOT_FOUND => Step::Done(Ok(UserData::Absent)),
            StatusCode::FORBIDDEN => Step::Done(Ok(UserData::Refused(
                "access to instance metadata is turned off: HTTP 403 on GET /latest/user-data"
                    .into(),
            ))),
            StatusCode::UNAUTHORIZED => Step::Retry(
                Duration::ZERO,
                format!("GET {url}: HTTP 401, the token was refused"),
            ),
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => Step::Retry(
                retry_after(&resp),
                format!("GET {url}: HTTP {}", s.as_u16()),
            ),
            status => Step::Done(Err(ImdsError::Unexpected { url, status })),
        }
    }

    /// Whether IMDS answers a GET at all: when the token PUT times out but this does, the
    /// PUT's answer is what gets lost (EC2 sends it with the hop limit as its TTL).
    fn answers_get(&self, client: &Client, timeout: Duration) -> bool {
        client
            .get(format!("{}/latest/meta-data/", self.base))
            .timeout(timeout)
            .send()
            .is_ok()
    }

    /// The instance's user data. `progress` gets a line every 10 s while IMDS keeps failing.
    pub fn user_data(&self, progress: &mut dyn FnMut(&str)) -> Result<UserData, ImdsError> {
        let start = Instant::now();
        let unreachable = |last: String| ImdsError::Unreachable {
            url: self.base.clone(),
            deadline: self.deadline,
            last,
        };
        let client = Client::builder()
            // A proxy from the environment must never see metadata requests.
            .no_proxy()
            .connect_timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| unreachable(cause(&e)))?;
        let mut token: Option<String> = None;
        let mut tokens = 0;
        let mut put_timeouts = 0;
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0;
        let mut said = start;
        let mut last = String::from("no answer");
        let mut at_least;
        loop {
            let left = self.deadline.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(unreachable(last));
            }
            let timeout = left.min(REQUEST_TIMEOUT);
            attempt += 1;
            let step = match &token {
                None => {
                    let step = self.token(&client, timeout);
                    match &step {
                        // Only a full timeout counts: one cut short by the deadline says
                        // nothing about the network.
                        Step::Retry(_, why)
                            if why.ends_with("timed out") && timeout == REQUEST_TIMEOUT =>
                        {
                            put_timeouts += 1;
                            // Twice, so that one slow answer is not taken for a network
                            // that drops them all; the probe once, within the deadline.
                            let left = self.deadline.saturating_sub(start.elapsed());
                            if put_timeouts == 2
                                && !left.is_zero()
                                && self.answers_get(&client, left.min(REQUEST_TIMEOUT))
                            {
                                return Err(ImdsError::HopLimit {
                                    url: self.base.clone(),
                                });
                            }
                        }
                        Step::Retry(..) => {}
                        _ => put_timeouts = 0,
                    }
                    step
                }
                Some(t) => self.get(&client, t, timeout),
            };
            match step {
                Step::Token(t) => {
                    tokens += 1;
                    token = Some(t);
                    continue;
                }
                Step::Done(result) => return result,
                Step::Retry(after, why) => {
                    at_least = after;
                    if why.contains("HTTP 401") {
                        token = None;
                        if tokens >= MAX_TOKENS {
                            return Err(ImdsError::TokenRefused {
                                url: self.base.clone(),
                                tokens,
                            });
                        }
                    }
                    last = why;
                }
            }
            let left = self.deadline.saturating_sub(start.elapsed());
            let wake = Instant::now() + backoff.max(at_least).min(left);
            // Sleep in slices, so that a status line comes every 10 s however long the wait.
            loop {
                let now = Instant::now();
                if now >= wake {
                    break;
                }
                if now >= said + STATUS_EVERY {
                    said = now;
                    progress(&format!(
                        "waiting for EC2 metadata at {}: {} (attempt {attempt}, {} s left)",
                        self.base,
                        last.rsplit(": ").next().unwrap_or(&last),
                        self.deadline.saturating_sub(start.elapsed()).as_secs()
                    ));
                }
                std::thread::sleep(wake.min(said + STATUS_EVERY) - now);
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}
