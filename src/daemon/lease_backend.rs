//! The daemon's lease backend: lease rows and their audit rows go through the group-commit
//! writer; credentials issued for a lease are revoked through the secret's plugin.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use keywarden_plugin_sdk::{Credential, Secret};

use crate::audit::AuditEvent;
use crate::clock::Millis;
use crate::group_commit::{GroupCommit, WriteError};
use crate::leases::LeaseBackend;
use crate::rotation::engine::{Engine, PluginCallError};
use crate::store::{LeaseOp, LeaseRow, StoreError};
use crate::vault::{Bound, VaultError};

/// Writes through the group commit; revokes through the engine's providers.
#[derive(Debug, Clone)]
pub struct DaemonLeaseBackend {
    writer: GroupCommit,
    engine: Arc<Engine>,
}

impl DaemonLeaseBackend {
    /// A backend writing through `writer` and revoking through the engine's providers.
    pub fn new(writer: GroupCommit, engine: Arc<Engine>) -> Self {
        DaemonLeaseBackend { writer, engine }
    }

    async fn revoke(&self, lease: &LeaseRow) -> Result<(), PluginCallError> {
        let name = &lease.secret_name;
        let vault = self.engine.vault();
        let keys = vault.keys_in_use().await;
        let store = vault.store();
        let secret = store
            .secret(name)
            .await?
            .ok_or_else(|| VaultError::NoSuchSecret(name.clone()))?;
        // As the store holds it: a rekey may have resealed it since the lease was granted.
        let sealed = match store.issued_credential(&lease.id).await? {
            Some(sealed) => sealed,
            None => lease.issued.clone().ok_or_else(|| {
                StoreError::Corrupt(format!("lease {}: no issued credential", lease.id))
            })?,
        };
        let meta = lease.issued_meta.clone().unwrap_or_default();
        let value = vault.open_bound(&keys, &secret, Bound::Issued(&lease.id), &sealed, &meta)?;
        drop(keys);
        let target = Credential {
            version: None,
            value: Secret::new(value.expose()),
            meta,
        };
        self.engine
            .revoke_credential(name, Some(target), Some(&lease.id))
            .await
    }
}

impl LeaseBackend for DaemonLeaseBackend {
    fn commit(
        &self,
        ops: Vec<LeaseOp>,
        audit: Vec<AuditEvent>,
    ) -> BoxFuture<'_, Result<(), WriteError>> {
        Box::pin(self.writer.write(ops, audit))
    }

    fn revoke_issued<'a>(
        &'a self,
        lease: &'a LeaseRow,
    ) -> BoxFuture<'a, Result<(), PluginCallError>> {
        Box::pin(self.revoke(lease))
    }

    fn stored_expiries<'a>(
        &'a self,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Option<HashMap<String, Millis>>, StoreError>> {
        Box::pin(async move {
            match self.engine.vault().store().postgres() {
                Some(pg) => pg.open_lease_expiries(ids).await.map(Some),
                None => Ok(None),
            }
        })
    }
}
