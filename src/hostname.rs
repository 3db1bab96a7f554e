//! The machine's fully qualified name, as `hostname --fqdn` gives it: the canonical name
//! the resolver returns for `gethostname()`. Python's `socket.getfqdn()` asks for the first
//! name of the host's *address* instead, which is `localhost` wherever /etc/hosts lists
//! `127.0.0.1 localhost` before `127.0.0.1 <name>` (containers, VMs, some cloud images).

use std::ffi::{CStr, CString};

/// The name to use, from what the machine calls itself and what the resolver said its
/// canonical name is: the canonical name unless it is missing, a loopback name or an
/// address, which would be no name of this machine at all.
pub fn choose(host: &str, canonical: Option<&str>) -> String {
    let useful = |c: &str| {
        let c = c.trim_end_matches('.');
        !c.is_empty()
            && !matches!(
                c.to_ascii_lowercase().as_str(),
                "localhost"
                    | "localhost.localdomain"
                    | "localhost6"
                    | "localhost6.localdomain6"
                    | "ip6-localhost"
                    | "ip6-loopback"
            )
            && c.parse::<std::net::IpAddr>().is_err()
    };
    match canonical {
        Some(c) if useful(c) => c.trim_end_matches('.').to_owned(),
        _ => host.to_owned(),
    }
}

/// `gethostname()`, or None if it fails or is not UTF-8.
fn gethostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it when
    // the name fits, and the last byte is kept 0 for when it does not.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc != 0 {
        return None;
    }
    let name = CStr::from_bytes_until_nul(&buf).ok()?.to_str().ok()?;
    (!name.is_empty()).then(|| name.to_owned())
}

/// getaddrinfo(host, AI_CANONNAME)'s canonical name, if the resolver gives one.
fn canonical_name(host: &str) -> Option<String> {
    let node = CString::new(host).ok()?;
    // SAFETY: a zeroed addrinfo is a valid hints value (all fields empty) once flags are set.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_flags = libc::AI_CANONNAME;
    hints.ai_family = libc::AF_UNSPEC;
    hints.ai_socktype = libc::SOCK_STREAM;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: node and hints outlive the call; res is freed below with freeaddrinfo.
    let rc = unsafe { libc::getaddrinfo(node.as_ptr(), std::ptr::null(), &hints, &mut res) };
    if rc != 0 || res.is_null() {
        return None;
    }
    // SAFETY: res is a valid list from getaddrinfo; the first entry carries ai_canonname.
    unsafe {
        let c = (*res).ai_canonname;
        let name = (!c.is_null()).then(|| CStr::from_ptr(c).to_string_lossy().into_owned());
        libc::freeaddrinfo(res);
        name
    }
}

/// This machine's fully qualified name, as `hostname --fqdn` gives it.
pub fn fqdn() -> String {
    let Some(host) = gethostname() else {
        return "localhost".into();
    };
    let canonical = canonical_name(&host);
    choose(&host, canonical.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_canonical_name_unless_it_names_no_machine() {
        assert_eq!(
            choose("web-7", Some("web-7.example.com")),
            "web-7.example.com"
        );
        assert_eq!(
            choose("web-7", Some("web-7.example.com.")),
            "web-7.example.com"
        );
        assert_eq!(choose("web-7", Some("web-7")), "web-7");
        for useless in [
            "localhost",
            "LOCALHOST",
            "localhost.localdomain",
            "127.0.0.1",
            "::1",
            "",
        ] {
            assert_eq!(choose("web-7", Some(useless)), "web-7", "{useless}");
        }
        assert_eq!(choose("web-7", None), "web-7");
        // A machine that is called localhost is localhost.
        assert_eq!(choose("localhost", None), "localhost");
    }
}
