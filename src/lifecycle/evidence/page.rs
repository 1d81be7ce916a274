//! The evidence document for people: the same facts as the JSON, as a
//! Markdown page (readable as text, rendered by any forge) or a
//! self-contained HTML page. One list of sections feeds both.

use serde_json::Value;

/// A section: a heading, lines of `label: value`, and a table.
struct Section {
    heading: String,
    facts: Vec<(String, String)>,
    table: Option<(Vec<&'static str>, Vec<Vec<String>>)>,
}

/// A JSON value as text for a cell ("-" for none).
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// The sections of the evidence document `doc` (as [`super::gather`] builds it).
fn sections(doc: &Value) -> Vec<Section> {
    let fact = |label: &str, v: &Value| (label.to_string(), text(v));
    let chain = &doc["chain"];
    let chain_state = if chain["table_broken"].is_null() && chain["file_broken"].is_null() {
        let others = match chain["file_other_databases"].as_u64() {
            Some(n) if n > 0 => {
                format!(" ({n} lines of other databases, checked against their own hashes)")
            }
            _ => String::new(),
        };
        format!(
            "intact: {} events in rekey.audit, {} in {}{others}",
            text(&chain["table_events"]),
            text(&chain["file_events"]),
            text(&chain["file"])
        )
    } else {
        format!(
            "BROKEN: {} {}",
            text(&chain["table_broken"]),
            text(&chain["file_broken"])
        )
    };
    let v = &doc["final_full_verify"];
    vec![
        Section {
            heading: "Who, when, why".into(),
            facts: vec![
                fact("Job", &doc["job"]),
                fact("Rotation", &doc["rotation_id"]),
                fact("Step reached", &doc["step"]),
                fact("Operators", &doc["who"]),
                fact("Reason", &doc["why"]),
                fact("Incident", &doc["incident_id"]),
                fact("Operator notes", &doc["notes"]),
                fact("Started", &doc["when"]["started_at"]),
                fact("Promoted", &doc["when"]["promoted_at"]),
                fact("Finished", &doc["when"]["finished_at"]),
                fact("Secret", &doc["secret_id"]),
                fact("Grace period (s)", &doc["grace_s"]),
            ],
            table: None,
        },
        Section {
            heading: "Keys (ids and fingerprints, never material)".into(),
            facts: vec![],
            table: Some((
                vec!["", "id", "fingerprint"],
                ["old", "new"]
                    .iter()
                    .map(|k| {
                        vec![
                            k.to_string(),
                            text(&doc["keys"][k]["id"]),
                            text(&doc["keys"][k]["fingerprint"]),
                        ]
                    })
                    .collect(),
            )),
        },
        Section {
            heading: "Steps".into(),
            facts: vec![],
            table: Some((
                vec![
                    "#",
                    "step",
                    "at (UTC)",
                    "operator",
                    "verification",
                    "values",
                    "s since previous",
                    "detail",
                ],
                doc["steps"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        [
                            "seq",
                            "step",
                            "at",
                            "operator",
                            "verification_status",
                            "affected_records",
                            "seconds_since_previous_step",
                            "detail",
                        ]
                        .iter()
                        .map(|f| text(&s[f]))
                        .collect()
                    })
                    .collect(),
            )),
        },
        Section {
            heading: "Re-encryption".into(),
            facts: vec![],
            table: Some((
                vec![
                    "job",
                    "state",
                    "started",
                    "finished",
                    "seconds",
                    "values re-encrypted",
                    "quarantined",
                    "not rotated",
                ],
                doc["reencryption_jobs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|j| {
                        let t = &j["totals"];
                        vec![
                            text(&j["job_id"]),
                            text(&j["state"]),
                            text(&j["started_at"]),
                            text(&j["finished_at"]),
                            text(&j["duration_s"]),
                            text(&t["values_rewritten"]),
                            text(&t["values_failed"]),
                            text(&t["values_not_rotated"]),
                        ]
                    })
                    .collect(),
            )),
        },
        Section {
            heading: "Final full verify".into(),
            facts: if v["done"] == Value::Bool(true) {
                vec![
                    fact("At", &v["at"]),
                    fact("Passed", &v["passed"]),
                    fact("Values", &v["values_checked_or_left"]),
                    fact("Detail", &v["detail"]),
                ]
            } else {
                vec![fact("Not yet", &v["why"])]
            },
            table: None,
        },
        Section {
            heading: "Audit chain".into(),
            facts: vec![("Chain".into(), chain_state)],
            table: Some((
                vec![
                    "#",
                    "event",
                    "at (UTC)",
                    "old key",
                    "new key",
                    "prev_hash",
                    "hash",
                ],
                doc["events"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        [
                            "seq",
                            "event_type",
                            "timestamp",
                            "old_key",
                            "new_key",
                            "prev_hash",
                            "hash",
                        ]
                        .iter()
                        .map(|f| text(&e[f]))
                        .collect()
                    })
                    .collect(),
            )),
        },
    ]
}

