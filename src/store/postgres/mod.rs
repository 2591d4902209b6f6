//! The PostgreSQL side of the store (docs/design.md §13): where several daemons share one
//! database, exactly one of them leads ([`leader`]).
//!
//! Its schema is `migrations_postgres/`, applied by [`connect`].

pub mod leader;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::store::StoreError;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations_postgres");

/// Opens a pool on the database at `url` (`postgres://…`) and applies the schema's newer
/// migrations. Each connection waits at most `connect_timeout` to be made.
pub async fn connect(url: &str, connect_timeout: Duration) -> Result<PgPool, StoreError> {
    let options: PgConnectOptions = url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(connect_timeout)
        .connect_with(options.application_name("keywarden"))
        .await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

#[cfg(test)]
pub(crate) mod tests;
