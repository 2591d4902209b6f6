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
        out.push_str(&as_text(value, path)?);
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
}
