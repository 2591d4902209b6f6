//! `keywarden-plugin-aws`: AWS Secrets Manager, IAM access keys and STS short-lived credentials,
//! speaking keywarden plugin protocol v1.
//!
//! AWS credentials come from the secret's `credentials.admin` (a keywarden secret whose value is
//! a secret access key and whose `meta.access_key_id` is its id), read at each request so a key
//! that rotates itself always signs with the key valid at that step. `credential_source =
//! "environment"` opts into the standard provider chain (an instance role) instead.
//! Common settings: `region` (default us-east-1), `endpoint_url` (moto, VPC endpoints).

#![forbid(unsafe_code)]

mod iam;
mod secretsmanager;
mod sts;

use std::sync::OnceLock;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_smithy_http_client::tls;
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use keywarden_plugin_sdk::{Credential, ErrReply, Hello, KindInfo, OkReply, Op, Plugin, Request};
use serde_json::Value;

/// The HTTP client every SDK client shares: hyper with rustls on ring.
fn http_client() -> SharedHttpClient {
    static CLIENT: OnceLock<SharedHttpClient> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            aws_smithy_http_client::Builder::new()
                .tls_provider(tls::Provider::Rustls(
                    tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https()
        })
        .clone()
}

/// A string setting.
pub(crate) fn setting<'a>(request: &'a Request, key: &str) -> Option<&'a str> {
    request.settings.get(key).and_then(Value::as_str)
}

/// A required string setting.
pub(crate) fn required<'a>(request: &'a Request, key: &str) -> Result<&'a str, ErrReply> {
    setting(request, key).ok_or_else(|| ErrReply::fatal(format!("settings.{key} is required")))
}

/// SDK configuration signed by `credential` (a secret access key with `meta.access_key_id`).
pub(crate) fn config_for(
    request: &Request,
    credential: &Credential,
) -> Result<SdkConfig, ErrReply> {
    let key_id = credential
        .meta
        .get("access_key_id")
        .and_then(Value::as_str)
        .ok_or_else(|| ErrReply::fatal("the credential has no meta.access_key_id"))?;
    let session = credential
        .meta
        .get("session_token")
        .and_then(Value::as_str)
        .map(str::to_string);
    let credentials = Credentials::new(
        key_id,
        credential.value.expose(),
        session,
        None,
        "keywarden",
    );
    let mut builder = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(
            setting(request, "region")
                .unwrap_or("us-east-1")
                .to_string(),
        ))
        .credentials_provider(SharedCredentialsProvider::new(credentials))
        .http_client(http_client());
    if let Some(endpoint) = setting(request, "endpoint_url") {
        builder = builder.endpoint_url(endpoint);
    }
    Ok(builder.build())
}

/// SDK configuration for the request's admin credential, or the standard provider chain when
/// `credential_source = "environment"`.
pub(crate) async fn admin_config(request: &Request) -> Result<SdkConfig, ErrReply> {
    match setting(request, "credential_source") {
        None | Some("keywarden") => {
            let admin = request.credentials.get("admin").ok_or_else(|| {
                ErrReply::fatal(
                    "credentials.admin is required (or credential_source = \"environment\")",
                )
            })?;
            config_for(request, admin)
        }
        Some("environment") => {
            let mut loader = aws_config::defaults(BehaviorVersion::latest())
                .region(Region::new(
                    setting(request, "region")
                        .unwrap_or("us-east-1")
                        .to_string(),
                ))
                .http_client(http_client());
            if let Some(endpoint) = setting(request, "endpoint_url") {
                loader = loader.endpoint_url(endpoint);
            }
            Ok(loader.load().await)
        }
        Some(other) => Err(ErrReply::fatal(format!(
            "unknown credential_source {other:?}"
        ))),
    }
}

/// AWS's error code: from the parsed error, or else from the raw XML body (an `<Errors>`
/// wrapper some endpoints and emulators use defeats the SDK's parser).
pub(crate) fn error_code<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> Option<String> {
    e.code().map(str::to_string).or_else(|| {
        let body = std::str::from_utf8(e.raw_response()?.body().bytes()?).ok()?;
        let start = body.find("<Code>")? + "<Code>".len();
        let len = body[start..].find("</Code>")?;
        Some(body[start..start + len].to_string())
    })
}

/// Maps an SDK error to a reply: throttling, server errors and transport failures are worth a
/// retry; the rest are not. The message names the call and AWS's error code, never a secret.
pub(crate) fn sdk_error<E>(what: &str, e: SdkError<E, HttpResponse>) -> ErrReply
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let code = error_code(&e);
    let retryable = match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(_) => matches!(
            code.as_deref(),
            Some(
                "Throttling"
                    | "ThrottlingException"
                    | "TooManyRequestsException"
                    | "RequestLimitExceeded"
                    | "ServiceUnavailable"
                    | "InternalFailure"
                    | "InternalServiceError"
                    | "InternalServiceErrorException"
            )
        ),
        _ => false,
    };
    let message = format!(
        "{what}: {}{}",
        code.as_deref().unwrap_or("error"),
        e.message().map(|m| format!(": {m}")).unwrap_or_default()
    );
    if retryable {
        ErrReply::retryable(message)
    } else {
        ErrReply::fatal(message)
    }
}

struct AwsPlugin;

impl Plugin for AwsPlugin {
    fn hello(&self) -> Hello {
        let kind = |ops: &[&str], overlap: Option<bool>| KindInfo {
            ops: ops.iter().map(|s| s.to_string()).collect(),
            overlap,
        };
        Hello {
            keywarden_plugin: keywarden_plugin_sdk::PROTOCOL_VERSION,
            name: "aws".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kinds: [
                (
                    "aws-iam".to_string(),
                    kind(&["create", "verify", "revoke"], Some(true)),
                ),
                ("aws-sts".to_string(), kind(&["issue", "revoke"], None)),
                (
                    "aws-secretsmanager".to_string(),
                    kind(
                        &["create", "verify", "promote", "revoke", "push"],
                        Some(true),
                    ),
                ),
            ]
            .into(),
        }
    }

    async fn handle(&self, request: Request) -> Result<OkReply, ErrReply> {
        let Some(op) = request.op() else {
            return Err(ErrReply::unsupported());
        };
        match (request.kind.as_deref(), op) {
            (Some("aws-iam"), Op::Create) => iam::create(&request).await,
            (Some("aws-iam"), Op::Verify) => iam::verify(&request).await,
            (Some("aws-iam"), Op::Revoke) => iam::revoke(&request).await,
            (Some("aws-sts"), Op::Issue) => sts::issue(&request).await,
            (Some("aws-sts"), Op::Revoke) => sts::revoke(&request).await,
            (Some("aws-secretsmanager"), Op::Create) => secretsmanager::create(&request).await,
            (Some("aws-secretsmanager"), Op::Verify) => secretsmanager::verify(&request).await,
            (Some("aws-secretsmanager"), Op::Promote) => secretsmanager::promote(&request).await,
            (Some("aws-secretsmanager"), Op::Revoke) => secretsmanager::revoke(&request).await,
            (Some("aws-secretsmanager"), Op::Push) => secretsmanager::push(&request).await,
            _ => Err(ErrReply::unsupported()),
        }
    }
}

fn main() -> std::process::ExitCode {
    keywarden_plugin_sdk::serve(AwsPlugin)
}
