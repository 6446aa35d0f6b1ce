//! The PostgreSQL connections of the event store have Nagle's algorithm
//! off (`privcomm::sockets`). A test binary of its own: tests running beside
//! it would open connections of their own (test databases) that it cannot
//! tell apart from the store's.

mod support;

use privcomm::clock::SystemClock;
use privcomm_domain::ExpectedVersion;
use std::collections::HashSet;
use std::sync::Arc;
use support::{TestResult, append, event};

/// This process's open sockets by inode (`/proc/self/fd` → `socket:[inode]`).
fn socket_fds_by_inode() -> std::collections::HashMap<u64, i32> {
    let mut found = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc/self/fd").into_iter().flatten().flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        let target = target.to_string_lossy().into_owned();
        if let Some(inode) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']'))
            && let Ok(inode) = inode.parse()
        {
            found.insert(inode, fd);
        }
    }
    found
}

/// Inodes of TCP sockets whose remote port is `port` (`/proc/net/tcp`, `/proc/net/tcp6`).
fn tcp_inodes_to_port(port: u16) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port =
                fields.get(2).and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
            if remote_port == Some(port)
                && let Some(inode) = fields.get(9).and_then(|i| i.parse().ok())
            {
                inodes.insert(inode);
            }
        }
    }
    inodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_have_nagle_off() -> TestResult {
    let (store, db) = support::postgres_store(Arc::new(SystemClock)).await?;
    // An append opens the writer's own connection too.
    privcomm_domain::EventStore::append(&store, append("nagle", ExpectedVersion::Any, vec![event("one", 100)])).await?;
    let authority = db.url.split('@').nth(1).and_then(|rest| rest.split('/').next()).unwrap_or_default();
    let port = authority.rsplit_once(':').and_then(|(_, port)| port.parse().ok()).unwrap_or(5432);
    let ours = socket_fds_by_inode();
    let to_postgres: Vec<i32> =
        tcp_inodes_to_port(port).into_iter().filter_map(|inode| ours.get(&inode).copied()).collect();
    assert!(to_postgres.len() >= 2, "the store's pool and its writer are connected: {to_postgres:?}");
    for fd in to_postgres {
        assert_eq!(privcomm::sockets::nodelay(fd), Some(true), "a PostgreSQL connection (fd {fd}) has Nagle on");
    }
    db.drop_database().await;
    Ok(())
}
