//! Tests only: checks a served JSON body against the schema the OpenAPI
//! document gives for its operation and status, so the document cannot
//! drift from what the handlers really serialise. Supports the subset of
//! JSON Schema the document uses: `$ref`, `type` (one or a list),
//! `properties`, `required`, `items`, `enum`, `oneOf`/`anyOf`/`allOf`.

use serde_json::Value;

/// The response schema of `method path` (a template) for `status`.
pub fn response_schema<'a>(
    doc: &'a Value,
    method: &str,
    template: &str,
    status: u16,
) -> Option<&'a Value> {
    doc["paths"][template][method.to_ascii_lowercase()]["responses"][status.to_string()]["content"]
        ["application/json"]
        .get("schema")
}

/// Checks `value` against `schema`; the error names the JSON path.
pub fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference
            .strip_prefix("#/components/schemas/")
            .ok_or_else(|| format!("{at}: unsupported $ref {reference}"))?;
        let target = &doc["components"]["schemas"][name];
        if target.is_null() {
            return Err(format!("{at}: $ref {reference} names no schema"));
        }
        return check(doc, target, value, at);
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(options) = schema.get(key).and_then(Value::as_array) {
            let errors: Vec<String> = options
                .iter()
                .filter_map(|option| check(doc, option, value, at).err())
                .collect();
            if errors.len() == options.len() {
                return Err(format!(
                    "{at}: matches none of {key}: {}",
                    errors.join("; ")
                ));
            }
        }
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for part in all {
            check(doc, part, value, at)?;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        return Err(format!("{at}: {value} is not one of {allowed:?}"));
    }
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(list) => list.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !types.is_empty() && !types.iter().any(|t| is_type(value, t)) {
            return Err(format!("{at}: {value} is not of type {types:?}"));
        }
    }
    if let Value::Object(object) = value {
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for name in required.iter().filter_map(Value::as_str) {
                if !object.contains_key(name) {
                    return Err(format!("{at}: required property `{name}` is missing"));
                }
            }
        }
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            for (name, property) in properties {
                if let Some(v) = object.get(name) {
                    check(doc, property, v, &format!("{at}.{name}"))?;
                }
            }
            if schema.get("additionalProperties") == Some(&Value::Bool(false)) {
                for name in object.keys() {
                    if !properties.contains_key(name) {
                        return Err(format!("{at}: unexpected property `{name}`"));
                    }
                }
            }
        }
    }
    if let (Value::Array(items), Some(item)) = (value, schema.get("items")) {
        for (i, v) in items.iter().enumerate() {
            check(doc, item, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

fn is_type(value: &Value, name: &str) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.as_i64().is_some() || value.as_u64().is_some(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_checker_finds_a_wrong_type_a_missing_field_and_a_bad_enum() {
        let doc = json!({"components": {"schemas": {
            "S": {"type": "string", "enum": ["a", "b"]},
            "O": {"type": "object", "required": ["s"], "properties": {
                "s": {"$ref": "#/components/schemas/S"},
                "n": {"type": ["integer", "null"]}
            }}
        }}});
        let schema = json!({"$ref": "#/components/schemas/O"});
        assert!(check(&doc, &schema, &json!({"s": "a", "n": null}), "$").is_ok());
        assert!(check(&doc, &schema, &json!({"s": "c"}), "$").is_err());
        assert!(check(&doc, &schema, &json!({"n": 1}), "$").is_err());
        assert!(check(&doc, &schema, &json!({"s": "a", "n": "x"}), "$").is_err());
    }
}
