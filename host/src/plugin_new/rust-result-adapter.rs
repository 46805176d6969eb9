//! A CrowNest result adapter: a run's raw interpreter events -> stdout and
//! stderr chunks, rich outputs and the error.

wit_bindgen::generate!({ world: "result-adapter", path: "wit" });

use crownest::plugin::types::{OutputKind, RichOutput, RunError, StreamName};

struct Plugin;

impl Guest for Plugin {
    fn adapt(events: Vec<RawEvent>, _config: String) -> Result<Adapted, String> {
        let mut adapted = Adapted {
            stdout: Vec::new(),
            stderr: Vec::new(),
            outputs: Vec::new(),
            error: None,
            execution_count: None,
        };
        for event in events {
            match event {
                RawEvent::Stream(s) => match s.name {
                    StreamName::Stdout => adapted.stdout.push(s.text),
                    StreamName::Stderr => adapted.stderr.push(s.text),
                },
                RawEvent::DisplayData(d) => adapted.outputs.push(RichOutput {
                    kind: OutputKind::DisplayData,
                    bundle: d.bundle,
                    execution_count: d.execution_count,
                }),
                RawEvent::ExecuteResult(d) => {
                    adapted.execution_count = d.execution_count;
                    adapted.outputs.push(RichOutput {
                        kind: OutputKind::ExecuteResult,
                        bundle: d.bundle,
                        execution_count: d.execution_count,
                    });
                }
                RawEvent::Error(e) => {
                    adapted.error = Some(RunError {
                        name: e.ename,
                        message: e.evalue,
                        traceback: strip_ansi_all(e.traceback),
                    })
                }
            }
        }
        Ok(adapted)
    }
}

/// Traceback lines without terminal colour codes.
fn strip_ansi_all(lines: Vec<String>) -> Vec<String> {
    lines.iter().map(|l| strip_ansi(l)).collect()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

export!(Plugin);

#[cfg(test)]
mod tests {
    #[test]
    fn colour_codes_are_stripped() {
        assert_eq!(super::strip_ansi("\u{1b}[31mValueError\u{1b}[0m: x"), "ValueError: x");
    }
}
