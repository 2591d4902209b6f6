//! The vault header: KDF parameters, salt and wrapped root key; passphrase changes and rekeys.

use sqlx::Row;

use crate::audit::AuditEvent;
use crate::clock::now_millis;
use crate::crypto::KdfParams;
use crate::store::{RewrappedKey, StoreError, VaultHeader};

use super::SqliteStore;
use super::audit::append_audit_in;

impl SqliteStore {
    /// The vault header, or [`StoreError::NotInitialized`].
    pub async fn header(&self) -> Result<VaultHeader, StoreError> {
        self.header_row()
            .await?
            .ok_or_else(|| StoreError::NotInitialized {
                path: self.path.clone(),
            })
    }

    async fn header_row(&self) -> Result<Option<VaultHeader>, StoreError> {
        let row = sqlx::query(
            "SELECT kdf_algorithm, kdf_memory_kib, kdf_iterations, kdf_parallelism, kdf_salt, \
             wrapped_root_key, wrapped_fingerprint_key, root_generation FROM vault WHERE id = 1",
        )
        .fetch_optional(&self.reader)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let algorithm: String = row.try_get(0)?;
        if algorithm != "argon2id" {
            return Err(StoreError::Corrupt(format!(
                "unknown key-derivation algorithm {algorithm:?}"
            )));
        }
        let param = |i: usize| -> Result<u32, StoreError> {
            let v: i64 = row.try_get(i)?;
            u32::try_from(v)
                .map_err(|_| StoreError::Corrupt(format!("KDF parameter {v} out of range")))
        };
        Ok(Some(VaultHeader {
            kdf: KdfParams {
                memory_kib: param(1)?,
                iterations: param(2)?,
                parallelism: param(3)?,
            },
            salt: row.try_get(4)?,
            wrapped_root_key: row.try_get(5)?,
            wrapped_fingerprint_key: row.try_get(6)?,
            root_generation: row.try_get(7)?,
        }))
    }

    pub(super) async fn init_header(
        &self,
        header: &VaultHeader,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let now = now_millis();
        sqlx::query(
            "INSERT INTO vault (id, kdf_algorithm, kdf_memory_kib, kdf_iterations, \
             kdf_parallelism, kdf_salt, wrapped_root_key, wrapped_fingerprint_key, \
             root_generation, created_at, updated_at) \
             VALUES (1, 'argon2id', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(header.kdf.memory_kib)
        .bind(header.kdf.iterations)
        .bind(header.kdf.parallelism)
        .bind(header.salt.as_slice())
        .bind(header.wrapped_root_key.as_slice())
        .bind(header.wrapped_fingerprint_key.as_slice())
        .bind(header.root_generation)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        append_audit_in(&mut tx, &[audit]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces the KDF parameters, salt and wrapped root key (a passphrase change).
    pub async fn replace_root_wrapping(
        &self,
        header: &VaultHeader,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let updated = sqlx::query(
            "UPDATE vault SET kdf_memory_kib = ?, kdf_iterations = ?, kdf_parallelism = ?, \
             kdf_salt = ?, wrapped_root_key = ?, updated_at = ? \
             WHERE id = 1 AND root_generation = ?",
        )
        .bind(header.kdf.memory_kib)
        .bind(header.kdf.iterations)
        .bind(header.kdf.parallelism)
        .bind(header.salt.as_slice())
        .bind(header.wrapped_root_key.as_slice())
        .bind(now_millis())
        .bind(header.root_generation)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(StoreError::StaleKeys);
        }
        append_audit_in(&mut tx, &[audit]).await?;
        crash_point!("passwd.before-commit");
        tx.commit().await?;
        crash_point!("passwd.committed");
        Ok(())
    }

    /// Every secret's id, name and wrapped data key (for `rekey`).
    pub async fn all_data_keys(&self) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        let rows = sqlx::query("SELECT id, name, wrapped_data_key FROM secrets ORDER BY id")
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    async fn rekey_in_db(
        &self,
        old_generation: i64,
        header: &VaultHeader,
        rewrapped: &[RewrappedKey],
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let updated = sqlx::query(
            "UPDATE vault SET kdf_memory_kib = ?, kdf_iterations = ?, kdf_parallelism = ?, \
             kdf_salt = ?, wrapped_root_key = ?, wrapped_fingerprint_key = ?, \
             root_generation = ?, updated_at = ? WHERE id = 1 AND root_generation = ?",
        )
        .bind(header.kdf.memory_kib)
        .bind(header.kdf.iterations)
        .bind(header.kdf.parallelism)
        .bind(header.salt.as_slice())
        .bind(header.wrapped_root_key.as_slice())
        .bind(header.wrapped_fingerprint_key.as_slice())
        .bind(header.root_generation)
        .bind(now_millis())
        .bind(old_generation)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(StoreError::StaleKeys);
        }
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM secrets")
            .fetch_one(&mut *tx)
            .await?;
        if count != rewrapped.len() as i64 {
            return Err(StoreError::Conflict("the set of secrets".into()));
        }
        for (i, key) in rewrapped.iter().enumerate() {
            if i == rewrapped.len() / 2 {
                crash_point!("rekey.half-rewrapped");
            }
            let done = sqlx::query("UPDATE secrets SET wrapped_data_key = ? WHERE id = ?")
                .bind(key.wrapped_data_key.as_slice())
                .bind(key.secret_id.as_str())
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(StoreError::Conflict("the set of secrets".into()));
            }
        }
        append_audit_in(&mut tx, &[audit]).await?;
        crash_point!("rekey.before-commit");
        tx.commit().await?;
        crash_point!("rekey.committed");
        Ok(())
    }

    /// Installs a new root key: the header and every data key, in one transaction. Fails with
    /// [`StoreError::Conflict`] if the set of secrets changed since `rewrapped` was computed.
    pub async fn rekey(
        &self,
        old_generation: i64,
        header: &VaultHeader,
        rewrapped: &[RewrappedKey],
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let result = self
            .rekey_in_db(old_generation, header, rewrapped, audit)
            .await;
        self.invalidate(None);
        result
    }
}
