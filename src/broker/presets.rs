//! What each provider preset knows: where its API is, which header carries the key, which
//! methods and paths an agent may call through it. Where its usage (tokens) is in an answer is
//! the same few fields for all of them (`usage.rs`).

use serde::Deserialize;

/// A provider preset (`[brokers.NAME] preset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// OpenAI's API (`Authorization: Bearer`).
    Openai,
    /// Anthropic's API (`x-api-key`; the client's `anthropic-version` passes through).
    Anthropic,
    /// Google's Gemini API (`x-goog-api-key`).
    Gemini,
    /// Azure OpenAI (`api-key`); `upstream` is the resource's endpoint and must be set.
    AzureOpenai,
    /// Any REST API with a bearer token; `upstream` and `paths` must be set.
    Bearer,
}

pub use keywarden_plugin_sdk::broker::Allowed;

impl Preset {
    /// The API's base URL, if the preset has one (Azure's and `bearer`'s depend on the user).
    pub fn upstream(self) -> Option<&'static str> {
        match self {
            Preset::Openai => Some("https://api.openai.com"),
            Preset::Anthropic => Some("https://api.anthropic.com"),
            Preset::Gemini => Some("https://generativelanguage.googleapis.com"),
            Preset::AzureOpenai | Preset::Bearer => None,
        }
    }

    /// The header that carries the key, and what precedes the key in it.
    pub fn auth(self) -> (&'static str, &'static str) {
        match self {
            Preset::Openai | Preset::Bearer => ("authorization", "Bearer "),
            Preset::Anthropic => ("x-api-key", ""),
            Preset::Gemini => ("x-goog-api-key", ""),
            Preset::AzureOpenai => ("api-key", ""),
        }
    }

    /// The calls an agent may make (`bearer`: none; the config lists them). Calls that cost
    /// tokens are exact paths, so an endpoint whose answer carries no usage (a batch, a
    /// long-running job, images) under the same name is not one of them.
    pub fn allowed(self) -> Vec<Allowed> {
        let list: &[&str] = match self {
            Preset::Openai => &[
                "POST = /v1/chat/completions",
                "POST = /v1/completions",
                "POST = /v1/responses",
                "GET /v1/responses/",
                "POST = /v1/embeddings",
                "POST = /v1/moderations",
                "GET /v1/models",
            ],
            Preset::Anthropic => &[
                "POST = /v1/messages",
                "POST = /v1/messages/count_tokens",
                "GET /v1/models",
            ],
            Preset::Gemini => &[
                "POST = /v1beta/models/*:generateContent",
                "POST = /v1beta/models/*:streamGenerateContent",
                "POST = /v1beta/models/*:countTokens",
                "POST = /v1beta/models/*:embedContent",
                "POST = /v1beta/models/*:batchEmbedContents",
                "GET /v1beta/models",
                "POST = /v1/models/*:generateContent",
                "POST = /v1/models/*:streamGenerateContent",
                "POST = /v1/models/*:countTokens",
                "POST = /v1/models/*:embedContent",
                "POST = /v1/models/*:batchEmbedContents",
                "GET /v1/models",
            ],
            Preset::AzureOpenai => &[
                "POST = /openai/deployments/*/chat/completions",
                "POST = /openai/deployments/*/completions",
                "POST = /openai/deployments/*/embeddings",
                "POST = /openai/v1/chat/completions",
                "POST = /openai/v1/responses",
                "POST = /openai/v1/embeddings",
                "GET /openai/models",
                "GET /openai/v1/models",
            ],
            Preset::Bearer => &[],
        };
        list.iter()
            .map(|a| Allowed::parse(a).expect("presets are valid"))
            .collect()
    }
}
