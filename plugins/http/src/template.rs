//! Templates: `{{path.to.value}}` placeholders in strings, resolved against a JSON context.
//!
//! A string that is exactly one placeholder keeps the JSON type of its value (so `"{{ttl_seconds}}"`
//! in a body becomes a number); placeholders inside longer strings are replaced by their text.
//! A placeholder with no value is an error, never an empty string.

use serde_json::Value;

/// Looks up a dotted path (`credentials.admin.value`) in the context.
pub fn lookup<'a>(ctx: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(ctx, |v, key| v.get(key))
}

fn as_text(value: &Value, path: &str) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(format!("template placeholder {{{{{path}}}}} is not text")),
    }
}

/// Renders every placeholder of `template` as text.
pub fn render_str(template: &str, ctx: &Value) -> Result<String, String> {
    render(template, ctx, |_, text| text)
}

/// Renders a URL template. A placeholder that starts the template is its base (a configured
/// `base_url`) and is kept as written; every other one is percent-encoded, so a value the
/// provider returned (a key id, an item of a list) cannot add path segments, a query or a
/// fragment: `a/../b?x` becomes `a%2F..%2Fb%3Fx`.
pub fn render_url(template: &str, ctx: &Value) -> Result<String, String> {
    render(template, ctx, |at, text| {
        if at == 0 {
            return text;
        }
        let mut out = String::with_capacity(text.len());
        for b in text.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    })
}

/// Renders every placeholder of `template`, passing each value's text, with the placeholder's
/// byte offset in the template, through `escape`.
fn render(
    template: &str,
    ctx: &Value,
    escape: impl Fn(usize, String) -> String,
) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("unterminated placeholder in {template:?}"))?;
        let path = after[..end].trim();
        let value = lookup(ctx, path)
            .ok_or_else(|| format!("template placeholder {{{{{path}}}}} has no value"))?;
        let at = template.len() - rest.len() + start;
        out.push_str(&escape(at, as_text(value, path)?));
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Renders every string in a JSON value.
pub fn render_json(template: &Value, ctx: &Value) -> Result<Value, String> {
    Ok(match template {
        Value::String(s) => {
            let trimmed = s.trim();
            let whole = trimmed.starts_with("{{")
                && trimmed.ends_with("}}")
                && trimmed.matches("{{").count() == 1;
            if whole {
                let path = trimmed[2..trimmed.len() - 2].trim();
                lookup(ctx, path)
                    .cloned()
                    .ok_or_else(|| format!("template placeholder {{{{{path}}}}} has no value"))?
            } else {
                Value::String(render_str(s, ctx)?)
            }
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render_json(v, ctx))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_json(v, ctx)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_text_and_keeps_types_of_whole_placeholders() {
        let ctx = json!({"a": {"b": "x"}, "n": 90, "secret": "s/1"});
        assert_eq!(
            render_str("{{a.b}}-{{ n }}/{{secret}}", &ctx).unwrap(),
            "x-90/s/1"
        );
        assert_eq!(
            render_json(
                &json!({"ttl": "{{n}}", "name": "k-{{a.b}}", "list": ["{{a.b}}"]}),
                &ctx
            )
            .unwrap(),
            json!({"ttl": 90, "name": "k-x", "list": ["x"]})
        );
        assert!(
            render_str("{{missing}}", &ctx)
                .unwrap_err()
                .contains("missing")
        );
        assert!(render_str("{{a}}", &ctx).is_err(), "objects are not text");
        assert!(render_str("{{a.b", &ctx).is_err());
    }

    #[test]
    fn a_value_from_the_provider_cannot_steer_a_url() {
        let ctx = serde_json::json!({
            "base_url": "https://api.example",
            "meta": { "key_id": "k1/../../admin/keys/other?force=1#x" }
        });
        assert_eq!(
            render_url("{{base_url}}/v1/keys/{{meta.key_id}}", &ctx).unwrap(),
            "https://api.example/v1/keys/k1%2F..%2F..%2Fadmin%2Fkeys%2Fother%3Fforce%3D1%23x"
        );
        assert_eq!(
            render_url(
                "{{base_url}}/v1/keys/{{meta.key_id}}",
                &serde_json::json!({
                    "base_url": "https://api.example", "meta": { "key_id": "sk_Abc-123.x~y" }
                })
            )
            .unwrap(),
            "https://api.example/v1/keys/sk_Abc-123.x~y"
        );
    }
}
