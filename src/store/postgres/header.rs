//! The vault header: KDF parameters, salt and wrapped root key; passphrase changes and rekeys.

use sqlx::Row;
use sqlx::postgres::PgConnection;

use crate::audit::AuditEvent;
use crate::clock::now_millis;
use crate::crypto::{IntegrityKey, KdfParams};
use crate::store::{RewrappedKey, SealedMaterial, StoreError, VaultHeader};

use super::audit::append_audit_in;
use super::{PgStore, announce};

impl PgStore {
    /// The vault header, or [`StoreError::NotInitialized`].
    pub async fn header(&self) -> Result<VaultHeader, StoreError> {
        self.header_row()
            .await?
            .ok_or_else(|| StoreError::NotInitialized {
                path: self.location.clone(),
            })
    }

    async fn header_row(&self) -> Result<Option<VaultHeader>, StoreError> {
        let row = sqlx::query(
            "SELECT kdf_algorithm, kdf_memory_kib, kdf_iterations, kdf_parallelism, kdf_salt, \
             wrapped_root_key, wrapped_fingerprint_key, root_generation FROM vault WHERE id = 1",
        )
        .fetch_optional(&self.pool)
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

    /// Writes the vault row and appends `audit`, on `conn`: a write transaction from
    /// [`PgStore::begin_write`] that the caller ([`PgStore::create`]) commits.
    pub(super) async fn init_header(
        &self,
        conn: &mut PgConnection,
        header: &VaultHeader,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let now = now_millis();
        sqlx::query(
            "INSERT INTO vault (id, kdf_algorithm, kdf_memory_kib, kdf_iterations, \
             kdf_parallelism, kdf_salt, wrapped_root_key, wrapped_fingerprint_key, \
             root_generation, created_at, updated_at) \
             VALUES (1, 'argon2id', $1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(i64::from(header.kdf.memory_kib))
        .bind(i64::from(header.kdf.iterations))
        .bind(i64::from(header.kdf.parallelism))
        .bind(header.salt.as_slice())
        .bind(header.wrapped_root_key.as_slice())
        .bind(header.wrapped_fingerprint_key.as_slice())
        .bind(header.root_generation)
        .bind(now)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        append_audit_in(conn, self.integrity(), &[audit]).await?;
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
            "UPDATE vault SET kdf_memory_kib = $1, kdf_iterations = $2, kdf_parallelism = $3, \
             kdf_salt = $4, wrapped_root_key = $5, updated_at = $6 \
             WHERE id = 1 AND root_generation = $7",
        )
        .bind(i64::from(header.kdf.memory_kib))
        .bind(i64::from(header.kdf.iterations))
        .bind(i64::from(header.kdf.parallelism))
        .bind(header.salt.as_slice())
        .bind(header.wrapped_root_key.as_slice())
        .bind(now_millis())
        .bind(header.root_generation)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(StoreError::StaleKeys);
        }
        append_audit_in(&mut tx, self.integrity(), &[audit]).await?;
        crash_point!("passwd.before-commit");
        tx.commit().await?;
        crash_point!("passwd.committed");
        Ok(())
    }

