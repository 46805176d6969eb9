//! matplotlib figure description (`application/vnd.crownest.figure+json`)
//! -> E2B-shaped chart JSON. One axes makes one chart; several make a
//! `superchart` whose `elements` are the charts. The description format is
//! documented in docs/plugins.md.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use serde_json::{Map, Value, json};

/// The chart JSON text, or `None` when the description is not valid JSON
/// of the expected shape (the formatter then falls back to the PNG).
pub fn from_figure(text: &str) -> Option<String> {
    let figure: Value = serde_json::from_str(text).ok()?;
    let axes = figure.get("axes")?.as_array()?;
    let figure_title = str_field(&figure, "title");
    let chart = match axes.as_slice() {
        [] => {
            let mut chart = Map::new();
            chart.insert("type".into(), "unknown".into());
            chart.insert("title".into(), figure_title.into());
            chart.insert("elements".into(), Value::Array(Vec::new()));
            Value::Object(chart)
        }
        [one] => {
            let mut chart = axes_chart(one);
            if chart
                .get("title")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                chart.insert("title".into(), figure_title.into());
            }
            Value::Object(chart)
        }
        many => json!({
            "type": "superchart",
            "title": figure_title,
            "elements": many.iter().map(|a| Value::Object(axes_chart(a))).collect::<Vec<_>>(),
        }),
    };
    serde_json::to_string(&chart).ok()
}

fn axes_chart(axes: &Value) -> Map<String, Value> {
    let lines = array(axes, "lines");
    let scatters = array(axes, "scatters");
    let bars = array(axes, "bars");
    let pies = array(axes, "pies");
    let boxes = array(axes, "boxes");

    let mut chart = Map::new();
    let title = str_field(axes, "title");
    let (kind, elements) = if !pies.is_empty() {
        ("pie", pie_elements(pies))
    } else if !boxes.is_empty() {
        ("box_and_whisker", box_elements(boxes))
    } else if !bars.is_empty() {
        ("bar", bar_elements(axes, bars))
    } else if !lines.is_empty() && scatters.is_empty() {
        ("line", point_elements(lines, true))
    } else if !scatters.is_empty() && lines.is_empty() {
        ("scatter", point_elements(scatters, false))
    } else {
        // Mixed lines and scatters, or nothing E2B can describe.
        ("unknown", Vec::new())
    };
    chart.insert("type".into(), kind.into());
    chart.insert("title".into(), title.into());
    if kind != "pie" {
        let x_label = str_field(axes, "xlabel");
        let y_label = str_field(axes, "ylabel");
        chart.insert("x_label".into(), x_label.clone().into());
        chart.insert("y_label".into(), y_label.clone().into());
        chart.insert(
            "x_unit".into(),
            unit(&x_label).map_or(Value::Null, Value::from),
        );
        chart.insert(
            "y_unit".into(),
            unit(&y_label).map_or(Value::Null, Value::from),
        );
    }
    if kind == "line" || kind == "scatter" {
        for (key, from) in [("x_scale", "xscale"), ("y_scale", "yscale")] {
            let scale = axes.get(from).and_then(Value::as_str).unwrap_or("linear");
            chart.insert(key.into(), scale.into());
        }
        for (key, from) in [
            ("x_ticks", "xticks"),
            ("x_tick_labels", "xticklabels"),
            ("y_ticks", "yticks"),
            ("y_tick_labels", "yticklabels"),
        ] {
            chart.insert(key.into(), Value::Array(array(axes, from).to_vec()));
        }
    }
    chart.insert("elements".into(), Value::Array(elements));
    chart
}