/// Escapes text for a Markdown page: a table cell's bars and newlines, and
/// HTML (which Markdown renders as it stands), so an operator's notes are
/// shown, never run.
fn md(s: &str) -> String {
    html_escape(s).replace('|', "\\|").replace('\n', " ")
}

/// The document as Markdown.
pub fn markdown(doc: &Value) -> String {
    let mut out = format!(
        "# Key rotation evidence: {} rotation {}\n\nGenerated {} by rekey from rekey.rotations, rekey.jobs and the hash-chained rekey.audit.\n",
        md(&text(&doc["job"])),
        text(&doc["rotation_id"]),
        text(&doc["generated_at"])
    );
    for s in sections(doc) {
        out.push_str(&format!("\n## {}\n\n", s.heading));
        for (label, value) in &s.facts {
            out.push_str(&format!("- **{label}:** {}\n", md(value)));
        }
        if let Some((head, rows)) = &s.table {
            if !s.facts.is_empty() {
                out.push('\n');
            }
            out.push_str(&format!("| {} |\n", head.join(" | ")));
            out.push_str(&format!("|{}\n", "---|".repeat(head.len())));
            for row in rows {
                out.push_str(&format!(
                    "| {} |\n",
                    row.iter().map(|c| md(c)).collect::<Vec<_>>().join(" | ")
                ));
            }
        }
    }
    out
}

/// Escapes text for HTML.
fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The document as one self-contained HTML page.
pub fn html(doc: &Value) -> String {
    let title = format!(
        "Key rotation evidence: {} rotation {}",
        text(&doc["job"]),
        text(&doc["rotation_id"])
    );
    let mut out = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #999;padding:2px 6px;font-size:90%}}</style>\
         </head><body>\n<h1>{t}</h1>\n<p>Generated {} by rekey from rekey.rotations, rekey.jobs and the hash-chained rekey.audit.</p>\n",
        html_escape(&text(&doc["generated_at"])),
        t = html_escape(&title)
    );
    for s in sections(doc) {
        out.push_str(&format!("<h2>{}</h2>\n", html_escape(&s.heading)));
        if !s.facts.is_empty() {
            out.push_str("<ul>\n");
            for (label, value) in &s.facts {
                out.push_str(&format!(
                    "<li><b>{}:</b> {}</li>\n",
                    html_escape(label),
                    html_escape(value)
                ));
            }
            out.push_str("</ul>\n");
        }
        if let Some((head, rows)) = &s.table {
            out.push_str("<table><tr>");
            for h in head {
                out.push_str(&format!("<th>{}</th>", html_escape(h)));
            }
            out.push_str("</tr>\n");
            for row in rows {
                out.push_str("<tr>");
                for c in row {
                    out.push_str(&format!("<td>{}</td>", html_escape(c)));
                }
                out.push_str("</tr>\n");
            }
            out.push_str("</table>\n");
        }
    }
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_shows_an_operators_markup_as_text_and_keeps_table_cells_whole() {
        let doc = serde_json::json!({
            "job": "patients",
            "notes": ["<script>alert(1)</script> a | b"],
            "steps": [{ "step": "key_staged", "detail": "x | y" }],
        });
        let page = markdown(&doc);
        assert!(!page.contains("<script>"), "{page}");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt; a \\| b"),
            "{page}"
        );
    }
}