    /// Every secret's id, name and wrapped data key (for `rekey`).
    pub async fn all_data_keys(&self) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        let rows = sqlx::query("SELECT id, name, wrapped_data_key FROM secrets ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
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
        let mut tx = self.begin_write().await?;
        let updated = sqlx::query(
            "UPDATE vault SET kdf_memory_kib = $1, kdf_iterations = $2, kdf_parallelism = $3, \
             kdf_salt = $4, wrapped_root_key = $5, wrapped_fingerprint_key = $6, \
             root_generation = $7, updated_at = $8 WHERE id = 1 AND root_generation = $9",
        )
        .bind(i64::from(header.kdf.memory_kib))
        .bind(i64::from(header.kdf.iterations))
        .bind(i64::from(header.kdf.parallelism))
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
            if let Some(material) = &key.resealed {
                reseal_in(&mut tx, &key.secret_id, material).await?;
            }
            let done = sqlx::query("UPDATE secrets SET wrapped_data_key = $1 WHERE id = $2")
                .bind(key.wrapped_data_key.as_slice())
                .bind(key.secret_id.as_str())
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(StoreError::Conflict("the set of secrets".into()));
            }
        }
        append_audit_in(&mut tx, self.integrity(), &[audit]).await?;
        announce(&mut tx, None).await?;
        crash_point!("rekey.before-commit");
        tx.commit().await?;
        self.invalidate(None);
        crash_point!("rekey.committed");
        Ok(())
    }

    /// Upgrades a store whose current versions carry no MAC: records one for every secret's
    /// current version under `key` and installs `wrapped_fingerprint_key` (the same key, wrapped
    /// to say MACs are now kept), in one transaction.
    pub async fn install_current_macs(
        &self,
        key: &IntegrityKey,
        wrapped_fingerprint_key: &[u8],
    ) -> Result<usize, StoreError> {
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query(
            "SELECT s.id, s.name, v.version FROM secrets s JOIN versions v \
             ON v.secret_id = s.id AND v.stage = 'current'",
        )
        .fetch_all(&mut *tx)
        .await?;
        for row in &rows {
            let (id, name, version): (String, String, i64) =
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            sqlx::query("UPDATE secrets SET current_mac = $1 WHERE id = $2")
                .bind(key.current_version(&id, &name, version).as_slice())
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE vault SET wrapped_fingerprint_key = $1 WHERE id = 1")
            .bind(wrapped_fingerprint_key)
            .execute(&mut *tx)
            .await?;
        announce(&mut tx, None).await?;
        tx.commit().await?;
        self.invalidate(None);
        Ok(rows.len())
    }

    /// Everything sealed under secret `secret_id`'s data key: its versions, its rotations'
    /// proposed values and the credentials issued for its leases.
    pub async fn sealed_material(&self, secret_id: &str) -> Result<SealedMaterial, StoreError> {
        type Meta = serde_json::Map<String, serde_json::Value>;
        let meta = |text: Option<String>| -> Result<Meta, StoreError> {
            serde_json::from_str(text.as_deref().unwrap_or("{}"))
                .map_err(|e| StoreError::Corrupt(format!("meta: {e}")))
        };
        let mut material = SealedMaterial::default();
        for r in sqlx::query("SELECT version, ciphertext, meta FROM versions WHERE secret_id = $1")
            .bind(secret_id)
            .fetch_all(&self.pool)
            .await?
        {
            material
                .versions
                .push((r.try_get(0)?, r.try_get(1)?, meta(r.try_get(2)?)?));
        }
        for r in sqlx::query(
            "SELECT id, proposed FROM rotations WHERE secret_id = $1 AND proposed IS NOT NULL",
        )
        .bind(secret_id)
        .fetch_all(&self.pool)
        .await?
        {
            material.proposed.push((r.try_get(0)?, r.try_get(1)?));
        }
        for r in sqlx::query(
            "SELECT id, issued, issued_meta FROM leases \
             WHERE secret_id = $1 AND issued IS NOT NULL",
        )
        .bind(secret_id)
        .fetch_all(&self.pool)
        .await?
        {
            material
                .issued
                .push((r.try_get(0)?, r.try_get(1)?, meta(r.try_get(2)?)?));
        }
        Ok(material)
    }
}

/// Replaces everything sealed under one secret's data key; fails with a conflict if what is
/// sealed changed since `material` was read.
async fn reseal_in(
    conn: &mut PgConnection,
    secret_id: &str,
    material: &SealedMaterial,
) -> Result<(), StoreError> {
    let conflict = || StoreError::Conflict(format!("the values of secret {secret_id}"));
    let counts: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM versions WHERE secret_id = $1), \
                (SELECT count(*) FROM rotations WHERE secret_id = $1 AND proposed IS NOT NULL), \
                (SELECT count(*) FROM leases WHERE secret_id = $1 AND issued IS NOT NULL)",
    )
    .bind(secret_id)
    .fetch_one(&mut *conn)
    .await?;
    let expected = (
        material.versions.len() as i64,
        material.proposed.len() as i64,
        material.issued.len() as i64,
    );
    if counts != expected {
        return Err(conflict());
    }
    for (version, ciphertext, _) in &material.versions {
        let done = sqlx::query(
            "UPDATE versions SET ciphertext = $1 WHERE secret_id = $2 AND version = $3",
        )
        .bind(ciphertext.as_slice())
        .bind(secret_id)
        .bind(*version)
        .execute(&mut *conn)
        .await?;
        if done.rows_affected() != 1 {
            return Err(conflict());
        }
    }
    for (id, sealed) in &material.proposed {
        sqlx::query("UPDATE rotations SET proposed = $1 WHERE id = $2")
            .bind(sealed.as_slice())
            .bind(id.as_str())
            .execute(&mut *conn)
            .await?;
    }
    for (id, sealed, _) in &material.issued {
        sqlx::query("UPDATE leases SET issued = $1 WHERE id = $2")
            .bind(sealed.as_slice())
            .bind(id.as_str())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
