//! Multi-row statements: placeholder lists for `VALUES (…), (…)` and
//! `IN (…)`, in chunks that stay under both backends' parameter limits, so a
//! group of messages costs one round trip per statement, not one per row.

use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, AnyConnection};

/// Most bind parameters per statement (SQLite allows 32,766, Postgres 65,535).
const MAX_PARAMS: usize = 30_000;

/// Statements with more rows than this are not kept prepared: their text
/// changes with the group size and would churn the statement cache.
const CACHED_ROWS: usize = 8;

/// How many rows of `cols` parameters fit in one statement.
pub fn rows_per_chunk(cols: usize) -> usize {
    (MAX_PARAMS / cols.max(1)).max(1)
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

/// A query whose text depends on `rows`; prepared and cached only when small.
pub fn query(sql: &str, rows: usize) -> Query<'_, Any, AnyArguments<'_>> {
    sqlx::query(sql).persistent(rows <= CACHED_ROWS)
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
    for chunk in keys.chunks(rows_per_chunk(1)) {
        let text = sql.replace("{keys}", &list(chunk.len(), leading + 1));
        let mut q = bind(query(&text, chunk.len()));
        for key in chunk {
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
        assert_eq!(rows_per_chunk(10), 3_000);
    }
}
