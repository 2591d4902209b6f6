//! The daemon's lease backend: lease rows and their audit rows go through the group-commit
//! writer; credentials issued for a lease are revoked through the secret's plugin.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use keywarden_plugin_sdk::{Credential, Op, Request, Secret};

use crate::audit::AuditEvent;
use crate::group_commit::GroupCommit;
use crate::leases::LeaseBackend;
use crate::provider::Provider;
use crate::rotation::engine::Engine;
use crate::store::{LeaseOp, LeaseRow};
use crate::vault::Bound;

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

    async fn revoke(&self, lease: &LeaseRow) -> Result<(), String> {
        let catalog = self.engine.catalog();
        let spec = catalog
            .secrets
            .get(&lease.secret_name)
            .ok_or_else(|| format!("{:?} is no longer declared", lease.secret_name))?;
        let Some(Provider::Plugin { host, kind, .. }) = catalog.providers.get(&spec.provider)
        else {
            return Err(format!("provider {:?} is not available", spec.provider));
        };
        let vault = self.engine.vault();
        let secret = vault
            .store()
            .secret(&lease.secret_name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the secret is gone")?;
        let sealed = lease
            .issued
            .as_deref()
            .ok_or("the lease has no issued credential")?;
        let value = vault
            .open_bound(&secret, Bound::Issued(&lease.id), sealed)
            .map_err(|e| e.to_string())?;
        let request = Request {
            op: Op::Revoke.as_str().into(),
            kind: Some(kind.clone()),
            secret: Some(lease.secret_name.clone()),
            settings: spec.settings.clone(),
            credentials: self.engine.credentials_for(&spec.credentials).await?,
            target: Some(Credential {
                version: None,
                value: Secret::new(value.expose()),
                meta: lease.issued_meta.clone().unwrap_or_default(),
            }),
            ..Request::default()
        };
        host.call(request)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

impl LeaseBackend for DaemonLeaseBackend {
    fn persist(
        &self,
        ops: Vec<LeaseOp>,
        audit: Vec<AuditEvent>,
    ) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(self.writer.queue(ops, audit))
    }

    fn commit(
        &self,
        ops: Vec<LeaseOp>,
        audit: Vec<AuditEvent>,
    ) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(self.writer.write(ops, audit))
    }

    fn revoke_issued<'a>(&'a self, lease: &'a LeaseRow) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.revoke(lease))
    }
}
