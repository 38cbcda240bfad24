//! Helpers shared by jobhost's tests.
//!
//! [`postgres_schema`] gives each test its own schema in the local test
//! database, so PostgreSQL tests run in parallel without seeing each other's
//! jobs. The server is `JOBHOST_TEST_POSTGRES`, by default
//! `postgres://postgres@127.0.0.1:5432/test`. When it cannot be reached, a
//! test skips with a message, unless `CI` is set: then it fails, so that a
//! missing server never passes as green.

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// Default server of the PostgreSQL tests.
pub const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A schema of its own for one test, dropped with everything in it on drop.
pub struct TestSchema {
    /// The server URL, without a schema.
    pub server: String,
    pub name: String,
}

impl TestSchema {
    /// Returns a URL whose connections use this schema.
    pub fn url(&self) -> String {
        let separator = if self.server.contains('?') { '&' } else { '?' };
        format!("{}{separator}options=-c%20search_path%3D{}", self.server, self.name)
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop runs outside any runtime, or inside one that must not block,
        // so the cleanup gets a thread and a runtime of its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let mut connection = PgConnection::connect(&server).await.ok()?;
                sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS {name} CASCADE")).execute(&mut connection).await.ok()
            })
        });
        let _ = cleanup.join();
    }
}

/// Creates a fresh schema on the test server, or returns None (after saying
/// why on stderr) when the server cannot be reached and `CI` is not set.
///
/// # Panics
///
/// When the server cannot be reached and `CI` is set.
pub async fn postgres_schema() -> Option<TestSchema> {
    let server = std::env::var("JOBHOST_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_POSTGRES.to_owned());
    schema_on(server, std::env::var_os("CI").is_some()).await
}

/// Creates a fresh schema on `server`; `ci` decides whether an unreachable
/// server fails (true) or skips (false).
async fn schema_on(server: String, ci: bool) -> Option<TestSchema> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let mut connection = match PgConnection::connect(&server).await {
        Ok(connection) => connection,
        Err(error) => {
            let message = format!("PostgreSQL at {server} is unreachable: {error}");
            if ci {
                panic!("{message}; CI is set, so PostgreSQL tests fail instead of skipping (.ci/run starts the server)");
            }
            eprintln!("skipped: {message}; start it, or set JOBHOST_TEST_POSTGRES");
            return None;
        }
    };
    let name = format!(
        "jobhost_test_{}_{}_{:06x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>() & 0xff_ffff
    );
    sqlx::raw_sql(&format!("CREATE SCHEMA {name}"))
        .execute(&mut connection)
        .await
        .unwrap_or_else(|error| panic!("creating schema {name} failed: {error}"));
    Some(TestSchema { server, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing listens on port 1 of the loopback interface.
    const UNREACHABLE: &str = "postgres://postgres@127.0.0.1:1/test";

    #[tokio::test]
    async fn unreachable_server_skips_outside_ci() {
        assert!(schema_on(UNREACHABLE.to_owned(), false).await.is_none());
    }

    #[tokio::test]
    #[should_panic(expected = "CI is set, so PostgreSQL tests fail instead of skipping")]
    async fn unreachable_server_fails_under_ci() {
        schema_on(UNREACHABLE.to_owned(), true).await;
    }
}
