//! Admins a seed names before their accounts exist. On EC2 troops may read the user data
//! before cloud-init has made the users it lists, so a missing user is not an error: init
//! writes it down, and each pull adds the ones that exist by then (a file read when nothing
//! is pending; one `getent` per pending name otherwise).

use std::io;

use crate::accounts::{self, AccountError};
use crate::fsutil;
use crate::paths::Layout;

/// The names still waiting, in the order the seed gave them.
pub fn pending(layout: &Layout) -> Vec<String> {
    parse(&std::fs::read_to_string(layout.pending_admins()).unwrap_or_default())
}

fn parse(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && crate::names::check_user(l).is_ok())
        .map(String::from)
        .collect()
}

/// Replace the list; an empty one removes the file.
pub fn set_pending(layout: &Layout, names: &[String]) -> io::Result<()> {
    let path = layout.pending_admins();
    if names.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let mut text = names.join("\n");
    text.push('\n');
    fsutil::write_atomic(&path, text.as_bytes(), 0o644)
}

/// What `settle` did.
#[derive(Debug, Default)]
pub struct Settled {
    pub added: Vec<String>,
    pub waiting: Vec<String>,
}

/// Add every pending admin whose account exists now to `group`, and forget it.
pub fn settle(layout: &Layout, group: &str) -> Result<Settled, SettleError> {
    let names = pending(layout);
    let mut settled = Settled::default();
    if names.is_empty() {
        return Ok(settled);
    }
    for name in names {
        if accounts::user_exists(&name)? {
            if !accounts::is_member(&name, group)? {
                accounts::add_member(&name, group)?;
            }
            settled.added.push(name);
        } else {
            settled.waiting.push(name);
        }
    }
    if !settled.added.is_empty() {
        set_pending(layout, &settled.waiting).map_err(|source| SettleError::Write {
            path: layout.pending_admins().display().to_string(),
            source,
        })?;
    }
    Ok(settled)
}

#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error(transparent)]
    Account(#[from] AccountError),
    #[error("failed to write {path}: {source}")]
    Write { path: String, source: io::Error },
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_list_keeps_names_only() {
        assert_eq!(
            super::parse("ops\n\n  dev \nbad name\n../x\n"),
            vec!["ops".to_string(), "dev".to_string()]
        );
    }
}
