//! forkd's results as MCP tool results: text content for output and values,
//! image content for PNG/JPEG displays and image files, `is_error` for user
//! code that failed (an exception, a non-zero exit, a timeout).

use base64::Engine as _;
use forkd_ipc::{CellResult, CommandResult, DisplayData, FileEntry, SessionInfo};
use rmcp::model::{CallToolResult, ContentBlock};

const IMAGE_TYPES: [&str; 2] = ["image/png", "image/jpeg"];

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A failed tool call whose text says why.
pub fn tool_error(message: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message)])
}

/// One rich value: an image when it has one, else its text.
fn display(d: &DisplayData) -> Option<ContentBlock> {
    for mime in IMAGE_TYPES {
        if let Some(b64) = d.data.get(mime) {
            return Some(ContentBlock::image(b64.clone(), mime));
        }
    }
    [
        "text/plain",
        "text/markdown",
        "text/html",
        "application/json",
    ]
    .iter()
    .find_map(|m| d.data.get(*m))
    .map(|t| ContentBlock::text(t.clone()))
}

/// A cell: stdout, stderr (marked), its displays and value, and on failure
/// the traceback (`is_error`).
pub fn cell(r: &CellResult) -> CallToolResult {
    let mut content = Vec::new();
    if !r.stdout.is_empty() {
        content.push(ContentBlock::text(lossy(&r.stdout)));
    }
    if !r.stderr.is_empty() {
        content.push(ContentBlock::text(format!(
            "[stderr]\n{}",
            lossy(&r.stderr)
        )));
    }
    content.extend(r.results.iter().filter_map(display));
    // A value without a rich result (the daemon sends both; keep it robust).
    if let (Some(text), false) = (&r.text, r.results.iter().any(|d| d.main)) {
        content.push(ContentBlock::text(text.clone()));
    }
    let mut notes: Vec<String> = Vec::new();
    if r.stdout_truncated || r.stderr_truncated {
        notes
            .push("output was cut at the session's output limit (and the code interrupted)".into());
    }
    // The same one line as the CLI and clients (`ipc::explain`): which limit
    // stopped the cell, and whether the session kept its state.
    if let Some(why) = r.kill_message() {
        let kept = r.error.as_ref().is_none_or(|e| e.name != "KernelDied");
        notes.push(if kept {
            format!("{why}; the session keeps its state")
        } else {
            format!("{why}; the session's interpreter was replaced and its state is lost")
        });
    }
    let failed = r.error.is_some() || r.timed_out || r.killed_by.is_some();
    if let Some(e) = &r.error {
        let mut tb = e.traceback.trim_end().to_owned();
        let last = format!("{}: {}", e.name, e.value);
        if !tb.contains(&last) {
            if !tb.is_empty() {
                tb.push('\n');
            }
            tb.push_str(&last);
        }
        content.push(ContentBlock::text(tb));
    }
    if !notes.is_empty() {
        content.push(ContentBlock::text(format!("[forkd] {}", notes.join("; "))));
    }
    if content.is_empty() {
        content.push(ContentBlock::text("(no output)"));
    }
    if failed {
        CallToolResult::error(content)
    } else {
        CallToolResult::success(content)
    }
}

/// A command: its status line, then stdout and stderr; `is_error` unless it
/// exited 0.
pub fn command(r: &CommandResult) -> CallToolResult {
    let why = r.kill_message();
    let status = match (r.exit_code, r.signal, &why) {
        (Some(code), _, _) if !r.timed_out => format!("exit code {code}"),
        (_, _, Some(why)) => why.clone(),
        (Some(code), _, None) => format!("exit code {code}"),
        (None, Some(sig), None) => format!("killed by signal {sig}"),
        (None, None, None) => "ended without an exit status".to_owned(),
    };
    let mut content = vec![ContentBlock::text(status)];
    if !r.stdout.is_empty() {
        content.push(ContentBlock::text(lossy(&r.stdout)));
    }
    if !r.stderr.is_empty() {
        content.push(ContentBlock::text(format!(
            "[stderr]\n{}",
            lossy(&r.stderr)
        )));
    }
    // A cut the status line does not already say: the command exited on
    // its own before the kill reached it.
    if let (Some(_), Some(why)) = (r.exit_code, &why) {
        if !r.timed_out {
            content.push(ContentBlock::text(format!("[forkd] {why}")));
        }
    }
    if r.exit_code == Some(0) && !r.timed_out {
        CallToolResult::success(content)
    } else {
        CallToolResult::error(content)
    }
}

