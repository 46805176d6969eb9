//! Where a key is in a template file: line and column for error messages,
//! from the spans `toml` keeps while parsing.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

/// One template file's text and its parsed tree with spans.
pub(crate) struct Doc<'a> {
    text: &'a str,
    root: Option<DeTable<'a>>,
}

impl<'a> Doc<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        Self {
            text,
            root: DeTable::parse(text).ok().map(|t| t.into_inner()),
        }
    }

    /// 1-based line and column of a byte offset.
    pub(crate) fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(before.chars().count(), |nl| {
            before[nl + 1..].chars().count()
        }) + 1;
        (line, column)
    }

    /// Where the value at `path` (`resources.memoryMiB`, `rootfs.files[1].src`)
    /// is, or the deepest part of the path that exists (the table a missing
    /// key belongs in).
    pub(crate) fn locate(&self, path: &str) -> Option<(usize, usize)> {
        self.span(path).map(|span| self.line_col(span.start))
    }

    fn span(&self, path: &str) -> Option<Range<usize>> {
        let mut table = self.root.as_ref()?;
        let mut found: Option<Range<usize>> = None;
        let mut segments = segments(path).into_iter().peekable();
        while let Some(Segment::Key(key)) = segments.next() {
            let Some((name, value)) = table.iter().find(|(k, _)| k.get_ref() == key) else {
                return found;
            };
            found = Some(name.span());
            let mut value: &toml::Spanned<DeValue<'a>> = value;
            while let Some(Segment::Index(i)) = segments.peek() {
                let DeValue::Array(items) = value.get_ref() else {
                    return found;
                };
                let Some(item) = items.get(*i) else {
                    return found;
                };
                found = Some(item.span());
                value = item;
                segments.next();
            }
            match value.get_ref() {
                DeValue::Table(inner) if segments.peek().is_some() => table = inner,
                _ => {
                    if segments.peek().is_none() && !matches!(value.get_ref(), DeValue::Table(_)) {
                        found = Some(value.span());
                    }
                    return found;
                }
            }
        }
        found
    }

    /// The dotted key path whose value holds `offset`, for errors `toml`
    /// reports by span (a wrong type, an unknown key).
    pub(crate) fn path_at(&self, offset: usize) -> Option<String> {
        find(self.root.as_ref()?, offset, "")
    }

    /// The keys of table `table` in the order they are written.
    pub(crate) fn key_order(&self, table: &str) -> Vec<String> {
        let Some(root) = self.root.as_ref() else {
            return Vec::new();
        };
        let Some((_, value)) = root.iter().find(|(k, _)| k.get_ref() == table) else {
            return Vec::new();
        };
        let DeValue::Table(inner) = value.get_ref() else {
            return Vec::new();
        };
        let mut keys: Vec<_> = inner
            .iter()
            .map(|(k, _)| (k.span().start, k.get_ref().to_string()))
            .collect();
        keys.sort();
        keys.into_iter().map(|(_, k)| k).collect()
    }
}

fn covers(range: &Range<usize>, offset: usize) -> bool {
    range.start <= offset && offset < range.end.max(range.start + 1)
}

fn find(table: &DeTable<'_>, offset: usize, prefix: &str) -> Option<String> {
    for (key, value) in table.iter() {
        let path = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        if covers(&key.span(), offset) {
            return Some(path);
        }
        match value.get_ref() {
            DeValue::Table(inner) => {
                if let Some(found) = find(inner, offset, &path) {
                    return Some(found);
                }
            }
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let at = format!("{path}[{i}]");
                    if let DeValue::Table(inner) = item.get_ref()
                        && let Some(found) = find(inner, offset, &at)
                    {
                        return Some(found);
                    }
                    if covers(&item.span(), offset) {
                        return Some(at);
                    }
                }
                if covers(&value.span(), offset) {
                    return Some(path);
                }
            }
            _ => {
                if covers(&value.span(), offset) {
                    return Some(path);
                }
            }
        }
    }
    None
}

enum Segment<'p> {
    Key(&'p str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        out.push(Segment::Key(key));
        while let Some((index, after)) = rest.split_once(']') {
            if let Ok(i) = index.parse() {
                out.push(Segment::Index(i));
            }
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "name = \"x\"\n[rootfs]\npip = [\"a\", \"b\"]\nfiles = [{ src = \"s\", dest = \"/d\" }]\n[resources]\nmemoryMiB = 1\n";

    #[test]
    fn locates_values_array_items_and_missing_keys_by_their_table() {
        let doc = Doc::new(TEXT);
        assert_eq!(doc.locate("name"), Some((1, 8)));
        assert_eq!(doc.locate("resources.memoryMiB"), Some((6, 13)));
        assert_eq!(doc.locate("rootfs.pip[1]"), Some((3, 13)));
        assert_eq!(doc.locate("rootfs.files[0].dest"), Some((4, 30)));
        assert_eq!(doc.locate("resources.pids"), Some((5, 2)));
        assert_eq!(doc.locate("user.uid"), None);
    }

    #[test]
    fn path_at_names_the_key_whose_value_holds_an_offset_and_key_order_is_as_written() {
        let doc = Doc::new(TEXT);
        let offset = TEXT.find("= 1").expect("value") + 2;
        assert_eq!(doc.path_at(offset).as_deref(), Some("resources.memoryMiB"));
        let offset = TEXT.find("\"/d\"").expect("dest");
        assert_eq!(doc.path_at(offset).as_deref(), Some("rootfs.files[0].dest"));
        assert_eq!(doc.key_order("rootfs"), ["pip", "files"]);
    }
}
