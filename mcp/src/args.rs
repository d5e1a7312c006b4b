//! Tool arguments: their JSON schemas (what `tools/list` advertises) and
//! their parsing, which turns a bad argument into a message the model can
//! act on.

use std::collections::BTreeMap;
use std::sync::Arc;

use rmcp::model::JsonObject;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// `run_code`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCodeArgs {
    /// Python source. The value of a trailing expression is returned as the
    /// result (as in a notebook cell).
    pub code: String,
    /// Run in this session (state is kept between calls). Without it, the
    /// code runs once in a fresh sandbox that is discarded afterwards.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Interrupt the code after this many milliseconds (default: the
    /// daemon's).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// `session_create`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionCreateArgs {
    /// Zygote (preloaded interpreter) by name; default: the daemon's default.
    #[serde(default)]
    pub zygote: Option<String>,
    /// Lifetime in milliseconds (default and maximum: the daemon's).
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    /// End the session after this many milliseconds without a call.
    #[serde(default)]
    pub idle_timeout_ms: Option<u64>,
    /// Free-form labels, shown by session_list and usable as its filter.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Keep the session when this MCP server exits (default false: it is
    /// killed then). A kept session still ends at its TTL.
    #[serde(default)]
    pub keep: bool,
}

/// `session_list`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionListArgs {
    /// Only sessions carrying every one of these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `session_kill`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionKillArgs {
    /// The id session_create returned.
    pub session_id: String,
}

/// `run_command`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCommandArgs {
    /// Shell command line, run as `/bin/sh -c COMMAND` inside the session's
    /// sandbox.
    pub command: String,
    /// The session to run it in.
    pub session_id: String,
    /// Working directory inside the sandbox (default: the session's, /tmp).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Kill the command after this many milliseconds (default: the daemon's).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// `write_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFileArgs {
    /// The session.
    pub session_id: String,
    /// Path inside the sandbox; relative paths are below the session's
    /// working directory (/tmp).
    pub path: String,
    /// The file's text (UTF-8). Give exactly one of content and
    /// content_base64.
    #[serde(default)]
    pub content: Option<String>,
    /// The file's bytes, base64-encoded (for binary files).
    #[serde(default)]
    pub content_base64: Option<String>,
}

/// `read_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFileArgs {
    /// The session.
    pub session_id: String,
    /// Path inside the sandbox.
    pub path: String,
}

/// `list_files`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListFilesArgs {
    /// The session.
    pub session_id: String,
    /// Directory inside the sandbox (default: the session's working
    /// directory, /tmp).
    #[serde(default)]
    pub path: Option<String>,
}

/// The input schema of `T`, as `tools/list` shows it.
pub fn schema<T: JsonSchema + 'static>() -> Arc<JsonObject> {
    use rmcp::handler::server::common::{schema_for_input, schema_for_type};
    // schema_for_input only fails for a schema whose root is not an object;
    // every type above is a struct, and the raw schema is still a valid one.
    schema_for_input::<T>().unwrap_or_else(|_| schema_for_type::<T>())
}

/// Parses `tool`'s arguments; the error says what was wrong and what the
/// tool takes.
pub fn parse<T: DeserializeOwned + JsonSchema + 'static>(
    tool: &str,
    args: JsonObject,
) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::Object(args)).map_err(|e| {
        let schema = schema::<T>();
        let wanted = schema
            .get("properties")
            .and_then(|p| p.as_object())
            .map(|p| p.keys().cloned().collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        let required = schema
            .get("required")
            .and_then(|r| r.as_array())
            .map(|r| {
                r.iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        format!(
            "invalid arguments for {tool}: {e}. It takes {{{wanted}}} (required: {required}); \
             see its input schema"
        )
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn obj(v: serde_json::Value) -> JsonObject {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn schemas_name_fields_and_required_ones() {
        let s = schema::<RunCodeArgs>();
        assert_eq!(s["type"], "object");
        let props = s["properties"].as_object().unwrap();
        assert!(props.contains_key("code") && props.contains_key("session_id"));
        assert_eq!(s["required"], serde_json::json!(["code"]));
        let s = schema::<SessionCreateArgs>();
        assert!(s
            .get("required")
            .is_none_or(|r| r.as_array().unwrap().is_empty()));
    }

    #[test]
    fn bad_arguments_say_what_is_wrong() {
        let e = parse::<RunCodeArgs>("run_code", obj(serde_json::json!({}))).unwrap_err();
        assert!(e.contains("missing field `code`"), "{e}");
        assert!(e.contains("required: code"), "{e}");
        let e = parse::<RunCodeArgs>("run_code", obj(serde_json::json!({"code": 5}))).unwrap_err();
        assert!(
            e.contains("invalid type: integer `5`, expected a string"),
            "{e}"
        );
        let e = parse::<RunCodeArgs>("run_code", obj(serde_json::json!({"code": "1", "cod": 1})))
            .unwrap_err();
        assert!(e.contains("unknown field `cod`"), "{e}");
        let ok = parse::<RunCodeArgs>("run_code", obj(serde_json::json!({"code": "1"}))).unwrap();
        assert_eq!(ok.code, "1");
        assert!(ok.session_id.is_none());
    }
}