/// `[{label, points: [[x, y], …]}]` from `lines` (`xs`, `ys`) or `scatters` (`points`).
fn point_elements(series: &[Value], lines: bool) -> Vec<Value> {
    series
        .iter()
        .map(|s| {
            let points: Vec<Value> = if lines {
                array(s, "xs")
                    .iter()
                    .zip(array(s, "ys"))
                    .map(|(x, y)| Value::Array(alloc::vec![x.clone(), y.clone()]))
                    .collect()
            } else {
                array(s, "points")
                    .iter()
                    .filter(|p| p.as_array().is_some_and(|p| p.len() == 2))
                    .cloned()
                    .collect()
            };
            json!({ "label": str_field(s, "label"), "points": points })
        })
        .collect()
}

/// `[{label, group, value}]`: one per bar; `label` is the bar's category
/// (its x tick label), `group` the series (container) label.
fn bar_elements(axes: &Value, bars: &[Value]) -> Vec<Value> {
    let tick_labels = array(axes, "xticklabels");
    let mut out = Vec::new();
    for series in bars {
        let group = str_field(series, "label");
        let heights = array(series, "heights");
        let labels = array(series, "xlabels");
        let xs = array(series, "xs");
        for (i, height) in heights.iter().enumerate() {
            let label = labels
                .get(i)
                .and_then(Value::as_str)
                .map(String::from)
                .or_else(|| {
                    (tick_labels.len() == heights.len())
                        .then(|| tick_labels.get(i).and_then(Value::as_str).map(String::from))
                        .flatten()
                })
                .or_else(|| xs.get(i).map(number_label))
                .unwrap_or_else(|| i.to_string());
            out.push(json!({ "label": label, "group": group, "value": height }));
        }
    }
    out
}

/// `[{label, angle, radius}]`: one per wedge, `angle` in degrees.
fn pie_elements(pies: &[Value]) -> Vec<Value> {
    let mut out = Vec::new();
    for pie in pies {
        let labels = array(pie, "labels");
        let angles = array(pie, "angles");
        let fractions = array(pie, "fractions");
        let radius = pie.get("radius").and_then(Value::as_f64).unwrap_or(1.0);
        let count = angles.len().max(fractions.len());
        for i in 0..count {
            let angle = angles
                .get(i)
                .and_then(Value::as_f64)
                .or_else(|| fractions.get(i).and_then(Value::as_f64).map(|f| f * 360.0))
                .unwrap_or(0.0);
            let label = labels.get(i).and_then(Value::as_str).unwrap_or("");
            out.push(json!({ "label": label, "angle": angle, "radius": radius }));
        }
    }
    out
}

/// `[{label, min, first_quartile, median, third_quartile, max, outliers}]`.
fn box_elements(boxes: &[Value]) -> Vec<Value> {
    boxes
        .iter()
        .map(|b| {
            let num = |key: &str| b.get(key).and_then(Value::as_f64).unwrap_or(0.0);
            json!({
                "label": str_field(b, "label"),
                "min": num("min"),
                "first_quartile": num("q1"),
                "median": num("median"),
                "third_quartile": num("q3"),
                "max": num("max"),
                "outliers": array(b, "outliers"),
            })
        })
        .collect()
}

/// `"Time (s)"` -> `s`, `"Distance [km]"` -> `km`.
fn unit(label: &str) -> Option<String> {
    let label = label.trim_end();
    let (open, close) = match label.chars().last()? {
        ')' => ('(', ')'),
        ']' => ('[', ']'),
        _ => return None,
    };
    let start = label.rfind(open)?;
    let inner = label[start + 1..label.len() - close.len_utf8()].trim();
    (!inner.is_empty()).then(|| String::from(inner))
}

fn number_label(x: &Value) -> String {
    match x {
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.abs() < 1e15 && (f as i64) as f64 == f => (f as i64).to_string(),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn array<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value
        .get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn str_field(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_str)
        .map(String::from)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_comes_from_trailing_brackets() {
        assert_eq!(unit("Time (s)").as_deref(), Some("s"));
        assert_eq!(unit("Distance [km]").as_deref(), Some("km"));
        assert_eq!(unit("Value"), None);
    }
}
