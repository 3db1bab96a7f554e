//! Integration tests: real git, real remotes, real python venvs, the real binary.

mod util;

mod api;
mod bad_input;
mod deploy;
mod pull;