/// The image type of `data` by its magic bytes.
fn image_type(data: &[u8]) -> Option<&'static str> {
    if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if data.starts_with(b"\xff\xd8\xff") {
        Some("image/jpeg")
    } else if data.starts_with(b"GIF87a") || data.starts_with(b"GIF89a") {
        Some("image/gif")
    } else {
        None
    }
}

/// A file's contents: text when it is UTF-8, an image when it is one, else
/// base64 (announced in a first text block).
pub fn file(path: &str, data: &[u8]) -> CallToolResult {
    let b64 = || base64::engine::general_purpose::STANDARD.encode(data);
    if let Some(mime) = image_type(data) {
        return CallToolResult::success(vec![ContentBlock::image(b64(), mime)]);
    }
    match std::str::from_utf8(data) {
        Ok(text) => CallToolResult::success(vec![ContentBlock::text(text)]),
        Err(_) => CallToolResult::success(vec![
            ContentBlock::text(format!(
                "{path} is binary ({} bytes); its base64 follows",
                data.len()
            )),
            ContentBlock::text(b64()),
        ]),
    }
}

/// A directory listing, as JSON (name, path, type, size, mode, modified_ms).
pub fn entries(entries: &[FileEntry]) -> CallToolResult {
    let rows: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            serde_json::json!({
                "name": e.name, "path": e.path, "type": e.kind, "size": e.size,
                "mode": format!("{:o}", e.mode), "modified_ms": e.modified_ms,
            })
        })
        .collect();
    json(&rows)
}

/// A session's summary as the tools show it; `owned`: created by this MCP
/// server and killed when it exits.
pub fn session_json(s: &SessionInfo, owned: Option<bool>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "session_id": s.session,
        "zygote": s.zygote,
        "state": s.state,
        "labels": s.labels,
        "age_ms": s.age_ms,
        "ttl_left_ms": s.ttl_left_ms,
        "cells": s.cells,
        "memory_bytes": s.usage.memory_bytes,
    });
    if let Some(ended) = s.ended_by {
        v["ended_by"] = serde_json::json!(ended);
    }
    if let Some(o) = owned {
        v["killed_when_mcp_server_exits"] = o.into();
    }
    v
}

