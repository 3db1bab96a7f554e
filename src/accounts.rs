//! The host's users and groups: the admin group (`troops` by default) and its members.
//! Always the host's own, whatever the root prefix; tests use throwaway names.

use std::process::Command;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AccountError {
    #[error("failed to run {program}: {source}")]
    Spawn {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("{command} failed: {message}")]
    Failed { command: String, message: String },
    #[error("admin {0:?}: no such user on this machine")]
    NoSuchUser(String),
}

fn run(program: &'static str, args: &[&str]) -> Result<std::process::Output, AccountError> {
    Command::new(program)
        .args(args)
        .output()
        .map_err(|source| AccountError::Spawn { program, source })
}

fn checked(program: &'static str, args: &[&str]) -> Result<(), AccountError> {
    let out = run(program, args)?;
    if out.status.success() {
        return Ok(());
    }
    Err(AccountError::Failed {
        command: format!("{program} {}", args.join(" ")),
        message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// `name:x:gid:member,member` from the group database (files, LDAP, whatever NSS says).
fn group_entry(group: &str) -> Result<Option<(u32, Vec<String>)>, AccountError> {
    let out = run("getent", &["group", group])?;
    if !out.status.success() {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = line.trim().split(':').collect();
    let gid = fields.get(2).and_then(|g| g.parse().ok());
    let members = fields
        .get(3)
        .map(|m| {
            m.split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    Ok(gid.map(|g| (g, members)))
}

pub fn group_gid(group: &str) -> Result<Option<u32>, AccountError> {
    Ok(group_entry(group)?.map(|(gid, _)| gid))
}

/// The user's primary gid, if the user exists.
fn user_gid(user: &str) -> Result<Option<u32>, AccountError> {
    let out = run("getent", &["passwd", user])?;
    if !out.status.success() {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    Ok(line.trim().split(':').nth(3).and_then(|g| g.parse().ok()))
}

/// The name of the user with `uid`, from the user database.
pub fn user_name(uid: u32) -> Result<Option<String>, AccountError> {
    let out = run("getent", &["passwd", &uid.to_string()])?;
    if !out.status.success() {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    Ok(line
        .split(':')
        .next()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(String::from))
}

pub fn user_exists(user: &str) -> Result<bool, AccountError> {
    Ok(user_gid(user)?.is_some())
}

pub fn is_member(user: &str, group: &str) -> Result<bool, AccountError> {
    let Some((gid, members)) = group_entry(group)? else {
        return Ok(false);
    };
    Ok(members.iter().any(|m| m == user) || user_gid(user)? == Some(gid))
}

/// Create `group` as a system group.
pub fn create_group(group: &str) -> Result<(), AccountError> {
    checked("groupadd", &["--system", group])
}

pub fn delete_group(group: &str) -> Result<(), AccountError> {
    checked("groupdel", &[group])
}

pub fn add_member(user: &str, group: &str) -> Result<(), AccountError> {
    if !user_exists(user)? {
        return Err(AccountError::NoSuchUser(user.to_owned()));
    }
    checked("gpasswd", &["-a", user, group])
}
