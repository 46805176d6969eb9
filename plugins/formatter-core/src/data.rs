//! DataFrame description (`application/vnd.crownest.dataframe+json`) ->
//! `data` JSON: the same fields, checked and normalised (every row as long
//! as `columns`, `index` as long as `rows`).

use alloc::string::String;
use alloc::vec::Vec;
use serde_json::{Value, json};

pub fn from_dataframe(text: &str) -> Option<String> {
    let frame: Value = serde_json::from_str(text).ok()?;
    let columns: Vec<Value> = frame.get("columns")?.as_array()?.clone();
    let rows = frame.get("rows")?.as_array()?;
    let width = columns.len();
    let rows: Vec<Value> = rows
        .iter()
        .map(|row| {
            let mut cells = row.as_array().cloned().unwrap_or_default();
            cells.resize(width, Value::Null);
            Value::Array(cells)
        })
        .collect();
    let mut index: Vec<Value> = frame
        .get("index")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    index.truncate(rows.len());
    while index.len() < rows.len() {
        index.push(Value::from(index.len()));
    }
    let mut dtypes: Vec<Value> = frame
        .get("dtypes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    dtypes.resize(width, Value::from("object"));
    let total_rows = frame
        .get("totalRows")
        .and_then(Value::as_u64)
        .unwrap_or(rows.len() as u64);
    let truncated = frame
        .get("truncated")
        .and_then(Value::as_bool)
        .unwrap_or(total_rows > rows.len() as u64);
    serde_json::to_string(&json!({
        "columns": columns,
        "index": index,
        "rows": rows,
        "dtypes": dtypes,
        "totalRows": total_rows,
        "truncated": truncated,
    }))
    .ok()
}