/// A JSON value as one text block.
pub fn json<T: serde::Serialize>(v: &T) -> CallToolResult {
    match serde_json::to_string_pretty(v) {
        Ok(s) => CallToolResult::success(vec![ContentBlock::text(s)]),
        Err(e) => tool_error(format!("could not encode the answer: {e}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use forkd_ipc::CellError;

    fn texts(r: &CallToolResult) -> Vec<String> {
        r.content
            .iter()
            .filter_map(|c| c.as_text().map(|t| t.text.clone()))
            .collect()
    }

    #[test]
    fn a_cell_with_output_value_and_figure() {
        let mut png = DisplayData::default();
        png.data.insert("image/png".into(), "iVBORw0KGgo=".into());
        png.data.insert("text/plain".into(), "<Figure>".into());
        let mut value = DisplayData {
            main: true,
            ..Default::default()
        };
        value.data.insert("text/plain".into(), "42".into());
        let r = cell(&CellResult {
            stdout: b"hi\n".to_vec(),
            results: vec![png, value],
            text: Some("42".into()),
            ..Default::default()
        });
        assert_eq!(r.is_error, Some(false));
        assert_eq!(texts(&r), vec!["hi\n", "42"]);
        let img = r.content.iter().find_map(|c| c.as_image()).unwrap();
        assert_eq!(img.mime_type, "image/png");
        assert_eq!(img.data, "iVBORw0KGgo=");
    }

    #[test]
    fn an_exception_is_a_tool_error_with_its_traceback() {
        let r = cell(&CellResult {
            error: Some(CellError {
                name: "ZeroDivisionError".into(),
                value: "division by zero".into(),
                traceback: "Traceback (most recent call last):\n  line 1\n".into(),
            }),
            ..Default::default()
        });
        assert_eq!(r.is_error, Some(true));
        let t = texts(&r).join("\n");
        assert!(
            t.ends_with("line 1\nZeroDivisionError: division by zero"),
            "{t}"
        );
    }

    #[test]
    fn cells_stopped_by_a_limit_say_which_in_the_clients_words() {
        let timed_out = CellResult {
            timed_out: true,
            timeout_ms: Some(1500),
            ..Default::default()
        };
        let r = cell(&timed_out);
        assert_eq!(r.is_error, Some(true));
        assert_eq!(
            texts(&r),
            vec![format!(
                "[forkd] {}; the session keeps its state",
                timed_out.kill_message().unwrap()
            )]
        );
        assert!(texts(&r)[0].starts_with("[forkd] interrupted: timed out after 1.5 s"));
        let oom = cell(&CellResult {
            killed_by: Some(forkd_ipc::KilledBy::Oom),
            memory_limit_bytes: Some(256 << 20),
            peak_memory_bytes: Some(256 << 20),
            error: Some(CellError {
                name: "KernelDied".into(),
                value: "the interpreter died".into(),
                traceback: String::new(),
            }),
            ..Default::default()
        });
        assert_eq!(oom.is_error, Some(true));
        assert_eq!(
            texts(&oom).last().unwrap(),
            "[forkd] killed: out of memory (limit 256 MiB, peak 256 MiB); the session's interpreter was replaced and its state is lost"
        );
    }

    #[test]
    fn commands_fail_unless_they_exit_zero() {
        let ok = command(&CommandResult {
            exit_code: Some(0),
            stdout: b"hi\n".to_vec(),
            ..Default::default()
        });
        assert_eq!(ok.is_error, Some(false));
        assert_eq!(texts(&ok), vec!["exit code 0", "hi\n"]);
        let bad = command(&CommandResult {
            exit_code: Some(3),
            stderr: b"no\n".to_vec(),
            ..Default::default()
        });
        assert_eq!(bad.is_error, Some(true));
        assert_eq!(texts(&bad), vec!["exit code 3", "[stderr]\nno\n"]);
        let killed = command(&CommandResult {
            signal: Some(9),
            timed_out: true,
            timeout_ms: Some(2000),
            ..Default::default()
        });
        assert_eq!(killed.is_error, Some(true));
        assert_eq!(
            texts(&killed)[0],
            "killed: timed out after 2 s (the timeout)"
        );
        let flooded = command(&CommandResult {
            signal: Some(9),
            stdout: b"y\n".to_vec(),
            stdout_truncated: true,
            output_limit_bytes: Some(1 << 20),
            ..Default::default()
        });
        assert_eq!(
            texts(&flooded),
            vec![
                "killed: output over the limit (1 MiB of stdout+stderr)",
                "y\n"
            ]
        );
        let cut = command(&CommandResult {
            exit_code: Some(0),
            stdout: b"y\n".to_vec(),
            stdout_truncated: true,
            output_limit_bytes: Some(1 << 20),
            ..Default::default()
        });
        assert_eq!(cut.is_error, Some(false));
        assert_eq!(
            texts(&cut),
            vec![
                "exit code 0",
                "y\n",
                "[forkd] output cut at the limit (1 MiB of stdout+stderr)"
            ]
        );
    }

    #[test]
    fn files_are_text_images_or_base64() {
        assert_eq!(texts(&file("a", b"hello")), vec!["hello"]);
        let png = file("p", b"\x89PNG\r\n\x1a\nrest");
        assert_eq!(png.content[0].as_image().unwrap().mime_type, "image/png");
        let bin = file("b", &[0xff, 0x00, 0x01]);
        assert_eq!(
            texts(&bin),
            vec!["b is binary (3 bytes); its base64 follows", "/wAB"]
        );
    }
}
