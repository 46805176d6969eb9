//! What the result adapters share: the `result-adapter` world's bindings
//! (with a public `export!` macro) and the event folding. The adapters
//! differ only in how they clean a traceback ([`Style`]).
#![no_std]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;

pub mod bindings {
    //! Generated from `wit/` (world `result-adapter`).
    wit_bindgen::generate!({
        world: "result-adapter",
        path: "../../wit",
        pub_export_macro: true,
        default_bindings_module: "adapter_core::bindings",
    });
}

use bindings::crownest::plugin::types::{
    Adapted, OutputKind, RawEvent, RichOutput, RunError, StreamName,
};

/// Which interpreter's tracebacks an adapter cleans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// IPython: traceback lines carry ANSI colours and may hold several
    /// lines each.
    IPython,
    /// Node: the traceback is `error.stack` split into lines; its first
    /// line repeats `name: message`, and frames inside node itself or the
    /// runner are noise to the user.
    Node,
}

/// Folds one run's events into stdout/stderr chunks, rich outputs (in
/// display order, empty bundles dropped), the first error and the
/// largest execution count.
pub fn adapt(events: Vec<RawEvent>, style: Style) -> Adapted {
    let mut adapted = Adapted {
        stdout: Vec::new(),
        stderr: Vec::new(),
        outputs: Vec::new(),
        error: None,
        execution_count: None,
    };
    for event in events {
        match event {
            RawEvent::Stream(stream) => match stream.name {
                StreamName::Stdout => adapted.stdout.push(stream.text),
                StreamName::Stderr => adapted.stderr.push(stream.text),
            },
            RawEvent::DisplayData(display) | RawEvent::ExecuteResult(display)
                if display.bundle.is_empty() =>
            {
                bump(&mut adapted.execution_count, display.execution_count);
            }
            RawEvent::DisplayData(display) => adapted.outputs.push(RichOutput {
                kind: OutputKind::DisplayData,
                bundle: display.bundle,
                execution_count: display.execution_count,
            }),
            RawEvent::ExecuteResult(display) => {
                bump(&mut adapted.execution_count, display.execution_count);
                adapted.outputs.push(RichOutput {
                    kind: OutputKind::ExecuteResult,
                    bundle: display.bundle,
                    execution_count: display.execution_count,
                });
            }
            RawEvent::Error(error) if adapted.error.is_none() => {
                let traceback =
                    clean_traceback(&error.ename, &error.evalue, &error.traceback, style);
                adapted.error = Some(RunError {
                    name: strip_ansi(&error.ename),
                    message: strip_ansi(&error.evalue),
                    traceback,
                });
            }
            // A second error (an error while handling the first) adds nothing
            // the user can act on beyond the first one.
            RawEvent::Error(_) => {}
        }
    }
    adapted
}

fn bump(count: &mut Option<u32>, new: Option<u32>) {
    if let Some(new) = new {
        *count = Some(count.map_or(new, |old| old.max(new)));
    }
}

/// One line per element, ANSI escapes removed, noise dropped per style.
pub fn clean_traceback(ename: &str, evalue: &str, lines: &[String], style: Style) -> Vec<String> {
    let mut out = Vec::new();
    for line in lines {
        for part in strip_ansi(line).split('\n') {
            let part = part.trim_end();
            if part.is_empty() {
                continue;
            }
            if style == Style::Node && is_node_noise(part) {
                continue;
            }
            out.push(String::from(part));
        }
    }
    if style == Style::Node
        && let Some(first) = out.first()
    {
        let header = if evalue.is_empty() {
            String::from(ename)
        } else {
            alloc::format!("{ename}: {evalue}")
        };
        if *first == header {
            out.remove(0);
        }
    }
    out
}

fn is_node_noise(frame: &str) -> bool {
    let frame = frame.trim_start();
    frame.starts_with("at ")
        && (frame.contains("node:internal")
            || frame.contains("(node:")
            || frame.starts_with("at node:")
            || frame.contains("node_runner.js"))
}

/// Removes ANSI escape sequences (CSI `ESC [ … final`, OSC `ESC ] … BEL`,
/// and two-byte escapes).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('[') => {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            Some(']') => {
                while let Some(c) = chars.next() {
                    if c == '\u{7}' {
                        break;
                    }
                    if c == '\u{1b}' {
                        chars.next();
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    out
}
