//! Troops: a node that keeps itself deployed from git. The binary (`main.rs`, `cli/`) is
//! glue; everything it does lives in these modules, none of which knows about a terminal.

pub mod fsutil;
pub mod names;
pub mod paths;
pub mod repo;
pub mod settings;
pub mod target;
pub mod backoff;
pub mod deploy;
pub mod fetch;
pub mod lock;
pub mod node;
pub mod output;
pub mod pull;
