//! Troops: a node that keeps itself deployed from git. The binary (`main.rs`, `cli/`) is
//! glue; everything it does lives in these modules, none of which knows about a terminal.

pub mod accounts;
pub mod admins;
pub mod advance;
pub mod backoff;
pub mod clock;
pub mod credentials;
pub mod daemon;
pub mod deploy;
pub mod fetch;
pub mod fsutil;
pub mod gate;
pub mod hook;
pub mod hosting;
pub mod hostname;
pub mod init;
pub mod keys;
pub mod lock;
pub mod metrics;
pub mod names;
pub mod node;
pub mod output;
pub mod paths;
pub mod procs;
pub mod pull;
pub mod repair;
pub mod repo;
pub mod rollout;
pub mod seed;
pub mod settings;
pub mod status;
pub mod target;
pub mod verify;
