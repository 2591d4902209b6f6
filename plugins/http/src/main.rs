//! `keywarden-plugin-http`: declarative REST rotation for AI and SaaS providers, and signed
//! webhooks, speaking keywarden plugin protocol v1. See `plugin.rs` for the kinds, `spec.rs`
//! for the settings and presets.

#![forbid(unsafe_code)]

mod client;
mod plugin;
mod spec;
mod template;
mod webhook;

fn main() -> std::process::ExitCode {
    // TLS through rustls with ring: one well-known crypto library, no C toolchain needed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    keywarden_plugin_sdk::serve(plugin::HttpPlugin::default())
}
