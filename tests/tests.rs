//! Integration tests: real git, real remotes, real python venvs, the real binary.

mod imds_fake;
mod util;

mod api;
mod bad_input;
mod deploy;
mod faults;
mod first_boot;
mod gates;
mod hosting;
mod metrics;
mod pull;
mod push;
mod rollout;
mod signatures;
mod ssh;
mod trust;
mod venvs;
