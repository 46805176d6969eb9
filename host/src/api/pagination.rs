//! Cursor pagination: `?limit=&cursor=`, answered with `data` and
//! `nextCursor`. A cursor is opaque to clients (base64url of the last row's
//! creation time and id).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::ApiError;
use crate::store::Cursor;

pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 200;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page size, 1..=200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<usize>,
    /// `nextCursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageQuery {
    pub fn limit(&self) -> Result<usize, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(n) => Err(ApiError::invalid(
                "limit",
                format!("limit must be between 1 and {MAX_LIMIT}, got {n}"),
            )),
        }
    }

    pub fn cursor(&self) -> Result<Option<Cursor>, ApiError> {
        let Some(text) = &self.cursor else {
            return Ok(None);
        };
        decode(text)
            .map(Some)
            .ok_or_else(|| ApiError::invalid("cursor", "cursor is not one this server issued"))
    }
}

/// One page of a list.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Page<T> {
    pub data: Vec<T>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Largest list response body, roughly: a page ends early rather than grow
/// past it (a `limit=200` page of commands with 2 MiB output tails would be
/// 800 MiB).
pub const MAX_PAGE_BYTES: usize = 8 * 1024 * 1024;

impl<T> Page<T> {
    /// Like [`Page::from_rows`], but the page also ends once the rows'
    /// `size` adds up to [`MAX_PAGE_BYTES`] (it keeps at least one row); the
    /// cursor then continues after the last row kept.
    pub fn from_rows_within<R>(
        mut rows: Vec<R>,
        limit: usize,
        size: impl Fn(&R) -> usize,
        key: impl Fn(&R) -> Cursor,
        render: impl Fn(R) -> T,
    ) -> Self {
        let mut total = 0;
        let mut keep = rows.len().min(limit);
        for (i, row) in rows.iter().take(limit).enumerate() {
            total += size(row);
            if total > MAX_PAGE_BYTES && i > 0 {
                keep = i;
                break;
            }
        }
        if keep < rows.len().min(limit) {
            // Cut by size: there is more after the last row kept.
            rows.truncate(keep + 1);
            return Self::from_rows(rows, keep, key, render);
        }
        Self::from_rows(rows, limit, key, render)
    }

    /// Builds a page from `limit + 1` fetched rows: the extra row only says
    /// that another page exists.
    pub fn from_rows<R>(
        mut rows: Vec<R>,
        limit: usize,
        key: impl Fn(&R) -> Cursor,
        render: impl Fn(R) -> T,
    ) -> Self {
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next_cursor = if more {
            rows.last().map(|r| encode(&key(r)))
        } else {
            None
        };
        Self {
            data: rows.into_iter().map(render).collect(),
            next_cursor,
        }
    }
}

fn encode(cursor: &Cursor) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}", cursor.created_at, cursor.id))
}

fn decode(text: &str) -> Option<Cursor> {
    let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (at, id) = text.split_once(':')?;
    Some(Cursor {
        created_at: at.parse().ok()?,
        id: id.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let cursor = Cursor {
            created_at: 42,
            id: "sbx_abc".into(),
        };
        assert_eq!(decode(&encode(&cursor)), Some(cursor));
        assert_eq!(decode("!!"), None);
        assert_eq!(decode(&URL_SAFE_NO_PAD.encode("nocolon")), None);
    }

    #[test]
    fn from_rows_uses_the_extra_row_only_as_a_signal() {
        let rows = vec![3, 2, 1];
        let page = Page::from_rows(
            rows,
            2,
            |n| Cursor {
                created_at: *n,
                id: n.to_string(),
            },
            |n| n,
        );
        assert_eq!(page.data, vec![3, 2]);
        assert!(page.next_cursor.is_some());
        let last = Page::from_rows(
            vec![1],
            2,
            |n| Cursor {
                created_at: *n,
                id: n.to_string(),
            },
            |n| n,
        );
        assert!(last.next_cursor.is_none());
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    fn cursor(n: &usize) -> Cursor {
        Cursor {
            created_at: *n as i64,
            id: n.to_string(),
        }
    }

    #[test]
    fn a_page_ends_early_by_size_and_its_cursor_continues_after_the_last_row() {
        let rows: Vec<usize> = (0..10).collect();
        let page = Page::from_rows_within(rows, 5, |_| MAX_PAGE_BYTES / 2, cursor, |n| n);
        assert_eq!(page.data, [0, 1]);
        assert_eq!(
            page.next_cursor.as_deref().and_then(decode),
            Some(cursor(&1))
        );
        let small = Page::from_rows_within((0..3).collect(), 5, |_| 10, cursor, |n: usize| n);
        assert_eq!(small.data, [0, 1, 2]);
        assert!(small.next_cursor.is_none());
        let huge = Page::from_rows_within(
            (0..3).collect(),
            5,
            |_| usize::MAX / 4,
            cursor,
            |n: usize| n,
        );
        assert_eq!(huge.data, [0]);
        assert!(huge.next_cursor.is_some());
    }
}
