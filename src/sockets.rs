//! Nagle's algorithm off for the process's PostgreSQL connections.
//!
//! sqlx 0.9.0 no longer sets `TCP_NODELAY` on its sockets (launchbadge/sqlx
//! issue 4335; fixed upstream, not yet released) and offers no way to set
//! it. Over TLS a large statement leaves in several records, each written
//! on its own, and Nagle then holds each record back until the server
//! acknowledges the previous one — which the server, still waiting for the
//! rest of the statement, delays by up to 40 ms. In the relay load run that
//! was most of the time the PostgreSQL append writer held the cluster's
//! head lock (a 60 KB `INSERT` of ~120 events: 26 ms on average).
//!
//! [`disable_nagle`] runs after each new PostgreSQL connection: it sets
//! `TCP_NODELAY` on every TCP socket of the process that lacks it (every
//! socket this process opens wants it: the relay's and NATS's set it
//! themselves). Remove it once sqlx sets the option again.

// The FFI layer: two socket-option system calls (STYLE.md allows `unsafe`
// in the FFI layer only).
#![allow(unsafe_code)]

use std::ffi::c_int;

/// Sets `TCP_NODELAY` on every TCP socket of this process that lacks it;
/// returns how many it changed. Linux only (it reads `/proc/self/fd`);
/// elsewhere it changes nothing.
pub fn disable_nagle() -> usize {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return 0 };
    let mut changed = 0;
    for entry in entries.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|name| name.parse::<c_int>().ok()) else { continue };
        let is_socket =
            std::fs::read_link(entry.path()).is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        // A socket that is not TCP refuses the option: nothing happens.
        if is_socket && nodelay(fd) == Some(false) && set_nodelay(fd) {
            changed += 1;
        }
    }
    changed
}

/// Whether `fd` has `TCP_NODELAY` set; `None` if it is not a TCP socket (or closed).
pub fn nodelay(fd: c_int) -> Option<bool> {
    let mut value: c_int = 0;
    let mut length = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `length` bytes into `value`, which
    // is that large; on a descriptor that is not a TCP socket (or was closed
    // meanwhile) it only fails.
    let result = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&raw mut value).cast::<libc::c_void>(),
            &raw mut length,
        )
    };
    (result == 0).then_some(value != 0)
}

fn set_nodelay(fd: c_int) -> bool {
    let value: c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `value`; a
    // descriptor reused by another socket meanwhile at worst gets the same
    // harmless option.
    let result = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&raw const value).cast::<libc::c_void>(),
            std::mem::size_of::<c_int>() as libc::socklen_t,
        )
    };
    result == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd as _;

    #[test]
    fn a_tcp_socket_without_nodelay_gets_it_and_other_descriptors_are_left_alone() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = std::net::TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        client.set_nodelay(false).expect("nodelay off");
        assert_eq!(nodelay(client.as_raw_fd()), Some(false));
        let file = std::fs::File::open("/proc/self/status").expect("a file");
        assert_eq!(nodelay(file.as_raw_fd()), None, "not a socket");
        assert!(disable_nagle() >= 1);
        assert_eq!(nodelay(client.as_raw_fd()), Some(true));
    }
}
