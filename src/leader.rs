//! One node at a time: work that must run once per cluster (the outbox
//! publisher, the projection workers) runs on whichever node holds a
//! PostgreSQL advisory lock. The lock lives as long as its connection, so a
//! node that dies releases it and another takes over within seconds.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// Work started when this node becomes the leader; dropped when it stops being one.
pub type LeaderWork = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs `work()` whenever this node holds advisory lock `lock` of the
/// database at `database_url`, until `shutdown` resolves. `what` names the
/// work in the logs ("this node runs the outbox").
pub async fn while_leader(
    database_url: String,
    lock: i64,
    what: &'static str,
    work: impl Fn() -> LeaderWork,
    shutdown: impl Future<Output = ()>,
) {
    use sqlx::Connection as _;
    tokio::pin!(shutdown);
    let mut standing_by = false;
    loop {
        let leading = async {
            let mut connection = sqlx::PgConnection::connect(&database_url).await?;
            let locked: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(lock).fetch_one(&mut connection).await?;
            if !locked {
                return Ok::<_, sqlx::Error>(false);
            }
            tracing::info!("this node runs {what}");
            let running = work();
            // The lock lives as long as its connection: watch it.
            let watch = async {
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    if let Err(error) = sqlx::query("SELECT 1").execute(&mut connection).await {
                        return error;
                    }
                }
            };
            tokio::select! {
                () = running => {}
                error = watch => tracing::warn!(%error, "lost the connection holding the lock for {what}; standing by"),
            }
            Ok(true)
        };
        tokio::select! {
            () = &mut shutdown => return,
            outcome = leading => match outcome {
                Ok(true) => standing_by = false,
                Ok(false) if !standing_by => {
                    standing_by = true;
                    tracing::info!("another node runs {what}; standing by");
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "cannot take the lock for {what}; retrying in 1 s"),
            }
        }
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
