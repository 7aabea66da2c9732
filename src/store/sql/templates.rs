//! Template version rows. Versions are numbered per (name, locale).

use async_trait::async_trait;
use sqlx::Row;

use super::{rows, to_json, SqlStore};
use crate::store::{StoreResult, TemplateStore, TemplateVersion};

impl SqlStore {
    async fn insert_template(
        &self,
        executor: &mut sqlx::AnyConnection,
        t: &TemplateVersion,
        conflict_ignore: bool,
    ) -> StoreResult<()> {
        let sql = format!(
            "INSERT INTO templates ({}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12){}",
            rows::TEMPLATE_COLUMNS,
            if conflict_ignore {
                " ON CONFLICT DO NOTHING"
            } else {
                ""
            }
        );
        sqlx::query(&sql)
            .bind(&t.name)
            .bind(&t.locale)
            .bind(t.version)
            .bind(&t.subject)
            .bind(&t.html)
            .bind(&t.text)
            .bind(to_json(&t.required))
            .bind(to_json(&t.secret))
            .bind(&t.description)
            .bind(t.priority.map(|p| p.as_str()))
            .bind(i64::from(t.builtin))
            .bind(t.created_at)
            .execute(executor)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl TemplateStore for SqlStore {
    async fn template_versions(&self, name: &str) -> StoreResult<Vec<TemplateVersion>> {
        let found = sqlx::query(&format!(
            "SELECT {} FROM templates WHERE name = $1 ORDER BY version DESC, created_at DESC",
            rows::TEMPLATE_COLUMNS
        ))
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        found.iter().map(rows::template).collect()
    }

    async fn list_templates(&self) -> StoreResult<Vec<TemplateVersion>> {
        let found = sqlx::query(&format!(
            "SELECT {} FROM templates ORDER BY name, locale, version DESC",
            rows::TEMPLATE_COLUMNS
        ))
        .fetch_all(&self.pool)
        .await?;
        found.iter().map(rows::template).collect()
    }

    async fn put_template(&self, t: &TemplateVersion) -> StoreResult<TemplateVersion> {
        // Retry on the rare race where two PUTs pick the same number.
        let mut last_error = None;
        for _ in 0..5 {
            let mut tx = self.pool.begin().await?;
            let next: i64 = sqlx::query(
                "SELECT COALESCE(MAX(version), 0) + 1 AS v FROM templates WHERE name=$1 AND locale=$2",
            )
            .bind(&t.name)
            .bind(&t.locale)
            .fetch_one(&mut *tx)
            .await?
            .try_get("v")?;
            let mut stored = t.clone();
            stored.version = next;
            match self.insert_template(&mut tx, &stored, false).await {
                Ok(()) => {
                    tx.commit().await?;
                    return Ok(stored);
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| crate::store::StoreError::Corrupt("put_template".into())))
    }

    async fn delete_template(&self, name: &str) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM templates WHERE name = $1 AND builtin = 0")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn seed_builtin(&self, t: &TemplateVersion) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await?;
        self.insert_template(&mut conn, t, true).await
    }
}
