//! Multi-row statements: placeholder lists for `VALUES (…), (…)` and
//! `IN (…)`, so a group of messages costs one round trip per statement, not
//! one per row.
//!
//! A statement's text depends on its row count, so row counts are rounded
//! to powers of two up to [`MAX_BUCKET`]: every statement has at most seven
//! texts, and all of them stay prepared on each connection (parsed and
//! planned once, not on every call; planning was a quarter of Postgres's
//! CPU on the delivery path). `IN` lists and `UPDATE … FROM (VALUES …)` are
//! padded up to the bucket by repeating their last key or row, which
//! changes nothing; the accept's insert is padded the same way and drops
//! the repeats with `DISTINCT ON` its key (`messages::padded_insert`);
//! other inserts are split into power-of-two chunks instead.

use std::collections::HashMap;

use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, Row};

/// Most bind parameters per statement (SQLite allows 32,766, Postgres 65,535).
pub const MAX_PARAMS: usize = 30_000;

/// Most rows bound into one statement (a power of two).
pub const MAX_BUCKET: usize = 64;

/// How many rows of `cols` parameters fit in one statement: a power of two,
/// at most [`MAX_BUCKET`].
pub fn rows_per_chunk(cols: usize) -> usize {
    let fit = (MAX_PARAMS / cols.max(1)).clamp(1, MAX_BUCKET);
    1 << fit.ilog2()
}

/// `items` in chunks whose lengths are powers of two, largest first (13
/// rows of a small statement: 8, 4, 1), for statements that cannot be
/// padded (inserts).
pub fn split<T>(items: &[T], cols: usize) -> Vec<&[T]> {
    let max = rows_per_chunk(cols);
    let mut out = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let take = if rest.len() >= max {
            max
        } else {
            1 << rest.len().ilog2()
        };
        let (head, tail) = rest.split_at(take);
        out.push(head);
        rest = tail;
    }
    out
}

/// `items` in chunks of at most [`rows_per_chunk`], each with the row count
/// to bind (its length rounded up to a power of two): the caller repeats
/// the chunk's last row to fill it.
pub fn padded<T>(items: &[T], cols: usize) -> Vec<(&[T], usize)> {
    items
        .chunks(rows_per_chunk(cols))
        .map(|chunk| (chunk, chunk.len().next_power_of_two()))
        .collect()
}

/// The rows of `chunk` followed by its last row until there are `size`.
pub fn fill<T>(chunk: &[T], size: usize) -> impl Iterator<Item = &T> {
    let last = chunk.last();
    chunk
        .iter()
        .chain(std::iter::repeat_n(last, size.saturating_sub(chunk.len())).flatten())
}

/// `($first,…),(…)`: `rows` tuples of `cols` placeholders, numbered on from
/// `first`.
pub fn values(rows: usize, cols: usize, first: usize) -> String {
    let mut out = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            out.push(',');
        }
        out.push('(');
        for c in 0..cols {
            if c > 0 {
                out.push(',');
            }
            out.push('$');
            out.push_str(&(first + r * cols + c).to_string());
        }
        out.push(')');
    }
    out
}

/// `$first,…` with `n` placeholders, for `IN (…)`.
pub fn list(n: usize, first: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A query being built over the `Any` driver.
pub type AnyQuery<'q> = Query<'q, Any, AnyArguments<'q>>;

/// Runs `sql`, whose `IN (…)` list is written `{keys}`, for every key (in
/// chunks); the keys are the statement's only parameters. Returns all rows.
pub async fn select_in(
    conn: &mut AnyConnection,
    sql: &str,
    keys: &[&str],
) -> Result<Vec<AnyRow>, sqlx::Error> {
    fetch_in(conn, sql, keys, 0, |q| q).await
}

/// Like [`select_in`] for a statement that selects two columns, `k` (the
/// key) and `v`: the rows as a map from key to value.
pub async fn select_map<T>(
    conn: &mut AnyConnection,
    sql: &str,
    keys: &[&str],
) -> Result<HashMap<String, T>, sqlx::Error>
where
    T: for<'r> sqlx::Decode<'r, Any> + sqlx::Type<Any>,
{
    let rows = select_in(conn, sql, keys).await?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in rows {
        out.insert(row.try_get("k")?, row.try_get("v")?);
    }
    Ok(out)
}

/// Like [`select_in`] for a statement with `leading` parameters before the
/// keys (`$1..$leading`), bound by `bind` on every chunk.
pub async fn fetch_in(
    conn: &mut AnyConnection,
    sql: &str,
    keys: &[&str],
    leading: usize,
    bind: impl for<'a> Fn(AnyQuery<'a>) -> AnyQuery<'a>,
) -> Result<Vec<AnyRow>, sqlx::Error> {
    let mut rows = Vec::new();
    for (chunk, size) in padded(keys, 1) {
        let text = sql.replace("{keys}", &list(size, leading + 1));
        let mut q = bind(sqlx::query(&text));
        for key in fill(chunk, size) {
            q = q.bind(*key);
        }
        rows.extend(q.fetch_all(&mut *conn).await?);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_on() {
        assert_eq!(values(2, 3, 2), "($2,$3,$4),($5,$6,$7)");
        assert_eq!(list(3, 4), "$4,$5,$6");
        assert_eq!(rows_per_chunk(10), 64);
        assert_eq!(rows_per_chunk(20_000), 1);
        assert_eq!(rows_per_chunk(1_000), 16);
    }

    #[test]
    fn chunks_are_powers_of_two() {
        let items: Vec<u32> = (0..77).collect();
        let sizes: Vec<usize> = split(&items, 1).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![64, 8, 4, 1]);
        assert_eq!(split(&items, 1).concat(), items);
        assert!(split::<u32>(&[], 1).is_empty());
        let padded: Vec<(usize, usize)> = padded(&items, 1)
            .iter()
            .map(|(c, n)| (c.len(), *n))
            .collect();
        assert_eq!(padded, vec![(64, 64), (13, 16)]);
        let filled: Vec<u32> = fill(&[1, 2, 3], 4).copied().collect();
        assert_eq!(filled, vec![1, 2, 3, 3]);
        assert_eq!(fill::<u32>(&[], 2).count(), 0);
    }
}
